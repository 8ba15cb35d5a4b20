//! Header handling of one request and response: hop-by-hop removal
//! (RFC 9110 §7.6.1), what a gateway must not trust from the internet
//! (`x-outrigger-*`, a client's `x-request-id`, `x-forwarded-for` and
//! `Forwarded` from untrusted peers), `x-request-id`, and the proxy's own
//! response headers, which an upstream may not set.
//!
//! Hop-by-hop removal first scans the map once and only then removes, so
//! the common request that carries none costs one pass of cheap compares.

use crate::config::Cidr;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

const KEEP_ALIVE: &str = "keep-alive";
const PROXY_CONNECTION: &str = "proxy-connection";
const HTTP2_SETTINGS: &str = "http2-settings";
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
const H2_SETTINGS: u8 = 64;

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
            14 if s == HTTP2_SETTINGS => H2_SETTINGS,
            16 if s == PROXY_CONNECTION => PROXY_CONN,
            _ => 0,
        }
    }
}

/// End-to-end headers the proxy relies on: `Connection` may not remove
/// them (`Connection: host` would otherwise strip the Host it routed on).
fn protected(token: &str) -> bool {
    token.eq_ignore_ascii_case("host")
        || token.eq_ignore_ascii_case("content-length")
        || token.eq_ignore_ascii_case("te")
}

