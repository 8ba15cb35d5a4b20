#!/usr/bin/env bash
# Instructions per request, by callgrind (repeatable whatever else the
# machine is doing): one Outrigger worker in front of NGINX (64-byte body),
# N requests of each kind, the proxy's whole run counted (start-up ~1 M).
#
#   bash benches/callgrind.sh                 # bare route, HTTP/1.1 and h2c
#   ROUTE=policies bash benches/callgrind.sh  # retries, both timeouts, breaker, outlier
#   ROUTE=tracing bash benches/callgrind.sh   # tracing on, 100 % sampled (SAMPLING=0.01: 1 %), spans to a sink
#   N=20000 KINDS=h1 bash benches/callgrind.sh
#   PROXY=haproxy bash benches/callgrind.sh   # HAProxy in the proxy's place, same load
#
# Prints `instructions: <proxy> <route> <kind> <total> (<per request>)`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
KINDS=${KINDS:-h1 h2}
ROUTE=${ROUTE:-bare}
PROXY=${PROXY:-outrigger}
BIN=${BIN:-target/release/outrigger}
if [ "$PROXY" = haproxy ]; then
  # The same HAProxy as the load harness; it has no policies or tracing.
  [ "$ROUTE" = bare ] || { echo "callgrind.sh: PROXY=haproxy measures the bare route only" >&2; exit 1; }
  HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
  [ -x "$HAPROXY" ] || { echo "callgrind.sh: haproxy not found" >&2; exit 1; }
else
  [ -x "$BIN" ] || cargo build --release --bin outrigger
fi
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$tmp"/cg.* "$KEEP"/ ; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx;
  proxy_temp_path $tmp/nginx;
  fastcgi_temp_path $tmp/nginx;
  uwsgi_temp_path $tmp/nginx;
  scgi_temp_path $tmp/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "$(printf 'x%.0s' $(seq 63))\n"; } }
}
EOF
nginx -c "$tmp/nginx.conf" -p "$tmp" &
extra_route="" extra_cluster="" tracing=""
case "$ROUTE" in
  policies)
    extra_route=", timeout: 2s, retry: { attempts: 3, retry_on: [gateway-error, connect-failure, reset], per_try_timeout: 500ms }"
    extra_cluster=", circuit_breaker: { max_connections: 1024, max_pending: 1024, max_requests: 1024 }, outlier_detection: { consecutive_5xx: 5 }"
    ;;
  tracing)
    SINK=$(free_port)
    python3 - "$SINK" <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
    tracing="tracing: { otlp: \"http://127.0.0.1:$SINK/v1/traces\", sampling: ${SAMPLING:-1.0} }"
    ;;
esac
for kind in $KINDS; do
  P=$(free_port)
  A=$(free_port)
  if [ "$PROXY" = haproxy ]; then
    # The load harness's HAProxy (benches/haproxy.cfg); h2c on its own
    # port, as HAProxy needs `proto h2` to take it.
    bind="  bind 127.0.0.1:$P"
    if [ "$kind" = h2 ]; then bind="$bind proto h2"; fi
    sed -e "s|^@BINDS@\$|$bind|" -e "s|@UPSTREAM@|127.0.0.1:$UP|" benches/haproxy.cfg >"$tmp/haproxy.cfg"
    valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$kind" \
      "$HAPROXY" -f "$tmp/haproxy.cfg" >/dev/null 2>"$tmp/vg.$kind" &
    vg=$!
    ready=
    for _ in $(seq 600); do
      kill -0 "$vg" 2>/dev/null || break
      python3 -c "import socket; socket.create_connection(('127.0.0.1', $P), 1).close()" 2>/dev/null && { ready=1; break; }
      sleep 0.1
    done
  else
  cat >"$tmp/c.yaml" <<EOF
admin: { address: 127.0.0.1:$A, probes: 127.0.0.1:$((A + 1)) }
listeners: [ { name: out, role: outbound, address: 127.0.0.1:$P } ]
routes: [ { name: bench, backends: [ { cluster: up } ]$extra_route } ]
clusters: [ { name: up, protocol: http1, endpoints: [ { address: 127.0.0.1:$UP } ]$extra_cluster } ]
$tracing
EOF
  # `on` is the older name of `retry_on`: fall back for builds without it.
  if ! "$BIN" validate "$tmp/c.yaml" >/dev/null 2>&1; then
    sed -i 's/retry_on:/on:/' "$tmp/c.yaml"
  fi
  valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$kind" \
    "$BIN" run --config "$tmp/c.yaml" --threads 1 --log-level error >/dev/null 2>"$tmp/vg.$kind" &
  vg=$!
  ready=
  for _ in $(seq 600); do
    kill -0 "$vg" 2>/dev/null || break
    curl -sf -o /dev/null "http://127.0.0.1:$((A + 1))/ready" && { ready=1; break; }
    sleep 0.1
  done
  fi
  [ -n "$ready" ] || { echo "callgrind.sh: the proxy did not start:" >&2; cat "$tmp/vg.$kind" >&2; exit 1; }
  if [ "$kind" = h1 ]; then
    h2load --h1 -n "$N" -c 8 "http://127.0.0.1:$P/" >/dev/null
  else
    h2load -n "$N" -c 8 -m 10 "http://127.0.0.1:$P/" >/dev/null
  fi
  # HAProxy takes SIGINT as a soft stop that waits for idle connections.
  if [ "$PROXY" = haproxy ]; then kill -TERM "$vg"; else kill -INT "$vg"; fi
  wait "$vg" || true
  if [ "$PROXY" = haproxy ]; then
    # HAProxy's start-up reads the system CA store (~200 M): count its
    # event loop only, where every request is served.
    total=$(callgrind_annotate --inclusive=yes "$tmp/cg.$kind" 2>/dev/null | awk '/:run_poll_loop / && !t { gsub(",", "", $1); t = $1 } END { print t }')
  else
    total=$(callgrind_annotate "$tmp/cg.$kind" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t { gsub(",", "", $1); t = $1 } END { print t }')
  fi
  [ -n "$total" ] || { echo "callgrind.sh: no count in $tmp/cg.$kind (run_poll_loop needs HAProxy's symbols)" >&2; exit 1; }
  echo "instructions: $PROXY $ROUTE $kind $total ($((total / N)) per request)"
done
