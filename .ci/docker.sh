#!/usr/bin/env bash
# CI: the container image, with no image registry reachable.
#
#  1. compiles the static binary on the host (glibc linked in, crt-static);
#  2. starts a private dockerd (own data root, exec root, socket, pidfile;
#     no iptables, no bridge) and stops it at the end, also on failure;
#  3. checks that the repo's .dockerignore gives the builder stage what it
#     needs and leaves target/, fuzz/, .git and bench results out;
#  4. builds the image with `docker build --target runtime-prebuilt` (FROM
#     scratch, so nothing is pulled) and prints its size;
#  5. runs it as an arbitrary UID (4242) on a read-only root filesystem with
#     host networking and a test config on free loopback ports, proxying to
#     a tiny upstream on the host; checks /ready, /metrics, one proxied
#     request, the access log on stdout and a graceful stop.
#
# Runs as root on a fresh Debian bookworm machine. Every wait is a poll
# with a deadline. Leaves nothing running; removes its temp dir. The binary
# goes to target/static (or $CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

TARGET=x86_64-unknown-linux-gnu
[ "$(uname -m)" = x86_64 ] || { echo "docker.sh: needs an x86_64 host" >&2; exit 1; }

log() { printf '\n==> %s\n' "$*"; }
die() { echo "docker.sh: FAIL: $*" >&2; exit 1; }

# wait_until WHAT SECONDS CMD...: run CMD (quiet by itself) until it
# succeeds; fail at the deadline.
wait_until() {
  local what=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
    sleep 0.1
  done
}

# alive PID: the process exists and is not a zombie.
alive() {
  local state=
  [ -r "/proc/$1/stat" ] || return 1
  read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 1
  [ "$state" != Z ]
}

# stop_pid PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL.
stop_pid() {
  local pid=$1 secs=$2
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  local deadline=$((SECONDS + secs))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    echo "docker.sh: pid $pid ignored SIGTERM for ${secs}s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# --- tools -----------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v curl >/dev/null || need+=(curl)
command -v file >/dev/null || need+=(file)
command -v strip >/dev/null || need+=(binutils)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  # Keep the package scripts from starting the system's docker/containerd
  # services: this script runs its own daemon and must leave nothing behind.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  # apparmor only where the kernel enforces it (dockerd then needs
  # apparmor_parser); no other recommends (needrestart restarts services).
  if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then
    need+=(apparmor)
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >/dev/null
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# --- temp dir and cleanup ----------------------------------------------------
WORK=$(mktemp -d /tmp/outrigger-docker.XXXXXX)
# containerd's shims put their sockets in /run/containerd/s whatever the
# daemon's roots; remove those directories at the end if this run made them.
had_run_containerd=
[ ! -e /run/containerd ] || had_run_containerd=1
SOCK=$WORK/docker.sock
DOCKERD_PID=
UPSTREAM_PID=
CONTAINER=outrigger-ci-$$
IMAGE=outrigger-ci:$$

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$DOCKERD_PID" ] && alive "$DOCKERD_PID"; then
    docker rm -f "$CONTAINER" >/dev/null 2>&1
    docker rm -f "$CONTAINER-ctx" >/dev/null 2>&1
  fi
  [ -z "$UPSTREAM_PID" ] || stop_pid "$UPSTREAM_PID" 5
  if [ "$rc" -ne 0 ] && [ -s "$WORK/dockerd.log" ]; then
    echo "--- dockerd.log: last errors" >&2
    grep -E 'level=(error|fatal)' "$WORK/dockerd.log" | tail -n 10 >&2
  fi
  if [ -n "$DOCKERD_PID" ]; then
    # dockerd stops the containerd it started; kill that one too if dockerd
    # had to be killed.
    local cpid
    cpid=$(cat "$WORK/exec/containerd/containerd.pid" 2>/dev/null)
    stop_pid "$DOCKERD_PID" 30
    [ -z "$cpid" ] || stop_pid "$cpid" 10
  fi
  # Mounts left by a killed daemon would make rm fail.
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
  [ -n "$had_run_containerd" ] || rmdir /run/containerd/s /run/containerd 2>/dev/null
  rm -rf "$WORK"
  if [ "$rc" -eq 0 ]; then echo "docker.sh: OK"; else echo "docker.sh: failed ($rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. static binary --------------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target/static}
# --target is what makes crt-static work: RUSTFLAGS then reach only the
# target, not proc-macros and build scripts, which must stay dynamic.
# STATIC_BUILD=quick (what CI uses) keeps the release profile's paths but
# builds unoptimised, without its fat LTO: this step checks the packaging,
# not the speed, and the whole-program build took 16 of CI's minutes on 2
# cores (~4 this way). The default builds the binary that ships.
if [ "${STATIC_BUILD:-release}" = quick ]; then
  # Its own target dir: this binary must never be the one
  # target/static/.../release/outrigger that .dockerignore lets in.
  TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target/static-quick}
  export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=false
