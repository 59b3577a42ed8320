#!/usr/bin/env bash
# Installs everything chunkd needs to build, test and benchmark on Debian 12, idempotently.
# Used by the README's two commands, by .ci/run and by the Dockerfile.
#
#   deploy/scripts/install-deps.sh [build|python|runtime|all|image|wait-lock]
#
#   build      compilers, gRPC/protobuf/Abseil dev packages (default)
#   python     what `pip install ./python` needs to build the native module and both binaries
#              (build, less the test libraries) and python3-venv, python3-dev: the README's
#              first hour for Python users, without the test environment
#   all        build + test/bench peers (redis, nginx, openssl), clang for the sanitizer and
#              fuzz builds, and the Python virtual environment
#   runtime    only the shared libraries the chunkd binary links (for slim images)
#   image      podman, runc and debootstrap: build and test the container image without Docker
#              (deploy/scripts/build-image.sh, test-image.sh)
#   wait-lock  only wait until no other package manager holds dpkg's or apt's locks
#
# When another apt-get or dpkg holds their locks (unattended-upgrades does on a fresh VM), this
# waits for them, saying so, up to CHUNKD_APT_LOCK_WAIT seconds (default 600), instead of failing.
set -euo pipefail

mode="${1:-build}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

runtime_pkgs=(libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libcurl4 libpugixml1v5 libcpp-httplib0.11 ca-certificates)
build_pkgs=(build-essential cmake ninja-build pkg-config git ccache
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libcurl4-openssl-dev libpugixml-dev libcpp-httplib-dev libssl-dev)
test_pkgs=(redis-server libhiredis-dev nginx-light openssl procps iproute2
  liburing-dev                          # io_uring beside pread in chunkd_disk_tier_bench
  python3 python3-venv python3-dev
  clang-14 libclang-rt-14-dev llvm-14   # sanitizer builds and libFuzzer (sanitize.sh, fuzz.sh)
  clang-format-14)                      # the C++ formatting check (check-format.sh)
# Rootful podman with Debian's runc (podman's default, crun, fails on some VMs' cgroups; see
# deploy/podman/containers.conf), catatonit (the pause process of pods: podman kube play), its
# netavark network stack with iptables for published ports, and debootstrap for base images
# where no registry is reachable.
# `pip install ./python` (python/setup.py drives the CMake build with the tests off).
python_pkgs=(build-essential cmake ninja-build pkg-config ccache
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libabsl-dev
  libcurl4-openssl-dev libpugixml-dev libcpp-httplib-dev libssl-dev
  python3 python3-venv python3-dev)
image_pkgs=(podman runc catatonit netavark aardvark-dns iptables debootstrap debian-archive-keyring)

case "$mode" in
  runtime) pkgs=("${runtime_pkgs[@]}") ;;
  build) pkgs=("${build_pkgs[@]}") ;;
  python) pkgs=("${python_pkgs[@]}") ;;
  all) pkgs=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  image) pkgs=("${image_pkgs[@]}") ;;
  wait-lock) pkgs=() ;;
  *) echo "usage: $0 [build|python|runtime|all|image|wait-lock]" >&2; exit 2 ;;
esac

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

# The locks apt-get and dpkg take (fcntl locks: they show in /proc/locks, which needs no tool).
read -r -a apt_locks <<< "${CHUNKD_APT_LOCK_FILES:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}"
lock_wait="${CHUNKD_APT_LOCK_WAIT:-600}"

# Prints "PID (COMMAND)" of a process that holds one of the locks; nothing when none does.
lock_holder() {
  local f dev id
  for f in "${apt_locks[@]}"; do
    [ -e "$f" ] || continue
    # /proc/locks names a file as MAJOR:MINOR:INODE of its filesystem, in hex, hex, decimal.
    dev="$(stat -c %d "$f")"
    id="$(printf '%02x:%02x:%s' $(( (dev >> 8) & 0xfff )) $(( (dev & 0xff) | ((dev >> 12) & 0xfff00) )) \
      "$(stat -c %i "$f")")"
    awk -v id="$id" '$2 != "->" && $6 == id {
        pid = $5; cmd = ""
        if ((getline cmd < ("/proc/" pid "/comm")) <= 0) cmd = "?"
        print pid " (" cmd ")"; found = 1; exit
      } END { exit !found }' /proc/locks && return 0
  done
  return 0
}

wait_for_apt_locks() {
  local waited=0 holder
  while holder="$(lock_holder)"; [ -n "$holder" ]; do
    if [ "$waited" -ge "$lock_wait" ]; then
      echo "install-deps: another package manager still holds the dpkg/apt lock after ${lock_wait}s (process $holder); try again when it has finished" >&2
      return 1
    fi
    if [ $(( waited % 30 )) = 0 ]; then
      echo "install-deps: waiting for another package manager to finish (process $holder holds the dpkg/apt lock; waited ${waited}s of ${lock_wait}s)" >&2
    fi
    sleep 1
    waited=$(( waited + 1 ))
  done
}

if [ "$mode" = wait-lock ]; then
  wait_for_apt_locks
  exit 0
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  wait_for_apt_locks
  # Lock::Timeout covers a package manager that starts between the wait and apt-get.
  $sudo apt-get -o DPkg::Lock::Timeout="$lock_wait" update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout="$lock_wait" \
    install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "$mode" = all ]; then
  "$here/setup-venv.sh"
fi
