#!/usr/bin/env bash
# Builds the chunkd container image from the Dockerfile with podman, from Debian's packages
# alone: no Docker engine and no image registry needed.
#
#   deploy/scripts/build-image.sh [--refresh-base]
#
# 1. The base images (kept in podman's image store; made again when their recipe below changes):
#    debootstrap --variant=minbase bookworm, imported as localhost/chunkd-debian:12 (the build
#    stage) and, with documentation, manuals and translations removed as in Docker's
#    debian:12-slim, as localhost/chunkd-debian:12-slim (the runtime stage). --refresh-base makes
#    them again (for Debian's updates; the build's apt-get installs current packages anyway).
# 2. podman build of the Dockerfile, unchanged, with those two as BUILD_IMAGE and BASE_IMAGE, in
#    docker format (the OCI format has no HEALTHCHECK). Layers are cached: the dependency layers
#    are reused until install-deps.sh changes, and the compile step keeps its ccache in a build
#    cache mount, so a rebuild after a source change recompiles only what changed.
# 3. Prints the image's name and size.
#
# Docker users need none of this: docker build -t chunkd:VERSION . (deploy/README.md).
# Environment: CHUNKD_IMAGE (the tag, default localhost/chunkd:VERSION), CHUNKD_DEBIAN_MIRROR
# (default http://deb.debian.org/debian), CONTAINERS_CONF (see podman-env.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/podman-env.sh"
root="$podman_root"

refresh=0
case "${1:-}" in
  --refresh-base) refresh=1 ;;
  "") ;;
  *) echo "usage: $0 [--refresh-base]" >&2; exit 2 ;;
esac

"$here/install-deps.sh" image
if why="$(podman_unusable)"; then
  echo "build-image: podman cannot build here: $why" >&2
  exit 1
fi

make_base_images() {
  local mirror="${CHUNKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  local work
  work="$(mktemp -d /var/tmp/chunkd-rootfs.XXXXXX)"
  trap 'rm -rf "$work"' RETURN
  echo "build-image: making the base images from Debian bookworm (debootstrap, about 2 minutes)"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    echo "build-image: debootstrap failed (log above)" >&2
    return 1
  }
  # The sources Docker's debian:12 has: the release, its updates and security updates.
  rm -f "$work/rootfs/etc/apt/sources.list"
  cat > "$work/rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # apt's settings of Docker's debian:12 images: no package caches or downloaded packages left
  # in image layers (pkgcache.bin and srcpkgcache.bin alone are 90 MB), no translations.
  cat > "$work/rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' > "$work/rootfs/etc/apt/apt.conf.d/docker-no-languages"
  # /dev/shm as every system has it (debootstrap leaves 0755). Docker and podman mount a tmpfs
  # there, but podman gives a new volume mounted there (an emptyDir in `podman kube play`) the
  # mode of the image's directory: 1777, like the 0777 Kubernetes gives an emptyDir.
  chmod 1777 "$work/rootfs/dev/shm"
  rm -rf "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb \
    "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/log/"*.log
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["bash"]' \
    --change "LABEL chunkd.base-recipe=$recipe" - "$base_build_image" >/dev/null
  # The slim variant: what debian:12-slim leaves out, and dpkg told to keep leaving it out.
  mkdir -p "$work/rootfs/etc/dpkg/dpkg.cfg.d"
  cat > "$work/rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  find "$work/rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/info/"* \
    "$work/rootfs/usr/share/locale/"* "$work/rootfs/usr/share/lintian/"*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["bash"]' \
    --change "LABEL chunkd.base-recipe=$recipe" - "$base_runtime_image" >/dev/null
  echo "build-image: made $base_build_image and $base_runtime_image"
}

# The base images are remade when this recipe (make_base_images) changes, or on --refresh-base.
recipe="$(declare -f make_base_images | sha256sum | cut -c 1-16)"
current() {
  [ "$(podman image inspect --format '{{index .Labels "chunkd.base-recipe"}}' "$1" 2>/dev/null)" = "$recipe" ]
}
if [ "$refresh" = 1 ] || ! current "$base_build_image" || ! current "$base_runtime_image"; then
  make_base_images
fi

start=$(date +%s)
echo "build-image: building $chunkd_image from the Dockerfile (podman build)"
podman build --isolation=chroot --format docker --layers \
  --build-arg BUILD_IMAGE="$base_build_image" --build-arg BASE_IMAGE="$base_runtime_image" \
  -t "$chunkd_image" -f "$root/Dockerfile" "$root"
size="$(podman image inspect --format '{{.Size}}' "$chunkd_image")"
echo "build-image: built $chunkd_image in $(( $(date +%s) - start ))s; size $(( size / 1000000 )) MB ($size bytes)"
