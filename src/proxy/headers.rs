//! Header handling of one request and response: hop-by-hop removal
//! (RFC 9110 §7.6.1), `x-forwarded-*`, `x-request-id`, and the URI and
//! `Host` each upstream protocol needs.
//!
//! Hop-by-hop removal first scans the map once and only then removes, so
//! the common request that carries none costs one pass of cheap compares.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const KEEP_ALIVE: &str = "keep-alive";
const PROXY_CONNECTION: &str = "proxy-connection";
pub const REQUEST_ID: &str = "x-request-id";
const XFF: &str = "x-forwarded-for";
const XFP: &str = "x-forwarded-proto";

// Bit per hop-by-hop header, so one scan of the map finds all that are present.
const CONN: u8 = 1;
const TE_: u8 = 2;
const TRANSFER: u8 = 4;
const UPGRADE: u8 = 8;
const KEEPALIVE: u8 = 16;
const PROXY_CONN: u8 = 32;

fn hop_bit(name: &HeaderName) -> u8 {
    if *name == header::CONNECTION {
        CONN
    } else if *name == header::TE {
        TE_
    } else if *name == header::TRANSFER_ENCODING {
        TRANSFER
    } else if *name == header::UPGRADE {
        UPGRADE
    } else {
        // Custom names: compare length first, it rules out nearly all.
        let s = name.as_str();
        match s.len() {
            10 if s == KEEP_ALIVE => KEEPALIVE,
            16 if s == PROXY_CONNECTION => PROXY_CONN,
            _ => 0,
        }
    }
}

/// Removes hop-by-hop headers and those named by `Connection`. With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive (the
/// upgrade is forwarded end to end). `TE: trailers` survives: gRPC servers
/// require it, and it is valid on every hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut present = 0u8;
    for name in headers.keys() {
        present |= hop_bit(name);
    }
    if present == 0 {
        return;
    }
    if present & CONN != 0 {
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        // Look them up by &str: no allocation for the common tokens.
        let mut listed: [Option<HeaderName>; 4] = Default::default();
        let mut n = 0;
        for v in headers.get_all(header::CONNECTION) {
            let Ok(s) = v.to_str() else { continue };
            for token in s.split(',') {
                let t = token.trim();
                if t.is_empty()
                    || t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if n < listed.len()
                    && let Ok(name) = HeaderName::from_bytes(t.as_bytes())
                {
                    listed[n] = Some(name);
                    n += 1;
                }
            }
        }
        for name in listed.into_iter().flatten() {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if present & TE_ != 0 {
        let trailers = headers.get(header::TE).is_some_and(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        });
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if present & TRANSFER != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & KEEPALIVE != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if present & PROXY_CONN != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// True for an HTTP/1.1 request asking to switch protocols (WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Adds `x-request-id` when absent.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    // A static name: no per-request parsing or validation of "x-request-id".
    static NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
    let header::Entry::Vacant(slot) = headers.entry(NAME.clone()) else {
        return;
    };
    let mut buf = [0u8; 32];
    let mut n = fastrand::u128(..);
    for b in buf.iter_mut() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    if let Ok(v) = HeaderValue::from_bytes(&buf) {
        slot.insert(v);
    }
}

/// Gateway listeners: append the client to `x-forwarded-for`, set `x-forwarded-proto`.
pub fn add_forwarded(headers: &mut HeaderMap, client: std::net::IpAddr, proto: &'static str) {
    let ip = client.to_string();
    let value = match headers.get(XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
    }
    headers.insert(XFP, HeaderValue::from_static(proto));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("upgrade", "h2c"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn request_id_and_forwarded() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        ensure_request_id(&mut h);
        assert_eq!(h[REQUEST_ID].len(), 32);
        let id = h[REQUEST_ID].clone();
        ensure_request_id(&mut h);
        assert_eq!(h[REQUEST_ID], id);
        add_forwarded(&mut h, "127.0.0.9".parse().unwrap(), "http");
        assert_eq!(h[XFF], "10.0.0.1, 127.0.0.9");
        assert_eq!(h[XFP], "http");
    }
}
