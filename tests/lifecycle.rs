//! Readiness, draining on SIGTERM and on `POST /shutdown`, the drain deadline.

mod support;

use std::time::Duration;
use support::*;

fn yaml(up: &Upstream) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ] }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        up.addr
    )
}

/// Waits (on the upstream's own count) until `n` requests have reached it.
async fn until_hits(up: &Upstream, n: usize) {
    tokio::time::timeout(READY_TIMEOUT, async {
        while up.hits() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("requests never reached the upstream");
}

async fn drains_in_flight_requests(threads: &str, trigger: impl FnOnce(&ProxyProc)) {
    let up = Upstream::with(
        "slow",
        UpstreamOpts {
            delay: Some(Duration::from_millis(700)),
            status: None,
            ..Default::default()
        },
    )
    .await;
    let mut p = ProxyProc::start_with(&yaml(&up), &["--threads", threads]);
    assert_eq!(http_get_raw(p.probes, "/ready").0, 200);
    assert_eq!(http_get_raw(p.probes, "/live").0, 200);
    let addr = p.addr("out");

    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(async move {
            let c = if i % 2 == 0 {
                TestClient::h1(addr)
            } else {
                TestClient::h2(addr)
            };
            let r = get(&c, "svc", "/").await;
            (
                i % 2 == 0,
                r.status,
                r.header("connection").map(str::to_owned),
            )
        }));
    }
    until_hits(&up, 8).await;
    trigger(&p);

    // Readiness fails while requests are still in flight (they take 700 ms).
    let probes = p.probes;
    let ready = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let status = http_get_raw(probes, "/ready").0;
            if status != 200 || std::time::Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await
    .unwrap();
    assert_eq!(ready, 503);
    for t in tasks {
        let (h1, status, connection) = t.await.unwrap();
        assert_eq!(status, 200, "an in-flight request failed during drain");
        if h1 {
            assert_eq!(
                connection.as_deref(),
                Some("close"),
                "HTTP/1 responses during drain close the connection"
            );
        }
    }
    // New connections are refused: the listener is closed.
    assert!(std::net::TcpStream::connect(addr).is_err());
    let status = tokio::task::spawn_blocking(move || p.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    drains_in_flight_requests("2", |p| p.signal("TERM")).await;
}

/// With one worker (HTTP/2 streams on their connection's task, which a
/// drain asks to close) as well as with two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_endpoint_drains_like_sigterm() {
    drains_in_flight_requests("1", |p| {
        let r = raw(p.admin, b"POST /shutdown HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_ends_a_drain_that_would_never_finish() {
    let up = Upstream::with(
        "stuck",
        UpstreamOpts {
            delay: Some(Duration::from_secs(600)),
            status: None,
            ..Default::default()
        },
    )
    .await;
    let mut p = ProxyProc::start_with(&yaml(&up), &["--drain-timeout", "200ms"]);
    let addr = p.addr("out");
    let stuck = tokio::spawn(async move {
        let c = TestClient::h1(addr);
        let req = http::Request::builder()
            .uri("/")
            .header("host", "svc")
            .body(Default::default())
            .unwrap();
        c.request(req).await.is_err()
    });
    until_hits(&up, 1).await;
    p.signal("INT");
    let status = tokio::task::spawn_blocking(move || p.wait_exit())
        .await
        .unwrap();
    assert!(status.success());
    assert!(
        stuck.await.unwrap(),
        "the stuck request ends when the proxy exits"
    );
}

#[test]
fn admin_endpoints_answer() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start("app"));
    let p = ProxyProc::start(&yaml(&up));
    let (s, body, _) = http_get_raw(p.admin, "/config");
    assert_eq!(s, 200);
    assert!(
        body.contains("# version: 1") && body.contains("name: app"),
        "{body}"
    );
    let (s, body, _) = http_get_raw(p.admin, "/clusters");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["clusters"][0]["endpoints"][0]["address"],
        up.addr.to_string()
    );
    assert_eq!(v["clusters"][0]["endpoints"][0]["state"], "healthy");
    assert_eq!(v["clusters"][0]["requests_total"], 0);
    // Totals count what was served; `open` is what is in flight now.
    let c = TestClient::h1(p.addr("out"));
    for _ in 0..3 {
        assert_eq!(rt.block_on(get(&c, "app.svc", "/")).status, 200);
    }
    let v: serde_json::Value = serde_json::from_str(&http_get_raw(p.admin, "/clusters").1).unwrap();
    assert_eq!(v["clusters"][0]["requests_total"], 3);
    assert_eq!(v["clusters"][0]["open"]["requests"], 0);
    let (s, body, _) = http_get_raw(p.probes, "/metrics");
    assert_eq!(s, 200);
    for name in [
        "outrigger_config_version 1",
        "outrigger_connections",
        "outrigger_process_resident_memory_bytes",
        "outrigger_feed_updates_total",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
    assert_eq!(
        http_get_raw(p.probes, "/config").0,
        404,
        "the probe port serves no admin endpoints"
    );
    assert_eq!(http_get_raw(p.admin, "/shutdown").0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_downstream_connections_are_closed() {
    use std::io::{Read, Write};
    let up = Upstream::start("app").await;
    let yaml = yaml(&up).replace(
        "address: 127.0.0.1:0 }",
        "address: 127.0.0.1:0, idle_timeout: 100ms }",
    );
    let p = ProxyProc::start(&yaml);
    let addr = p.addr("out");
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Keep-alive, then silence: the proxy closes the connection (read → 0).
        matches!(s.read(&mut buf), Ok(0))
    })
    .await
    .unwrap();
    assert!(closed, "idle connection was not closed");
    // HTTP/2 too: the connection goes away after the idle period.
    let c = TestClient::h2(addr);
    assert_eq!(get(&c, "svc", "/").await.status, 200);
    let mut gone = false;
    for _ in 0..300 {
        let s = c.h2_sender().await;
        if s.is_none_or(|s| s.is_closed()) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "idle HTTP/2 connection was not closed");
}

/// The access log is its own output: at `--log-level warn` the diagnostic
/// info lines are gone, the access lines are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_does_not_follow_the_log_level() {
    use std::io::{BufRead, BufReader};
    let app = Upstream::start("app").await;
    let (port, probes) = (free_port(), free_port());
    let dir = temp_dir();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "admin: {{ address: 127.0.0.1:{}, probes: 127.0.0.1:{probes} }}\nlisteners: [ {{ name: out, role: outbound, address: 127.0.0.1:{port}, access_log: true }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ] }} ]\nclusters: [ {{ name: c, endpoints: [ {{ address: {} }} ] }} ]\n",
            free_port(),
            app.addr
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["run", "--log-level", "warn", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let probe = format!("127.0.0.1:{probes}").parse().unwrap();
    while std::net::TcpStream::connect(probe).is_err() || http_get_raw(probe, "/ready").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = TestClient::h1(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(get(&c, "x", "/logged").await.status, 200);
    let _ = child.kill();
    let _ = child.wait();
    let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"access\"") && l.contains("/logged")),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("\"level\":\"INFO\"") && !l.contains("\"message\":\"access\"")),
        "info lines at warn: {lines:?}"
    );
}

