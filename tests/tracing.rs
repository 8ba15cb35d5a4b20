//! Distributed tracing from a user's side: a request across two proxies
//! (an outbound sidecar, then the callee's inbound sidecar) yields spans
//! with one trace id and the right parent links at a collector that
//! decodes them with OpenTelemetry's own protobuf definitions; the app
//! sees the context; B3 callers hear B3; a malformed header starts a new
//! trace; a collector that is down or slow costs dropped spans, never a
//! failed request. Also the deadline told to the app.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

fn python() -> String {
    std::env::var("OUTRIGGER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The collector stand-in (tests/support/otlp_collector.py).
struct Collector {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Collector {
    fn start(mode: &str) -> Collector {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/otlp_collector.py"
        );
        let mut child = Command::new(python())
            .args([script, mode])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (tests/run.sh installs opentelemetry-proto)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("collector: {first}"))
            .parse()
            .unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let s2 = spans.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                s2.lock().unwrap().push(serde_json::from_str(&l).unwrap());
            }
        });
        Collector { child, port, spans }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Waits until `n` spans arrived.
    fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let s = self.spans.lock().unwrap().clone();
            if s.len() >= n {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} spans: {s:?}",
                s.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tracing(url: &str) -> String {
    format!("tracing: {{ otlp: \"{url}\", sampling: 1.0, flush_interval: 50ms }}\n")
}

