//! The request's authority, and the URI and `Host` each upstream protocol
//! needs. Ground floor: the proxy rewrites a request for its upstream
//! protocol here, and the balancer again when an endpoint turns out to
//! speak only HTTP/1.1.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

/// The request's authority: the URI's (HTTP/2 `:authority`, absolute-form)
/// or else the `Host` header.
pub fn authority<B>(req: &http::Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// Rewrites the URI and `Host` for an HTTP/1.1 upstream: origin-form URI
/// and a `Host` header (an HTTP/2 request has only `:authority`).
pub fn to_http1<B>(req: &mut http::Request<B>) {
    *req.version_mut() = http::Version::HTTP_11;
    // The URI's authority (HTTP/2 `:authority`, an absolute-form target)
    // is the one routed on: the upstream sees that, never a different Host.
    if let Some(a) = req.uri().authority().cloned()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
}

/// Rewrites the URI for an HTTP/2 upstream: `:scheme` and `:authority` are required.
pub fn to_http2<B>(req: &mut http::Request<B>, authority: Option<Authority>) {
    *req.version_mut() = http::Version::HTTP_2;
    let uri = req.uri();
    if uri.scheme().is_some() && uri.authority().is_some() {
        return;
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = authority;
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(u) = Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

/// The proxy's own header namespace.
const OWN_PREFIX: &str = "x-outrigger-";

fn own_header(name: &HeaderName) -> bool {
    name.as_str().starts_with(OWN_PREFIX)
}

/// Removes every `x-outrigger-*` header: on a gateway's requests (the
/// internet may not ask for faults or claim attempts and identities), and
/// on every upstream response (only the proxy speaks for itself). One scan
/// of the names when there is none.
pub fn strip_own(headers: &mut HeaderMap) {
    if !headers.keys().any(own_header) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| own_header(n)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_own_namespace_is_stripped() {
        // Found by the `headers` fuzz target: the bare prefix survived.
        let mut h = HeaderMap::new();
        h.insert("x-outrigger-", HeaderValue::from_static("t"));
        h.insert("x-outrigger-fault-abort", HeaderValue::from_static("503"));
        h.insert("x-outriggers", HeaderValue::from_static("not ours"));
        strip_own(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn uri_rewrites() {
        let mut r = http::Request::builder()
            .uri("http://a.b:8080/x?q=1")
            .header("host", "other")
            .body(())
            .unwrap();
        to_http1(&mut r);
        assert_eq!(r.uri(), "/x?q=1");
        assert_eq!(
            r.headers()["host"],
            "a.b:8080",
            "the absolute-form authority wins"
        );
        let mut r = http::Request::builder().uri("/y").body(()).unwrap();
        to_http2(&mut r, Some(Authority::from_static("svc")));
        assert_eq!(r.uri(), "http://svc/y");
    }
}
