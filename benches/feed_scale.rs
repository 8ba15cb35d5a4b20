//! Control-plane scale: N simulated proxies (lightweight feed clients in
//! this one process, HTTP/2 over TLS with a bearer token each, acking every
//! message) subscribed to one `outrigger control-plane` process on a
//! directory mesh of S services, N/S replicas each (sharing the service's
//! account, as a Deployment's pods do). Measures:
//! - the control plane's memory per connected proxy (RSS before/after);
//! - push latency from a route edit (file written) to each proxy's receipt
//!   and to the last proxy's ack, over R edits: p50/p99.
//!
//! `cargo bench --bench feed_scale` (env: PROXIES=1000 SERVICES=50 ROUNDS=10)

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const TD: &str = "bench.test";
const NS: &str = "bench";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Service i's route: `/v2` split between itself and the next service.
fn route(i: usize, services: usize, w: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: svc{i}, namespace: {NS} }}\nspec:\n  parentRefs: [ {{ group: \"\", kind: Service, name: svc{i} }} ]\n  rules:\n    - matches: [ {{ path: {{ type: PathPrefix, value: /v2 }} }} ]\n      backendRefs: [ {{ name: svc{i}, port: 8080, weight: {w} }}, {{ name: svc{}, port: 8080, weight: {} }} ]\n",
        (i + 1) % services,
        100 - w
    )
}

fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct Shared {
    /// The version each proxy last received.
    got: Vec<AtomicU64>,
    /// When each proxy received the version it was waiting for (µs since start).
    at: Vec<AtomicU64>,
    changed: Notify,
    start: Instant,
    snapshot_bytes: AtomicU64,
}

async fn proxy(
    i: usize,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    s: Arc<Shared>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, c) = http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
        .await
        .unwrap();
    tokio::spawn(c);
    let token = format!("bench-token-{i:08}");
    let svc = i % env("SERVICES", 50);
    let req = http::Request::get(format!(
        "https://localhost/v1/feed?node=p{i}&namespace={NS}&service=svc{svc}&address=127.1.{}.{}&inbound={}&outbound=15001&app=8080",
        i / 250,
        i % 250 + 1,
        // REGISTER=0: client-only proxies (no endpoints, no registration churn).
        if env("REGISTER", 1) == 1 { 15006 } else { 0 }
    ))
    .header("authorization", format!("Bearer {token}"))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "feed for p{i}");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            // Only the head is read (`{"type":…,"version":N,`): a real proxy
            // parses the whole message, but the one thread simulating a
            // thousand of them must not be what is measured.
            let head = String::from_utf8_lossy(&line[..line.len().min(64)]);
            if i == 0 && head.starts_with("{\"type\":\"snapshot\"") {
                s.snapshot_bytes.store(line.len() as u64, Ordering::SeqCst);
            }
            let version: u64 = head
                .split("\"version\":")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse().ok())
                .expect("a version in every message");
            s.at[i].store(s.start.elapsed().as_micros() as u64, Ordering::SeqCst);
            s.got[i].store(version, Ordering::SeqCst);
            s.changed.notify_waiters();
            let ack =
                serde_json::json!({ "node": format!("p{i}"), "version": version, "ack": true });
            let req = http::Request::post("https://localhost/v1/ack")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(ack.to_string())))
                .unwrap();
            let mut send = send.clone();
            tokio::spawn(async move {
                if let Ok(r) = send.send_request(req).await {
                    let _ = r.into_body().collect().await;
                }
            });
        }
    }
}

