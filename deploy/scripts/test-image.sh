#!/usr/bin/env bash
# Builds chunkd's container image (build-image.sh) and runs it as the deployment files do, with
# podman; run by deploy/scripts/test.sh (so by CI). Where podman cannot run (not root, no
# podman, a machine where `podman info` fails) it says why in one line and exits 0, except in
# CI (CI=true), where a test that did not run must not read as passed: there it fails. Only an
# explicit CHUNKD_SKIP_IMAGE_TESTS=1 skips it in CI too.
#
#   deploy/scripts/test-image.sh
#
# 1. The container as a user runs it: the image's non-root user, a read-only root filesystem, no
#    capabilities; the image's HEALTHCHECK passes; chunkctl on the host puts and gets through
#    the published port and through the UNIX socket in a volume the host shares; with a /dev/shm
#    it cannot write, chunkd serves inline (and says so) instead of failing Puts.
# 2. SIGTERM (podman stop): a Get still streaming when the signal comes finishes, and chunkd
#    exits 0 within its --shutdown_grace.
# 3. The sidecar, deploy/k8s/sidecar.yaml, through `podman kube play`: the application container
#    (the chunkd image, which has chunkctl) reads a chunk over the socket both containers mount,
#    by shared memory from the memory-backed /dev/shm volume both mount, and gets the same bytes.
#    The manifest is played as written first; podman 4.3 (Debian 12) refuses it: it knows no
#    native sidecars (init containers with restartPolicy: Always) and, as for a plain init
#    container, refuses their probes. The test then plays it with that one container moved to
#    `containers:`, everything else as written, and says so in its output.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/podman-env.sh"
root="$podman_root"
started=$(date +%s)
log() { echo "test-image [$(( $(date +%s) - started ))s]: $*" >&2; }
fail() { echo "test-image: FAILED: $*" >&2; exit 1; }

if [ -n "${CHUNKD_SKIP_IMAGE_TESTS:-}" ]; then
  echo "test-image: skipped: CHUNKD_SKIP_IMAGE_TESTS is set"; exit 0
fi
if [ "$(id -u)" = 0 ]; then
  "$here/install-deps.sh" image
fi
if why="$(podman_unusable)"; then
  if [ "${CI:-}" = true ]; then
    fail "podman cannot run containers here: $why (CI=true; CHUNKD_SKIP_IMAGE_TESTS=1 skips on purpose)"
  fi
  echo "test-image: skipped: podman cannot run containers here: $why"; exit 0
fi

chunkctl="${CHUNKCTL_BIN:-$root/build/client/chunkctl}"
[ -x "$chunkctl" ] || "$root/deploy/scripts/build.sh" chunkctl >/dev/null
python="${CHUNKD_PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || "$root/deploy/scripts/setup-venv.sh"

"$here/build-image.sh"
image="$chunkd_image"

work="$(mktemp -d /var/tmp/chunkd-image-test.XXXXXX)"
name="chunkd-test-$$"
kube="$work/sidecar.yaml"
cleanup() {
  podman rm -f -t 0 "$name" "$name-noshm" >/dev/null 2>&1 || true
  if [ -f "$kube" ]; then podman kube down "$kube" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. the container ---------------------------------------------------------------------------
mkdir -p "$work/sock" "$work/data"
chown 10001:10001 "$work/sock" "$work/data"
head -c 3M /dev/urandom > "$work/value.bin"
head -c 48M /dev/urandom > "$work/big.bin"
log "running $image: read-only root, no capabilities, port 7878 published on 127.0.0.1"
# --health-interval=disable: no systemd timer for the health check (podman wants systemd for
# those); `podman healthcheck run` below runs the image's HEALTHCHECK command itself.
podman run -d --name "$name" --health-interval=disable --read-only --cap-drop=ALL --security-opt=no-new-privileges \
  --shm-size=256m -p 127.0.0.1::7878 -v "$work/sock:/run/chunkd" -v "$work/data:/data" \
  "$image" --listen=0.0.0.0:7878,unix:/run/chunkd/chunkd.sock --store=/data \
  --host_cache_bytes=128MiB --shutdown_grace=10s > /dev/null

healthy=0
for _ in $(seq 60); do
  if podman healthcheck run "$name" > /dev/null 2>&1; then healthy=1; break; fi
  sleep 0.5
done
[ "$healthy" = 1 ] || { podman logs "$name" >&2; fail "the image's HEALTHCHECK never passed"; }
log "HEALTHCHECK passes"

uid="$(podman exec "$name" id -u)"
[ "$uid" = 10001 ] || fail "chunkd runs as uid $uid, not 10001"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name")" = true ] ||
  fail "the root filesystem is writable"
if podman exec "$name" sh -c 'echo x > /usr/local/bin/x' 2>/dev/null; then
  fail "wrote to the root filesystem"
fi
# (Output is captured before it is searched: with pipefail, grep -q closing the pipe early
# would fail the pipeline.)
version="$(podman exec "$name" chunkd --version)"
grep -q "^chunkd $chunkd_version$" <<< "$version" ||
  fail "chunkd --version in the image does not say $chunkd_version: $version"