/// B's inbound sidecar in front of `app`, and A's outbound sidecar whose
/// route `b.svc` goes to B.
fn two_hops(app: &Upstream, a_tracing: &str, b_tracing: &str) -> (ProxyProc, ProxyProc) {
    let b = ProxyProc::start(&format!(
        "node: {{ service: b }}\nlisteners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {} }} ]\n{b_tracing}",
        app.addr
    ));
    let a = ProxyProc::start(&format!(
        "node: {{ service: a }}\nlisteners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes: [ {{ name: to-b, match: {{ host: b.svc }}, backends: [ {{ cluster: b }} ], timeout: 2s }} ]\nclusters: [ {{ name: b, endpoints: [ {{ address: {} }} ] }} ]\n{a_tracing}",
        b.addr("in")
    ));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_across_two_sidecars_is_one_trace() {
    let col = Collector::start("ok");
    let app = Upstream::start("app").await;
    let (a, _b) = two_hops(&app, &tracing(&col.url()), &tracing(&col.url()));
    let c = TestClient::h1(a.addr("out"));
    let r = get(&c, "b.svc", "/orders/7").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let spans = col.wait_for(2);
    let a_span = spans.iter().find(|s| s["service"] == "a").unwrap();
    let b_span = spans.iter().find(|s| s["service"] == "b").unwrap();
    assert_eq!(a_span["trace_id"], b_span["trace_id"], "one trace");
    assert_eq!(
        a_span["parent_span_id"], "",
        "the first proxy starts the trace"
    );
    assert_eq!(
        b_span["parent_span_id"], a_span["span_id"],
        "B's parent is A's span"
    );
    assert_eq!(a_span["kind"], 3, "client");
    assert_eq!(b_span["kind"], 2, "server");
    assert_eq!(a_span["attributes"]["outrigger.route"], "to-b");
    assert_eq!(a_span["attributes"]["http.response.status_code"], 200);
    assert_eq!(a_span["attributes"]["url.path"], "/orders/7");
    assert!(a_span["attributes"]["server.address"].as_str().is_some());
    assert_eq!(a_span["scope"], "outrigger");
    assert_eq!(a_span["content_type"], "application/x-protobuf");
    // The app sees the context of B's span.
    let seen = app.last();
    let tp = seen.headers["traceparent"].to_str().unwrap().to_string();
    let trace = a_span["trace_id"].as_str().unwrap();
    assert_eq!(
        tp,
        format!("00-{trace}-{}-01", b_span["span_id"].as_str().unwrap())
    );
    // The trace id is in the access log, with the fields users expect.
    let line = a.wait_log(|l| l.contains("\"message\":\"access\"") && l.contains(trace));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert!(
        f["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert_eq!(f["request_id"].as_str().unwrap().len(), 32, "{line}");
    assert_eq!(f["protocol"], "HTTP/1.1");
    assert_eq!(f["upstream"], _b.addr("in").to_string());
    assert_eq!(f["status"], 200);
    // The deadline the app is told: the route's 2 s, less what is spent.
    let left: u64 = seen.headers["x-outrigger-expected-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2000).contains(&left), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_context_is_continued_b3_too_and_a_bad_one_restarted() {
    let col = Collector::start("ok");
    let app = Upstream::start("app").await;
    let (a, _b) = two_hops(&app, &tracing(&col.url()), "");
    let c = TestClient::h1(a.addr("out"));
    // W3C from the app: continued, sampled flag honoured.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = send(
        &c,
        "GET",
        "b.svc",
        "/",
        &[("traceparent", tp), ("tracestate", "v=1")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = app.last();
    let got = seen.headers["traceparent"].to_str().unwrap();
    assert!(
        got.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{got}"
    );
    assert!(
        !got.contains("00f067aa0ba902b7"),
        "this proxy's span is the parent now"
    );
    assert_eq!(seen.headers["tracestate"], "v=1");
    let s = col.wait_for(1);
    assert_eq!(s[0]["parent_span_id"], "00f067aa0ba902b7");
    // B3 multi from the app: the next hop hears B3 too, same trace.
    let r = send(
        &c,
        "GET",
        "b.svc",
        "/",
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = app.last();
    assert_eq!(
        seen.headers["x-b3-traceid"],
        "463ac35c9f6413ad48485a3953bb6124"
    );
    assert_eq!(seen.headers["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    assert_ne!(seen.headers["x-b3-spanid"], "a2fb4a1d1a96d312");
    assert!(
        seen.headers["traceparent"]
            .to_str()
            .unwrap()
            .starts_with("00-463ac35c9f6413ad48485a3953bb6124-")
    );
    // A caller that says "not sampled": propagated, no span.
    let before = col.spans.lock().unwrap().len();
    let unsampled = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let r = send(&c, "GET", "b.svc", "/", &[("traceparent", unsampled)], "").await;
    assert_eq!(r.status, 200);
    assert!(
        app.last().headers["traceparent"]
            .to_str()
            .unwrap()
            .ends_with("-00")
    );
    // A malformed traceparent: a new trace, counted, never forwarded.
    let bad = "00-not-a-trace-01";
    let r = send(&c, "GET", "b.svc", "/", &[("traceparent", bad)], "").await;
    assert_eq!(r.status, 200);
    let got = app.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(got, bad);
    assert_eq!(got.len(), 55, "{got}");
    assert_eq!(
        a.metric("outrigger_trace_context_invalid_total", &[]),
        Some(1.0)
    );
    // The unsampled request made no span; the restarted one did.
    let spans = col.wait_for(before + 1);
    assert!(
        spans
            .iter()
            .all(|s| s["trace_id"] != "5bf92f3577b34da6a3ce929d0e0e4736")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_or_slow_never_fails_a_request() {
    let app = Upstream::start("app").await;
    // Down: nothing listens there.
    let (a, _b) = two_hops(
        &app,
        &tracing(&format!("http://{}/v1/traces", dead_addr())),
        "",
    );
    let c = TestClient::h1(a.addr("out"));
    for _ in 0..50 {
        assert_eq!(get(&c, "b.svc", "/").await.status, 200);
    }
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while a
        .metric(
            "outrigger_trace_spans_dropped_total",
            &["reason=\"export-failed\""],
        )
        .unwrap_or(0.0)
        < 50.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "spans not counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Slow: the one export in flight hangs; a small queue fills and drops.
    let slow = Collector::start("slow");
    let (a, _b) = two_hops(
        &app,
        &format!(
            "tracing: {{ otlp: \"{}\", max_queue: 4, max_batch: 2, flush_interval: 10ms }}\n",
            slow.url()
        ),
        "",
    );
    let c = TestClient::h1(a.addr("out"));
    for _ in 0..100 {
        assert_eq!(get(&c, "b.svc", "/").await.status, 200);
    }
    assert!(
        a.metric(
            "outrigger_trace_spans_dropped_total",
            &["reason=\"queue-full\""]
        )
        .unwrap_or(0.0)
            >= 90.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_are_told_a_reduced_grpc_timeout() {
    let app = Upstream::start("app").await;
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, match: {{ host: g.svc }}, backends: [ {{ cluster: g }} ], timeout: 500ms }} ]\nclusters: [ {{ name: g, protocol: http2, endpoints: [ {{ address: {} }} ] }} ]\n",
        app.addr
    ));
    let c = TestClient::h2(p.addr("out"));
    let r = send(
        &c,
        "POST",
        "g.svc",
        "/pkg.Svc/Call",
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "10S"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = app.last();
    let g = seen.headers["grpc-timeout"].to_str().unwrap();
    let ms: u64 = g.strip_suffix('m').unwrap().parse().unwrap();
    assert!((1..=500).contains(&ms), "{g}");
    // A caller with less time left keeps its own.
    let r = send(
        &c,
        "POST",
        "g.svc",
        "/pkg.Svc/Call",
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "100m"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(app.last().headers["grpc-timeout"], "100m");
}

/// The admin port's `/tap`: a live sample of the requests answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_live_requests() {
    let app = Upstream::start("app").await;
    let (a, _b) = two_hops(&app, "tracing: { sampling: 1.0 }\n", "");
    let admin = a.admin;
    let tap = std::thread::spawn(move || {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{admin}/tap?seconds=5&max=3")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let c = TestClient::h1(a.addr("out"));
    // Requests until the tap has its three (it may start after the first).
    while !tap.is_finished() {
        assert_eq!(get(&c, "b.svc", "/tapped").await.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = tap.join().unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    for l in &lines {
        assert_eq!(l["path"], "/tapped");
        assert_eq!(l["status"], 200);
        assert_eq!(l["route"], "to-b");
        assert_eq!(l["trace_id"].as_str().unwrap().len(), 32);
    }
}

/// `outrigger tap`: each request printed as it is answered, on one human
/// line; exit 0 once `--max` were shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrigger_tap_prints_requests_as_they_are_answered() {
    use std::io::Read;
    let app = Upstream::start("app").await;
    let (a, _b) = two_hops(&app, "tracing: { sampling: 1.0 }\n", "");
    let admin = a.admin.to_string();
    let mut tap = Command::new(bin())
        .args(["tap", "--admin", &admin, "--seconds", "5", "--max", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both outputs line by line, as they come.
    let (tx, rx) = std::sync::mpsc::channel();
    let pipes: [(&str, Box<dyn Read + Send>); 2] = [
        ("out", Box::new(tap.stdout.take().unwrap())),
        ("err", Box::new(tap.stderr.take().unwrap())),
    ];
    for (name, pipe) in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((name, l));
            }
        });
    }
    drop(tx);
    // Ready: tap says so once the admin port answered, which it does with
    // the tap already subscribed.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(k, l): &(&str, String)| *k == "err" && l.starts_with("tapping "))
    {
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) => seen.push(l),
            Err(e) => panic!("tap never started ({e}): {seen:?}"),
        }
    }
    let c = TestClient::h1(a.addr("out"));
    for path in ["/tap/one", "/tap/two"] {
        assert_eq!(get(&c, "b.svc", path).await.status, 200);
    }
    let exit = tokio::time::timeout(
        READY_TIMEOUT,
        tokio::task::spawn_blocking(move || tap.wait()),
    )
    .await
    .expect("tap did not exit")
    .unwrap()
    .unwrap();
    // The readers end with the pipes.
    seen.extend(rx.iter());
    let lines = |kind: &str| -> Vec<String> {
        seen.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, l)| l.clone())
            .collect()
    };
    let (out, err) = (lines("out"), lines("err"));
    assert!(exit.success(), "{exit}: {err:?}");
    assert_eq!(out.len(), 2, "{out:?}");
    for (line, path) in out.iter().zip(["/tap/one", "/tap/two"]) {
        assert!(
            line.contains(&format!(" out GET b.svc {path} → 200 ")),
            "{line}"
        );
        assert!(line.contains(" route=to-b"), "{line}");
        assert!(line.contains(" upstream=127.0.0.1:"), "{line}");
        assert!(line.contains(" trace="), "{line}");
    }
    assert!(
        err.iter().any(|l| l == "2 requests shown (--max reached)"),
        "{err:?}"
    );

    // A port that is not an admin port: its answer is named.
    let probes = a.probes.to_string();
    let o = Command::new(bin())
        .args(["tap", "--admin", &probes, "--seconds", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("the admin port {probes} answered /tap with 404")),
        "{err}"
    );
}

/// `outrigger tap` on a port nobody listens on: exit 1, naming it.
#[test]
fn outrigger_tap_names_an_admin_port_it_cannot_reach() {
    let addr = dead_addr().to_string();
    let o = Command::new(bin())
        .args(["tap", "--admin", &addr, "--seconds", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot reach the admin port {addr}")),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}
