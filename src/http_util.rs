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
    // RFC 9113 §8.3.1: `:authority` says where the request goes; a Host
    // beside it (an HTTP/1.1 absolute-form request's) could disagree.
    req.headers_mut().remove(header::HOST);
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

/// Why a request path is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPath;

/// The canonical form of a request path, so that routing, authorization
/// and the app agree on what it names: `%2e` decoded, dot segments removed
/// (RFC 3986 §5.2.4). Encoded slashes and backslashes (`%2f`, `%5c`, `\`)
/// and `..;` segments are refused: an app that decodes or normalises them
/// would see another path than the one authorized (`/public/..%2fadmin`).
/// `None` when the path is canonical already, the common case: one scan.
pub fn normalize_path(path: &str) -> Result<Option<String>, BadPath> {
    let b = path.as_bytes();
    let suspicious = b.iter().any(|&c| c == b'%' || c == b'\\') || path.contains("/.");
    if !suspicious {
        return Ok(None);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err(BadPath);
    }
    let decoded = if lower.contains("%2e") {
        let mut out = String::with_capacity(path.len());
        let mut rest = path;
        while let Some(i) = rest.find('%') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            if tail.len() >= 3 && tail[1..3].eq_ignore_ascii_case("2e") {
                out.push('.');
                rest = &tail[3..];
            } else {
                out.push('%');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out
    } else {
        path.to_string()
    };
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        if seg.starts_with("..;") || seg.starts_with(".;") {
            return Err(BadPath);
        }
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut canonical = String::with_capacity(decoded.len());
    for s in &out {
        canonical.push('/');
        canonical.push_str(s);
    }
    if trailing_slash || canonical.is_empty() {
        canonical.push('/');
    }
    Ok((canonical != path).then_some(canonical))
}

/// Replaces the path of `req`'s URI, keeping its query and authority.
pub fn set_path<B>(req: &mut http::Request<B>, path: &str) -> Result<(), BadPath> {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| BadPath)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| BadPath)?;
    Ok(())
}

/// Replaces the request's authority: the URI's when it has one, and `Host`.
pub fn set_authority<B>(req: &mut http::Request<B>, authority: &Authority) {
    if req.uri().authority().is_some() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.authority = Some(authority.clone());
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
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

/// A client response's body read whole when the status is a success; else
/// an error naming `what`, the status and the body (where the other end
/// says why).
pub async fn success_body(
    resp: http::Response<hyper::body::Incoming>,
    what: &str,
) -> Result<bytes::Bytes, String> {
    use http_body_util::BodyExt;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        // The start of what the other end said is enough for a message.
        let said = &body[..body.len().min(300)];
        return Err(format!(
            "{what}: {status}: {}",
            String::from_utf8_lossy(said).trim()
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_canonical_or_refused() {
        for (path, want) in [
            ("/api/orders", Ok(None)),
            ("/static/app.js", Ok(None)),
            ("/api/../admin", Ok(Some("/admin"))),
            ("/api/%2e%2e/admin", Ok(Some("/admin"))),
            ("/api/%2E%2e/admin", Ok(Some("/admin"))),
            ("/a/./b/", Ok(Some("/a/b/"))),
            ("/a/b/..", Ok(Some("/a/"))),
            ("/../../etc", Ok(Some("/etc"))),
            ("/a/%41", Ok(None)),
            ("/public/..%2fadmin", Err(BadPath)),
            ("/public/..%5Cadmin", Err(BadPath)),
            ("/api/..;/admin", Err(BadPath)),
        ] {
            assert_eq!(
                normalize_path(path),
                want.map(|o: Option<&str>| o.map(String::from)),
                "{path}"
            );
        }
    }

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
        let mut r = http::Request::builder()
            .uri("http://allowed.svc/z")
            .header("host", "admin.internal")
            .body(())
            .unwrap();
        to_http2(&mut r, None);
        assert_eq!(r.uri(), "http://allowed.svc/z");
        assert!(
            r.headers().get("host").is_none(),
            "a disagreeing Host went upstream"
        );
    }
}
