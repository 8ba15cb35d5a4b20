//! The core from an attacker's side and from an operator's: hostile
//! clients and upstreams written for each test, and edits of the running
//! config. Every test pushes real traffic through a real proxy process.

mod support;

use bytes::Bytes;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::upstream::{RawUpstream, tcp_echo};
use support::*;

fn one_cluster(listener_extra: &str, route_extra: &str, addr: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - {{ name: out, role: outbound, address: 127.0.0.1:0{listener_extra} }}\n  - {{ name: gw, role: gateway, address: 127.0.0.1:0 }}\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ]{route_extra} }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {addr} }} ] }} ]\n"
    )
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"))
}

/// Reads one HTTP/1.1 response with a content-length body from `s`.
fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(n > 0, "closed mid-head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (
        status_of(&head),
        head,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_half_written_config_is_refused_and_the_old_one_serves() {
    let up = Upstream::start("app").await;
    let yaml = one_cluster("", "", up.addr);
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));
    assert_eq!(get(&c, "svc", "/").await.status, 200);

    // Truncated to nothing: refused, not applied as "no listeners".
    let nacks = p
        .metric("outrigger_feed_updates_total", &["nack"])
        .unwrap_or(0.0);
    std::fs::write(&p.config_path, "").unwrap();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while p
        .metric("outrigger_feed_updates_total", &["nack"])
        .unwrap_or(0.0)
        <= nacks
    {
        assert!(
            std::time::Instant::now() < deadline,
            "empty file never nacked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(&c, "svc", "/").await.status,
        200,
        "keep-alive still served"
    );
    let fresh = TestClient::h1(p.addr("out"));
    assert_eq!(
        get(&fresh, "svc", "/").await.status,
        200,
        "new connections too"
    );
    assert_eq!(http_get_raw(p.probes, "/ready").0, 200);

    // `validate` calls an empty file what it is.
    let dir = temp_dir();
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let out = std::process::Command::new(bin())
        .arg("validate")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listeners"));

    // A valid edit still lands afterwards.
    assert!(p.reload(&yaml.replace("name: r,", "name: r2,")));
}

