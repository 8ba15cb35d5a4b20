//! The header sanitiser: hop-by-hop removal, `Connection` lists, upgrade
//! tokens, gateway forwarding headers and the proxy's own namespace, on
//! any header map. Afterwards no hop-by-hop header survives (but a kept
//! upgrade), `Host` is never removed, and nothing `x-outrigger-*` is left
//! where it was stripped.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use outrigger::proxy::headers;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut map = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        map.append(n, v);
    }
    let had_host = map.contains_key(http::header::HOST);
    let keep_upgrade = flags & 1 != 0;
    let _ = headers::upgrade_token(&map);
    headers::strip_hop_by_hop(&mut map, keep_upgrade);
    for hop in ["transfer-encoding", "keep-alive", "proxy-connection", "http2-settings"] {
        assert!(!map.contains_key(hop), "{hop} survived");
    }
    if !keep_upgrade {
        assert!(!map.contains_key("connection"));
        assert!(!map.contains_key("upgrade"));
    }
    if let Some(te) = map.get("te") {
        assert_eq!(te, "trailers");
    }
    assert_eq!(map.contains_key(http::header::HOST), had_host, "Host removed");
    if flags & 2 != 0 {
        headers::strip_own(&mut map);
        assert!(map.keys().all(|k| !k.as_str().starts_with("x-outrigger-")));
        let trust = headers::Trust {
            hops: u32::from(flags >> 4),
            proxies: vec![],
        };
        headers::set_forwarded(&mut map, [127, 0, 0, 1].into(), "http", &trust);
        let xff = map.get("x-forwarded-for").expect("x-forwarded-for set");
        assert!(xff.to_str().unwrap_or("").ends_with("127.0.0.1"));
    }
});
