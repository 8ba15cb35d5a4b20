#!/usr/bin/env python3
"""Wake-ups per request, next to HAProxy: the proxy's threads' context
switches (voluntary: it slept and was woken; involuntary: preempted) per
request over an open-loop run at 2,000 req/s, and that run's latency.

    python3 benches/wakeups.py                      # outrigger, haproxy, twice each
    python3 benches/wakeups.py outrigger haproxy    # any order, any count

Same setup as benches/load.py (it borrows its parts): NGINX upstream and load
generator on core 1, the proxy alone on core 0, one worker.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load as L  # noqa: E402

RATE, SECONDS, WARM_UP = 2000, 5, 1


def main():
    L.ensure_tools()
    names = sys.argv[1:] or ["outrigger", "haproxy", "outrigger", "haproxy"]
    tmp = tempfile.mkdtemp()
    up = L.upstream_nginx(tmp, "1")
    try:
        for name in names:
            p = L.proxy_outrigger(tmp, "0") if name == "outrigger" else L.proxy_haproxy(tmp, "0")
            try:
                pids = L.pids_of(p.p.pid)
                v0, i0, _ = L.switches(pids)
                lat = L.open_loop(L.PROXY_PORT, RATE, SECONDS, "1", tmp)
                v1, i1, threads = L.switches(pids)
                # The counts include h2load's warm-up second.
                n = max(lat["samples"], 1) * (SECONDS + WARM_UP) / SECONDS
                print("%-10s threads %d  voluntary switches/request %.2f  involuntary %.3f  p50 %d  p99 %d  p99.9 %d us" % (
                    name, threads, (v1 - v0) / n, (i1 - i0) / n, lat["p50_us"], lat["p99_us"], lat["p999_us"]), flush=True)
            finally:
                p.stop()
    finally:
        up.stop()


if __name__ == "__main__":
    main()
