#!/usr/bin/env bash
# A profile-guided release build of `outrigger` (PGO): an instrumented build
# serves a training load, and the release build is compiled again with the
# counts, so that LLVM lays out and inlines the hot paths for what a sidecar
# does. Result: target/pgo/outrigger (the plain target/release/outrigger is
# untouched). Takes two full release builds (~27 min on 2 cores).
#
#   bash benches/pgo.sh
#   python3 benches/load.py --bin target/pgo/outrigger --base-bin target/release/outrigger
#   BIN=target/pgo/outrigger bash benches/callgrind.sh
#
# For the container image (static, as .ci/docker.sh builds it; RUSTFLAGS
# from the environment go into both builds, so the counts match the code):
#   RUSTFLAGS="-C target-feature=+crt-static" bash benches/pgo.sh
#   docker build --target runtime-prebuilt \
#     --build-arg PREBUILT=target/pgo/x86_64-unknown-linux-gnu/release/outrigger -t outrigger .
#
# The counts belong to the sources they were taken from: run it again on
# the sources being released (functions changed since are compiled without
# counts, as in a plain build).
#
# The training load: one proxy in front of NGINX (64-byte body) with an
# outbound listener and an inbound one with mutual TLS; HTTP/1.1 (wrk) and
# h2c (h2load) to a bare route, a route with retries, both timeouts, a
# breaker and outlier detection, and a route through the inbound listener
# over mTLS. Needs nginx, wrk, h2load (nghttp2-client) and an llvm-profdata
# that reads this rustc's profiles (LLVM 19 or newer: Debian's llvm-19, or
# rustup's llvm-tools); LLVM_PROFDATA=path picks one.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=${LLVM_PROFDATA:-}
if [ -z "$PROFDATA" ]; then
  for c in "$(rustc --print sysroot)"/lib/rustlib/"$HOST"/bin/llvm-profdata \
           $(ls -d /usr/lib/llvm-*/bin/llvm-profdata 2>/dev/null | sort -V -r); do
    [ -x "$c" ] && { PROFDATA=$c; break; }
  done
fi
[ -n "$PROFDATA" ] || { echo "pgo.sh: no llvm-profdata (apt-get install llvm-19, or LLVM_PROFDATA=...)" >&2; exit 1; }
for t in nginx wrk h2load; do
  command -v "$t" >/dev/null || { echo "pgo.sh: $t not found (apt-get install nginx wrk nghttp2-client)" >&2; exit 1; }
done

OUT=target/pgo
mkdir -p "$OUT"
raw=$(mktemp -d)
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$raw" "$tmp"' EXIT

# 1. Instrumented build (PGO_GEN_BIN=path reuses one). --target keeps build
# scripts and proc macros (which run on the host) out of RUSTFLAGS; the
# profile's path is set at run time (LLVM_PROFILE_FILE, for the proxy
# only), so the flags, and cargo's cache, stay the same from one run to the
# next.
gen=${PGO_GEN_BIN:-target/pgo-gen/$HOST/release/outrigger}
if [ -z "${PGO_GEN_BIN:-}" ]; then
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PWD/target/pgo-gen/profraw" cargo build --release --locked --bin outrigger \
    --target "$HOST" --target-dir target/pgo-gen
fi

# 2. Training.
# Five distinct free ports, held open together while they are picked.
read -r UP P IN A A1 < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $tmp/nginx.pid; error_log $tmp/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $tmp/nginx; proxy_temp_path $tmp/nginx; fastcgi_temp_path $tmp/nginx;
  uwsgi_temp_path $tmp/nginx; scgi_temp_path $tmp/nginx;
  server { listen 127.0.0.1:$UP; location / { return 200 "$(printf 'x%.0s' $(seq 63))\n"; } } }
