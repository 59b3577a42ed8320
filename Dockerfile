# syntax=docker/dockerfile:1
#
# chunkd container image: a build stage that compiles chunkd and chunkctl with the same install
# script as a developer machine, and a slim runtime stage with only their shared libraries.
#
#   docker build -t chunkd:0.1.0 .
#   deploy/scripts/build-image.sh        (no Docker: podman, with base images from debootstrap)
#   docker run --rm --shm-size=5g -p 127.0.0.1:7878:7878 -v chunkd-data:/data chunkd:0.1.0 \
#     --listen=0.0.0.0:7878 --store=/data --host_cache_bytes=4GiB
#
# The cache lives in shared-memory segments under /dev/shm (--shm_dir): Docker's default
# /dev/shm is 64 MiB, so give --shm-size above --host_cache_bytes.
# Arguments given after the image name replace CMD (the defaults below) entirely, so repeat
# --listen and --store when you pass your own flags.
#
# GPU (CUDA IPC) images: set BASE_IMAGE to an NVIDIA CUDA runtime image and BUILD_IMAGE to the
# -devel image of the SAME distribution release, e.g.
#   --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
#   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
# The two stages must share a distribution (the binary links that release's glibc, gRPC and
# protobuf), and deploy/scripts/install-deps.sh installs Debian 12 package names: on another
# distribution the names differ (Ubuntu 24.04 has libgrpc++1.51t64, libprotobuf32t64,
# libabsl20220623t64, ...), so the script must learn that distribution first. NVIDIA publishes no
# Debian CUDA images. The build finds the CUDA toolkit in the -devel image and enables the device
# tier; without a GPU at run time chunkd runs host-only.
ARG BUILD_IMAGE=debian:12
ARG BASE_IMAGE=debian:12-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# The install script alone first, so that the dependency layer is cached across source edits.
COPY deploy/scripts/install-deps.sh deploy/scripts/install-deps.sh
RUN bash deploy/scripts/install-deps.sh build && rm -rf /var/lib/apt/lists/*
COPY . .
# The compiler cache lives in a build cache mount (BuildKit and podman/buildah): a rebuild after a
# source edit recompiles only what changed.
RUN --mount=type=cache,target=/var/cache/ccache \
    export CCACHE_DIR=/var/cache/ccache CCACHE_BASEDIR=/src \
 && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCHUNKD_BUILD_TESTS=OFF -DCHUNKD_BUILD_BENCH=OFF -DCHUNKD_BUILD_PYTHON=OFF \
      -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache \
 && ninja -C build chunkd chunkctl \
 && strip build/server/chunkd build/client/chunkctl

FROM ${BASE_IMAGE} AS runtime
COPY deploy/scripts/install-deps.sh /tmp/install-deps.sh
RUN bash /tmp/install-deps.sh runtime && rm -rf /var/lib/apt/lists/* /tmp/install-deps.sh
# A fixed non-root uid/gid (10001) so that volumes, Kubernetes securityContext (runAsUser,
# fsGroup) and clients that share the UNIX socket can all name it.
RUN groupadd --system --gid 10001 chunkd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin chunkd \
 && install -d -o 10001 -g 10001 -m 0750 /data \
 && install -d -o 10001 -g 10001 -m 0755 /run/chunkd
COPY --from=build /src/build/server/chunkd /src/build/client/chunkctl /usr/local/bin/
LABEL org.opencontainers.image.title="chunkd" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="gRPC server that caches Zarr chunk buffers"
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# gRPC (TCP). A UNIX socket goes in /run/chunkd (--listen=unix:/run/chunkd/chunkd.sock).
# Later: --metrics_listen for Prometheus gets its own EXPOSE.
EXPOSE 7878
# Docker has no native gRPC health check and Debian packages no grpc_health_probe: chunkctl asks
# the standard gRPC health service and exits 0 only when it answers SERVING (it needs no token,
# so it works with --auth_tokens). It probes the TCP port of the default --listen; if you serve
# only on a UNIX socket, override it
# (--health-cmd "chunkctl --server=unix:/run/chunkd/chunkd.sock health") or disable it; with
# --tls_cert, add --tls_ca=<the CA> (or --tls_server_name) to it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["chunkctl", "--server=127.0.0.1:7878", "--timeout=2s", "health"]
# SIGTERM (docker stop) lets calls in flight finish for --shutdown_grace (10s): give docker stop
# a longer timeout (docker stop -t 15, compose stop_grace_period) so it does not SIGKILL first.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chunkd"]
# Listen on all interfaces inside the container, without authentication unless you add it
# (--auth_tokens=FILE, --tls_cert/--tls_key[/--tls_client_ca] with the files on a volume or as
# secrets): publish the port on a trusted network only (docker run -p 127.0.0.1:7878:7878).
CMD ["--listen=0.0.0.0:7878", "--store=/data"]
