//! The proxy's HTTP/1.1 connections to an app, seen from the app's side:
//! reused after every kind of complete answer, dropped when the app closes
//! them while idle (without costing a request), and live in both
//! directions at once for a streaming exchange.

mod support;

use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fn config(app: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - {{ name: out, role: outbound, address: 127.0.0.1:0 }}\nroutes:\n  - {{ name: all, backends: [ {{ cluster: app }} ] }}\nclusters:\n  - {{ name: app, protocol: http1, endpoints: [ {{ address: {app} }} ] }}\n"
    )
}

/// A keep-alive HTTP/1.1 app written by hand, so that the test sees its
/// connections: `/204`, `/304` and HEAD get bodiless answers, anything else
/// `ok`. With `close_after`, it closes each connection after one answer
/// (an idle timeout of zero, without saying so) and reports the close.
struct RawApp {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
}

async fn raw_app(close_after: bool) -> RawApp {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = support::upstream::read_head(&mut s, &mut buf).await {
                    let answer: &[u8] = if head.starts_with("head ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                    } else if head.starts_with("get /204 ") {
                        b"HTTP/1.1 204 No Content\r\n\r\n"
                    } else if head.starts_with("get /304 ") {
                        b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    if close_after {
                        drop(s);
                        let _ = tx.send(());
                        return;
                    }
                }
            });
        }
    });
    RawApp {
        addr,
        accepted,
        closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_connection_serves_answers_with_and_without_bodies() {
    let app = raw_app(false).await;
    let p = ProxyProc::start(&config(app.addr));
    let c = TestClient::h1(p.addr("out"));
    for round in 0..3 {
        for (method, path, status, body) in [
            ("GET", "/", 200, "ok"),
            ("HEAD", "/", 200, ""),
            ("GET", "/204", 204, ""),
            ("GET", "/304", 304, ""),
            ("GET", "/again", 200, "ok"),
        ] {
            let r = send(&c, method, "app.svc", path, &[], Bytes::new()).await;
            assert_eq!(r.status, status, "round {round}: {method} {path}");
            assert_eq!(r.text(), body, "round {round}: {method} {path}");
        }
    }
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        1,
        "the proxy did not reuse its connection after a bodiless answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_idle_connections_costs_no_request() {
    let mut app = raw_app(true).await;
    let p = ProxyProc::start(&config(app.addr));
    for c in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        for i in 0..10 {
            let r = get(&c, "app.svc", "/").await;
            assert_eq!(
                r.status, 200,
                "request {i} after the app closed the last connection"
            );
            assert_eq!(r.text(), "ok");
            // The app has closed the connection the proxy holds idle.
            // (Loopback puts the end of stream in the proxy's socket within
            // the app's close, before the next request is sent.)
            tokio::time::timeout(READY_TIMEOUT, app.closed.recv())
                .await
                .expect("the app did not close")
                .unwrap();
        }
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_and_its_echo_stream_in_step() {
    // Each chunk must reach the app and come back before the next is sent:
    // the request and the response move at once on one connection.
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config(up.addr));
    for h2 in [false, true] {
        let io = hyper_util::rt::TokioIo::new(
            tokio::net::TcpStream::connect(p.addr("out")).await.unwrap(),
        );
        let (tx, body) =
            http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
        let req = http::Request::post("http://app.svc/echo")
            .header("host", "app.svc")
            .body(body)
            .unwrap();
        type Answer = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = hyper::Result<http::Response<hyper::body::Incoming>>,
                    > + Send,
            >,
        >;
        let resp: Answer = if h2 {
            let (mut s, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Box::pin(s.send_request(req))
        } else {
            let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Box::pin(s.send_request(req))
        };
        ping_pong(tx, resp).await;
    }
}

async fn ping_pong(
    mut tx: http_body_util::channel::Sender<Bytes, std::convert::Infallible>,
    resp: impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
) {
    tx.send_data(Bytes::from_static(b"ping 0;")).await.unwrap();
    let mut resp = tokio::time::timeout(READY_TIMEOUT, resp)
        .await
        .expect("no response head while the upload is open")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.body_mut();
    for i in 0..5 {
        if i > 0 {
            tx.send_data(Bytes::from(format!("ping {i};")))
                .await
                .unwrap();
        }
        let want = format!("ping {i};");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = tokio::time::timeout(READY_TIMEOUT, body.frame())
                .await
                .unwrap_or_else(|_| panic!("chunk {i} did not come back"))
                .expect("body ended early")
                .unwrap();
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
    drop(tx);
    let rest = tokio::time::timeout(READY_TIMEOUT, body.collect())
        .await
        .expect("the echo did not end")
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
}
