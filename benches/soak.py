#!/usr/bin/env python3
"""Soak: Outrigger under a steady open-loop load for minutes, while its
config is reloaded every few seconds and its endpoints churn (killed and
restarted, added to and removed from the config). Samples resident memory,
open file descriptors and p99 latency every few seconds; checks that none
grows beyond a stated bound; writes benches/results/soak.{json,md,svg}.

  python3 benches/soak.py                    # 10 minutes at 500 req/s
  python3 benches/soak.py --minutes 1        # a quick look

This is a benchmark, not a test: it asserts nothing in CI; its figures
(and whether they stayed within the bound) are in the README.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the harness's helpers: processes, NGINX, tools)

PORTS = [18601, 18602, 18603, 18604]  # upstream NGINX instances
PROXY, ADMIN = 18600, 18610
SAMPLE = 5  # seconds per sample (one h2load segment)
# Bounds: after the first minute (pools, buffers, allocator warm), resident
# memory may not grow by more than this over the rest of the run, nor file
# descriptors beyond what the churn itself explains.
RSS_GROWTH_MIB = 8
FD_SLACK = 64


def upstream(tmp, port, core):
    conf = os.path.join(tmp, "up%d.conf" % port)
    with open(conf, "w") as f:
        f.write(load.nginx_head(tmp, "up%d" % port) + """
  server { listen 127.0.0.1:%d; location / { default_type text/plain; return 200 "%s"; } } }
