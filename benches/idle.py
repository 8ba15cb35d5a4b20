#!/usr/bin/env python3
"""Memory held by idle downstream connections: opens N keep-alive
connections to Outrigger's outbound listener, one request each (so every
connection has been through the HTTP/1 server and the pool), then holds
them idle and reads the proxy's resident memory. Writes
benches/results/idle.json.

  python3 benches/idle.py                 # 10,000 connections
  python3 benches/idle.py --connections 2000
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402

PROXY, ADMIN = 18701, 18710


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(n, soft), hard) if hard != resource.RLIM_INFINITY else n
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    load.ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "outrigger"], cwd=load.ROOT, check=True)
    raise_nofile(args.connections * 2 + 1000)  # inherited by the proxy too
    proxy_core, load_core = load.cores()
    tmp = tempfile.mkdtemp(prefix="outrigger-idle-")
    up = load.upstream_nginx(tmp, load_core)
    cfg = os.path.join(tmp, "idle.yaml")
    with open(cfg, "w") as f:
        f.write("admin: { address: 127.0.0.1:%d, probes: 127.0.0.1:%d }\n" % (ADMIN, ADMIN + 1))
        f.write("listeners: [ { name: out, role: outbound, address: 127.0.0.1:%d, max_connections: %d } ]\n" % (
            PROXY, args.connections + 100))
        f.write("routes: [ { name: r, backends: [ { cluster: up } ] } ]\n")
        f.write("clusters: [ { name: up, protocol: http1, endpoints: [ { address: 127.0.0.1:%d } ] } ]\n" % load.UP_PORT)
    exe = os.path.join(load.ROOT, "target", "release", "outrigger")
    proxy = load.Proc([exe, "run", "--config", cfg, "--threads", "1", "--log-level", "warn"], proxy_core, PROXY)
    pid = proxy.p.pid
    socks = []
    try:
        time.sleep(0.5)
        idle_rss = load.rss_mib([pid])
        for i in range(args.connections):
            s = socket.create_connection(("127.0.0.1", PROXY))
            s.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            got = b""
            while not got.endswith(load.BODY.encode()):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection %d closed" % i)
                got += chunk
            socks.append(s)
        time.sleep(1)
        held_rss = load.rss_mib([pid])
        with open("/proc/%d/status" % pid) as f:
            threads = [l for l in f if l.startswith("Threads:")][0].split()[1]
        res = {
            "connections": len(socks),
            "rss_idle_mib": round(idle_rss, 1),
            "rss_with_connections_mib": round(held_rss, 1),
            "kib_per_connection": round((held_rss - idle_rss) * 1024 / len(socks), 2),
            "threads": int(threads),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    finally:
        for s in socks:
            s.close()
        proxy.stop()
        up.stop()
    os.makedirs(load.RESULTS, exist_ok=True)
    with open(os.path.join(load.RESULTS, "idle.json"), "w") as f:
        json.dump(res, f, indent=2)
    print("%d idle keep-alive connections: RSS %.1f MiB (idle proxy %.1f MiB) = %.1f KiB per connection" % (
        res["connections"], res["rss_with_connections_mib"], res["rss_idle_mib"], res["kib_per_connection"]))


if __name__ == "__main__":
    main()
