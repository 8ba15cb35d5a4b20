//! gRPC end to end through the proxy, with a real gRPC client and server
//! (Python grpcio): unary, server streaming, trailers, and a proxy error
//! answered as a gRPC status the client can read.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use support::*;

fn python() -> String {
    std::env::var("OUTRIGGER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn peer() -> String {
    format!("{}/tests/support/grpc_peer.py", env!("CARGO_MANIFEST_DIR"))
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_server() -> Server {
    let mut child = Command::new(python())
        .args([&peer(), "server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with grpcio (tests/run.sh installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("gRPC server said {line:?}"));
    Server(child, port)
}

fn grpc_client(mode: &str, target: std::net::SocketAddr, authority: &str) -> serde_json::Value {
    let out = Command::new(python())
        .args([&peer(), mode, &target.to_string(), authority])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn grpc_unary_and_streaming_pass_through() {
    grpc_passes_through_with("2");
}

/// One worker serves a connection's HTTP/2 streams on the connection's own
/// task instead of spawning them (src/proxy/streams.rs).
#[test]
fn grpc_unary_and_streaming_pass_through_one_worker() {
    grpc_passes_through_with("1");
}

fn grpc_passes_through_with(threads: &str) {
    let server = grpc_server();
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes:
  - {{ name: grpc, match: {{ host: echo.grpc, path_prefix: /demo.Echo/ }}, backends: [ {{ cluster: echo }} ] }}
clusters:
  - {{ name: echo, protocol: http2, endpoints: [ {{ address: 127.0.0.1:{} }} ] }}
"#,
        server.1
    );
    let p = ProxyProc::start_with(&yaml, &["--threads", threads]);
    let out = grpc_client("client", p.addr("out"), "echo.grpc");
    assert_eq!(out["unary"], "echo:hello");
    assert_eq!(out["trailer"], "grpc-peer", "trailing metadata lost: {out}");
    assert_eq!(
        out["stream"],
        serde_json::json!(["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"])
    );
    assert_eq!(out["missing"], "UNIMPLEMENTED");
    assert!(
        p.metric(
            "outrigger_requests_total",
            &["route=\"grpc\"", "code=\"200\""]
        )
        .unwrap()
            >= 3.0
    );
}

#[test]
fn grpc_proxy_errors_arrive_as_grpc_status() {
    let dead = dead_addr();
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes:
  - {{ name: grpc, match: {{ host: dead.grpc }}, backends: [ {{ cluster: dead }} ] }}
clusters:
  - {{ name: dead, protocol: http2, endpoints: [ {{ address: {dead} }} ] }}
"#
    );
    let p = ProxyProc::start(&yaml);
    let out = grpc_client("error", p.addr("out"), "dead.grpc");
    assert_eq!(out["code"], "UNAVAILABLE", "{out}");
    assert_eq!(out["details"], "connect-failure");
    let out = grpc_client("error", p.addr("out"), "nowhere.grpc");
    assert_eq!(out["code"], "UNIMPLEMENTED", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadline_is_answered_with_deadline_exceeded() {
    // An app that never answers and knows nothing of deadlines: a gRPC
    // server would also be told the route's 300 ms (`grpc-timeout`) and
    // could answer DEADLINE_EXCEEDED itself a moment before the proxy.
    let app = Upstream::hanging("hangs").await;
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes:
  - {{ name: grpc, match: {{ host: echo.grpc }}, backends: [ {{ cluster: echo }} ], timeout: 300ms }}
clusters:
  - {{ name: echo, protocol: http2, endpoints: [ {{ address: {} }} ] }}
"#,
        app.addr
    );
    let p = ProxyProc::start(&yaml);
    // The client allows 10 s; the route allows 300 ms: the proxy answers.
    let addr = p.addr("out");
    let out = tokio::task::spawn_blocking(move || grpc_client("hang", addr, "echo.grpc"))
        .await
        .unwrap();
    assert_eq!(out["code"], "DEADLINE_EXCEEDED", "{out}");
    assert_eq!(out["details"], "timeout");
    assert_eq!(app.hits(), 1);
    assert_eq!(
        p.metric(
            "outrigger_timeouts_total",
            &["route=\"grpc\"", "kind=\"route\""]
        ),
        Some(1.0)
    );
}

#[test]
fn grpc_through_two_sidecars_with_mtls() {
    use support::pki::{Pki, spiffe};
    let server = grpc_server();
    let pki = Pki::new();
    let callee_files = pki.workload("echo");
    let caller_files = pki.workload("client");
    // The callee's sidecar: mTLS in, gRPC (HTTP/2) to the app.
    let callee = ProxyProc::start(&format!(
        "{}listeners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: 127.0.0.1:{}, tls: strict }} ]\n",
        callee_files.identity_yaml(),
        server.1
    ));
    let caller = ProxyProc::start(&format!(
        "{}listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: grpc, match: {{ host: echo.grpc }}, backends: [ {{ cluster: echo }} ] }} ]\nclusters: [ {{ name: echo, endpoints: [ {{ address: {}, identity: \"{}\" }} ] }} ]\n",
        caller_files.identity_yaml(),
        callee.addr("in"),
        spiffe("echo")
    ));
    let out = grpc_client("client", caller.addr("out"), "echo.grpc");
    assert_eq!(out["unary"], "echo:hello");
    assert_eq!(out["trailer"], "grpc-peer", "trailing metadata lost: {out}");
    assert_eq!(
        out["stream"],
        serde_json::json!(["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"])
    );
    assert!(
        callee
            .metric("outrigger_tls_handshakes_total", &["result=\"ok\""])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        callee
            .metric(
                "outrigger_peer_requests_total",
                &[&format!("peer=\"{}\"", spiffe("client"))]
            )
            .unwrap_or(0.0)
            >= 3.0
    );
}
