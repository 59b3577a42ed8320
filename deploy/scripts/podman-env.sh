# Sourced by build-image.sh and test-image.sh: podman's settings for this project, the image's
# name, and one answer to "can podman build and run containers here?".
#
# podman (with runc, from Debian's packages: install-deps.sh image) builds and runs the
# Dockerfile without a Docker engine. deploy/podman/containers.conf holds the settings a plain
# Debian 12 VM needs (runc, cgroupfs, no default ulimits, netavark); a CONTAINERS_CONF of your own
# wins.
podman_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$podman_root/deploy/podman/containers.conf}"

# The project version (CMake's project(... VERSION)) tags the image, as the manifests expect.
chunkd_version="$(sed -n 's/^project(chunkd VERSION \([0-9.]*\).*/\1/p' "$podman_root/CMakeLists.txt")"
chunkd_image="${CHUNKD_IMAGE:-localhost/chunkd:$chunkd_version}"
# The base images made from Debian's packages (debootstrap), for registry-less machines.
base_build_image="localhost/chunkd-debian:12"
base_runtime_image="localhost/chunkd-debian:12-slim"

# podman_unusable: prints why podman cannot build and run containers here and returns 0, or
# prints nothing and returns 1 when it can.
podman_unusable() {
  if [ -n "${CHUNKD_SKIP_IMAGE_TESTS:-}" ]; then
    echo "CHUNKD_SKIP_IMAGE_TESTS is set"
  elif ! command -v podman >/dev/null; then
    echo "podman is not installed (deploy/scripts/install-deps.sh image installs it)"
  elif [ "$(id -u)" != 0 ]; then
    # The base image needs debootstrap (root) and the tests bind-mount root-owned paths.
    echo "not root: the image tests run rootful podman"
  elif ! podman_error="$(podman info 2>&1 >/dev/null)"; then
    echo "podman info fails: $(printf '%s' "$podman_error" | tail -n 1)"
  else
    return 1
  fi
  return 0
}