fi
log "building the static binary ($TARGET, ${STATIC_BUILD:-release}, target dir $TARGET_DIR)"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --bin outrigger --target "$TARGET" --target-dir "$TARGET_DIR"
BIN=$TARGET_DIR/$TARGET/release/outrigger
file -L "$BIN"
ldd "$BIN" 2>&1 | sed 's/^/ldd: /' || true
file -L "$BIN" | grep -Eq 'static(-pie)? linked|statically linked' || die "$BIN is not static"
ldd "$BIN" 2>&1 | grep -Eq 'not a dynamic executable|statically linked' || die "ldd lists libraries for $BIN"
VERSION=$("$BIN" --version | awk '{ print $2 }')
echo "version: $VERSION"

# --- 2. a private dockerd ----------------------------------------------------
log "starting dockerd on $SOCK"
mkdir -p "$WORK/root" "$WORK/exec" "$WORK/client"
echo '{}' >"$WORK/daemon.json" # not /etc/docker/daemon.json
dockerd \
  --config-file "$WORK/daemon.json" \
  --data-root "$WORK/root" \
  --exec-root "$WORK/exec" \
  --pidfile "$WORK/dockerd.pid" \
  --host "unix://$SOCK" \
  --iptables=false --ip6tables=false --bridge=none \
  --containerd-namespace outrigger-ci \
  --containerd-plugins-namespace outrigger-ci-plugins \
  >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$SOCK DOCKER_CONFIG=$WORK/client
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
# The classic builder is in every dockerd and needs no buildx plugin; the
# Dockerfile is written for it (see its header).
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
dockerd_up() {
  alive "$DOCKERD_PID" || { tail -n 30 "$WORK/dockerd.log" >&2; die "dockerd exited"; }
  docker version >/dev/null 2>&1
}
wait_until dockerd 60 dockerd_up
docker version --format 'client {{.Client.Version}}, daemon {{.Server.Version}}'
docker info --format 'storage driver: {{.Driver}}, cgroup {{.CgroupVersion}}'

# --- 3. the repo's build context ----------------------------------------------
log "checking the repo's build context (.dockerignore)"
# A throwaway image that copies the whole context: what `docker build .`
# would send, without the Rust image. Export it and list the files.
printf 'FROM scratch\nCOPY . /ctx/\n' |
  docker build -q -f - -t outrigger-ci-ctx:$$ "$REPO" >/dev/null
docker create --name "$CONTAINER-ctx" outrigger-ci-ctx:$$ /none >/dev/null
docker export "$CONTAINER-ctx" | tar -tv >"$WORK/context-long.txt"
docker rm "$CONTAINER-ctx" >/dev/null
awk '{ print $6 }' "$WORK/context-long.txt" | sed -n 's,^ctx/,,p' | grep -v '/$' | sort >"$WORK/context.txt"
# The size of the sources: a prebuilt binary the allow-list lets in (with
# its line tables, ~100 MB) is what the prebuilt stage is for, not bloat.
ctx_kib=$(awk '$6 ~ /^ctx\// && $6 !~ /^ctx\/target\// { s += $3 } END { printf "%d", s / 1024 }' "$WORK/context-long.txt")
docker rmi outrigger-ci-ctx:$$ >/dev/null
echo "context: $(wc -l <"$WORK/context.txt") files, $ctx_kib KiB"
for f in Cargo.toml Cargo.lock src/main.rs src/lib.rs config/sidecar.yaml config/gateway.yaml \
  config/demo.yaml charts/outrigger/crds/outrigger.io.yaml; do
  grep -qx "$f" "$WORK/context.txt" || die "the build context lacks $f"
