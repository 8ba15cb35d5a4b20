#!/usr/bin/env python3
"""Load harness: Outrigger next to NGINX and HAProxy, on loopback, in one run.

One fixed upstream (NGINX, 64-byte body) and, in turn, each proxy in front
of it with one worker, keep-alive upstream, no access log, pinned to core 0
with taskset; the load generators and the upstream run on core 1. Rounds are
interleaved (every proxy once per round) and figures are medians over rounds,
so a noisy neighbour hurts all proxies alike.

Measured per proxy:
  - closed-loop HTTP/1.1 keep-alive throughput (wrk) and CPU time per request
    (utime+stime from /proc/PID/stat over the requests served);
  - HTTP/2 cleartext throughput and CPU per request (h2load);
  - open-loop latency at a fixed rate (h2load --h1 --rps, per-request log):
    p50, p90, p99, p99.9, max; and the same for the upstream directly;
  - resident memory idle and under load.
Outrigger-only rows: two sidecars in a row (outbound -> inbound -> app), a
route with retries, timeouts and circuit breaking configured, tracing, and
workers and CPU limits: two workers on both cores, and a cgroup quota of half
a CPU (as `resources.limits.cpu: 500m`) with the worker count the proxy picks
from it and with two forced.

Writes benches/results/latest.{md,json,svg} and prints a sizing line.

  python3 benches/load.py                 # 3 rounds, 8 s per measurement
  python3 benches/load.py --rounds 1 --duration 3   # quick look
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benches", "results")
UP_PORT, PROXY_PORT, H2_PORT, SIDECAR2_PORT = 18500, 18501, 18503, 18502
BODY = "x" * 63 + "\n"  # 64 bytes
TICK = os.sysconf("SC_CLK_TCK")
# The Outrigger build every Outrigger row runs (--bin; outrigger-base is --base-bin).
EXE = os.path.join(ROOT, "target", "release", "outrigger")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, text=True, capture_output=True, **kw).stdout


def ensure_tools():
    missing = [t for t in ("nginx", "haproxy", "wrk", "h2load", "taskset") if not shutil.which(t) and not os.path.exists("/usr/sbin/" + t)]
    if missing:
        print("installing", " ".join(missing), file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "haproxy", "wrk", "nghttp2-client", "util-linux"], check=True, env=env)


def binary(name):
    return shutil.which(name) or "/usr/sbin/" + name


def cores():
    n = os.cpu_count() or 1
    return ("0", "1") if n >= 2 else ("0", "0")


def wait_port(port, timeout=20):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d never opened" % port)


def pids_of(root):
    """root and all its descendants."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open("/proc/%s/stat" % p) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICK


def switches(pids):
    """Context switches of every thread of the processes: (voluntary: slept
    and was woken, involuntary: preempted, threads)."""
    vol = invol = threads = 0
    for pid in pids:
        for st in glob.glob("/proc/%d/task/*/status" % pid):
            try:
                with open(st) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol += int(line.split()[1])
                threads += 1
            except OSError:
                pass
    return vol, invol, threads


# The upstream app (NGINX), whose own cost per request a proxy changes too:
# the harder a proxy's writes are to batch, the more often the app is woken.
APP = []


def rss_mib(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            pass
    return total / 1024


class Proc:
    def __init__(self, cmd, core, port, cwd=None, env=None):
        self.p = subprocess.Popen(["taskset", "-c", core] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env)
        wait_port(port)
        time.sleep(0.2)  # let worker processes settle before the idle reading

    def pids(self):
        return pids_of(self.p.pid)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def nginx_head(tmp, name):
    """The part of an NGINX config both the upstream and the proxy share."""
    return """
daemon off; master_process off; worker_processes 1; pid %s/%s.pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s; uwsgi_temp_path %s; scgi_temp_path %s;
""" % (tmp, name, tmp, tmp, tmp, tmp, tmp)


def upstream_nginx(tmp, core):
    conf = os.path.join(tmp, "upstream.conf")
    with open(conf, "w") as f:
        f.write(nginx_head(tmp, "up") + """
  server { listen 127.0.0.1:%d; location / { default_type text/plain; return 200 "%s"; } } }
""" % (UP_PORT, BODY.replace("\n", "\\n")))
    return Proc([binary("nginx"), "-c", conf, "-p", tmp], core, UP_PORT)


def proxy_nginx(tmp, core):
    conf = os.path.join(tmp, "proxy-nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_head(tmp, "px") + """
  upstream u { server 127.0.0.1:%d; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:%d; listen 127.0.0.1:%d http2;
    location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } } }
""" % (UP_PORT, PROXY_PORT, H2_PORT))
    return Proc([binary("nginx"), "-c", conf, "-p", tmp], core, PROXY_PORT)


def proxy_haproxy(tmp, core):
    conf = os.path.join(tmp, "haproxy.cfg")
    # One config for both benches: benches/haproxy.cfg.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "haproxy.cfg")) as f:
        template = f.read()
    binds = "  bind 127.0.0.1:%d\n  bind 127.0.0.1:%d proto h2" % (PROXY_PORT, H2_PORT)
    with open(conf, "w") as f:
        f.write(template.replace("@BINDS@", binds).replace("@UPSTREAM@", "127.0.0.1:%d" % UP_PORT))
    return Proc([binary("haproxy"), "-f", conf], core, PROXY_PORT)


TRACE_PORT = 18530


class SpanSink:
    """An OTLP/HTTP endpoint that accepts and discards span batches (runs
    in the harness, not on the proxy's core): the tracing rows measure the
    proxy's cost of making and exporting spans, not a collector's."""

    def __init__(self):
        import http.server

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", TRACE_PORT), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def outrigger_yaml(tmp, name, listeners, admin_port, policies=False, sampling=None):
    route_extra = ""
    cluster_extra = ""
    if policies:
        route_extra = ", timeout: 2s, retry: { attempts: 3, retry_on: [gateway-error, connect-failure, reset], per_try_timeout: 500ms }"
        cluster_extra = ", circuit_breaker: { max_connections: 1024, max_pending: 1024, max_requests: 1024 }, outlier_detection: { consecutive_5xx: 5 }"
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as f:
        f.write("admin: { address: 127.0.0.1:%d, probes: 127.0.0.1:%d }\n" % (admin_port, admin_port + 1))
        f.write("listeners:\n")
        for l in listeners:
            f.write("  - %s\n" % l)
        f.write("routes: [ { name: bench, backends: [ { cluster: up } ]%s } ]\n" % route_extra)
        f.write("clusters: [ { name: up, protocol: http1, endpoints: [ { address: 127.0.0.1:%d } ]%s } ]\n" % (UP_PORT, cluster_extra))
        if sampling is not None:
            f.write("tracing: { otlp: \"http://127.0.0.1:%d/v1/traces\", sampling: %s }\n" % (TRACE_PORT, sampling))
    return path


def proxy_outrigger(tmp, core, policies=False, sampling=None, threads="1", cgroup=None, exe=None):
    """threads=None: the proxy picks its worker count (CPU quota, affinity);
    cgroup: a directory the proxy joins before it starts; exe: another build
    (--base-bin) instead of this tree's."""
    path = outrigger_yaml(tmp, "outrigger", ["{ name: out, role: outbound, address: 127.0.0.1:%d }" % PROXY_PORT], 18510, policies, sampling)
    exe = exe or EXE
    cmd = [exe, "run", "--config", path, "--log-level", "error"] + (["--threads", threads] if threads else [])
    if cgroup:
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup] + cmd
    return Proc(cmd, core, PROXY_PORT)


def quota_cgroup(quota_us=50000, period_us=100000):
    """A cgroup limited to quota/period of a CPU (v2 cpu.max or v1
    cfs_quota_us), as a pod's `resources.limits.cpu: 500m` makes; None
    where it cannot be made (needs root)."""
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    d = os.path.join("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpu", "outrigger-bench-%d" % os.getpid())
    try:
        if v2:
            with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
                f.write("+cpu")
        os.makedirs(d, exist_ok=True)
        if v2:
            with open(os.path.join(d, "cpu.max"), "w") as f:
                f.write("%d %d" % (quota_us, period_us))
        else:
            with open(os.path.join(d, "cpu.cfs_period_us"), "w") as f:
                f.write(str(period_us))
            with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(quota_us))
        return d
    except OSError as e:
        print("  (CPU-quota rows skipped: cannot make a cgroup: %s)" % e, file=sys.stderr)
        try:
            os.rmdir(d)
        except OSError:
            pass
        return None