""" % (port, load.BODY.replace("\n", "\\n")))
    return load.Proc([load.binary("nginx"), "-c", conf, "-p", tmp], core, port)


def config(path, endpoints, variant):
    """Two variants of one config, alternated on every reload: different
    route timeouts, retry settings and weights; the endpoint list follows the churn."""
    eps = ", ".join("{ address: 127.0.0.1:%d }" % p for p in endpoints)
    timeout = "2s" if variant else "3s"
    attempts = 3 if variant else 2
    with open(path + ".tmp", "w") as f:
        f.write("admin: { address: 127.0.0.1:%d, probes: 127.0.0.1:%d }\n" % (ADMIN, ADMIN + 1))
        f.write("listeners: [ { name: out, role: outbound, address: 127.0.0.1:%d } ]\n" % PROXY)
        f.write("routes: [ { name: r, backends: [ { cluster: a, weight: %d }, { cluster: b, weight: 1 } ], timeout: %s, "
                "retry: { attempts: %d, retry_on: [gateway-error, connect-failure, reset] } } ]\n" % (3 if variant else 1, timeout, attempts))
        f.write("clusters:\n")
        f.write("  - { name: a, protocol: http1, endpoints: [ %s ], outlier_detection: { consecutive_gateway_errors: 3, base_ejection: 5s } }\n" % eps)
        f.write("  - { name: b, protocol: http1, endpoints: [ %s ] }\n" % eps)
    os.replace(path + ".tmp", path)  # atomic, as a ConfigMap update is


def fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def segment(rate, seconds, core, tmp):
    """One open-loop h2load segment: (p99 ms, requests, failed)."""
    log = os.path.join(tmp, "seg.log")
    if os.path.exists(log):
        os.remove(log)  # h2load appends to an existing log
    out = subprocess.run(
        ["taskset", "-c", core, "h2load", "--h1", "-c", "16", "-t", "1", "--rps", str(max(1, rate // 16)),
         "-D", str(seconds), "--log-file", log, "http://127.0.0.1:%d/" % PROXY],
        capture_output=True, text=True)
    lat = []
    failed = 0
    try:
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    status = int(parts[1])
                    if status < 200 or status >= 300:
                        failed += 1
                    lat.append(int(parts[2]) / 1000.0)  # µs → ms
    except OSError:
        pass
    for line in out.stdout.splitlines():
        if line.startswith("requests:"):
            # "requests: N total, N started, N done, N succeeded, N failed, N errored"
            nums = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
            if len(nums) >= 6:
                failed = max(failed, nums[4] + nums[5])
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1] if lat else 0.0
    return p99, len(lat), failed


def svg(samples, bound):
    w, h, pad = 900, 540, 50
    panels = [("RSS MiB", "rss_mib"), ("open fds", "fds"), ("p99 ms", "p99_ms")]
    ph = (h - pad) / len(panels)
    t_max = max(s["t"] for s in samples) or 1
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (w, h)]
    out.append('<rect width="100%" height="100%" fill="white"/>')
    for i, (title, key) in enumerate(panels):
        top = pad / 2 + i * ph
        vals = [s[key] for s in samples]
        lo, hi = 0, max(vals) * 1.15 or 1
        if key == "rss_mib":
            hi = max(hi, bound["rss_limit_mib"] * 1.05)
        x = lambda t: pad + (w - 2 * pad) * t / t_max  # noqa: E731
        y = lambda v: top + ph - 25 - (ph - 40) * (v - lo) / (hi - lo)  # noqa: E731
        out.append('<text x="%d" y="%d" font-weight="bold">%s</text>' % (pad, top + 12, title))
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#999"/>' % (pad, y(lo), w - pad, y(lo)))
        out.append('<text x="5" y="%.1f">%.1f</text><text x="5" y="%.1f">%.1f</text>' % (y(hi) + 10, hi, y(lo), lo))
        pts = " ".join("%.1f,%.1f" % (x(s["t"]), y(s[key])) for s in samples)
        out.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="%s"/>' % pts)
        if key == "rss_mib":
            out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#d62728" stroke-dasharray="4"/>' % (
                pad, y(bound["rss_limit_mib"]), w - pad, y(bound["rss_limit_mib"])))
            out.append('<text x="%d" y="%.1f" fill="#d62728">bound</text>' % (w - pad - 40, y(bound["rss_limit_mib"]) - 3))
    out.append('<text x="%d" y="%d">seconds: 0 … %d (reloads every 3 s, an endpoint killed or restarted every 15 s)</text>' % (pad, h - 8, t_max))
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    load.ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "outrigger"], cwd=load.ROOT, check=True)
    proxy_core, load_core = load.cores()
    tmp = tempfile.mkdtemp(prefix="outrigger-soak-")
    ups = {p: upstream(tmp, p, load_core) for p in PORTS}
    cfg = os.path.join(tmp, "soak.yaml")
    in_config = list(PORTS[:3])
    config(cfg, in_config, True)
    exe = os.path.join(load.ROOT, "target", "release", "outrigger")
    proxy = load.Proc([exe, "run", "--config", cfg, "--threads", "1", "--log-level", "warn", "--watch-interval", "500ms"],
                      proxy_core, PROXY)
    pid = proxy.p.pid
    stop = threading.Event()
    events = {"reloads": 0, "kills": 0, "restarts": 0, "config_churn": 0}

    def churn():
        variant, tick = False, 0
        while not stop.wait(3):
            tick += 1
            # Endpoint churn in the config every 4th reload: the fourth
            # endpoint joins or leaves.
            if tick % 4 == 0:
                if PORTS[3] in in_config:
                    in_config.remove(PORTS[3])
                else:
                    in_config.append(PORTS[3])
                events["config_churn"] += 1
            config(cfg, in_config, variant)
            variant = not variant
            events["reloads"] += 1
            # Every 5th tick (15 s), kill an endpoint or restart the dead one.
            if tick % 5 == 0:
                dead = [p for p, u in ups.items() if u is None]
                if dead:
                    ups[dead[0]] = upstream(tmp, dead[0], load_core)
                    events["restarts"] += 1
                else:
                    victim = PORTS[(tick // 5) % 3]
                    ups[victim].stop()
                    ups[victim] = None
                    events["kills"] += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    samples = []
    start = time.time()
    try:
        while time.time() - start < args.minutes * 60:
            p99, n, failed = segment(args.rate, SAMPLE, load_core, tmp)
            samples.append({"t": round(time.time() - start, 1), "rss_mib": round(load.rss_mib([pid]), 2), "fds": fds(pid),
                            "p99_ms": round(p99, 3), "requests": n, "failed": failed})
            s = samples[-1]
            print("t=%5.0fs rss=%.1f MiB fds=%d p99=%.2f ms requests=%d failed=%d" % (
                s["t"], s["rss_mib"], s["fds"], s["p99_ms"], s["requests"], s["failed"]), flush=True)
    finally:
        stop.set()
        t.join()
        proxy.stop()
        for u in ups.values():
            if u is not None:
                u.stop()
    warm = [s for s in samples if s["t"] >= 60] or samples
    base_rss = min(s["rss_mib"] for s in warm[:3])
    base_fds = max(s["fds"] for s in warm[:3])
    bound = {"rss_limit_mib": base_rss + RSS_GROWTH_MIB, "fd_limit": base_fds + FD_SLACK}
    summary = {
        "minutes": args.minutes, "rate": args.rate, "events": events,
        "rss_mib": {"first": samples[0]["rss_mib"], "after_warmup": base_rss, "max": max(s["rss_mib"] for s in samples),
                    "last": samples[-1]["rss_mib"]},
        "fds": {"first": samples[0]["fds"], "max": max(s["fds"] for s in samples), "last": samples[-1]["fds"]},
        "p99_ms": {"median": statistics.median(s["p99_ms"] for s in samples), "max": max(s["p99_ms"] for s in samples)},
        "requests": sum(s["requests"] for s in samples), "failed": sum(s["failed"] for s in samples),
        "within_bound": all(s["rss_mib"] <= bound["rss_limit_mib"] and s["fds"] <= bound["fd_limit"] for s in warm),
        "bound": bound, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(load.RESULTS, exist_ok=True)
    with open(os.path.join(load.RESULTS, "soak.json"), "w") as f:
        json.dump({"summary": summary, "samples": samples}, f, indent=1)
    with open(os.path.join(load.RESULTS, "soak.svg"), "w") as f:
        f.write(svg(samples, bound))
    md = (
        "Soak, %g min at %d req/s open loop (%s): %d config reloads, %d endpoint kills, %d restarts, %d endpoint list changes.\n\n"
        "| | first | after 1 min | max | last | bound |\n|---|---:|---:|---:|---:|---:|\n"
        "| RSS MiB | %.1f | %.1f | %.1f | %.1f | %.1f |\n| open fds | %d | – | %d | %d | %d |\n\n"
        "p99 per %d s sample: median %.2f ms, max %.2f ms. Requests %d, failed %d (%.3f %%). Within bound: %s.\n" % (
            args.minutes, args.rate, summary["date"], events["reloads"], events["kills"], events["restarts"], events["config_churn"],
            summary["rss_mib"]["first"], base_rss, summary["rss_mib"]["max"], summary["rss_mib"]["last"], bound["rss_limit_mib"],
            summary["fds"]["first"], summary["fds"]["max"], summary["fds"]["last"], bound["fd_limit"],
            SAMPLE, summary["p99_ms"]["median"], summary["p99_ms"]["max"], summary["requests"], summary["failed"],
            100.0 * summary["failed"] / max(1, summary["requests"]), "yes" if summary["within_bound"] else "NO"))
    with open(os.path.join(load.RESULTS, "soak.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    sys.exit(0 if summary["within_bound"] else 1)


if __name__ == "__main__":
    main()