/// Shutdown that keeps the app working: the inbound side stops accepting
/// at once (callers move away) while the outbound side, with a drain
/// delay, still takes the app's new connections; once the app has none
/// open, the proxy exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_side_outlives_the_inbound_side_on_shutdown() {
    let app = Upstream::start("app").await;
    let mut p = ProxyProc::start(&format!(
        "listeners:\n  - {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {} }}\n  - {{ name: out, role: outbound, address: 127.0.0.1:0, drain_delay: 30s }}\nroutes: [ {{ name: r, listeners: [out], backends: [ {{ cluster: c }} ] }} ]\nclusters: [ {{ name: c, endpoints: [ {{ address: {} }} ] }} ]\n",
        app.addr, app.addr
    ));
    let (inbound, outbound) = (p.addr("in"), p.addr("out"));
    p.signal("TERM");
    // The inbound listener closes.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while std::net::TcpStream::connect(inbound).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "inbound still accepting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The app's new outbound connection still works, as do a few more.
    for _ in 0..3 {
        let c = TestClient::h1(outbound);
        assert_eq!(get(&c, "x", "/").await.status, 200);
    }
    // Nothing open for a second: it stops accepting and exits, long before
    // the 30 s delay.
    let status = p.wait_exit();
    assert!(status.success(), "{status:?}");
    p.wait_log(|l| l.contains("drain delay over"));
}

/// The access log names the upstream also when the request failed there
/// (a timed-out attempt leaves no response naming it), and says how long
/// the upstream took to its first byte when it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_upstream_of_a_timeout_and_the_time_to_first_byte() {
    let hung = Upstream::hanging("hung").await;
    let app = Upstream::start("app").await;
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes:\n  - {{ name: stuck, match: {{ host: stuck }}, backends: [ {{ cluster: hung }} ], timeout: 200ms }}\n  - {{ name: ok, backends: [ {{ cluster: app }} ] }}\nclusters:\n  - {{ name: hung, endpoints: [ {{ address: {} }} ] }}\n  - {{ name: app, endpoints: [ {{ address: {} }} ] }}\n",
        hung.addr, app.addr
    ));
    let c = TestClient::h1(p.addr("out"));
    assert_eq!(get(&c, "stuck", "/hangs").await.status, 504);
    assert_eq!(get(&c, "app", "/answers").await.status, 200);
    let field = |line: &str, name: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["fields"][name].clone()
    };
    let timed_out = p.wait_log(|l| l.contains("\"message\":\"access\"") && l.contains("/hangs"));
    assert_eq!(field(&timed_out, "status"), 504, "{timed_out}");
    assert_eq!(
        field(&timed_out, "upstream"),
        hung.addr.to_string().as_str(),
        "{timed_out}"
    );
    assert!(
        field(&timed_out, "upstream_ttfb_ms").is_null(),
        "{timed_out}"
    );
    let answered = p.wait_log(|l| l.contains("\"message\":\"access\"") && l.contains("/answers"));
    assert_eq!(
        field(&answered, "upstream"),
        app.addr.to_string().as_str(),
        "{answered}"
    );
    let ttfb = field(&answered, "upstream_ttfb_ms")
        .as_f64()
        .expect("upstream_ttfb_ms");
    let total = field(&answered, "duration_ms").as_f64().unwrap();
    assert!(ttfb > 0.0 && ttfb <= total, "{answered}");
}