def worker_threads():
    """outrigger_worker_threads from the bench proxy's admin port."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:18510/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("outrigger_worker_threads "):
                    return int(float(line.split()[1]))
    except OSError:
        pass
    return 0


TD = "bench.local"


def mesh_certs(tmp):
    """A CA and two workload certificates (caller, callee) made with `outrigger ca`."""
    exe = EXE
    ca = os.path.join(tmp, "ca")
    if not os.path.exists(os.path.join(ca, "ca.pem")):
        sh([exe, "ca", "init", ca, "--trust-domain", TD])
        for sa in ("caller", "callee"):
            sh([exe, "ca", "issue", "--ca", ca, "--spiffe", "spiffe://%s/ns/bench/sa/%s" % (TD, sa), "--out", os.path.join(tmp, sa)])
    return {sa: os.path.join(tmp, sa) for sa in ("caller", "callee")}


def identity_yaml(d):
    return "identity: { trust_domain: %s, source: { files: { cert: %s/cert.pem, key: %s/key.pem, roots: %s/roots.pem } } }\n" % (TD, d, d, d)


class Mesh:
    """Two Outrigger sidecars in a row: the caller's outbound -> the callee's inbound -> app,
    in plaintext or with mTLS between the two sidecars."""

    def __init__(self, tmp, core, mtls=False):
        exe = EXE
        certs = mesh_certs(tmp) if mtls else None
        inbound = os.path.join(tmp, "inbound.yaml")
        with open(inbound, "w") as f:
            f.write("admin: { address: 127.0.0.1:18520, probes: 127.0.0.1:18521 }\n")
            if mtls:
                f.write(identity_yaml(certs["callee"]))
            f.write("listeners: [ { name: in, role: inbound, address: 127.0.0.1:%d, forward_to: 127.0.0.1:%d%s } ]\n" % (
                SIDECAR2_PORT, UP_PORT, ", tls: strict" if mtls else ""))
        outbound = os.path.join(tmp, "outbound.yaml")
        with open(outbound, "w") as f:
            f.write("admin: { address: 127.0.0.1:18510, probes: 127.0.0.1:18511 }\n")
            if mtls:
                f.write(identity_yaml(certs["caller"]))
            f.write("listeners: [ { name: out, role: outbound, address: 127.0.0.1:%d } ]\n" % PROXY_PORT)
            f.write("routes: [ { name: r, backends: [ { cluster: callee } ] } ]\n")
            ident = ', identity: "spiffe://%s/ns/bench/sa/callee"' % TD if mtls else ""
            f.write("clusters: [ { name: callee, endpoints: [ { address: 127.0.0.1:%d%s } ] } ]\n" % (SIDECAR2_PORT, ident))
        self.a = Proc([exe, "run", "--config", inbound, "--threads", "1", "--log-level", "error"], core, SIDECAR2_PORT)
        self.b = Proc([exe, "run", "--config", outbound, "--threads", "1", "--log-level", "error"], core, PROXY_PORT)

    def pids(self):
        return self.a.pids() + self.b.pids()

    def stop(self):
        self.b.stop()
        self.a.stop()


def parse_wrk(out):
    reqs = int(out.split(" requests in ")[0].split()[-1])
    rps = float(out.split("Requests/sec:")[1].split()[0])
    non2xx = 0
    if "Non-2xx" in out:
        non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0])
    errors = 0
    if "Socket errors" in out:
        errors = sum(int(x.split()[1].strip(",")) for x in out.split("Socket errors:")[1].split("\n")[0].split(",") if len(x.split()) > 1)
    return reqs, rps, non2xx + errors


def parse_h2load(out):
    done = 0
    for line in out.splitlines():
        if line.startswith("requests:"):
            parts = line.split(",")
            for p in parts:
                if "succeeded" in p:
                    done = int(p.split()[0])
    rps = float(out.split("req/s")[0].split(",")[-1].strip().split()[0]) if "req/s" in out else 0.0
    return done, rps


def measure_load(target, cmd, pids_fn):
    """Runs one load command; returns its figures: requests, rps, errors, the
    proxy's CPU per request and peak RSS, and the app's CPU and wake-ups per
    request."""
    pids = pids_fn()
    rss_peak = [rss_mib(pids)]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            rss_peak[0] = max(rss_peak[0], rss_mib(pids))

    t = threading.Thread(target=sample)
    t.start()
    app = APP[0].pids() if APP else []
    c0, a0, w0 = cpu_seconds(pids), cpu_seconds(app), switches(app)[0]
    out = sh(cmd)
    c1, a1, w1 = cpu_seconds(pids), cpu_seconds(app), switches(app)[0]
    stop.set()
    t.join()
    if "wrk" in cmd[2:4]:
        reqs, rps, errors = parse_wrk(out)
    else:
        reqs, rps = parse_h2load(out)
        errors = 0
    n = max(reqs, 1)
    return {"requests": reqs, "rps": rps, "errors": errors, "cpu_us_per_req": (c1 - c0) * 1e6 / n, "rss_load_mib": rss_peak[0],
            "app_cpu_us_per_req": (a1 - a0) * 1e6 / n, "app_wakeups_per_req": (w1 - w0) / n}


def open_loop(port, rate, duration, load_core, tmp):
    log = os.path.join(tmp, "h2load-%d.log" % port)
    # Few clients: h2load fires each client's requests on a timer, and many
    # clients firing on the same tick make bursts that measure queueing.
    clients = 4
    if os.path.exists(log):
        os.remove(log)  # h2load appends to an existing log
    sh(["taskset", "-c", load_core, "h2load", "--h1", "-c", str(clients), "--rps", str(rate // clients), "-D", str(duration),
        "--warm-up-time", "1", "--log-file", log, "http://127.0.0.1:%d/" % port])
    lat = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                lat.append(int(parts[2]))
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(len(lat) * p))] if lat else 0

    return {"p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99), "p999_us": pct(0.999), "max_us": lat[-1] if lat else 0, "samples": len(lat)}


def handshakes(tmp, callee, load_core, duration):
    """New full mTLS handshakes per second on the callee sidecar's one core
    (`openssl s_time -new` with a client certificate), and its CPU per handshake."""
    d = mesh_certs(tmp)["caller"]
    pids = callee.pids()
    c0 = cpu_seconds(pids)
    out = subprocess.run(["taskset", "-c", load_core, "openssl", "s_time", "-connect", "127.0.0.1:%d" % SIDECAR2_PORT, "-new",
                          "-cert", d + "/cert.pem", "-key", d + "/key.pem", "-CAfile", d + "/roots.pem", "-time", str(duration)],
                         capture_output=True, text=True).stdout
    c1 = cpu_seconds(pids)
    n = 0
    for line in out.splitlines():
        # "1234 connections in 8.00s; 154.25 connections/user sec, ..."
        if "connections in" in line and "real seconds" in line:
            n = int(line.split()[0])
        elif "connections in" in line and n == 0:
            n = int(line.split()[0])
    return {"per_second": n / float(duration), "cpu_us_per_handshake": (c1 - c0) * 1e6 / max(n, 1)}


def run_round(args, tmp, proxy_core, load_core, rnd):
    rows = {}
    d = str(args.duration)
    subjects = [("direct", None), ("outrigger", proxy_outrigger), ("nginx", proxy_nginx), ("haproxy", proxy_haproxy),
                ("outrigger-mesh", "mesh"), ("outrigger-mesh-mtls", "mesh-mtls"), ("outrigger-policies", "policies"),
                ("outrigger-trace-100", "trace-1.0"), ("outrigger-trace-1", "trace-0.01"),
                # Workers and CPU limits: two workers on both cores (beside
                # the load generator), and half a CPU's quota with the worker
                # count the proxy picks (1) and with two forced.
                ("outrigger-2w", "2w"), ("outrigger-quota", "quota"), ("outrigger-quota-2w", "quota-2w")]
    if args.base_bin:
        # Before and after a change, in the same rounds.
        subjects.insert(2, ("outrigger-base", "base"))
    if args.only:
        subjects = [s for s in subjects if s[0] in args.only.split(",")]
    for name, start in subjects:
        row = {}
        if start is None:
            row["latency"] = open_loop(UP_PORT, args.rate, args.duration, load_core, tmp)
            rows[name] = row
            continue
        if start == "mesh":
            p = Mesh(tmp, proxy_core)
        elif start == "mesh-mtls":
            p = Mesh(tmp, proxy_core, mtls=True)
        elif isinstance(start, str) and start.startswith("trace-"):
            p = proxy_outrigger(tmp, proxy_core, sampling=start[len("trace-"):])
        elif start == "base":
            p = proxy_outrigger(tmp, proxy_core, exe=args.base_bin)
        elif start == "2w":
            p = proxy_outrigger(tmp, proxy_core + "," + load_core, threads="2")
        elif start in ("quota", "quota-2w"):
            if not args.cgroup:
                continue
            p = proxy_outrigger(tmp, proxy_core + "," + load_core, threads="2" if start == "quota-2w" else None, cgroup=args.cgroup)
        elif start == "policies":
            try:
                p = proxy_outrigger(tmp, proxy_core, policies=True)
            except Exception:
                print("  (policies row skipped: this build does not accept retry/breaker config yet)", file=sys.stderr)
                continue
        else:
            p = start(tmp, proxy_core)
        try:
            row["rss_idle_mib"] = rss_mib(p.pids())
            if name.startswith("outrigger") and not name.startswith("outrigger-mesh"):
                row["workers"] = worker_threads()
            url = "http://127.0.0.1:%d/" % PROXY_PORT
            # warm-up: pools, caches
            sh(["taskset", "-c", load_core, "wrk", "-t1", "-c32", "-d1s", url])
            row["http1"] = measure_load(name, ["taskset", "-c", load_core, "wrk", "-t1", "-c32", "-d" + d + "s", url], p.pids)
            if name in ("outrigger", "outrigger-base", "nginx", "haproxy", "outrigger-mesh", "outrigger-mesh-mtls", "outrigger-2w", "outrigger-quota", "outrigger-quota-2w"):
                h2port = H2_PORT if name in ("nginx", "haproxy") else PROXY_PORT
                row["http2"] = measure_load(name, ["taskset", "-c", load_core, "h2load", "-c16", "-m10", "-D", d, "http://127.0.0.1:%d/" % h2port], p.pids)
            if name == "outrigger-mesh-mtls":
                row["handshakes"] = handshakes(tmp, p.a, load_core, args.duration)
            row["latency"] = open_loop(PROXY_PORT, args.rate, args.duration, load_core, tmp)
        finally:
            p.stop()
        rows[name] = row
        h1 = row.get("http1", {})
        print("  round %d %-20s %9.0f req/s  %6.1f us CPU/req  rss %5.1f MiB  p99 %s us" % (
            rnd, name, h1.get("rps", 0), h1.get("cpu_us_per_req", 0), h1.get("rss_load_mib", 0),
            row.get("latency", {}).get("p99_us", "-")), file=sys.stderr)
    return rows


def median_rows(rounds):
    out = {}
    for name in rounds[0]:
        out[name] = {}
        for key, val in rounds[0][name].items():
            if isinstance(val, dict):
                out[name][key] = {k: statistics.median(r[name][key][k] for r in rounds if name in r and key in r[name]) for k in val}
                out[name][key]["spread"] = {k: [min(r[name][key][k] for r in rounds if name in r and key in r[name]), max(r[name][key][k] for r in rounds if name in r and key in r[name])] for k in val}
            else:
                out[name][key] = statistics.median(r[name][key] for r in rounds if name in r)
    return out


def sizing(res, rate):
    o = res.get("outrigger", {})
    cpu = o.get("http1", {}).get("cpu_us_per_req", 0)
    mem = o.get("http1", {}).get("rss_load_mib", 0)
    # µs of CPU per request == millicores per 1,000 requests per second.
    m_per_k = cpu
    req_m = max(10, int(round(m_per_k * rate / 1000 * 1.5)))
    lim_m = req_m * 2
    mem_req = int(mem + 8)
    return {"millicores_per_1k_rps": round(m_per_k, 1), "memory_mib": round(mem, 1), "rate": rate,
            "requests": {"cpu": "%dm" % req_m, "memory": "%dMi" % mem_req},
            "limits": {"cpu": "%dm" % lim_m, "memory": "%dMi" % (mem_req * 2)}}


def write_chart(size):
    """Writes the sizing into the chart's defaults, between its markers."""
    path = os.path.join(ROOT, "charts", "outrigger", "values.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    begin, end = "# BEGIN sizing (benches/load.py)\n", "# END sizing"
    if begin not in text or end not in text:
        return
    block = "  sizedForRps: %d\n  resources:\n    requests: { cpu: %s, memory: %s }\n    limits: { cpu: %s, memory: %s }\n" % (
        size["rate"], size["requests"]["cpu"], size["requests"]["memory"], size["limits"]["cpu"], size["limits"]["memory"])
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + begin + block + end + tail)