/// Removes hop-by-hop headers and every header named by `Connection`
/// (except the protected ones). With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` survive (the upgrade is forwarded end to end). `TE:
/// trailers` survives: gRPC servers require it, and it is valid on every
/// hop. A chunked message loses `Content-Length` too (RFC 9112 §6.3: the
/// length of a chunked message is the chunks', never the header's).
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
        // The common tokens cost no allocation; others are collected first
        // (the map cannot change while its Connection values are read).
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            let Ok(s) = v.to_str() else { continue };
            for token in s.split(',') {
                let t = token.trim();
                if t.is_empty()
                    || t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("upgrade")
                    || protected(t)
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if present & TE_ != 0 {
        let trailers = headers.get_all(header::TE).iter().any(|v| {
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
        headers.remove(header::CONTENT_LENGTH);
    }
    if present & KEEPALIVE != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if present & PROXY_CONN != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if present & H2_SETTINGS != 0 {
        headers.remove(HTTP2_SETTINGS);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade` with
/// `Connection: upgrade`): its first token.
pub fn upgrade_token(headers: &HeaderMap) -> Option<&str> {
    let up = headers.get(header::UPGRADE)?;
    let asks = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if !asks {
        return None;
    }
    let first = up.to_str().ok()?.split(',').next()?.trim();
    // `websocket/13` → `websocket`: routes allow protocols, not versions.
    Some(first.split('/').next().unwrap_or(first))
}

pub use crate::http_util::strip_own;

/// Adds `x-request-id` when absent, or replaces a client's (`replace`);
/// returns the id the request now carries (one lookup for both).
pub fn set_request_id(headers: &mut HeaderMap, replace: bool) -> Option<HeaderValue> {
    // A static name: no per-request parsing or validation of "x-request-id".
    static NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
    let slot = match headers.entry(NAME.clone()) {
        header::Entry::Occupied(o) if !replace => return Some(o.get().clone()),
        e => e,
    };
    let mut buf = [0u8; 32];
    let mut n = fastrand::u128(..);
    for b in buf.iter_mut() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    let v = HeaderValue::from_bytes(&buf).ok()?;
    match slot {
        header::Entry::Vacant(s) => {
            s.insert(v.clone());
        }
        header::Entry::Occupied(mut s) => {
            s.insert(v.clone());
        }
    }
    Some(v)
}

/// Adds `x-request-id` when absent; returns the request's id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> Option<HeaderValue> {
    set_request_id(headers, false)
}

/// Who a gateway trusts to have said where a request came from.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Proxies in front (their entries at the right of the chain are kept).
    pub hops: u32,
    pub proxies: Vec<Cidr>,
}

impl Trust {
    /// With CIDRs configured, the peer must be in one (also when
    /// `trusted_hops` is set: a client that reaches the gateway past the
    /// load balancer is not trusted); with only hops, every peer is the
    /// load balancer.
    fn peer_trusted(&self, peer: IpAddr) -> bool {
        if self.proxies.is_empty() {
            self.hops > 0
        } else {
            self.proxies.iter().any(|c| c.contains(peer))
        }
    }
}

/// Other headers proxies and CDNs use to say who the client was or how it
/// reached them: only a trusted peer's survive, or an app's IP allowlist
/// and generated URLs (password-reset links) would believe the internet.
const CLIENT_CLAIMS: [&str; 6] = [
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "true-client-ip",
    "x-client-ip",
];

/// The entries of every `name` line, in order: several lines are one list.
fn chain(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// Gateway listeners: `x-forwarded-for` and `Forwarded` (RFC 7239) say
/// the peer, appended to what came in only when the peer is trusted (a
/// configured proxy, or `trusted_hops` of them, of whose entries only the
/// last `hops` are kept); an untrusted client's own claims are dropped.
/// `x-forwarded-proto` is the listener's.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, proto: &'static str, trust: &Trust) {
    let trusted = trust.peer_trusted(peer);
    let keep = |mut entries: Vec<String>| -> Vec<String> {
        if !trusted {
            return Vec::new();
        }
        if trust.hops > 0 && entries.len() > trust.hops as usize {
            entries.drain(..entries.len() - trust.hops as usize);
        }
        entries
    };
    let mut xff = keep(chain(headers, XFF));
    xff.push(peer.to_string());
    let mut fwd = keep(chain(headers, "forwarded"));
    fwd.push(match peer {
        IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    });
    headers.remove(XFF);
    headers.remove(header::FORWARDED);
    if let Ok(v) = HeaderValue::from_str(&xff.join(", ")) {
        headers.insert(XFF, v);
    }
    if let Ok(v) = HeaderValue::from_str(&fwd.join(", ")) {
        headers.insert(header::FORWARDED, v);
    }
    if trusted {
        // A trusted TLS-terminating load balancer knows the client's scheme.
        if !headers.contains_key(XFP) {
            headers.insert(XFP, HeaderValue::from_static(proto));
        }
    } else {
        for name in CLIENT_CLAIMS {
            headers.remove(name);
        }
        headers.insert(XFP, HeaderValue::from_static(proto));
    }
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
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn every_listed_name_goes_but_never_host() {
        let mut h = map(&[
            ("connection", "a, b, c, d, e, f, host, Content-Length"),
            ("host", "svc"),
            ("content-length", "3"),
            ("a", "1"),
            ("b", "1"),
            ("c", "1"),
            ("d", "1"),
            ("e", "1"),
            ("f", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["host"], "svc");
        assert_eq!(h["content-length"], "3");
    }

    #[test]
    fn chunked_messages_lose_a_stale_length() {
        let mut h = map(&[("transfer-encoding", "chunked"), ("content-length", "10")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert_eq!(upgrade_token(&h), Some("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        let h = map(&[("upgrade", "h2c")]);
        assert_eq!(upgrade_token(&h), None, "no Connection: upgrade");
    }

    #[test]
    fn own_headers_are_stripped() {
        let mut h = map(&[
            ("x-outrigger-fault-abort", "503"),
            ("x-outrigger-attempts", "9"),
            ("x-outrigger", "not ours"),
            ("x-other", "1"),
        ]);
        strip_own(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
    }

    #[test]
    fn request_id_kept_or_replaced() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        assert_eq!(h[REQUEST_ID].len(), 32);
        let id = h[REQUEST_ID].clone();
        ensure_request_id(&mut h);
        assert_eq!(h[REQUEST_ID], id);
        set_request_id(&mut h, true);
        assert_ne!(h[REQUEST_ID], id);
    }

    #[test]
    fn forwarded_trusts_only_trusted_peers() {
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        let spoofed = || {
            map(&[
                ("x-forwarded-for", "6.6.6.6, 10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-proto", "https"),
            ])
        };
        let mut h = spoofed();
        h.insert("x-real-ip", "6.6.6.6".parse().unwrap());
        h.insert("x-forwarded-host", "evil.example".parse().unwrap());
        set_forwarded(&mut h, peer, "http", &Trust::default());
        assert_eq!(h[XFF], "127.0.0.9");
        assert!(h.get("x-real-ip").is_none() && h.get("x-forwarded-host").is_none());
        assert_eq!(h["forwarded"], "for=127.0.0.9;proto=http");
        assert_eq!(h[XFP], "http");

        let mut h = spoofed();
        let cidr = Trust {
            hops: 0,
            proxies: vec!["127.0.0.0/8".parse().unwrap()],
        };
        set_forwarded(&mut h, peer, "http", &cidr);
        assert_eq!(h[XFF], "6.6.6.6, 10.0.0.1, 10.0.0.2, 127.0.0.9");

        let mut h = spoofed();
        let one_hop = Trust {
            hops: 1,
            proxies: vec![],
        };
        set_forwarded(&mut h, peer, "http", &one_hop);
        assert_eq!(
            h[XFF], "10.0.0.2, 127.0.0.9",
            "only the trusted hop's entry"
        );
        assert_eq!(h["forwarded"], "for=6.6.6.6, for=127.0.0.9;proto=http");
    }
}