done
# Every [[bench]] in Cargo.toml: cargo will not load the manifest without it.
for b in $(sed -n '/^\[\[bench\]\]/,/^name/ s/^name *= *"\(.*\)"/\1/p' Cargo.toml); do
  grep -qx "benches/$b.rs" "$WORK/context.txt" || die "the build context lacks benches/$b.rs"
done
# Every file src/ include_str!()s or include_bytes!()s outside its tests
# (the text before a file's first #[cfg(test)]).
python3 - "$WORK/context.txt" <<'EOF' || die "the build context lacks files src/ includes (above)"
import os, re, sys
ctx = set(open(sys.argv[1]).read().split())
missing = []
for root, _, files in os.walk("src"):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(root, f)
        text = open(path, encoding="utf-8").read().split("#[cfg(test)]")[0]
        for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text):
            want = os.path.normpath(os.path.join(root, m.group(1)))
            if want not in ctx:
                missing.append(f"{path} includes {want}")
print("\n".join(missing) or "src/ includes: all in the context")
sys.exit(1 if missing else 0)
EOF
if grep -E '^(\.git|fuzz|benches/results|tests)/|^target/.*/(deps|build|incremental)/' "$WORK/context.txt" | head -5; then
  die "the build context holds files it should not (above)"
fi
((ctx_kib < 20480)) || die "the build context is ${ctx_kib} KiB"

