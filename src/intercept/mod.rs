//! Transparent interception: the pod's redirect rules (`rules`, installed
//! by `outrigger init`), and what the outbound listener does with a
//! redirected connection: recover where the app meant to go
//! (`SO_ORIGINAL_DST`, IPv4 and IPv6), refuse a loop back into the proxy,
//! and decide from the first bytes whether it is HTTP the mesh routes
//! (HTTP/1 to a host with a route, HTTP/2 prior knowledge) or something
//! to pass through opaque to that destination (TLS from the app, another
//! protocol, HTTP to a host outside the mesh, or a server-speaks-first
//! protocol such as MySQL or SMTP, which sends nothing until the timeout).

pub mod rules;

use crate::telemetry::metrics;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long to wait for the client's first bytes before deciding the
/// protocol speaks server-first.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// Where a redirected connection was going; `None` when it was not
/// redirected (a client that dialled the listener itself).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    // Without a NAT entry some kernels answer with the socket's own address.
    (dst != local).then_some(dst)
}

/// What the first bytes say.
#[derive(Debug, PartialEq)]
pub enum Protocol {
    /// HTTP/1 to a host the mesh routes, or HTTP/2 prior knowledge.
    Http,
    /// Passed through as it is, with the reason.
    Opaque(&'static str),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// The `Host` of an HTTP/1 request head, if `buf` starts with one.
fn http1_host(buf: &[u8]) -> Option<Result<&str, ()>> {
    let line_end = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..line_end];
    let method_end = line.iter().position(|&b| b == b' ')?;
    if method_end == 0 || !line[..method_end].iter().all(u8::is_ascii_uppercase) {
        return Some(Err(()));
    }
    if !line.ends_with(b"HTTP/1.1\r")
        && !line.ends_with(b"HTTP/1.0\r")
        && !line.ends_with(b"HTTP/1.1")
    {
        return Some(Err(()));
    }
    let head = &buf[line_end + 1..];
    // Only whole lines: a blank one ends the head, a partial one waits.
    for l in head.split_inclusive(|&b| b == b'\n') {
        let l = l.strip_suffix(b"\n")?;
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if l.is_empty() {
            return Some(Ok(""));
        }
        if l.len() > 5 && l[..5].eq_ignore_ascii_case(b"host:") {
            return Some(std::str::from_utf8(&l[5..]).map(str::trim).map_err(|_| ()));
        }
    }
    None
}

/// Peeks at the first bytes (without taking them) until the protocol is
/// known. `routed(host)` says whether the mesh has a route for a host.
pub async fn detect(stream: &TcpStream, routed: impl Fn(&str) -> bool) -> Protocol {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) if seen == 0 => return Protocol::Opaque("server-first"),
            Err(_) => return Protocol::Opaque("unknown"),
            Ok(Err(_)) | Ok(Ok(0)) => return Protocol::Opaque("closed"),
            Ok(Ok(n)) => n,
        };
        let b = &buf[..n];
        if b[0] == 0x16 {
            return Protocol::Opaque("tls");
        }
        if H2_PREFACE.starts_with(&b[..b.len().min(H2_PREFACE.len())]) {
            if b.len() >= H2_PREFACE.len() {
                return Protocol::Http;
            }
        } else {
            match http1_host(b) {
                Some(Ok(host)) if routed(host) => return Protocol::Http,
                Some(Ok(_)) => return Protocol::Opaque("http-unrouted"),
                Some(Err(())) => return Protocol::Opaque("unknown"),
                None if n == buf.len() => return Protocol::Opaque("unknown"),
                None => {}
            }
        }
        // More bytes are on their way: peek again once they arrive.
        seen = n;
        let grown = async {
            loop {
                match stream.peek(&mut buf).await {
                    Ok(m) if m > seen => return,
                    Ok(0) | Err(_) => return,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        };
        if tokio::time::timeout_at(deadline, grown).await.is_err() {
            return Protocol::Opaque("unknown");
        }
    }
}

/// Relays the connection as it is to where it was going, counting bytes.
pub async fn passthrough(mut client: TcpStream, dst: SocketAddr, listener: &str, reason: &str) {
    let m = metrics();
    m.tcp_passthrough
        .with_label_values(&[listener, reason])
        .inc();
    let mut upstream =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            _ => {
                tracing::debug!(listener, %dst, "passthrough: upstream unreachable");
                let _ = client.shutdown().await;
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        m.tcp_bytes
            .with_label_values(&[listener, "sent"])
            .inc_by(up);
        m.tcp_bytes
            .with_label_values(&[listener, "received"])
            .inc_by(down);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_http1_head() {
        assert_eq!(
            http1_host(b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: orders:8080\r\n\r\n"),
            Some(Ok("orders:8080"))
        );
        assert_eq!(http1_host(b"GET / HTTP/1.1\r\nAcc"), None, "not yet");
        assert_eq!(http1_host(b"GET / HTTP/1.1\r\n"), None, "not yet");
        assert_eq!(http1_host(b"GET / HTTP/1.1\r\n\r\n"), Some(Ok("")));
        assert_eq!(http1_host(b"\x03\x00\x00\x10 mysql\n"), Some(Err(())));
        assert_eq!(http1_host(b"EHLO mail HTTP\n"), Some(Err(())));
    }

    #[tokio::test]
    async fn detection_over_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        for (bytes, want) in [
            (
                &b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"[..],
                Protocol::Http,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
                Protocol::Opaque("http-unrouted"),
            ),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Protocol::Http),
            (b"\x16\x03\x01\x00\xa5\x01", Protocol::Opaque("tls")),
            (b"\x00\x01binary", Protocol::Opaque("unknown")),
            (b"", Protocol::Opaque("server-first")),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            c.write_all(bytes).await.unwrap();
            assert_eq!(
                detect(&s, |h| h.starts_with("orders")).await,
                want,
                "{bytes:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_head_in_pieces_is_waited_for() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let d = tokio::spawn(async move { detect(&s, |h| h == "orders").await });
        tokio::task::yield_now().await;
        c.write_all(b"Host: orders\r\n\r\n").await.unwrap();
        assert_eq!(d.await.unwrap(), Protocol::Http);
    }

    #[tokio::test]
    async fn a_socket_nobody_redirected_has_no_original_destination() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&s), None);
    }
}
