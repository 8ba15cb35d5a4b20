//! The control plane and the feed end to end: a control-plane process on a
//! directory of mesh documents, proxies that get their identity and config
//! from it, apps behind them, real traffic.

mod support;

use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::kube_api::FakeKubeApi;
use support::mesh::*;
use support::pki::TD;
use support::*;

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: orders, namespace: {NS} }}\nspec:\n  parentRefs: [ {{ group: \"\", kind: Service, name: orders }} ]\n  rules:\n    - backendRefs: [ {{ name: orders-v1, port: 8080, weight: {v1} }}, {{ name: orders-v2, port: 8080, weight: {v2} }} ]\n"
    )
}

/// web calling orders, split between orders-v1 (all) and orders-v2.
fn orders_mesh() -> Mesh {
    let m = Mesh::new(&["web", "orders-v1", "orders-v2"]);
    m.write(
        "services.yaml",
        &[
            service("orders"),
            service("orders-v1"),
            service("orders-v2"),
        ]
        .join("---\n"),
    );
    m.write("route.yaml", &split(100, 0));
    m
}

/// Sends requests until `pred` holds on an answer (a readiness wait).
async fn until(c: &TestClient, host: &str, what: &str, pred: impl Fn(&Resp) -> bool) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let r = get(c, host, "/").await;
        if pred(&r) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: last answer {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric of the control plane (served on its TLS port).
fn cp_metric(cp: &ProxyProc, name: &str, labels: &[&str]) -> Option<f64> {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--http2"])
        .arg(format!("https://{}/metrics", cp.addr("cp")))
        .output()
        .unwrap();
    metric_value(&String::from_utf8_lossy(&out.stdout), name, labels)
}

fn nodes(cp: &ProxyProc, sa: &str) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--http2", "-H"])
        .arg(format!("authorization: Bearer {}", token_for(sa)))
        .arg(format!("https://{}/v1/nodes", cp.addr("cp")))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Requests in a loop from `n` clients; counts answers that are not 200.
fn load(
    addr: std::net::SocketAddr,
    host: &'static str,
) -> (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
        tokio::spawn(async move {
            let c = TestClient::h1(addr);
            while !stop.load(Ordering::SeqCst) {
                let r = get(&c, host, "/").await;
                if r.status != 200 {
                    eprintln!(
                        "failed: {} {:?} {}",
                        r.status,
                        r.header("x-outrigger-reason"),
                        r.text()
                    );
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    (stop, failed, done)
}

/// How many endpoints `p` has in its clusters named like `cluster`.
fn endpoint_count(p: &ProxyProc, cluster: &str) -> usize {
    let (status, body, _) = http_get_raw(p.admin, "/clusters");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["clusters"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["name"].as_str().is_some_and(|n| n.contains(cluster)))
                .map(|c| c["endpoints"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until `p`'s endpoint count for `cluster` satisfies `pred`.
async fn endpoints_become(p: &ProxyProc, cluster: &str, pred: impl Fn(usize) -> bool) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let n = endpoint_count(p, cluster);
        if pred(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{cluster}: still {n} endpoints"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn more(done: &AtomicUsize, n: usize) {
    let target = done.load(Ordering::SeqCst) + n;
    while done.load(Ordering::SeqCst) < target {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_route_changes_every_proxy_without_failing_a_request() {
    let m = orders_mesh();
    let cp = m.control_plane(&[]);
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let _b1 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    let _b2 = m.proxy(&[&cp], "orders-v2", "orders-v2", Some(&v2), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "v1 never answered through the mesh", |r| {
        r.text() == "v1"
    })
    .await;
    // Over mTLS: the app behind the callee's sidecar sees the caller.
    assert_eq!(
        v1.last().headers["x-outrigger-peer-identity"],
        format!("spiffe://{TD}/ns/{NS}/sa/web")
    );

    let (stop, failed, done) = load(a.addr("outbound"), "orders.shop");
    more(&done, 50).await;
    m.write("route.yaml", &split(0, 100));
    let before = v2.hits();
    while v2.hits() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v1_after = v1.hits();
    more(&done, 100).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed while the route changed"
    );
    assert!(v1.hits() <= v1_after + 8, "traffic still went to v1");
    // Every proxy acked the new version.
    let n = nodes(&cp, "web");
    let nodes = n.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{n}");
    for node in nodes {
        assert!(node["last_ack"]["version"].as_u64().unwrap() >= 2, "{node}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_and_unappliable_snapshots_change_nothing() {
    let m = orders_mesh();
    let cp = m.control_plane(&[]);
    let v1 = Upstream::start("v1").await;
    let _b1 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "v1 never answered", |r| r.text() == "v1").await;
    // A route to a service that does not exist: the control plane refuses
    // it, naming file, document and field; traffic goes on as before.
    m.write(
        "route.yaml",
        &split(100, 0).replace("name: orders-v2, port", "name: orders-v9, port"),
    );
    let line = cp.wait_log(|l| l.contains("mesh model refused"));
    assert!(
        line.contains("spec.rules[0].backendRefs[1].name") && line.contains("orders-v9"),
        "{line}"
    );
    let m2 = Mesh {
        dir: m.dir.clone(),
        ca_dir: m.ca_dir.clone(),
        mesh_dir: m.mesh_dir.clone(),
        tokens: m.tokens.clone(),
    };
    m2.write("bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: { name: x, namespace: shop }\nspec: { ports: [ { port: many } ] }\n");
    let line = cp.wait_log(|l| l.contains("mesh documents refused"));
    assert!(
        line.contains("bad.yaml (document 1): spec.ports[0].port"),
        "{line}"
    );
    std::fs::remove_file(m.mesh_dir.join("bad.yaml")).unwrap();
    assert_eq!(get(&c, "orders", "/").await.text(), "v1");
    m.write("route.yaml", &split(100, 0));
    // A snapshot the proxy cannot apply (a zero connect timeout): nacked
    // with the error, visible in /v1/nodes, and the proxy keeps its config.
    m.write(
        "policy.yaml",
        &format!("apiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: p, namespace: {NS} }}\nspec: {{ targetRef: {{ kind: Service, name: orders-v1 }}, connectTimeout: 0s }}\n"),
    );
    a.wait_log(|l| l.contains("config from the control plane refused"));
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let n = nodes(&cp, "web");
        let web = n
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["service"] == "web")
            .cloned()
            .unwrap();
        if let Some(err) = web["last_nack"]["error"].as_str() {
            assert!(err.contains("connect_timeout"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nack never shown: {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&c, "orders", "/").await.text(),
        "v1",
        "the old config keeps serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_outlive_their_control_plane_and_move_to_another_replica() {
    let m = orders_mesh();
    let mut cp1 = m.control_plane(&[]);
    let cp2 = m.control_plane(&[]);
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let _b1 = m.proxy(&[&cp1, &cp2], "orders-v1", "orders-v1", Some(&v1), "");
    let _b2 = m.proxy(&[&cp1, &cp2], "orders-v2", "orders-v2", Some(&v2), "");
    let a = m.proxy(&[&cp1, &cp2], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "v1 never answered", |r| r.text() == "v1").await;
    // The first replica dies: traffic flows on the last good config.
    let (stop, failed, done) = load(a.addr("outbound"), "orders");
    cp1.signal("KILL");
    cp1.wait_exit();
    more(&done, 100).await;
    // An edit reaches the proxies through the other replica.
    m.write("route.yaml", &split(0, 100));
    let before = v2.hits();
    while v2.hits() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    more(&done, 50).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed while the control plane died"
    );
    let n = nodes(&cp2, "web");
    assert_eq!(
        n.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["connected"] == true)
            .count(),
        3,
        "{n}"
    );
}

/// The only control plane dies and comes back on the same address, and
/// one service's proxy cannot reach it for a while: its callers keep
/// sending to it (the registration the control plane saved), every proxy
/// comes back, and an edit made while the control plane was away reaches
/// them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_gets_every_proxy_back_and_they_converge() {
    let m = orders_mesh();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cp = m.control_plane_at(&listen, &[]);
    // orders-v2's proxy reaches the control plane through a gate.
    let gate = Gate::start(listen.parse().unwrap()).await;
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let _b1 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    let (_b2, v2_node) = m.proxy_node_at(&[gate.addr], "orders-v2", "orders-v2", Some(&v2), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "v1 never answered", |r| r.text() == "v1").await;
    // web knows orders-v2's endpoint before the control plane goes.
    endpoints_become(&a, "orders-v2", |n| n > 0).await;
    let (stop, failed, done) = load(a.addr("outbound"), "orders");
    // The gate shuts once the control plane is killed: shut before, the
    // old one would see orders-v2 leave and save that.
    cp.signal("KILL");
    gate.shut();
    cp.wait_exit();
    more(&done, 100).await;
    // Edited while no control plane runs; it comes back with the edit and
    // without orders-v2's registration.
    m.write("route.yaml", &split(0, 100));
    let cp = m.control_plane_at(&listen, &[]);
    let before = v2.hits();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while v2.hits() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "web never sent to orders-v2; {} requests failed",
            failed.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    more(&done, 50).await;
    // orders-v2 is an endpoint from what was saved, not from a session.
    let n = node_entry(&cp, &v2_node);
    assert_eq!(
        n["connected"], false,
        "orders-v2 not taken back, or it got through the gate: {n}"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed");
    gate.open();
    more(&done, 50).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed");
    // Every proxy is back and acked the new control plane's version.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let n = nodes(&cp, "web");
        let list = n.as_array().unwrap();
        let acked = list
            .iter()
            .filter(|x| x["connected"] == true && x["last_ack"]["version"] == x["version"])
            .count();
        if list.len() == 3 && acked == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxy that refused its config (its outbound port was taken) is sent
/// whole snapshots until one applies: an endpoint delta would have to
/// apply to a config it does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refused_its_config_gets_it_whole_once_it_can() {
    let m = orders_mesh();
    let cp = m.control_plane(&[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (yaml, _) = m.proxy_yaml(&[cp.addr("cp")], "web", "web", None, "", port);
    let a = ProxyProc::start_until(&yaml, &[], "config from the control plane refused");
    // A registration: the next version differs from the refused one in
    // endpoints only.
    let v1 = Upstream::start("v1").await;
    let _b1 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    let refused =
        |a: &ProxyProc| a.count_log(|l| l.contains("config from the control plane refused"));
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while refused(&a) < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", a.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.count_log(|l| l.contains("endpoints before any snapshot")),
        0,
        "a delta on top of a refused snapshot"
    );
    // The port is free again; the next version applies whole.
    drop(taken);
    let _b2 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    a.wait_log(|l| l.contains("\"message\":\"ready\""));
    let c = TestClient::h1(format!("127.0.0.1:{port}").parse().unwrap());
    until(&c, "orders", "web never served", |r| r.text() == "v1").await;
}

/// A registration taken back at start whose proxy does not reconnect
/// within the window goes: its callers answer 503 `no-endpoints` rather
/// than connect to a pod that may be gone; it is back once it registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_taken_back_goes_if_its_proxy_does_not_return() {
    let m = orders_mesh();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cp = m.control_plane_at(&listen, &[]);
    let gate = Gate::start(listen.parse().unwrap()).await;
    let v1 = Upstream::start("v1").await;
    let _b1 = m
        .proxy_node_at(&[gate.addr], "orders-v1", "orders-v1", Some(&v1), "")
        .0;
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "v1 never answered", |r| r.text() == "v1").await;
    cp.signal("KILL");
    gate.shut();
    cp.wait_exit();
    let cp = m.control_plane_at(&listen, &["--reregister-window", "1s"]);
    // web is back on the new control plane, which has orders-v1 only
    // from what its predecessor saved.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !nodes(&cp, "web")
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["service"] == "web" && x["connected"] == true)
    {
        assert!(std::time::Instant::now() < deadline, "web never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoints_become(&a, "orders-v1", |n| n == 0).await;
    let r = get(&c, "orders", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-outrigger-reason"), Some("no-endpoints"));
    gate.open();
    endpoints_become(&a, "orders-v1", |n| n > 0).await;
    until(&c, "orders", "v1 never answered again", |r| {
        r.text() == "v1"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_registering_and_draining_changes_its_callers_endpoints() {
    let m = Mesh::new(&["web", "orders"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    let r = get(&c, "orders", "/").await;
    assert_eq!(r.status, 503, "no endpoint yet: {}", r.text());
    let app1 = Upstream::start("one").await;
    let app2 = Upstream::start("two").await;
    let b1 = m.proxy(&[&cp], "orders", "orders", Some(&app1), "");
    until(
        &c,
        "orders",
        "a registered proxy never became an endpoint",
        |r| r.text() == "one",
    )
    .await;
    let mut b2 = m.proxy(&[&cp], "orders", "orders", Some(&app2), "");
    until(&c, "orders", "the second replica never got traffic", |r| {
        r.text() == "two"
    })
    .await;
    // Draining: deregistered first, so callers stop sending before it stops.
    let (stop, failed, done) = load(a.addr("outbound"), "orders");
    more(&done, 20).await;
    b2.signal("TERM");
    b2.wait_exit();
    let after = app2.hits();
    more(&done, 100).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed while a replica drained"
    );
    assert!(
        app2.hits() <= after + 4,
        "a drained replica kept getting traffic"
    );
    drop(b1);
}

/// `id`'s entry in `cp`'s node list (`Null` while it has none).
fn node_entry(cp: &ProxyProc, id: &str) -> serde_json::Value {
    nodes(cp, "web")
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["node"] == id)
        .cloned()
        .unwrap_or_default()
}

async fn node_until(
    cp: &ProxyProc,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let n = node_entry(cp, id);
        if pred(&n) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy whose feed drops while it drains says so when it reconnects:
/// the control plane must not take a stopping pod back as an endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_whose_feed_reconnects_stays_out_of_its_callers_endpoints() {
    let m = Mesh::new(&["web", "orders"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    let gate = Gate::start(cp.addr("cp")).await;
    let app1 = Upstream::start("one").await;
    let app2 = Upstream::start("two").await;
    let _b1 = m.proxy(&[&cp], "orders", "orders", Some(&app1), "");
    let (mut b2, id2) = m.proxy_node_at(&[gate.addr], "orders", "orders", Some(&app2), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    endpoints_become(&a, "orders", |n| n == 2).await;
    // An app connection open on b2's outbound side keeps b2 running for
    // that listener's drain delay (5 s), long enough to reconnect.
    let _held = std::net::TcpStream::connect(b2.addr("outbound")).unwrap();
    b2.signal("TERM");
    node_until(&cp, &id2, "b2 never drained", |n| n["draining"] == true).await;
    endpoints_become(&a, "orders", |n| n == 1).await;
    gate.shut();
    node_until(&cp, &id2, "b2's feed never dropped", |n| {
        n.is_null() || n["connected"] == false
    })
    .await;
    gate.open();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let n = loop {
        let n = node_entry(&cp, &id2);
        if n["connected"] == true {
            break n;
        }
        assert!(
            b2.running(),
            "b2 exited before its feed reconnected (its 5 s drain delay ran out): {n}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "b2 never reconnected: {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(n["draining"], true, "b2 came back as serving: {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_gets_a_certificate_or_a_feed_for_another_identity() {
    let m = Mesh::new(&["web", "orders"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    let url = format!("https://{}", cp.addr("cp"));
    let key = m.dir.join("k.pem");
    let csr = m.dir.join("csr.pem");
    let openssl_csr = |san: &str, key_opt: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(["req", "-new", "-nodes", "-subj", "/O=x"])
            .args(key_opt)
            .args(["-keyout"])
            .arg(&key)
            .args(["-out"])
            .arg(&csr)
            .args(["-addext", &format!("subjectAltName=URI:{san}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let post =
        |path: &str, token: &str, body: &Path| cp_curl(&cp, "POST", path, Some(token), Some(body));
    // web asking for orders' identity.
    openssl_csr(
        &format!("spiffe://{TD}/ns/{NS}/sa/orders"),
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let (code, body) = post("/v1/certificate", &token_for("web"), &csr);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not for"), "{body}");
    // Its own identity with a weak key.
    openssl_csr(
        &format!("spiffe://{TD}/ns/{NS}/sa/web"),
        &["-newkey", "rsa:1024"],
    );
    let (code, body) = post("/v1/certificate", &token_for("web"), &csr);
    assert_eq!(code, 403, "{body}");
    // A token nobody issued.
    let (code, _) = post("/v1/certificate", "not-a-token-at-all-xxxx", &csr);
    assert_eq!(code, 401);
    // The right CSR with the right token.
    openssl_csr(
        &format!("spiffe://{TD}/ns/{NS}/sa/web"),
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let (code, body) = post("/v1/certificate", &token_for("web"), &csr);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("BEGIN CERTIFICATE"));
    // A feed for another namespace.
    let out = std::process::Command::new("curl")
        .args([
            "-sk",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-H",
        ])
        .arg(format!("authorization: Bearer {}", token_for("web")))
        .arg(format!(
            "{url}/v1/feed?node=x&namespace=payments&service=web"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // A garbled ack.
    std::fs::write(&csr, "{ not json").unwrap();
    let (code, _) = post("/v1/ack", &token_for("web"), &csr);
    assert_eq!(code, 400);
    // Every refusal is counted by kind.
    for reason in ["unauthenticated", "forbidden", "bad-request"] {
        assert!(
            cp_metric(
                &cp,
                "outrigger_cp_refused_total",
                &[&format!("reason=\"{reason}\"")]
            )
            .is_some_and(|v| v >= 1.0),
            "{reason} not counted"
        );
    }
    assert!(
        cp_metric(
            &cp,
            "outrigger_cp_certificates_total",
            &["result=\"refused\""]
        )
        .unwrap()
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_under_load_without_a_failed_request() {
    let m = Mesh::new(&["web", "orders"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&["--cert-ttl", "3s"]);
    let app = Upstream::start("app").await;
    let b = m.proxy(&[&cp], "orders", "orders", Some(&app), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    until(&c, "orders", "no traffic", |r| r.text() == "app").await;
    let (stop, failed, done) = load(a.addr("outbound"), "orders");
    // Both sides renew at two thirds of 3 s; wait for both, then more traffic.
    a.wait_log(|l| l.contains("certificate rotated"));
    b.wait_log(|l| l.contains("certificate rotated"));
    more(&done, 100).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed across renewals"
    );
    assert!(
        cp_metric(
            &cp,
            "outrigger_cp_certificates_total",
            &["result=\"issued\""]
        )
        .unwrap()
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_client_that_never_reads_costs_the_control_plane_nothing() {
    let m = Mesh::new(&["web"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    // The first model is in: the next write is the next version.
    cp.wait_log(|l| l.contains("mesh model applied"));
    // A client that subscribes and never reads a byte.
    let stalled = std::process::Command::new("curl")
        .args([
            "-sk",
            "--http2",
            "--limit-rate",
            "1",
            "-o",
            "/dev/null",
            "-H",
        ])
        .arg(format!("authorization: Bearer {}", token_for("web")))
        .arg(format!(
            "https://{}/v1/feed?node=stalled&namespace={NS}&service=web",
            cp.addr("cp")
        ))
        .spawn()
        .unwrap();
    // Many model changes meanwhile, each bigger than the last.
    for i in 0..40 {
        let svcs: Vec<String> = (0..i).map(|j| service(&format!("s{j}"))).collect();
        m.write("many.yaml", &svcs.join("---\n"));
        cp.wait_log(|l| {
            l.contains("mesh model applied") && l.contains(&format!("\"version\":{}", i + 2))
        });
    }
    // Everyone else is still served at once.
    let a = m.proxy(&[&cp], "web", "web", None, "");
    assert!(a.addr("outbound").port() > 0);
    let mut stalled = stalled;
    let _ = stalled.kill();
    let _ = stalled.wait();
    let _ = Bytes::new();
}

/// The Kubernetes source, with kube-rs's own client against a fake API
/// server speaking list/watch: the initial list, ADDED/MODIFIED/DELETED
/// events, bookmarks, a watch ending, and `410 Gone` forcing a re-list;
/// proxies authenticated by TokenReview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_source_follows_the_api_server() {
    let m = Mesh::new(&[]);
    let api = FakeKubeApi::start().await;
    for sa in ["web", "orders-v1", "orders-v2"] {
        api.allow_token(&token_for(sa), &format!("system:serviceaccount:{NS}:{sa}"));
    }
    for s in ["orders", "orders-v1", "orders-v2"] {
        api.apply(&service(s));
    }
    api.apply(&split(100, 0));
    let cp = m.control_plane_kube(&api);
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let _b1 = m.proxy(&[&cp], "orders-v1", "orders-v1", Some(&v1), "");
    let _b2 = m.proxy(&[&cp], "orders-v2", "orders-v2", Some(&v2), "");
    let a = m.proxy(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(a.addr("outbound"));
    // The initial list: services and the route; proxies admitted by TokenReview.
    until(&c, "orders", "the listed route never served", |r| {
        r.text() == "v1"
    })
    .await;
    assert!(api.reviews() >= 3, "tokens were not reviewed");
    assert_eq!(api.lists("HTTPRoute"), 1);
    // MODIFIED.
    api.apply(&split(0, 100));
    until(&c, "orders", "a modified route never served", |r| {
        r.text() == "v2"
    })
    .await;
    // ADDED and DELETED: an EndpointSlice shows up in, then leaves, the
    // callers' clusters.
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: legacy-1, namespace: {NS}, labels: {{ kubernetes.io/service-name: legacy }} }}\naddressType: IPv4\nports: [ {{ name: http, port: 8080 }} ]\nendpoints: [ {{ addresses: [ 127.0.0.77 ], conditions: {{ ready: true }} }} ]\n"
    );
    api.apply(&service("legacy"));
    api.apply(&slice);
    let clusters = |a: &ProxyProc| http_get_raw(a.admin, "/clusters").1;
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !clusters(&a).contains("127.0.0.77:8080") {
        assert!(std::time::Instant::now() < deadline, "{}", clusters(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.delete("EndpointSlice", NS, "legacy-1");
    while clusters(&a).contains("127.0.0.77:8080") {
        assert!(std::time::Instant::now() < deadline, "{}", clusters(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A bookmark, then the watch ends: the watch resumes from the
    // bookmark's version, with no re-list.
    let mark = api.bookmark();
    api.close_watches();
    api.apply(&split(100, 0));
    until(
        &c,
        "orders",
        "a route after a resumed watch never served",
        |r| r.text() == "v1",
    )
    .await;
    assert!(
        api.watches("HTTPRoute").contains(&mark.to_string()),
        "{:?} does not resume from {mark}",
        api.watches("HTTPRoute")
    );
    assert_eq!(api.lists("HTTPRoute"), 1, "a bookmark must spare a re-list");
    // 410 Gone: history compacted, and a change the watch never saw; only
    // a re-list can find it.
    api.expire();
    api.apply(&split(0, 100));
    until(&c, "orders", "the change behind a 410 never served", |r| {
        r.text() == "v2"
    })
    .await;
    assert!(api.lists("HTTPRoute") >= 2, "no re-list after 410 Gone");
    // An object that does not validate is left out; the rest still moves.
    api.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: broken, namespace: {NS} }}\nspec:\n  parentRefs: [ {{ group: \"\", kind: Service, name: legacy }} ]\n  rules: [ {{ backendRefs: [ {{ name: nowhere, port: 8080 }} ] }} ]\n"
    ));
    api.delete("HTTPRoute", NS, "orders");
    until(&c, "orders", "a deleted route kept serving", |r| {
        r.status == 503
    })
    .await;
    cp.wait_log(|l| {
        l.contains("left out of the mesh model") && l.contains("HTTPRoute shop/broken")
    });
    // A token the review refuses gets nothing.
    let out = std::process::Command::new("curl")
        .args(["-sk", "--http2", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "authorization: Bearer a-token-nobody-issued-xxxx"])
        .arg(format!(
            "https://{}/v1/feed?node=x&namespace={NS}&service=web",
            cp.addr("cp")
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    assert!(
        cp_metric(
            &cp,
            "outrigger_cp_refused_total",
            &["reason=\"unauthenticated\""]
        )
        .is_some_and(|v| v >= 1.0)
    );
}

/// The control plane keeps a drain across a reconnect of the same proxy
/// process (the same `epoch`), whatever the new subscription's query says
/// (it may have been written before the drain began); a new process under
/// the same node name, a restarted container, starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_outlives_a_reconnect_of_the_same_process_only() {
    let m = Mesh::new(&["web"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    cp.wait_log(|l| l.contains("mesh model applied"));
    // A feed client that subscribes as node w1 and never acks.
    let feed = |epoch: u64| {
        std::process::Command::new("curl")
            .args(["-sk", "--http2", "-N", "-o", "/dev/null", "-H"])
            .arg(format!("authorization: Bearer {}", token_for("web")))
            .arg(format!(
                "https://{}/v1/feed?node=w1&namespace={NS}&service=web&address=127.0.0.1&inbound=15006&ready=1&draining=0&epoch={epoch}",
                cp.addr("cp")
            ))
            .spawn()
            .unwrap()
    };
    let subscribed = |n: usize| {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        while cp.count_log(|l| l.contains("proxy subscribed") && l.contains("\"w1\"")) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "subscription {n} not seen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stop = |mut c: std::process::Child| {
        let _ = c.kill();
        let _ = c.wait();
    };
    let a = feed(7);
    node_until(&cp, "w1", "w1 an endpoint", |n| {
        n["ready"] == true && n["draining"] == false
    })
    .await;
    let (code, body) = cp_curl(
        &cp,
        "POST",
        "/v1/drain?node=w1",
        Some(&token_for("web")),
        None,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(node_entry(&cp, "w1")["draining"], true);
    stop(a);
    // Subscribed again with `epoch`: the client and w1's entry once the
    // control plane has seen the `nth` subscription.
    let back = |epoch: u64, nth: usize| {
        let c = feed(epoch);
        subscribed(nth);
        (c, node_entry(&cp, "w1"))
    };
    // The same process back, with a query written before it drained.
    let (b, n) = back(7, 2);
    assert_eq!(
        (&n["connected"], &n["draining"]),
        (&true.into(), &true.into()),
        "the same process's drain was lost to its reconnect: {n}"
    );
    stop(b);
    // Another process (another epoch): serving, an endpoint again.
    let (c, n) = back(8, 3);
    assert_eq!(
        (&n["ready"], &n["draining"]),
        (&true.into(), &false.into()),
        "a new process was kept as draining: {n}"
    );
    stop(c);
}
