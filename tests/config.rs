//! `outrigger validate`, and config reload: a valid edit applies with no
//! failed request, an invalid one is counted and the old config serves on.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use support::*;

fn validate(text: &str) -> (bool, String, String) {
    let dir = temp_dir();
    let f = dir.join("c.yaml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&f)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn validate_accepts_the_shipped_examples() {
    for f in ["sidecar.yaml", "gateway.yaml", "demo.yaml"] {
        let path = format!("{}/config/{f}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(bin())
            .args(["validate", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
        // No warning either: the examples use `retry_on`, not `on`.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("warning"), "{f}: {err}");
    }
}

#[test]
fn validate_lists_every_error_with_its_path_and_fails() {
    let (ok, _, err) = validate(
        r#"
listeners:
  - { name: out, role: outbound, address: 127.0.0.1:15001 }
routes:
  - { name: r, match: { path_regex: "([" }, backends: [ { cluster: nope } ] }
clusters:
  - { name: c, lb: ring-hash }
"#,
    );
    assert!(!ok);
    assert!(err.contains("3 error(s)"), "{err}");
    assert!(
        err.contains("routes[0].match.path_regex: invalid regex"),
        "{err}"
    );
    assert!(
        err.contains("routes[0].backends[0].cluster: no cluster named `nope`"),
        "{err}"
    );
    assert!(err.contains("clusters[0].hash_on"), "{err}");

    let (ok, _, err) = validate("clusters:\n  - { name: c, retries: 3 }\n");
    assert!(!ok);
    assert!(
        err.contains("clusters[0]: unknown field `retries`"),
        "{err}"
    );
    assert!(err.contains("line 2"), "{err}");

    let (ok, _, err) = validate("listeners: [ { name: x, role: sideways, address: 1.2.3.4:5 } ]\n");
    assert!(!ok);
    assert!(err.contains("listeners[0].role"), "{err}");
}

/// Sixteen mistakes of every kind; the line of each is the number after `#`.
const MANY_MISTAKES: &str = r#"node: { id: web-1, servce: web }                   #1
listeners:
  - name: out
    role: outbound
    address: 127.0.0.1:15001
    idle_timeout: 500 ms                                #6
    header_read_timout: 10s                             #7
    max_connections: lots                               #8
  - name: in
    role: sideways                                      #10
    address: 0.0.0.0:15006
    forward_to: 127.0.0.1:8080
routes:
  - name: orders
    match: { host: orders, path_prefx: /api }           #15
    backends: [ { cluster: orders, weight: heavy } ]    #16
    timeout: 2                                          #17
    retry:
      attempts: 3
      retry_on: [gateway-error]
      per_try_timeout: 1h30                             #21
      backof: { base: 1ms }                             #22
  - name: payments
    backends: [ { cluster: payments } ]                 #24
clusters:
  - name: orders
    lb: round-robbin                                    #27
    connect_timeout: 1m30s
    colour: red                                         #29
    endpoints: [ { address: 10.0.0.1:80 }, { address: not-an-address } ]   #30
    outlier_detection: { consecutive_5xx: -1 }          #31
    health_check: { path: /healthz, interval: 5 s }     #32
"#;

#[test]
fn validate_reports_every_mistake_in_one_run() {
    let (ok, out, err) = validate(MANY_MISTAKES);
    assert!(!ok, "{out}{err}");
    assert!(err.contains(": 16 error(s)"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("  error: ")).collect();
    assert_eq!(errors.len(), 16, "{err}");
    for (line, what) in [
        (1, "node: unknown field `servce`: did you mean `service`?"),
        (
            6,
            "listeners[0].idle_timeout: `500 ms`: no spaces inside a duration",
        ),
        (7, "did you mean `header_read_timeout`?"),
        (8, "listeners[0].max_connections: invalid type"),
        (10, "listeners[1].role: unknown variant `sideways`"),
        (
            15,
            "routes[0].match: unknown field `path_prefx`: did you mean `path_prefix`?",
        ),
        (16, "routes[0].backends[0].weight: invalid type"),
        (17, "routes[0].timeout: `2` has no unit"),
        (21, "routes[0].retry.per_try_timeout: `1h30`"),
        (
            22,
            "routes[0].retry: unknown field `backof`: did you mean `backoff`?",
        ),
        (
            24,
            "routes[1].backends[0].cluster: no cluster named `payments`",
        ),
        (
            27,
            "clusters[0].lb: unknown variant `round-robbin`: did you mean `round-robin`?",
        ),
        (29, "clusters[0]: unknown field `colour`"),
        (30, "clusters[0].endpoints[1].address"),
        (31, "clusters[0].outlier_detection.consecutive_5xx"),
        (32, "clusters[0].health_check.interval: `5 s`: no spaces"),
    ] {
        let want = format!("at line {line} column ");
        assert!(
            errors.iter().any(|l| l.contains(what) && l.contains(&want)),
            "no `{what}` {want} in\n{err}"
        );
    }
}

#[test]
fn validate_passes_with_only_warnings() {
    let (ok, out, err) = validate(
        r#"listeners:
  - { name: out, role: outbound, address: 127.0.0.1:15001 }
routes:
  - name: orders
    match: { host: orders, path_prefix: /api }
    backends: [ { cluster: orders } ]
    retry: { attempts: 2, on: [5xx], per_try_timeout: 1s500ms }
  - name: orders-again
    match: { path_prefix: /api, host: orders }
    backends: [ { cluster: spare } ]
clusters:
  - { name: orders, connect_timeout: 1m30s, endpoints: [ { address: 127.0.0.1:8080 } ] }
  - { name: spare }
"#,
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(": ok (1 listeners, 2 routes, 2 clusters), 3 warning(s)"),
        "{out}"
    );
    assert!(
        err.contains("  warning: routes[0].retry.on: `on` is deprecated, write `retry_on`")
            && err.contains("at line 7 column 27"),
        "{err}"
    );
    assert!(
        err.contains("  warning: routes[1]: route `orders-again` is never used: route `orders` (routes[0]) has the same match on the same listeners and comes first at line 8 column 5"),
        "{err}"
    );
    assert!(
        err.contains("  warning: clusters[1]: cluster `spare` has no endpoints: requests routed to it get 503 at line 13 column 5"),
        "{err}"
    );
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn an_unknown_log_level_is_refused_at_start() {
    let dir = temp_dir();
    let f = dir.join("c.yaml");
    std::fs::write(
        &f,
        "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--log-level", "verbose", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("`verbose` is not a log level"), "{err}");
    // The environment variable is checked the same way.
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&f)
        .env("OUTRIGGER_LOG_LEVEL", "loud")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`loud`"));
}

fn two_cluster_yaml(a: &Upstream, b: &Upstream, target: &str) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: {target} }} ] }} ]\nclusters:\n  - {{ name: a, endpoints: [ {{ address: {} }} ] }}\n  - {{ name: b, endpoints: [ {{ address: {} }} ] }}\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_edits_without_failing_a_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let p = Arc::new(ProxyProc::start(&two_cluster_yaml(&a, &b, "a")));
    let out = p.addr("out");

    // Load runs through both reloads; every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (stop.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let c = TestClient::h1(out);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                if get(&c, "svc", "/").await.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
            }
            n
        }));
    }
    assert_eq!(get(&TestClient::h1(out), "svc", "/").await.text(), "a");
    // `reload` blocks until the proxy acks; run it beside the load.
    let yaml = two_cluster_yaml(&a, &b, "b");
    let p2 = p.clone();
    assert!(
        tokio::task::spawn_blocking(move || p2.reload(&yaml))
            .await
            .unwrap()
    );
    assert_eq!(get(&TestClient::h1(out), "svc", "/").await.text(), "b");
    assert_eq!(p.metric("outrigger_config_version", &[]), Some(2.0));
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 0);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed during reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_is_counted_and_the_old_config_keeps_serving() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let p = ProxyProc::start(&two_cluster_yaml(&a, &b, "a"));
    let c = TestClient::h1(p.addr("out"));
    // Unknown cluster → rejected.
    let bad = two_cluster_yaml(&a, &b, "missing");
    assert!(!p.reload(&bad));
    assert_eq!(
        p.metric("outrigger_feed_updates_total", &["nack"]),
        Some(1.0)
    );
    let line =
        p.wait_log(|l| l.contains("invalid config") && l.contains("routes[0].backends[0].cluster"));
    // The errors are a JSON array, not a string inside a string.
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["fields"]["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("routes[0].backends[0].cluster"),
        "{line}"
    );
    assert_eq!(get(&c, "svc", "/").await.text(), "a");
    // Not YAML at all → rejected too.
    assert!(!p.reload("listeners: [ {"));
    assert_eq!(get(&c, "svc", "/").await.text(), "a");
    assert_eq!(p.metric("outrigger_config_version", &[]), Some(1.0));
    // The next good edit applies, and the log says what changed.
    assert!(p.reload(&two_cluster_yaml(&a, &b, "b")));
    assert_eq!(get(&c, "svc", "/").await.text(), "b");
    let line = p.wait_log(|l| l.contains("config applied") && l.contains("\"changes\""));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["fields"]["changes"]["routes"]["changed"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let base = two_cluster_yaml(&a, &b, "a");
    let p = ProxyProc::start(&base);
    let with_extra = base.replace(
        "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]",
        "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 }, { name: extra, role: outbound, address: 127.0.0.1:0 } ]",
    );
    assert!(p.reload(&with_extra));
    let line = p.wait_log(|l| l.contains("\"listening\"") && l.contains("\"extra\""));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let extra: std::net::SocketAddr = v["fields"]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(get(&TestClient::h1(extra), "svc", "/").await.text(), "a");
    // The old listener kept serving throughout.
    assert_eq!(
        get(&TestClient::h1(p.addr("out")), "svc", "/").await.text(),
        "a"
    );
    assert!(p.reload(&base));
    p.wait_log(|l| l.contains("listener removed") && l.contains("extra"));
    p.wait_log(|l| l.contains("stopped accepting") && l.contains("extra"));
    assert!(
        std::net::TcpStream::connect(extra).is_err(),
        "removed listener still accepts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_listeners_settings_keeps_its_port_serving() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let p = std::sync::Arc::new(ProxyProc::start(&two_cluster_yaml(&a, &b, "a")));
    let out = p.addr("out");
    // Same name and address, a new header limit, under load: the settings
    // change in place and the socket stays.
    let changed = two_cluster_yaml(&a, &b, "a").replace(
        "{ name: out, role: outbound, address: 127.0.0.1:0 }",
        "{ name: out, role: outbound, address: 127.0.0.1:0, max_header_bytes: 16384 }",
    );
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let failures = std::sync::Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, failures) = (stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // A new connection each time: the listening socket is what changes.
                if get(&TestClient::h1(out), "svc", "/").await.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let p2 = p.clone();
    assert!(
        tokio::task::spawn_blocking(move || p2.reload(&changed))
            .await
            .unwrap()
    );
    p.wait_log(|l| l.contains("listener settings updated") && l.contains("\"out\""));
    assert_eq!(
        p.count_log(|l| l.contains("stopped accepting")),
        0,
        "the socket was closed"
    );
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed while the listener was replaced"
    );
    // The new limit is in force on the same port.
    let big = "x".repeat(20 * 1024);
    let r = send(
        &TestClient::h1(out),
        "GET",
        "svc",
        "/",
        &[("x-big", big.as_str())],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 431);
}