def markdown(res, meta):
    lines = ["| proxy | HTTP/1.1 req/s | CPU µs/req | HTTP/2 req/s | h2 CPU µs/req | RSS idle MiB | RSS load MiB | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("direct", "outrigger", "outrigger-base", "nginx", "haproxy", "outrigger-mesh", "outrigger-mesh-mtls", "outrigger-policies"):
        if name not in res:
            continue
        r = res[name]
        h1, h2, lat = r.get("http1", {}), r.get("http2", {}), r.get("latency", {})

        def f(d, k, fmt="%.0f"):
            return fmt % d[k] if k in d else "–"

        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            name, f(h1, "rps"), f(h1, "cpu_us_per_req", "%.1f"), f(h2, "rps"), f(h2, "cpu_us_per_req", "%.1f"),
            "%.1f" % r["rss_idle_mib"] if "rss_idle_mib" in r else "–", f(h1, "rss_load_mib", "%.1f"),
            f(lat, "p50_us"), f(lat, "p90_us"), f(lat, "p99_us"), f(lat, "p999_us"), f(lat, "max_us")))
    app = [(n, res[n]["http1"]) for n in ("outrigger", "outrigger-base", "nginx", "haproxy")
           if "app_cpu_us_per_req" in res.get(n, {}).get("http1", {})]
    if app:
        lines.append("")
        lines.append("The app (the upstream NGINX) behind each, HTTP/1.1: CPU µs and wake-ups per request: " + "; ".join(
            "%s %.1f, %.3f" % (n, h1["app_cpu_us_per_req"], h1["app_wakeups_per_req"]) for n, h1 in app) + ".")
    mesh, mtls = res.get("outrigger-mesh", {}), res.get("outrigger-mesh-mtls", {})
    if mesh and mtls:
        lines.append("")
        for proto in ("http1", "http2"):
            a, b = mesh.get(proto, {}).get("cpu_us_per_req"), mtls.get(proto, {}).get("cpu_us_per_req")
            if a and b:
                lines.append("Two sidecars with mTLS / plaintext, CPU per request (%s): %.1f / %.1f µs = %.2f×." % (
                    "HTTP/1.1" if proto == "http1" else "HTTP/2", b, a, b / a))
        hs = mtls.get("handshakes", {})
        if hs:
            lines.append("New full mTLS handshakes on one core (openssl s_time -new): %.0f per second, %.0f µs of CPU each." % (
                hs["per_second"], hs["cpu_us_per_handshake"]))
    scaling = [n for n in ("outrigger", "outrigger-2w", "outrigger-quota", "outrigger-quota-2w") if n in res]
    if len(scaling) > 1:
        lines.append("")
        lines.append("| workers and CPU limit | workers | HTTP/1.1 req/s | CPU µs/req | HTTP/2 req/s | h2 CPU µs/req | p50 µs | p99 µs | max µs |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        label = {"outrigger": "1 worker, one core", "outrigger-2w": "2 workers, both cores (shared with the load generator)",
                 "outrigger-quota": "0.5-CPU quota, workers picked by the proxy", "outrigger-quota-2w": "0.5-CPU quota, 2 workers forced"}
        for n in scaling:
            r = res[n]
            h1, h2, lat = r.get("http1", {}), r.get("http2", {}), r.get("latency", {})
            lines.append("| %s | %s | %.0f | %.1f | %.0f | %.1f | %.0f | %.0f | %.0f |" % (
                label[n], "%.0f" % r["workers"] if r.get("workers") else "–", h1.get("rps", 0), h1.get("cpu_us_per_req", 0),
                h2.get("rps", 0), h2.get("cpu_us_per_req", 0), lat.get("p50_us", 0), lat.get("p99_us", 0), lat.get("max_us", 0)))
    lines.append("")
    lines.append("Medians of %d interleaved rounds, %d s per measurement, one proxy worker pinned to one core; "
                 "open-loop latency at %d req/s (h2load --h1 --rps). Machine: %s, %s cores. %s." % (
                     meta["rounds"], meta["duration"], meta["rate"], meta["cpu"], meta["cores"], meta["date"]))
    if meta.get("bin"):
        lines[-1] += " Outrigger rows: `%s`%s." % (meta["bin"], "; outrigger-base: `%s`" % meta["base_bin"] if meta.get("base_bin") else "")
    return "\n".join(lines)


