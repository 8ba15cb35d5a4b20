//! Malformed requests get the right 4xx, are counted, are never forwarded,
//! and never stop the proxy from serving other connections.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use support::*;

fn yaml(up: &Upstream, extra: &str) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0{extra} }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ] }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        up.addr
    )
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"))
}

/// One keep-alive request on an open connection; returns the status line's code.
fn keepalive_get(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    status_of(&String::from_utf8_lossy(&buf[..n]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(&up, ""));
    let addr = p.addr("out");
    // A healthy keep-alive connection opened before the bad input.
    let mut good = TcpStream::connect(addr).unwrap();
    assert_eq!(keepalive_get(&mut good), 200);
    let before = up.hits();

    let big = "a".repeat(70 * 1024);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed request line"),
        (b"GET / HTTP/9.9\r\nhost: svc\r\n\r\n".to_vec(), 400, "bad version"),
        (format!("GET / HTTP/1.1\r\nhost: svc\r\nx-big: {big}\r\n\r\n").into_bytes(), 431, "64 KiB default limit"),
        (b"GET / HTTP/1.1\r\nhost: svc\r\nbad\x01name: v\r\n\r\n".to_vec(), 400, "invalid header name byte"),
        (b"GET / HTTP/1.1\r\nhost: svc\r\nx-v: a\x00b\r\n\r\n".to_vec(), 400, "NUL in header value"),
        (b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, "CL then TE"),
        (b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n".to_vec(), 400, "TE then CL"),
        (b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(), 400, "two lengths"),
    ];
    for (bytes, want, what) in &cases {
        let resp = raw(addr, bytes);
        assert_eq!(status_of(&resp), *want, "{what}: {resp}");
    }
    assert_eq!(
        up.hits(),
        before,
        "a malformed request reached the upstream"
    );

    // Still serving: the old connection and new ones.
    assert_eq!(keepalive_get(&mut good), 200);
    let c = TestClient::h1(addr);
    assert_eq!(get(&c, "svc", "/").await.status, 200);

    let m = p.metrics();
    let count = |reason: &str| {
        metric_value(
            &m,
            "outrigger_bad_requests_total",
            &[&format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(count("malformed") >= 4.0, "{m}");
    assert_eq!(count("header-too-large"), 1.0);
    assert_eq!(count("conflicting-framing"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limit_is_configurable() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&yaml(&up, ", max_header_bytes: 16384"));
    let addr = p.addr("out");
    let mid = "b".repeat(20 * 1024);
    let resp = raw(
        addr,
        format!("GET / HTTP/1.1\r\nhost: svc\r\nx-mid: {mid}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(status_of(&resp), 431);
    let small = "c".repeat(8 * 1024);
    let resp = raw(
        addr,
        format!("GET / HTTP/1.1\r\nhost: svc\r\nx-s: {small}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(status_of(&resp), 200);
    assert_eq!(up.last().headers["x-s"].len(), 8 * 1024);
}

fn two_hosts(a: &Upstream, b: &Upstream) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes:\n  - {{ name: ra, match: {{ host: a.example }}, backends: [ {{ cluster: a }} ] }}\n  - {{ name: rb, match: {{ host: b.example }}, backends: [ {{ cluster: b }} ] }}\nclusters:\n  - {{ name: a, endpoints: [ {{ address: {} }} ] }}\n  - {{ name: b, endpoints: [ {{ address: {} }} ] }}\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_authority_follow_rfc_9112_and_9113() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let p = ProxyProc::start(&two_hosts(&a, &b));
    let addr = p.addr("out");
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (
            b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
            400,
            "no Host",
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\nconnection: close\r\n\r\n",
            400,
            "two Host headers",
        ),
        (
            b"GET http://user@a.example/ HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n",
            400,
            "userinfo",
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a.exa mple\r\nconnection: close\r\n\r\n",
            400,
            "not an authority",
        ),
    ];
    for (bytes, want, what) in cases {
        let resp = raw(addr, bytes);
        assert_eq!(status_of(&resp), want, "{what}: {resp}");
    }
    assert_eq!(a.hits() + b.hits(), 0, "a refused request was forwarded");

    // Absolute form: the target's authority wins over Host, for routing,
    // for what the upstream sees and for the access log alike.
    let resp = raw(
        addr,
        b"GET http://a.example/x?q=1 HTTP/1.1\r\nhost: b.example\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(a.hits(), 1);
    let seen = a.last();
    assert_eq!(seen.path, "/x");
    assert_eq!(seen.headers["host"], "a.example");
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    let line = p.wait_log(|l| l.contains("\"access\"") && l.contains("\"route\":\"ra\""));
    assert!(line.contains("\"authority\":\"a.example\""), "{line}");

    // HTTP/1.0 may leave Host out.
    let resp = raw(addr, b"GET / HTTP/1.0\r\n\r\n");
    assert_ne!(status_of(&resp), 400, "{resp}");

    // HTTP/2: a host header that disagrees with :authority is refused; one
    // that agrees is folded into :authority.
    let h2 = TestClient::h2(addr);
    let conflicting = http::Request::get("http://a.example/")
        .header("host", "b.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = h2.h2_request_raw(conflicting).await;
    assert_eq!(resp, 400);
    let agreeing = http::Request::get("http://a.example/")
        .header("host", "a.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h2.h2_request_raw(agreeing).await, 200);
    assert_eq!(b.hits(), 0);
}