fn cp_metrics(addr: std::net::SocketAddr) -> String {
    let out = Command::new("curl")
        .args(["-sk", "--http2"])
        .arg(format!("https://{addr}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n = env("PROXIES", 1000);
    let services = env("SERVICES", 50);
    let rounds = env("ROUNDS", 10);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("outrigger-feed-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    outrigger::tls::ca::init(&dir.join("ca"), TD).unwrap();
    let mut svcs = String::new();
    for i in 0..services {
        svcs.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: svc{i}, namespace: {NS} }}\nspec: {{ ports: [ {{ name: http, port: 8080 }} ] }}\n"
        ));
    }
    write_atomic(&mesh, "services.yaml", &svcs);
    for i in 0..services {
        write_atomic(&mesh, &format!("route{i}.yaml"), &route(i, services, 100));
    }
    let mut tokens = String::new();
    for i in 0..n {
        // Replicas of a workload share its service account.
        tokens.push_str(&format!(
            "- {{ token: bench-token-{i:08}, identity: \"spiffe://{TD}/ns/{NS}/sa/svc{}\" }}\n",
            i % services
        ));
    }
    std::fs::write(dir.join("tokens.yaml"), tokens).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cp = Kill(
        Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args([
                "control-plane",
                "--listen",
                &addr.to_string(),
                "--trust-domain",
                TD,
            ])
            .args([
                "--dns",
                "localhost",
                "--watch-interval",
                "100ms",
                "--log-level",
                "warn",
            ])
            .arg("--mesh-dir")
            .arg(&mesh)
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .arg("--tokens")
            .arg(dir.join("tokens.yaml"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = cp.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss0 = rss_kib(pid);
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.join("ca/ca.pem")).unwrap();
        for c in rustls_pemfile_certs(&ca) {
            roots.add(c).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tls = Arc::new(tls);
        let s = Arc::new(Shared {
            got: (0..n).map(|_| AtomicU64::new(0)).collect(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            changed: Notify::new(),
            start: Instant::now(),
            snapshot_bytes: AtomicU64::new(0),
        });
        let t0 = Instant::now();
        for i in 0..n {
            tokio::spawn(proxy(i, addr, tls.clone(), s.clone()));
            if i % 50 == 49 {
                tokio::task::yield_now().await;
            }
        }
        // Converged: every proxy has a config and none changed for a while
        // (all registrations in). Versions may differ: a version that
        // changes nothing for a proxy is not sent to it.
        let settle = |s: Arc<Shared>| async move {
            let since = Instant::now();
            loop {
                if since.elapsed() > Duration::from_secs(60) {
                    let mut v: Vec<u64> = s.got.iter().map(|g| g.load(Ordering::SeqCst)).collect();
                    v.sort();
                    v.dedup();
                    panic!("never settled: versions {v:?}");
                }
                let v: Vec<u64> = s.got.iter().map(|g| g.load(Ordering::SeqCst)).collect();
                if v.iter().all(|x| *x > 0) {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let w: Vec<u64> = s.got.iter().map(|g| g.load(Ordering::SeqCst)).collect();
                    if w == v {
                        return v.iter().copied().max().unwrap_or(0);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let v = settle(s.clone()).await;
        let converge = t0.elapsed();
        let rss1 = rss_kib(pid);
        println!(
            "{n} proxies, {services} services: all subscribed and converged (version {v}) in {:.2} s",
            converge.as_secs_f64()
        );
        println!(
            "control plane RSS: {} KiB idle, {} KiB with {n} proxies: {:.1} KiB per proxy",
            rss0,
            rss1,
            (rss1 - rss0) as f64 / n as f64
        );
        let mut each = Vec::new();
        let mut last = Vec::new();
        for r in 0..rounds {
            let before: Vec<u64> = s.got.iter().map(|g| g.load(Ordering::SeqCst)).collect();
            let i = r % services;
            // Each edit changes its route: 100 → 50 the first time round.
            let w = if (r / services).is_multiple_of(2) { 50 } else { 100 };
            let text = route(i, services, w);
            let t = s.start.elapsed().as_micros() as u64;
            write_atomic(&mesh, &format!("route{i}.yaml"), &text);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                // Every proxy routes to every service: each edit reaches all.
                let behind = s
                    .got
                    .iter()
                    .zip(&before)
                    .filter(|(g, b)| g.load(Ordering::SeqCst) <= **b)
                    .count();
                if behind == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("round {r}: {behind} proxies never got the edit");
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), s.changed.notified()).await;
            }
            let lat: Vec<f64> = s
                .at
                .iter()
                .map(|a| (a.load(Ordering::SeqCst).saturating_sub(t)) as f64 / 1000.0)
                .collect();
            last.push(lat.iter().cloned().fold(0.0, f64::max));
            each.extend(lat);
            settle(s.clone()).await;
        }
        println!(
            "push latency, route edit (file written) → proxy has it, {} pushes: p50 {:.0} ms, p99 {:.0} ms; to the last proxy per edit: median {:.0} ms, max {:.0} ms",
            each.len(),
            pct(&mut each, 0.5),
            pct(&mut each, 0.99),
            pct(&mut last, 0.5),
            last.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "one proxy's last snapshot: {} bytes of JSON",
            s.snapshot_bytes.load(Ordering::SeqCst)
        );
        println!("  (includes the directory poll: --watch-interval 100ms, a change is taken once stable for one interval)");
        let m = cp_metrics(addr);
        for l in m.lines() {
            if l.starts_with("outrigger_cp_push_latency_seconds_") && !l.contains("_bucket") {
                println!("  {l}");
            }
            if l.starts_with("outrigger_cp_push_latency_seconds_bucket")
                && (l.contains("le=\"0.1\"") || l.contains("le=\"0.5\"") || l.contains("le=\"1\""))
            {
                println!("  {l}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    drop(cp);
}

/// The CERTIFICATE blocks of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(|c| c.ok())
        .collect()
}
