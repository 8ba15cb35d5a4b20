//! Listener limits (connections, header count and size, tunnels), tunnels
//! as connections that count, time out and drain, and the admin server's
//! own limits. Real clients and servers over loopback.

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn yaml(listener_extra: &str, up: &Upstream) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0{listener_extra} }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ] }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        up.addr
    )
}

async fn websocket(
    addr: std::net::SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    text: &str,
) {
    ws.send(Message::text(text.to_string())).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), text);
}

/// Polls a metric until `pred` holds (a readiness wait, not a timing).
async fn until_metric(p: &ProxyProc, name: &str, labels: &[&str], pred: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let v = p.metric(name, labels).unwrap_or(0.0);
        if pred(v) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name} stuck at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_and_counted() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(", max_connections: 2", &up));
    let addr = p.addr("out");
    let a = TestClient::h1(addr);
    let b = TestClient::h1(addr);
    assert_eq!(get(&a, "svc", "/").await.status, 200);
    assert_eq!(get(&b, "svc", "/").await.status, 200);
    // A third connection is closed at once, before any answer.
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let _ = c.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n");
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(
        p.metric(
            "outrigger_limit_rejections_total",
            &["listener=\"out\"", "limit=\"connections\""]
        ),
        Some(1.0)
    );
    // The two admitted connections are still served.
    assert_eq!(get(&a, "svc", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_get_431_on_both_protocols() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(", max_headers: 20, max_header_bytes: 16384", &up));
    let many: Vec<(String, String)> = (0..30).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let big = "b".repeat(20 * 1024);
    for client in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        let r = send(&client, "GET", "svc", "/", &many, Bytes::new()).await;
        assert_eq!(r.status, 431, "too many header fields");
    }
    // HTTP/2: a header list over the limit is a 431 and counted, as on HTTP/1.
    let h2 = TestClient::h2(p.addr("out"));
    let r = send(
        &h2,
        "GET",
        "svc",
        "/",
        &[("x-big", big.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 431);
    assert_eq!(r.header("x-outrigger-reason"), Some("header-too-large"));
    assert_eq!(up.hits(), 0);
    let m = p.metrics();
    let count = |reason: &str| {
        metric_value(
            &m,
            "outrigger_bad_requests_total",
            &[&format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("too-many-headers"), 1.0, "HTTP/2 counted: {m}");
    assert!(
        count("header-too-large") >= 2.0,
        "HTTP/1 and HTTP/2 counted: {m}"
    );
    // A list under the limit passes.
    let ok = "c".repeat(4 * 1024);
    let r = send(
        &h2,
        "GET",
        "svc",
        "/",
        &[("x-ok", ok.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_as_connections_and_against_their_limit() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(", max_tunnels: 1", &up));
    let mut ws = websocket(p.addr("out")).await;
    echo(&mut ws, "one").await;
    assert_eq!(
        p.metric("outrigger_tunnels", &["listener=\"out\""]),
        Some(1.0)
    );
    assert_eq!(
        p.metric("outrigger_connections", &["listener=\"out\""]),
        Some(1.0),
        "an upgraded connection is still an open connection"
    );
    // The second tunnel is refused; plain requests still pass.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", p.addr("out"))).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
        }
        other => panic!("second tunnel not refused: {other:?}"),
    }
    assert_eq!(
        get(&TestClient::h1(p.addr("out")), "svc", "/").await.status,
        200
    );
    ws.close(None).await.unwrap();
    until_metric(&p, "outrigger_tunnels", &["listener=\"out\""], |v| v == 0.0).await;
    let mut again = websocket(p.addr("out")).await;
    echo(&mut again, "two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_its_idle_timeout() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(", tunnel_idle_timeout: 300ms", &up));
    let mut ws = websocket(p.addr("out")).await;
    echo(&mut ws, "hello").await;
    // Silence: the proxy closes the tunnel, and the client sees the end.
    let end = tokio::time::timeout(READY_TIMEOUT, ws.next())
        .await
        .expect("tunnel never closed");
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{end:?}"
    );
    until_metric(&p, "outrigger_tunnels", &["listener=\"out\""], |v| v == 0.0).await;
    until_metric(&p, "outrigger_connections", &["listener=\"out\""], |v| {
        v == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_websocket_instead_of_cutting_it() {
    let up = Upstream::start("app").await;
    let mut p = ProxyProc::start_with(&yaml("", &up), &["--drain-timeout", "30s"]);
    let mut ws = websocket(p.addr("out")).await;
    echo(&mut ws, "before").await;
    p.signal("TERM");
    p.wait_log(|l| l.contains("\"draining\""));
    // Draining: the tunnel still carries messages until the client is done.
    echo(&mut ws, "during the drain").await;
    ws.close(None).await.unwrap();
    let status = p.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(
        p.count_log(|l| l.contains("drained; exiting")) == 1,
        "exited on the deadline, not when the tunnel closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_caps_its_connections() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml("", &up));
    // Idle connections that never send a request hold the admin's slots...
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(p.admin).unwrap())
        .collect();
    // ...and one more is closed at once instead of piling up.
    let mut extra = TcpStream::connect(p.admin).unwrap();
    extra.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let _ = extra.write_all(b"GET /config HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    let mut buf = Vec::new();
    let _ = extra.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    // The probe server is separate and answers; traffic flows.
    assert_eq!(http_get_raw(p.probes, "/ready").0, 200);
    assert_eq!(
        get(&TestClient::h1(p.addr("out")), "svc", "/").await.status,
        200
    );
    drop(held);
}