port="$(podman port "$name" 7878/tcp | head -n 1)"
port="${port##*:}"
tcp="127.0.0.1:$port"
sock="unix:$work/sock/chunkd.sock"
log "chunkctl from the host: TCP $tcp and $sock"
"$chunkctl" --server="$tcp" put img/c/0 "$work/value.bin"
"$chunkctl" --server="$tcp" get img/c/0 -o "$work/tcp.bin"
cmp "$work/value.bin" "$work/tcp.bin" || fail "TCP: the bytes read differ from those put"
"$chunkctl" --server="$sock" get img/c/0 -o "$work/unix.bin"
cmp "$work/value.bin" "$work/unix.bin" || fail "UNIX socket: the bytes read differ"
"$chunkctl" --server="$sock" put img/c/1 "$work/big.bin"
"$chunkctl" --server="$tcp" get img/c/1 -o "$work/big-tcp.bin"
cmp "$work/big.bin" "$work/big-tcp.bin" || fail "a value put over the socket reads back differently over TCP"
[ -S "$work/sock/chunkd.sock" ] && [ "$(stat -c %u "$work/sock/chunkd.sock")" = 10001 ] ||
  fail "the socket in the shared volume is not chunkd's (uid 10001)"

# A /dev/shm that chunkd's user cannot write (a root-owned volume): shared memory is off from the
# start, said once, and values are served inline; Puts do not fail.
mkdir -p "$work/root-shm"
podman run -d --name "$name-noshm" --health-interval=disable --read-only \
  -v "$work/root-shm:/dev/shm" "$image" --listen=unix:/run/chunkd/chunkd.sock --store=memory:// \
  > /dev/null
for _ in $(seq 60); do podman exec "$name-noshm" chunkctl --server=unix:/run/chunkd/chunkd.sock health > /dev/null 2>&1 && break; sleep 0.5; done
podman exec -i "$name-noshm" chunkctl --server=unix:/run/chunkd/chunkd.sock put k - < "$work/value.bin" ||
  fail "a Put fails when /dev/shm is not writable"
noshm_log="$(podman logs "$name-noshm" 2>&1)"
grep -q "shared-memory delivery is off: shared-memory directory /dev/shm is not writable by uid 10001" <<< "$noshm_log" ||
  fail "chunkd did not say that shared memory is off: $noshm_log"
podman rm -f -t 0 "$name-noshm" > /dev/null 2>&1
log "an unwritable /dev/shm: shared memory off, said once, Puts work"

# --- 2. SIGTERM while a Get streams -------------------------------------------------------------
# A raw gRPC Get (the request is one protobuf field, key = 1) of the 48 MiB value, read slowly:
# flow control keeps the call in flight on the server until the reader takes the rest.
log "SIGTERM with a Get in flight"
cat > "$work/slow_get.py" <<'EOF'
import sys, time, grpc
target, key, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
request = b"\x0a" + bytes([len(key)]) + key
channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 8 << 20)])
call = channel.unary_stream("/chunkd.v1.Chunkd/Get", request_serializer=None,
                            response_deserializer=None)(request, timeout=60)
got = 0
for i, message in enumerate(call):
    got += len(message)
    if i == 1:
        print("in flight", flush=True)
        time.sleep(3)
print(f"received {got}", flush=True)
sys.exit(0 if got >= size else 1)
EOF
"$python" "$work/slow_get.py" "$sock" img/c/1 $((48 << 20)) > "$work/slow_get.out" 2>&1 &
reader=$!
for _ in $(seq 100); do grep -q "in flight" "$work/slow_get.out" && break; sleep 0.1; done
grep -q "in flight" "$work/slow_get.out" || fail "the slow Get did not start: $(cat "$work/slow_get.out")"
stop_start=$(date +%s%N)
podman stop -t 20 "$name" > /dev/null 2>&1
stop_ms=$(( ($(date +%s%N) - stop_start) / 1000000 ))
# The Get in flight gets its whole value; or, the one exception (known, see docs/deploy.md,
# "Shutdown, and the reads it cuts"), UNAVAILABLE when gRPC's server shutdown closes the connection while the last
# megabytes still wait for this slow reader's flow-control window: never other bytes, never a hang.
get_in_flight="completed"
if ! wait "$reader"; then
  grep -q "StatusCode.UNAVAILABLE" "$work/slow_get.out" ||
    fail "the Get in flight did not complete after SIGTERM: $(cat "$work/slow_get.out")"
  get_in_flight="cut short by the connection's close (UNAVAILABLE), known gRPC shutdown behaviour"
  log "SIGTERM: the Get in flight was $get_in_flight"
fi
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
podman logs "$name" > "$work/chunkd.log" 2>&1
[ "$exit_code" = 0 ] || { cat "$work/chunkd.log" >&2; fail "chunkd exited $exit_code after SIGTERM"; }
grep -q "received Terminated: finishing calls in flight" "$work/chunkd.log" ||
  fail "chunkd's log does not say it drained: $(tail -n 3 "$work/chunkd.log")"