EOF
# Waits until URL answers 2xx, or fails with LOG if PID has exited (20 s at most).
ready() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 200); do
    curl -sf -o /dev/null "$url" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "pgo.sh: $url never answered" >&2
  cat "$log" >&2
  exit 1
}
nginx -c "$tmp/nginx.conf" -p "$tmp" &
ngx=$!
ready "http://127.0.0.1:$UP/" "$ngx" "$tmp/nginx/error.log"
TD=pgo.local
"$gen" ca init "$tmp/ca" --trust-domain "$TD" >/dev/null
"$gen" ca issue --ca "$tmp/ca" --spiffe "spiffe://$TD/ns/pgo/sa/proxy" --out "$tmp/id" >/dev/null
cat >"$tmp/c.yaml" <<EOF
admin: { address: 127.0.0.1:$A, probes: 127.0.0.1:$A1 }
identity: { trust_domain: $TD, source: { files: { cert: $tmp/id/cert.pem, key: $tmp/id/key.pem, roots: $tmp/id/roots.pem } } }
listeners:
  - { name: out, role: outbound, address: 127.0.0.1:$P }
  - { name: in, role: inbound, address: 127.0.0.1:$IN, forward_to: 127.0.0.1:$UP, tls: strict }
routes:
  - name: policies
    match: { host: policies.local }
    backends: [ { cluster: up-policies } ]
    timeout: 2s
    retry: { attempts: 3, retry_on: [gateway-error, connect-failure, reset], per_try_timeout: 500ms }
  - { name: mesh, match: { host: mesh.local }, backends: [ { cluster: mesh } ] }
  - { name: bare, backends: [ { cluster: up } ] }
clusters:
  - { name: up, protocol: http1, endpoints: [ { address: 127.0.0.1:$UP } ] }
  - name: up-policies
    protocol: http1
    endpoints: [ { address: 127.0.0.1:$UP } ]
    circuit_breaker: { max_connections: 1024, max_pending: 1024, max_requests: 1024 }
    outlier_detection: { consecutive_5xx: 5 }
  - { name: mesh, endpoints: [ { address: 127.0.0.1:$IN, identity: "spiffe://$TD/ns/pgo/sa/proxy" } ] }
EOF
LLVM_PROFILE_FILE="$raw/outrigger-%p.profraw" "$gen" run --config "$tmp/c.yaml" --threads 1 --log-level error >/dev/null 2>"$tmp/proxy.log" &
px=$!
ready "http://127.0.0.1:$A1/ready" "$px" "$tmp/proxy.log"
for host in bare.local policies.local mesh.local; do
  curl -sSf -o /dev/null -H "host: $host" "http://127.0.0.1:$P/" || { echo "pgo.sh: $host failed" >&2; cat "$tmp/proxy.log" >&2; exit 1; }
  # Training on error paths would optimise the wrong code: every answer must be a 200.
  out=$(wrk -t1 -c32 -d4s -H "Host: $host" "http://127.0.0.1:$P/")
  if grep -q -e 'Non-2xx' -e 'Socket errors' <<<"$out"; then echo "pgo.sh: $host over HTTP/1.1: $out" >&2; exit 1; fi
  out=$(h2load -c16 -m10 -D 4 -H ":authority: $host" "http://127.0.0.1:$P/")
  if ! grep -q ' 0 failed, 0 errored' <<<"$out" || ! grep -q 'status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out"; then
    echo "pgo.sh: $host over h2c: $out" >&2; exit 1
  fi
done
# SIGINT: the proxy drains and exits, and the counts are written at exit.
kill -INT "$px"
wait "$px" || true
kill "$ngx" 2>/dev/null || true
ls "$raw"/outrigger-"$px".profraw >/dev/null || { echo "pgo.sh: the proxy wrote no profile" >&2; cat "$tmp/proxy.log" >&2; exit 1; }
# An llvm-profdata older than the profile's format (Debian's llvm-14 beside
# rustc's LLVM 22) says "unsupported ... format version": name the fix.
"$PROFDATA" merge -o "$OUT/outrigger.profdata" "$raw" || {
  echo "pgo.sh: $PROFDATA could not read rustc's profile (rustc: $(rustc -vV | sed -n 's/^LLVM version: //p')); apt-get install llvm-19 or set LLVM_PROFDATA" >&2
  exit 1
}

# 3. The release build with the counts (functions the training never ran
# are compiled as usual).
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PWD/$OUT/outrigger.profdata" cargo build --release --locked --bin outrigger \
  --target "$HOST" --target-dir target/pgo
cp "target/pgo/$HOST/release/outrigger" "$OUT/outrigger"
echo "pgo.sh: $OUT/outrigger"