def svg(res):
    names = [n for n in ("direct", "outrigger", "nginx", "haproxy", "outrigger-mesh", "outrigger-mesh-mtls", "outrigger-policies") if n in res]
    colors = {"direct": "#999", "outrigger": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728", "outrigger-mesh": "#9467bd",
              "outrigger-mesh-mtls": "#8c564b", "outrigger-policies": "#17becf"}
    W, H = 900, 420
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (W, H),
           '<rect width="100%" height="100%" fill="white"/>']
    # left: latency percentiles
    pcts = ["p50_us", "p90_us", "p99_us", "p999_us"]
    lat_names = [n for n in names if "latency" in res[n]]
    vmax = max([res[n]["latency"][p] for n in lat_names for p in pcts] + [1])
    x0, y0, ph = 50, 40, 300
    out.append('<text x="%d" y="20" font-weight="bold">Open-loop latency (µs) by percentile</text>' % x0)
    gw = 90
    for gi, p in enumerate(pcts):
        gx = x0 + gi * (gw + 10)
        out.append('<text x="%d" y="%d">%s</text>' % (gx + 20, y0 + ph + 20, p.replace("_us", "")))
        bw = gw / max(len(lat_names), 1)
        for ni, n in enumerate(lat_names):
            v = res[n]["latency"][p]
            h = ph * v / vmax
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %s: %d µs</title></rect>' % (
                gx + ni * bw, y0 + ph - h, bw - 2, h, colors[n], n, p, v))
    # right: CPU per request
    cpu_names = [n for n in names if "http1" in res[n]]
    cmax = max([res[n]["http1"]["cpu_us_per_req"] for n in cpu_names] + [1])
    x1 = 500
    out.append('<text x="%d" y="20" font-weight="bold">CPU µs per request (HTTP/1.1)</text>' % x1)
    for ni, n in enumerate(cpu_names):
        v = res[n]["http1"]["cpu_us_per_req"]
        h = ph * v / cmax
        x = x1 + ni * 62
        out.append('<rect x="%d" y="%.1f" width="50" height="%.1f" fill="%s"/>' % (x, y0 + ph - h, h, colors[n]))
        out.append('<text x="%d" y="%.1f">%.1f</text>' % (x + 8, y0 + ph - h - 4, v))
        out.append('<text x="%d" y="%d" transform="rotate(30 %d %d)">%s</text>' % (x, y0 + ph + 15, x, y0 + ph + 15, n))
    # legend
    for i, n in enumerate(names):
        out.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d">%s</text>' % (
            x0 + i * 140, H - 25, colors[n], x0 + i * 140 + 14, H - 16, n))
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rate", type=int, default=2000, help="open-loop request rate")
    ap.add_argument("--sidecar-rate", type=int, default=1000, help="request rate the sizing line is for")
    ap.add_argument("--only", help="comma-separated subjects (direct,outrigger,nginx,haproxy,outrigger-mesh,outrigger-mesh-mtls,outrigger-policies,outrigger-trace-100,outrigger-trace-1,outrigger-2w,outrigger-quota,outrigger-quota-2w; outrigger-base with --base-bin)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--base-bin", help="another outrigger binary, measured as the row outrigger-base (before/after a change)")
    ap.add_argument("--bin", help="the outrigger binary of every Outrigger row (default: target/release/outrigger, built "
                    "first; a PGO build from benches/pgo.sh is target/pgo/outrigger)")
    args = ap.parse_args()
    ensure_tools()
    global EXE
    if args.bin:
        EXE = os.path.abspath(args.bin)
        args.no_build = True  # the rows run the given build; build --base-bin yourself too
    if args.base_bin:
        args.base_bin = os.path.abspath(args.base_bin)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "outrigger"], cwd=ROOT, check=True)
    proxy_core, load_core = cores()
    tmp = tempfile.mkdtemp(prefix="outrigger-bench-")
    up = upstream_nginx(tmp, load_core)
    APP.append(up)
    SpanSink()
    rounds = []
    wanted = args.only.split(",") if args.only else None
    args.cgroup = None
    try:
        if wanted is None or {"outrigger-quota", "outrigger-quota-2w"} & set(wanted):
            args.cgroup = quota_cgroup()
        for r in range(args.rounds):
            rounds.append(run_round(args, tmp, proxy_core, load_core, r + 1))
    finally:
        up.stop()
        if args.cgroup:
            try:
                os.rmdir(args.cgroup)
            except OSError:
                pass
    res = median_rows(rounds)
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    meta = {"rounds": args.rounds, "duration": args.duration, "rate": args.rate, "cpu": cpu, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bin": os.path.relpath(EXE, ROOT), "base_bin": args.base_bin and os.path.relpath(args.base_bin, ROOT)}
    size = sizing(res, args.sidecar_rate)
    os.makedirs(RESULTS, exist_ok=True)
    # A partial run (--only) must not replace the full run the README quotes.
    stem = "partial" if args.only else "latest"
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "results": res, "rounds": rounds, "sizing": size}, f, indent=2)
    md = markdown(res, meta)
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(RESULTS, stem + ".svg"), "w") as f:
        f.write(svg(res))
    # The chart's sizing comes from full runs of this tree's plain build.
    if not args.only and not args.bin:
        write_chart(size)
    print(md)
    if "haproxy" in res and "outrigger" in res:
        ratio = res["outrigger"]["http1"]["cpu_us_per_req"] / res["haproxy"]["http1"]["cpu_us_per_req"]
        print("\nOutrigger CPU/request = %.2f x HAProxy's (same run)" % ratio)
    if "outrigger" in res:
        base = res["outrigger"]["http1"]["cpu_us_per_req"]
        for name, label in (("outrigger-trace-100", "100 %"), ("outrigger-trace-1", "1 %")):
            if name in res:
                t = res[name]["http1"]["cpu_us_per_req"]
                print("tracing at %s sampling (spans exported over OTLP): %.1f us CPU/request, %.2f x without tracing (%.1f us), HTTP/1.1 median of %d rounds" % (
                    label, t, t / base, base, args.rounds))
    print("\nsizing: %.1f millicores and %.1f MiB per 1,000 req/s -> at %d req/s: resources.requests {cpu: %s, memory: %s}, limits {cpu: %s, memory: %s}" % (
        size["millicores_per_1k_rps"], size["memory_mib"], size["rate"], size["requests"]["cpu"], size["requests"]["memory"],
        size["limits"]["cpu"], size["limits"]["memory"]))


if __name__ == "__main__":
    main()
