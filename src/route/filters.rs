//! What a route does to a request besides choosing its backend: header
//! edits both ways, path and host rewrites, and redirects (the filters of
//! Gateway API's HTTPRoute). Compiled once per snapshot; a route without
//! any costs nothing.

use crate::config;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Header edits compiled to names and values.
#[derive(Debug, Default)]
pub struct Edits {
    add: Vec<(HeaderName, HeaderValue)>,
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Edits {
    fn compile(e: &config::HeaderEdits) -> Edits {
        let pair = |hv: &config::HeaderValueConfig| {
            Some((
                HeaderName::from_bytes(hv.name.as_bytes()).ok()?,
                HeaderValue::from_str(&hv.value).ok()?,
            ))
        };
        Edits {
            add: e.add.iter().filter_map(pair).collect(),
            set: e.set.iter().filter_map(pair).collect(),
            remove: e
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Remove, then set, then add (Gateway API's order).
    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

#[derive(Debug)]
pub struct RedirectTo {
    pub status: u16,
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    prefix: Option<(String, String)>,
}

impl RedirectTo {
    /// The `Location` for a request to `scheme://authority/path?query`.
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let (host, port) = split_port(authority);
        let host = self.host.as_deref().unwrap_or(host);
        let port = self.port.or(port);
        let path = match (&self.path, &self.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some((matched, with))) => replace_prefix(path, matched, with),
            (None, None) => path.to_string(),
        };
        let default_port =
            (scheme == "https" && port == Some(443)) || (scheme == "http" && port == Some(80));
        let mut loc = format!("{scheme}://{host}");
        if let (Some(p), false) = (port, default_port) {
            loc.push_str(&format!(":{p}"));
        }
        loc.push_str(&path);
        if let Some(q) = query {
            loc.push('?');
            loc.push_str(q);
        }
        loc
    }
}

fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// `path` with the `matched` prefix replaced by `with` (a prefix of `/`
/// keeps the rest's slash).
pub fn replace_prefix(path: &str, matched: &str, with: &str) -> String {
    let rest = path.strip_prefix(matched).unwrap_or(path);
    let with = with.trim_end_matches('/');
    if rest.is_empty() {
        if with.is_empty() {
            "/".into()
        } else {
            with.to_string()
        }
    } else if rest.starts_with('/') {
        format!("{with}{rest}")
    } else {
        format!("{with}/{rest}")
    }
}

/// A route's filters.
#[derive(Debug, Default)]
pub struct Filters {
    pub request: Option<Edits>,
    pub response: Option<Edits>,
    /// (matched prefix, replacement)
    pub rewrite_prefix: Option<(String, String)>,
    pub rewrite_path: Option<String>,
    pub rewrite_host: Option<http::uri::Authority>,
    pub redirect: Option<RedirectTo>,
}

impl Filters {
    /// `None` when the route has none (the common case).
    pub fn compile(r: &config::Route) -> Option<Filters> {
        let matched = r.matches.path_prefix.clone().unwrap_or_default();
        let f = Filters {
            request: r.request_headers.as_ref().map(Edits::compile),
            response: r.response_headers.as_ref().map(Edits::compile),
            rewrite_prefix: r
                .rewrite
                .as_ref()
                .and_then(|rw| rw.path_prefix.clone())
                .map(|with| (matched.clone(), with)),
            rewrite_path: r.rewrite.as_ref().and_then(|rw| rw.path.clone()),
            rewrite_host: r
                .rewrite
                .as_ref()
                .and_then(|rw| rw.host.as_deref())
                .and_then(|h| http::uri::Authority::try_from(h).ok()),
            redirect: r.redirect.as_ref().map(|rd| RedirectTo {
                status: rd.status,
                scheme: rd.scheme.clone(),
                host: rd.host.clone(),
                port: rd.port,
                path: rd.path.clone(),
                prefix: rd.path_prefix.clone().map(|with| (matched.clone(), with)),
            }),
        };
        let any = f.request.is_some()
            || f.response.is_some()
            || f.rewrite_prefix.is_some()
            || f.rewrite_path.is_some()
            || f.rewrite_host.is_some()
            || f.redirect.is_some();
        any.then_some(f)
    }

    /// The path the upstream gets, if the route rewrites it.
    pub fn rewritten_path(&self, path: &str) -> Option<String> {
        if let Some(p) = &self.rewrite_path {
            return Some(p.clone());
        }
        self.rewrite_prefix
            .as_ref()
            .map(|(matched, with)| replace_prefix(path, matched, with))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_replaced_segment_wise() {
        assert_eq!(replace_prefix("/api/v1/x", "/api", "/v2"), "/v2/v1/x");
        assert_eq!(replace_prefix("/api/", "/api/", "/"), "/");
        assert_eq!(replace_prefix("/api/x", "/api/", "/"), "/x");
        assert_eq!(replace_prefix("/api", "/api", "/new/"), "/new");
    }

    #[test]
    fn redirects_keep_what_they_do_not_set() {
        let r = RedirectTo {
            status: 301,
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            prefix: Some(("/old".into(), "/new".into())),
        };
        assert_eq!(
            r.location("http", "shop.example:80", "/old/cart", Some("id=1")),
            "https://shop.example:80/new/cart?id=1"
        );
        let r = RedirectTo {
            status: 302,
            scheme: None,
            host: Some("www.example".into()),
            port: Some(443),
            path: None,
            prefix: None,
        };
        assert_eq!(
            r.location("https", "example", "/", None),
            "https://www.example/"
        );
    }

    #[test]
    fn edits_remove_set_add() {
        let e = Edits::compile(&config::HeaderEdits {
            add: vec![config::HeaderValueConfig {
                name: "x-a".into(),
                value: "2".into(),
            }],
            set: vec![config::HeaderValueConfig {
                name: "x-b".into(),
                value: "new".into(),
            }],
            remove: vec!["x-c".into()],
        });
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("old"));
        h.insert("x-c", HeaderValue::from_static("gone"));
        e.apply(&mut h);
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(h["x-b"], "new");
        assert!(h.get("x-c").is_none());
    }
}