/// Retries carry the trail: a request whose every attempt timed out names
/// the endpoint its last attempt went to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_last_endpoint_a_retried_request_tried() {
    let hang = support::upstream::Faults {
        hang: true,
        ..Default::default()
    };
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.set_faults(hang.clone());
    b.set_faults(hang);
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ], timeout: 2s, retry: {{ attempts: 2, retry_on: [5xx], per_try_timeout: 100ms, backoff: {{ base: 1ms, max: 1ms }}, budget: {{ percent: 100 }} }} }} ]\nclusters: [ {{ name: c, endpoints: [ {{ address: {} }}, {{ address: {} }} ] }} ]\n",
        a.addr, b.addr
    ));
    let c = TestClient::h1(p.addr("out"));
    assert_eq!(get(&c, "c", "/retried").await.status, 504);
    let line = p.wait_log(|l| l.contains("\"message\":\"access\"") && l.contains("/retried"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["attempts"], 2, "{line}");
    let upstream = v["fields"]["upstream"].as_str().unwrap_or("");
    assert!(
        upstream == a.addr.to_string() || upstream == b.addr.to_string(),
        "{line}"
    );
}

/// A cgroup with a CPU quota, removed on drop (cgroup v2 `cpu.max` or v1
/// `cpu.cfs_quota_us`); `None` where this machine does not let us make one.
struct QuotaCgroup {
    dir: std::path::PathBuf,
}

impl QuotaCgroup {
    fn new(quota_us: u64, period_us: u64) -> Option<QuotaCgroup> {
        let name = format!("outrigger-test-{}", std::process::id());
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            std::path::Path::new("/sys/fs/cgroup").join(&name)
        } else {
            std::path::Path::new("/sys/fs/cgroup/cpu").join(&name)
        };
        let made = (|| {
            if v2 {
                // The cpu controller must be on for the root's children
                // (refused inside a container whose root holds processes).
                let on = std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")?;
                if !on.split_whitespace().any(|c| c == "cpu") {
                    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu")?;
                }
                std::fs::create_dir(&dir)?;
                std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))
            } else {
                std::fs::create_dir(&dir)?;
                std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())?;
                std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())
            }
        })();
        match made {
            Ok(()) => Some(QuotaCgroup { dir }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                eprintln!(
                    "skipped: cannot make a cgroup with a CPU quota here ({e}): needs root and a writable cgroup tree"
                );
                None
            }
        }
    }
}

impl Drop for QuotaCgroup {
    fn drop(&mut self) {
        // The proxies have been killed; the kernel may take a moment to
        // see their cgroup empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove the test cgroup {}", self.dir.display());
    }
}

/// The first two CPUs this process may run on ("0-3,6" style list).
fn two_cpus() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
        cpus.extend((a..=b).take(2));
        if cpus.len() >= 2 {
            return Some(format!("{},{}", cpus[0], cpus[1]));
        }
    }
    None
}

/// `outrigger run` with no `--threads` inside `cgroup` (if any), on `cpus`
/// (two of them): the worker count its ready line and its gauge report.
fn workers_started(cpus: &str, cgroup: Option<&QuotaCgroup>) -> (u64, f64) {
    let dir = temp_dir();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "admin: { address: 127.0.0.1:0, probes: 127.0.0.1:0 }\nlisteners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]\nroutes: [ { name: r, backends: [ { cluster: app } ] } ]\nclusters: [ { name: app, endpoints: [ { address: 127.0.0.1:9 } ] } ]\n",
    )
    .unwrap();
    let join = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs && ", c.dir.display())
    });
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "{join}exec taskset -c {cpus} {bin} run --config {c} --log-level info",
            bin = bin(),
            c = config.display()
        ))
        .env_remove("OUTRIGGER_THREADS");
    let p = ProxyProc::spawn(cmd, config, "\"message\":\"ready\"");
    let ready = p
        .log()
        .into_iter()
        .find(|l| l.contains("\"message\":\"ready\""))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .and_then(|v| v["fields"]["workers"].as_u64())
        .expect("the ready line names the worker count");
    let gauge = p
        .metric("outrigger_worker_threads", &[])
        .expect("outrigger_worker_threads");
    (ready, gauge)
}

/// A sidecar limited to half a CPU runs one worker (no cross-thread
/// wake-ups, no two threads burning one quota), where the same start on two
/// CPUs without a limit runs two.
#[tokio::test]
async fn a_half_cpu_quota_gives_one_worker() {
    let Some(cpus) = two_cpus() else {
        eprintln!("skipped: needs two CPUs");
        return;
    };
    let Some(cg) = QuotaCgroup::new(50_000, 100_000) else {
        return;
    };
    assert_eq!(workers_started(&cpus, None), (2, 2.0));
    assert_eq!(workers_started(&cpus, Some(&cg)), (1, 1.0));
}
