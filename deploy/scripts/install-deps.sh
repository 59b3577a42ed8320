#!/usr/bin/env bash
# Installs everything chunkd needs to build, test and benchmark on Debian 12, idempotently.
# Used by the README's two commands, by .ci/run and by the Dockerfile.
#
#   deploy/scripts/install-deps.sh [build|runtime|all]
#
#   build    compilers, gRPC/protobuf/Abseil dev packages (default)
#   all      build + test/bench peers (redis, nginx, openssl), clang for the sanitizer and fuzz
#            builds, and the Python virtual environment
#   runtime  only the shared libraries the chunkd binary links (for slim images)
set -euo pipefail

mode="${1:-build}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

runtime_pkgs=(libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libcurl4 libpugixml1v5 libcpp-httplib0.11 ca-certificates)
build_pkgs=(build-essential cmake ninja-build pkg-config git ccache
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libcurl4-openssl-dev libpugixml-dev libcpp-httplib-dev libssl-dev)
test_pkgs=(redis-server libhiredis-dev nginx-light openssl procps
  python3 python3-venv python3-dev
  clang-14 libclang-rt-14-dev llvm-14)  # sanitizer builds and libFuzzer (sanitize.sh, fuzz.sh)

case "$mode" in
  runtime) pkgs=("${runtime_pkgs[@]}") ;;
  build) pkgs=("${build_pkgs[@]}") ;;
  all) pkgs=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "usage: $0 [build|runtime|all]" >&2; exit 2 ;;
esac

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "$mode" = all ]; then
  "$here/setup-venv.sh"
fi