/// An upstream that answers `/early` with a 413 before reading the body
/// and then reads and discards the rest, keeping the connection (as NGINX
/// does); anything else gets a 200.
async fn lingering_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Some(head) = support::upstream::read_head(&mut s, &mut buf).await {
                    let mut left: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    let answer: &[u8] = if head.starts_with("post /early") {
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\napp"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    // Discard the body as it comes, then serve the next request.
                    while left > 0 {
                        if buf.is_empty() {
                            match s.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        let n = left.min(buf.len());
                        buf.drain(..n);
                        left -= n;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_hold_up_the_next_callers_request() {
    let app = lingering_upstream().await;
    let yaml = one_cluster(", stream_idle_timeout: 60s", "", app)
        .replace("name: app,", "name: app, protocol: http1,");
    let p = ProxyProc::start(&yaml);
    let addr = p.addr("out");
    // Caller A (HTTP/2): an upload the app answers (413) before reading
    // it, whose body then trickles and does not end while the test runs.
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (mut a, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let req = http::Request::post("http://svc/early")
        .header("content-length", "1000000")
        .body(body)
        .unwrap();
    tx.send_data(Bytes::from_static(b"first bytes"))
        .await
        .unwrap();
    let resp = a.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    drop(resp);
    let _ = tx.send_data(Bytes::from_static(b"more bytes")).await;
    // Caller B: its request must not wait behind A's body on the pooled
    // upstream connection A's request used.
    let b = TestClient::h1(addr);
    let r = get(&b, "svc", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    let _ = tx.send_data(Bytes::from_static(b"still more")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_does_not_trust_internet_headers() {
    let up = Upstream::start("app").await;
    let yaml = format!(
        "listeners:\n  - {{ name: out, role: outbound, address: 127.0.0.1:0 }}\n  - {{ name: gw, role: gateway, address: 127.0.0.1:0 }}\n  - {{ name: edge, role: gateway, address: 127.0.0.1:0, trusted_proxies: [127.0.0.0/8], trust_request_id: true }}\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ], fault: {{ headers: true }} }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        up.addr
    );
    let p = ProxyProc::start(&yaml);
    let hostile = [
        ("x-outrigger-fault-abort", "503"),
        ("x-outrigger-attempts", "7"),
        ("x-request-id", "chosen-by-client"),
        ("x-forwarded-for", "10.9.9.9"),
        ("forwarded", "for=10.9.9.9"),
    ];
    // Through the gateway: no fault, nothing internal reaches the mesh.
    let gw = TestClient::h1(p.addr("gw"));
    let r = send(&gw, "GET", "shop.example", "/", &hostile, Bytes::new()).await;
    assert_eq!(r.status, 200, "the internet triggered a fault");
    let seen = up.last().headers;
    assert!(
        seen.keys().all(|k| !k.as_str().starts_with("x-outrigger-")),
        "{seen:?}"
    );
    assert_ne!(seen["x-request-id"], "chosen-by-client");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["forwarded"], "for=127.0.0.1;proto=http");
    // Several X-Forwarded-For lines from a trusted proxy are one chain.
    let edge = TestClient::h1(p.addr("edge"));
    send(
        &edge,
        "GET",
        "shop.example",
        "/",
        &[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-request-id", "from-trusted-edge"),
        ],
        Bytes::new(),
    )
    .await;
    let seen = up.last().headers;
    assert_eq!(
        seen["x-forwarded-for"],
        "203.0.113.1, 198.51.100.2, 127.0.0.1"
    );
    assert_eq!(seen["x-request-id"], "from-trusted-edge");
    // Inside the mesh, header faults still work for chaos tests.
    let out = TestClient::h1(p.addr("out"));
    let r = send(&out, "GET", "svc", "/", &hostile[..1], Bytes::new()).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-outrigger-reason"), Some("fault-injected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cannot_set_the_proxys_own_headers() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    let c = TestClient::h1(p.addr("out"));
    let r = send(
        &c,
        "GET",
        "svc",
        "/respond",
        &[
            ("x-respond-x-outrigger-reason", "forged"),
            ("x-respond-x-outrigger-attempts", "42"),
            ("x-respond-x-app", "kept"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-app"), Some("kept"));
    assert_eq!(r.header("x-outrigger-reason"), None);
    assert_eq!(r.header("x-outrigger-attempts"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_a_stale_length_arrives_whole() {
    let raw = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let p = ProxyProc::start(&one_cluster("", "", raw.addr));
    for client in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        let r = get(&client, "svc", "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello world", "truncated to the stale length");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_nobody_asked_for_is_a_502() {
    let raw = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: evil\r\n\r\n",
    )
    .await;
    let p = ProxyProc::start(&one_cluster("", "", raw.addr));
    let r = get(&TestClient::h1(p.addr("out")), "svc", "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-outrigger-reason"), Some("unexpected-upgrade"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_is_refused_on_every_request_of_a_connection() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    let mut s = TcpStream::connect(p.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"POST /sink HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\n\r\nhello")
        .unwrap();
    let (status, _, body) = read_response(&mut s);
    assert_eq!((status, body.as_str()), (200, "5"));
    let before = up.hits();
    // The second request on the same connection smuggles: TE before CL.
    s.write_all(b"POST /sink HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: svc\r\n\r\n")
        .unwrap();
    let (status, head, _) = read_response(&mut s);
    assert_eq!(status, 400, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(up.hits(), before, "the smuggling request reached the app");
    assert!(
        up.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.path != "/smuggled")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_requests_never_get_a_408_in_the_middle_of_a_response() {
    let up = Upstream::with(
        "app",
        UpstreamOpts {
            delay: Some(Duration::from_millis(600)),
            ..Default::default()
        },
    )
    .await;
    let p = ProxyProc::start(&one_cluster(", header_read_timeout: 200ms", "", up.addr));
    let mut s = TcpStream::connect(p.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\nhost: svc\n\n").unwrap();
    // The answer takes longer than the header timeout: the timer was for
    // the head, which ended with bare LFs, and must not fire now.
    let (status, head, body) = read_response(&mut s);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, "app");
    s.write_all(b"GET / HTTP/1.1\nhost: svc\n\n").unwrap();
    let (status, _, _) = read_response(&mut s);
    assert_eq!(status, 200, "the connection is still good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_host_and_strips_every_listed_header() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    let c = TestClient::h1(p.addr("out"));
    let r = send(
        &c,
        "GET",
        "svc.example",
        "/",
        &[
            ("connection", "host, a, b, c, d, e, f"),
            ("a", "1"),
            ("b", "1"),
            ("c", "1"),
            ("d", "1"),
            ("e", "1"),
            ("f", "1"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up.last().headers;
    assert_eq!(h["host"], "svc.example");
    for n in ["a", "b", "c", "d", "e", "f", "connection"] {
        assert!(h.get(n).is_none(), "{n} survived: {h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_unless_a_route_allows_it_and_then_tunnels() {
    let echo = tcp_echo().await;
    let p = ProxyProc::start(&one_cluster("", "", echo));
    let resp = raw(
        p.addr("out"),
        b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 405, "{resp}");
    assert!(resp.contains("connect-not-allowed"), "{resp}");

    let allowed = ProxyProc::start(&one_cluster("", ", connect: true", echo));
    let mut s = TcpStream::connect(allowed.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .unwrap();
    let (status, head, _) = read_response(&mut s);
    assert_eq!(status, 200, "{head}");
    s.write_all(b"raw bytes, not HTTP").unwrap();
    let mut back = [0u8; 19];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"raw bytes, not HTTP");
    assert_eq!(
        allowed.metric("outrigger_tunnels", &["listener=\"out\""]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_served_as_plain_http1_never_tunnelled() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    let mut s = TcpStream::connect(p.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .unwrap();
    let (status, head, body) = read_response(&mut s);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, "app");
    let h = up.last().headers;
    for n in ["upgrade", "http2-settings", "connection"] {
        assert!(h.get(n).is_none(), "{n} reached the app: {h:?}");
    }
    // Still HTTP/1.1 on the same connection.
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).0, 200);
    assert_eq!(
        p.metric("outrigger_tunnels", &["listener=\"out\""]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_show_a_reason_not_internal_addresses() {
    let dead = dead_addr();
    let p = ProxyProc::start(&one_cluster(", access_log: true", "", dead));
    let r = get(&TestClient::h1(p.addr("gw")), "svc", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "connect-failure\n");
    assert!(!r.text().contains("127.0.0.1"));
    let r = get(&TestClient::h1(p.addr("out")), "svc", "/").await;
    assert_eq!(r.text(), "connect-failure\n");
    // The detail stays in the access log, upstream address included.
    let line = p.wait_log(|l| l.contains("\"access\"") && l.contains("connect-failure"));
    assert!(line.contains(&dead.to_string()), "{line}");
    assert!(
        line.contains("Connection refused") || line.contains("connection refused"),
        "{line}"
    );
    // A listener set up for debugging shows it all.
    let debug = ProxyProc::start(&one_cluster(", error_detail: true", "", dead));
    let r = get(&TestClient::h1(debug.addr("out")), "svc", "/").await;
    assert!(r.text().contains(&dead.to_string()), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_fault_delay_is_capped_and_bounded_by_the_route_timeout() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster(
        "",
        ", timeout: 300ms, fault: { headers: true }",
        up.addr,
    ));
    let c = TestClient::h1(p.addr("out"));
    let r = send(
        &c,
        "GET",
        "svc",
        "/",
        &[("x-outrigger-fault-delay", "1000000000s")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-outrigger-reason"), Some("timeout"));
    assert_eq!(up.hits(), 0, "the delayed request was never sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_timeout_bounds_the_response_body_too() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster(
        "",
        ", timeout: 5s, total_timeout: 300ms",
        up.addr,
    ));
    // `/stall` sends a head and one chunk, then nothing: the route timeout
    // (to the head) is met, the total timeout cuts the body.
    let c = TestClient::h2(p.addr("out"));
    let req = http::Request::get("/stall")
        .header("host", "svc")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "the stalled stream was reset");
    assert_eq!(
        p.metric("outrigger_timeouts_total", &["kind=\"total\""]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_refuses_foreign_hosts_and_origins() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    let ask = |req: String| raw(p.admin, req.as_bytes());
    let r = ask(
        "POST /shutdown HTTP/1.1\r\nhost: attacker.example\r\nconnection: close\r\n\r\n".into(),
    );
    assert_eq!(status_of(&r), 403, "{r}");
    let r = ask(format!(
        "POST /shutdown HTTP/1.1\r\nhost: {}\r\norigin: https://evil.example\r\nconnection: close\r\n\r\n",
        p.admin
    ));
    assert_eq!(status_of(&r), 403, "{r}");
    let r = ask(
        "GET /config HTTP/1.1\r\nhost: rebound.example:15000\r\nconnection: close\r\n\r\n".into(),
    );
    assert_eq!(status_of(&r), 403, "DNS rebinding read the config: {r}");
    assert_eq!(http_get_raw(p.probes, "/ready").0, 200, "still running");
    assert_eq!(http_get_raw(p.admin, "/config").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_routed_authorized_and_forwarded_in_one_canonical_form() {
    let public = Upstream::start("public").await;
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: pub, match: {{ path_prefix: /public/ }}, backends: [ {{ cluster: p }} ] }} ]\nclusters: [ {{ name: p, endpoints: [ {{ address: {} }} ] }} ]\n",
        public.addr
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));
    // Dot segments climb out of the prefix: no longer the public route.
    for escape in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
    ] {
        let r = get(&c, "svc", escape).await;
        assert_eq!(r.status, 404, "{escape}");
    }
    // Encoded slashes and `..;` are refused outright.
    for bad in [
        "/public/..%2fadmin",
        "/public/..%5Cadmin",
        "/public/..;/admin",
    ] {
        let r = get(&c, "svc", bad).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.header("x-outrigger-reason"), Some("bad-path"));
    }
    assert_eq!(public.hits(), 0);
    // What stays inside is forwarded canonical, query kept.
    let r = get(&c, "svc", "/public/./a/../b?x=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(public.last().path, "/public/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_authorized_like_any_request() {
    let echo = tcp_echo().await;
    let yaml = format!(
        "listeners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {echo} }} ]\nroutes: [ {{ name: tunnel, listeners: [in], backends: [ {{ cluster: db }} ], connect: true }} ]\nclusters: [ {{ name: db, endpoints: [ {{ address: {echo} }} ] }} ]\nauthorization: [ {{ name: only-ops, listener: in, allow: [ {{ from: [\"spiffe://td/ns/ops/sa/admin\"] }} ] }} ]\n"
    );
    let p = ProxyProc::start(&yaml);
    let resp = raw(
        p.addr("in"),
        b"CONNECT db:5432 HTTP/1.1\r\nhost: db:5432\r\n\r\n",
    );
    assert_eq!(
        status_of(&resp),
        403,
        "a plaintext caller opened a tunnel: {resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_bound_to_the_protocol_the_route_allows() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_cluster("", "", up.addr));
    // Two protocols asked for: only the allowed one goes upstream.
    let mut s = TcpStream::connect(p.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"GET /respond HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: websocket, foo\r\n\r\n")
        .unwrap();
    let _ = read_response(&mut s);
    assert_eq!(up.last().headers["upgrade"], "websocket");
    // An upstream that switches to another protocol than the one allowed: 502.
    let raw_up = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: foo\r\n\r\n",
    )
    .await;
    let p2 = ProxyProc::start(&one_cluster("", "", raw_up.addr));
    let mut s = TcpStream::connect(p2.addr("out")).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: x\r\nsec-websocket-version: 13\r\n\r\n")
        .unwrap();
    let (status, head, _) = read_response(&mut s);
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("unexpected-upgrade"), "{head}");
}