# Within the grace (10 s) and the time podman and the exit take (a loaded machine: seconds).
[ "$stop_ms" -lt 15000 ] || fail "stopping took ${stop_ms} ms, more than --shutdown_grace=10s and 5 s"
log "SIGTERM: the Get in flight $get_in_flight, chunkd exited 0 ${stop_ms} ms after the signal"
podman rm "$name" > /dev/null 2>&1

# --- 3. the sidecar pod -------------------------------------------------------------------------
# The manifest with the image by the name this script built and names of the test's own: podman
# 4.3 makes each emptyDir a named volume of the same name ("data", "shm"), which kube down
# removes, so the test's names keep anyone else's volumes (and pods) out of it. First as written;
# where podman refuses the native sidecar, with that container moved to containers: (see above).
cat > "$work/manifest.py" <<'EOF'
import sys, yaml
source, target, image, prefix, move = sys.argv[1:]
docs = list(yaml.safe_load_all(open(source)))
docs[0]["metadata"]["name"] = prefix + docs[0]["metadata"]["name"]
pod = docs[0]["spec"]["template"]["spec"]
if move == "move":
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert sidecars, "the manifest has no native sidecar to move"
    for c in sidecars:
        pod["initContainers"].remove(c)
        del c["restartPolicy"]
        pod["containers"].insert(0, c)
    if not pod["initContainers"]:
        del pod["initContainers"]
for c in pod.get("initContainers", []) + pod["containers"]:
    if c["image"].split(":")[0] == "chunkd":
        c["image"] = image
    for m in c.get("volumeMounts", []):
        m["name"] = prefix + m["name"]
for v in pod["volumes"]:
    v["name"] = prefix + v["name"]
yaml.safe_dump_all(docs, open(target, "w"), sort_keys=False)
EOF
# (podman's stderr has "unable to get systemd connection" lines for the probes' timers: there is
# no systemd here; the probes are not what this checks.)
"$python" "$work/manifest.py" "$root/deploy/k8s/sidecar.yaml" "$kube" "$image" "$name-" keep
if timeout 120 podman kube play "$kube" > "$work/kube-play.log" 2>&1; then
  log "podman kube play deploy/k8s/sidecar.yaml: accepted as written"
else
  refusal="$(grep -v 'systemd connection' "$work/kube-play.log" | tail -n 1)"
  podman kube down "$kube" > /dev/null 2>&1 || true
  log "podman kube play refuses deploy/k8s/sidecar.yaml as written ($refusal);" \
    "playing it with the chunkd sidecar moved from initContainers to containers"
  "$python" "$work/manifest.py" "$root/deploy/k8s/sidecar.yaml" "$kube" "$image" "$name-" move
  podman kube play "$kube" > "$work/kube-play.log" 2>&1 || { cat "$work/kube-play.log" >&2; fail "kube play"; }
fi
pod="$(podman pod ps --format '{{.Name}}' | grep "^$name-zarr-app" | head -n 1)"
[ -n "$pod" ] || fail "kube play made no zarr-app pod: $(cat "$work/kube-play.log")"
server="$(podman ps --filter "pod=$pod" --format '{{.Names}}' | grep -- '-chunkd$')"
app="$(podman ps --filter "pod=$pod" --format '{{.Names}}' | grep -- '-app$')"
ready=0
for _ in $(seq 60); do
  if podman exec "$app" chunkctl health > /dev/null 2>&1; then ready=1; break; fi
  sleep 0.5
done
[ "$ready" = 1 ] || { podman logs "$server" >&2; fail "the app container cannot reach chunkd over the socket"; }
for c in "$server" "$app"; do
  [ "$(podman exec "$c" id -u)" = 10001 ] || fail "$c does not run as uid 10001"
  [ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$c")" = true ] ||
    fail "$c has a writable root filesystem"
done
# The same /dev/shm in both (what the server checks before it hands out handles).
[ "$(podman exec "$server" stat -c %d:%i /dev/shm)" = "$(podman exec "$app" stat -c %d:%i /dev/shm)" ] ||
  fail "the two containers do not share /dev/shm"
podman exec -i "$app" chunkctl put pod/c/0 - < "$work/value.bin"
podman exec "$app" chunkctl get pod/c/0 --delivery=shm -v > "$work/pod.bin" 2> "$work/pod.err"
cmp "$work/value.bin" "$work/pod.bin" || fail "the app read different bytes through shared memory"
grep -q "delivery DELIVERY_SHM" "$work/pod.err" ||
  fail "the app did not get the chunk by shared memory: $(cat "$work/pod.err")"
log "sidecar: the app read 3 MiB by DELIVERY_SHM over the pod's socket, same bytes"
podman kube down "$kube" > /dev/null 2>&1

log "passed: image $image, $(( $(podman image inspect --format '{{.Size}}' "$image") / 1000000 )) MB"