# --- 4. the image from the prebuilt binary -------------------------------------
log "building the image (--target runtime-prebuilt, FROM scratch)"
# A context of exactly what the runtime-prebuilt stage copies, at the paths
# the repo's .dockerignore lets through: works wherever CARGO_TARGET_DIR
# points, and fixes the modes (the image must work under any UID whatever
# the checkout's umask).
CTX=$WORK/context
PREBUILT=target/static/$TARGET/release/outrigger
install -D -m 0644 Dockerfile "$CTX/Dockerfile"
install -D -m 0644 .dockerignore "$CTX/.dockerignore"
install -D -m 0644 -t "$CTX/config" config/sidecar.yaml config/gateway.yaml
mkdir -p "$(dirname "$CTX/$PREBUILT")"
# Line tables out (the release profile keeps them: ~100 MB), symbols kept.
strip --strip-debug -o "$CTX/$PREBUILT" "$BIN"
chmod 0755 "$CTX/$PREBUILT"
source_args=()
origin=$(git config --get remote.origin.url 2>/dev/null || true)
[ -z "$origin" ] || source_args=(--build-arg "SOURCE=$origin")
docker build --target runtime-prebuilt \
  --build-arg "PREBUILT=$PREBUILT" --build-arg "VERSION=$VERSION" "${source_args[@]}" \
  -t "$IMAGE" "$CTX"
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
awk -v s="$size" 'BEGIN { printf "image size: %.1f MiB (%d bytes)\n", s / 1048576, s }'
docker image inspect --format 'user: {{.Config.User}}
entrypoint: {{json .Config.Entrypoint}}
cmd: {{json .Config.Cmd}}
ports: {{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}
labels: {{json .Config.Labels}}' "$IMAGE"
[ "$(docker image inspect --format '{{.Config.User}}' "$IMAGE")" = 1337:1337 ] || die "image user is not 1337:1337"

log "image: no shell, configs readable by any UID"
# `docker run` prints its own error when the entrypoint is missing.
if docker run --rm --network none --entrypoint /bin/sh "$IMAGE" -c true >/dev/null 2>&1; then
  die "the image has a shell"
fi
docker run --rm --network none "$IMAGE" --version
for c in sidecar gateway; do
  docker run --rm --network none --read-only --user 4242:4242 "$IMAGE" \
    validate "/etc/outrigger/$c.yaml"
done

# --- 5. run it -------------------------------------------------------------------
log "running the image as UID 4242 on a read-only root filesystem"
# Free loopback ports: upstream, outbound listener, admin, probes.
read -r UP_PORT OUT_PORT ADMIN_PORT PROBE_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
echo "ports: upstream $UP_PORT, outbound $OUT_PORT, admin $ADMIN_PORT, probes $PROBE_PORT"

# The upstream: a static file server on the host.
TOKEN="upstream-says-$$-$RANDOM"
mkdir -p "$WORK/upstream"
echo "$TOKEN" >"$WORK/upstream/hello.txt"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/upstream" "$UP_PORT" \
  >"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
upstream_up() {
  alive "$UPSTREAM_PID" || { cat "$WORK/upstream.log" >&2; die "the upstream exited"; }
  curl -fs -o /dev/null "http://127.0.0.1:$UP_PORT/hello.txt"
}
wait_until "the upstream" 20 upstream_up

# The image's sidecar.yaml binds fixed ports; this one binds the free ones.
mkdir -p "$WORK/conf"
cat >"$WORK/conf/test.yaml" <<EOF
node: { id: ci-docker, service: ci, namespace: default }
admin: { address: 127.0.0.1:$ADMIN_PORT, probes: 127.0.0.1:$PROBE_PORT }
listeners:
  - { name: outbound, role: outbound, address: 127.0.0.1:$OUT_PORT, access_log: true }
routes:
  - name: upstream
    match: { host: "*" }
    backends: [ { cluster: upstream } ]
clusters:
  - name: upstream
    endpoints: [ { address: 127.0.0.1:$UP_PORT } ]
EOF
chmod 0755 "$WORK/conf"
chmod 0644 "$WORK/conf/test.yaml"
"$BIN" validate "$WORK/conf/test.yaml"

docker run -d --name "$CONTAINER" --network host --user 4242:4242 --read-only \
  --cap-drop ALL --security-opt no-new-privileges \
  -v "$WORK/conf:/conf:ro" \
  "$IMAGE" run --config /conf/test.yaml --threads 1 >/dev/null
container_ready() {
  if [ "$(docker inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
    docker logs "$CONTAINER" >&2 || true
    die "the container exited"
  fi
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROBE_PORT/ready")" = 200 ]
}
wait_until "/ready" 30 container_ready
echo "/ready: 200"

body=$(curl -fsS -H 'Host: upstream.ci.test' "http://127.0.0.1:$OUT_PORT/hello.txt") ||
  { docker logs "$CONTAINER" >&2; die "the proxied request failed"; }
[ "$body" = "$TOKEN" ] || die "proxied body: got '$body', want '$TOKEN'"
echo "proxied GET /hello.txt: 200, upstream's body"

metrics=$(curl -fsS "http://127.0.0.1:$PROBE_PORT/metrics")
grep -q '^outrigger_' <<<"$metrics" || die "/metrics has no outrigger_ series"
echo "/metrics: $(grep -c '^outrigger_' <<<"$metrics") outrigger_ samples"
grep '^outrigger_requests_total{' <<<"$metrics" | grep 'route="upstream"' | grep 'code="200"' ||
  die "/metrics does not count the proxied request"

# Logs are JSON lines on stdout: the access log has the request.
access_logged() { docker logs "$CONTAINER" 2>/dev/null | grep -q '/hello.txt'; }
wait_until "the access log line on stdout" 10 access_logged
echo "access log on stdout: $(docker logs "$CONTAINER" 2>/dev/null | grep '/hello.txt' | head -1)"

log "stopping the container (SIGTERM, graceful drain)"
docker stop -t 30 "$CONTAINER" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER")
[ "$code" = 0 ] || { docker logs "$CONTAINER" >&2; die "exit code $code after SIGTERM"; }
echo "exit code after SIGTERM: 0"
docker rm "$CONTAINER" >/dev/null
