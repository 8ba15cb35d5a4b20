//! HTTP/1.1 and HTTP/2 through the proxy, both ways, with streaming
//! bodies, trailers, upgrades and header handling.

mod support;

use bytes::Bytes;
use support::*;

fn config(cluster_protocol: &str, upstream: &Upstream) -> String {
    format!(
        r#"
listeners:
  - {{ name: out, role: outbound, address: 127.0.0.1:0 }}
  - {{ name: gw, role: gateway, address: 127.0.0.1:0 }}
routes:
  - {{ name: all, backends: [ {{ cluster: app }} ] }}
clusters:
  - {{ name: app, protocol: {cluster_protocol}, endpoints: [ {{ address: {} }} ] }}
"#,
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_pass_in_every_combination() {
    let up = Upstream::start("app").await;
    for (cluster, down_h2, want_up) in [
        ("http1", false, http::Version::HTTP_11),
        ("http1", true, http::Version::HTTP_11),
        ("http2", false, http::Version::HTTP_2),
        ("http2", true, http::Version::HTTP_2),
        ("auto", false, http::Version::HTTP_11),
        ("auto", true, http::Version::HTTP_2),
    ] {
        let p = ProxyProc::start(&config(cluster, &up));
        let c = if down_h2 {
            TestClient::h2(p.addr("out"))
        } else {
            TestClient::h1(p.addr("out"))
        };
        for _ in 0..3 {
            let r = get(&c, "app.svc", "/hello?x=1").await;
            assert_eq!(r.status, 200, "{cluster} h2={down_h2}");
            assert_eq!(r.text(), "app");
            let seen = up.last();
            assert_eq!(seen.version, want_up, "{cluster} h2={down_h2}");
            assert_eq!(seen.path, "/hello");
            let host = seen
                .headers
                .get("host")
                .map(|h| h.to_str().unwrap().to_string());
            // HTTP/1 upstreams need a Host header even when the client spoke HTTP/2.
            if want_up == http::Version::HTTP_11 {
                assert_eq!(host.as_deref(), Some("app.svc"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_reaches_an_http1_only_app_with_the_default_config() {
    let app = Upstream::with(
        "app",
        UpstreamOpts {
            http1_only: true,
            ..Default::default()
        },
    )
    .await;
    // The default cluster protocol (`auto`): the caller's, with a fallback.
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: all, backends: [ {{ cluster: app }} ] }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        app.addr
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h2(p.addr("out"));
    for i in 0..5 {
        let r = send(&c, "POST", "app.svc", &format!("/echo?i={i}"), &[], "ping").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "ping");
        let seen = app.last();
        assert_eq!(seen.version, http::Version::HTTP_11);
        assert_eq!(seen.headers["host"], "app.svc");
    }
    // Learned once: later requests go straight to HTTP/1.1.
    p.wait_log(|l| l.contains("speaks only HTTP/1.1"));
    assert_eq!(
        p.count_log(|l| l.contains("speaks only HTTP/1.1")),
        1,
        "the fallback is remembered per endpoint"
    );

    // Forcing HTTP/2 onto it is a clear protocol mismatch, not a reset.
    let forced = ProxyProc::start(&yaml.replace("name: app,", "name: app, protocol: http2,"));
    let r = get(&TestClient::h1(forced.addr("out")), "app.svc", "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-outrigger-reason"), Some("protocol-mismatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_intact() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config("auto", &up));
    let body: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    for c in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        let r = send(&c, "POST", "app.svc", "/echo", &[], body.clone()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), body.len());
        assert!(r.body == body, "echoed body differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_through_http2() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config("http2", &up));
    let c = TestClient::h2(p.addr("out"));
    let r = get(&c, "app.svc", "/trailers").await;
    assert_eq!(r.text(), "with trailers");
    let t = r.trailers.expect("trailers lost");
    assert_eq!(t["x-trailer"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config("auto", &up));
    let url = format!("ws://{}/ws", p.addr("out"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_request_id_added() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config("http1", &up));
    let c = TestClient::h1(p.addr("out"));
    let r = send(
        &c,
        "GET",
        "app.svc",
        "/",
        &[
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-end", "kept"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up.last().headers;
    assert!(h.get("x-private").is_none(), "{h:?}");
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    assert_eq!(h["x-end"], "kept");
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["x-request-id"].len(), 32);
    assert!(
        h.get("x-forwarded-for").is_none(),
        "outbound listeners do not add x-forwarded-for"
    );

    // a request id the client sent is kept
    send(
        &c,
        "GET",
        "app.svc",
        "/",
        &[("x-request-id", "abc")],
        Bytes::new(),
    )
    .await;
    assert_eq!(up.last().headers["x-request-id"], "abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_adds_forwarded_headers() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&config("http1", &up));
    let c = TestClient::h1(p.addr("gw"));
    send(
        &c,
        "GET",
        "shop.example.com",
        "/",
        &[("x-forwarded-for", "203.0.113.9")],
        Bytes::new(),
    )
    .await;
    let h = up.last().headers;
    // An internet client's own claim is not trusted: the peer is the client.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_gets_503_with_reason_not_a_hang() {
    let dead = dead_addr();
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes: [ {{ name: all, backends: [ {{ cluster: dead }} ] }} ]
clusters: [ {{ name: dead, endpoints: [ {{ address: {dead} }} ] }}, {{ name: empty }} ]
"#
    );
    let p = ProxyProc::start(&yaml);
    for c in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        let r = get(&c, "x", "/").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-outrigger-reason"), Some("connect-failure"));
    }
    assert!(
        p.metric(
            "outrigger_upstream_connect_failures_total",
            &["cluster=\"dead\""]
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        p.metric(
            "outrigger_requests_total",
            &["code=\"503\"", "route=\"all\""]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_local_app() {
    let app = Upstream::start("local-app").await;
    let yaml = format!(
        "listeners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {} }} ]\n",
        app.addr
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("in"));
    let r = get(&c, "whatever", "/x").await;
    assert_eq!(r.text(), "local-app");
    assert_eq!(
        p.metric(
            "outrigger_requests_total",
            &["listener=\"in\"", "code=\"200\""]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_upstream_hits_the_connect_timeout() {
    // A listener that never accepts, with its accept queue full: further
    // SYNs are dropped, so a connect hangs instead of being refused.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = sock.listen(0).unwrap();
    let addr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    let mut full = false;
    for _ in 0..256 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        match tokio::time::timeout(std::time::Duration::from_millis(200), s.connect(addr)).await {
            Ok(Ok(c)) => fillers.push(c),
            _ => {
                full = true; // the queue is full: this connect hung
                break;
            }
        }
    }
    assert!(full, "could not fill the accept queue");
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: all, backends: [ {{ cluster: hole }} ] }} ]\nclusters: [ {{ name: hole, connect_timeout: 300ms, endpoints: [ {{ address: {addr} }} ] }} ]\n"
    );
    let p = ProxyProc::start(&yaml);
    let r = get(&TestClient::h1(p.addr("out")), "x", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-outrigger-reason"), Some("connect-timeout"));
    drop(hole);
}

/// With one worker, a connection's HTTP/2 streams run on the connection's
/// own task (src/proxy/streams.rs): many at once on one connection, each
/// answered with its own body, trailers kept, a stream the client abandons
/// mid-body reset without disturbing the others, and the connection still
/// serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_share_one_worker_and_one_connection() {
    for cluster in ["http1", "http2"] {
        let up = Upstream::start("app").await;
        let p = ProxyProc::start_with(&config(cluster, &up), &["--threads", "1"]);
        let c = TestClient::h2(p.addr("out"));
        // Opens the connection every request below shares.
        assert_eq!(get(&c, "app.svc", "/").await.status, 200);
        let first = c.h2_sender().await.expect("an HTTP/2 connection");

        // A stream that never ends, abandoned after its first chunk.
        let mut stalled = c
            .request(
                http::Request::get("http://app.svc/stall")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("stall answered")
            .into_body();
        let chunk = http_body_util::BodyExt::frame(&mut stalled)
            .await
            .expect("a first chunk")
            .expect("a frame");
        assert_eq!(chunk.into_data().ok().as_deref(), Some(&b"first"[..]));

        let echoes = (0..40).map(|i| {
            let c = &c;
            async move {
                let body = format!("stream {i} ").repeat(i * 50 + 1);
                let r = send(c, "POST", "app.svc", "/echo", &[], body.clone()).await;
                assert_eq!(r.status, 200, "{cluster} stream {i}");
                assert_eq!(r.text(), body, "{cluster} stream {i} got another's body");
            }
        });
        let trailers = async {
            let r = get(&c, "app.svc", "/trailers").await;
            assert_eq!(r.text(), "with trailers");
            // An HTTP/1.1 app sends trailers only to a client that asked.
            if cluster == "http2" {
                let t = r.trailers.expect("trailers");
                assert_eq!(t.get("x-trailer").unwrap(), "yes");
            }
        };
        tokio::join!(futures_util::future::join_all(echoes), trailers);
        drop(stalled);

        for _ in 0..3 {
            assert_eq!(get(&c, "app.svc", "/").await.text(), "app");
        }
        // The client opens a new connection only when its last one closed.
        assert!(
            !first.is_closed(),
            "{cluster}: every request should have shared the first connection"
        );
        assert_eq!(
            p.metric("outrigger_worker_threads", &[]),
            Some(1.0),
            "{cluster}"
        );
    }
}

/// hyper ends an HTTP/2 connection's future on some requests it refuses
/// (a CONNECT with a body length) without closing the h2 connection; with
/// one worker the connection's other streams run on its task, and must
/// learn that it is gone (the connection is dropped) instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_an_http2_connection_hyper_gave_up_on_do_not_hang() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start_with(&config("http1", &up), &["--threads", "1"]);
    let tcp = tokio::net::TcpStream::connect(p.addr("out")).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    // A response that never ends.
    let req = http::Request::get("http://app.svc/stall").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).expect("stream 1");
    let resp = tokio::time::timeout(READY_TIMEOUT, resp)
        .await
        .expect("stall answered")
        .expect("stall response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.data().await.expect("a first chunk").expect("data");
    assert_eq!(&first[..], b"first");
    let connect = http::Request::builder()
        .method("CONNECT")
        .uri("app.svc:80")
        .header("content-length", "5")
        .body(())
        .unwrap();
    let _connect = client.send_request(connect, false);
    let ended = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(chunk) = body.data().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a stream hung after its connection ended");
}
