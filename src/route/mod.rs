//! The route table, compiled once per config snapshot.
//!
//! Lookup picks the most specific host group first (exact host, then the
//! longest `*.suffix`, then `*`), and within a group the first route in
//! config order whose path, method and header conditions all hold. A group
//! that has no matching route falls through to the next less specific one.
//! Host groups are hash maps, exact paths a hash map and prefixes a byte
//! trie, so lookup cost follows the request (host labels, path length), not
//! the number of routes. The table knows nothing of clusters: it answers a
//! route index, and the snapshot keeps what belongs to each route.

pub mod filters;
mod trie;

use crate::config::{self, HeaderMatch};
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use rustc_hash::FxHashMap as HashMap;
use trie::Trie;

/// Index of a route in config order.
pub type RouteId = u32;

#[derive(Debug)]
enum HeaderCond {
    Exact(HeaderName, Vec<u8>),
    Regex(HeaderName, Regex),
    Present(HeaderName, bool),
}

impl HeaderCond {
    fn holds(&self, headers: &HeaderMap) -> bool {
        match self {
            HeaderCond::Exact(n, v) => headers
                .get_all(n)
                .iter()
                .any(|h| h.as_bytes() == v.as_slice()),
            HeaderCond::Regex(n, re) => headers
                .get_all(n)
                .iter()
                .any(|h| h.to_str().map(|s| re.is_match(s)).unwrap_or(false)),
            HeaderCond::Present(n, want) => headers.contains_key(n) == *want,
        }
    }
}

#[derive(Debug)]
struct Conditions {
    methods: Vec<Method>,
    headers: Vec<HeaderCond>,
    path_regex: Option<Regex>,
}

impl Conditions {
    fn hold(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && self.path_regex.as_ref().is_none_or(|re| re.is_match(path))
            && self.headers.iter().all(|h| h.holds(headers))
    }
}

#[derive(Debug, Default)]
struct HostGroup {
    exact: HashMap<Box<str>, Vec<RouteId>>,
    prefixes: Trie,
    regexes: Vec<RouteId>,
}

impl HostGroup {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.regexes.is_empty() && self.prefixes.is_empty()
    }

    fn lookup(
        &self,
        conds: &[Conditions],
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<RouteId> {
        let mut best: Option<RouteId> = None;
        let mut consider = |ids: &[RouteId]| {
            for &id in ids {
                if best.is_some_and(|b| id >= b) {
                    break;
                }
                if conds[id as usize].hold(method, path, headers) {
                    best = Some(id);
                    break;
                }
            }
        };
        if let Some(ids) = self.exact.get(path) {
            consider(ids);
        }
        self.prefixes.walk(path.as_bytes(), |ids| consider(ids));
        consider(&self.regexes);
        best
    }
}

/// What one route needs at request time besides its conditions.
#[derive(Debug)]
pub struct RouteInfo {
    pub name: String,
    /// (cluster name, cumulative weight)
    pub backends: Vec<(String, u64)>,
    total_weight: u64,
}

impl RouteInfo {
    /// Picks a backend index by weight.
    pub fn pick_backend(&self) -> usize {
        if self.backends.len() == 1 {
            return 0;
        }
        let r = fastrand::u64(..self.total_weight);
        self.backends
            .iter()
            .position(|(_, cum)| r < *cum)
            .unwrap_or(0)
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<Box<str>, HostGroup>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    wildcard_hosts: HashMap<Box<str>, HostGroup>,
    any_host: HostGroup,
    conditions: Vec<Conditions>,
    pub routes: Vec<RouteInfo>,
}

/// Regexes are checked at validation; this is the compile-time failure of one that slipped by.
#[derive(Debug, thiserror::Error)]
#[error("routes[{index}]: {message}")]
pub struct CompileError {
    pub index: usize,
    pub message: String,
}

impl RouteTable {
    /// Compiles the given routes (already filtered to one listener) in order.
    pub fn compile<'a>(
        routes: impl IntoIterator<Item = &'a config::Route>,
    ) -> Result<Self, CompileError> {
        let mut t = RouteTable::default();
        for (i, r) in routes.into_iter().enumerate() {
            let id = i as RouteId;
            let m = &r.matches;
            let err = |message: String| CompileError { index: i, message };
            let path_regex = match &m.path_regex {
                Some(re) => {
                    Some(Regex::new(&format!("^(?:{re})$")).map_err(|e| err(e.to_string()))?)
                }
                None => None,
            };
            let hosts = m.host.as_ref().map_or_else(|| vec!["*"], |h| h.list());
            for host in hosts {
                let group = match host {
                    "*" => &mut t.any_host,
                    h => match h.strip_prefix('*') {
                        Some(suffix) => t
                            .wildcard_hosts
                            .entry(suffix.to_ascii_lowercase().into())
                            .or_default(),
                        None => t
                            .exact_hosts
                            .entry(h.to_ascii_lowercase().into())
                            .or_default(),
                    },
                };
                if let Some(p) = &m.path {
                    group.exact.entry(p.as_str().into()).or_default().push(id);
                } else if path_regex.is_some() {
                    group.regexes.push(id);
                } else {
                    group
                        .prefixes
                        .insert(m.path_prefix.as_deref().unwrap_or("").as_bytes(), id);
                }
            }
            let headers = m
                .headers
                .iter()
                .map(|h| compile_header(h).map_err(&err))
                .collect::<Result<Vec<_>, _>>()?;
            let methods = m
                .methods
                .iter()
                .map(|s| Method::from_bytes(s.as_bytes()).map_err(|e| err(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            t.conditions.push(Conditions {
                methods,
                headers,
                path_regex,
            });
            let mut cum = 0u64;
            let backends = r
                .backends
                .iter()
                .map(|b| {
                    cum += u64::from(b.weight);
                    (b.cluster.clone(), cum)
                })
                .collect();
            t.routes.push(RouteInfo {
                name: r.name.clone(),
                backends,
                total_weight: cum.max(1),
            });
        }
        Ok(t)
    }

    /// Finds the route for a request. `host` may carry a port and any case.
    pub fn lookup(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<RouteId> {
        let host = strip_port(host);
        // Host names are case-insensitive; lowercase only when needed (rare).
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let conds = &self.conditions;
        if let Some(g) = self.exact_hosts.get(host)
            && let Some(id) = g.lookup(conds, method, path, headers)
        {
            return Some(id);
        }
        if !self.wildcard_hosts.is_empty() {
            // Longest suffix first: walk the dots left to right.
            for (i, b) in host.bytes().enumerate() {
                if b == b'.'
                    && let Some(g) = self.wildcard_hosts.get(&host[i..])
                    && let Some(id) = g.lookup(conds, method, path, headers)
                {
                    return Some(id);
                }
            }
        }
        self.any_host.lookup(conds, method, path, headers)
    }

    /// Whether any route may match `host` (any path, method or header).
    pub fn serves_host(&self, host: &str) -> bool {
        let host = strip_port(host).to_ascii_lowercase();
        !self.any_host.is_empty()
            || self.exact_hosts.contains_key(host.as_str())
            || host
                .bytes()
                .enumerate()
                .any(|(i, b)| b == b'.' && self.wildcard_hosts.contains_key(&host[i..]))
    }

    pub fn route(&self, id: RouteId) -> &RouteInfo {
        &self.routes[id as usize]
    }
}

fn compile_header(h: &HeaderMatch) -> Result<HeaderCond, String> {
    let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
    Ok(match (&h.exact, &h.regex, h.present) {
        (Some(v), _, _) => HeaderCond::Exact(name, v.as_bytes().to_vec()),
        (_, Some(re), _) => HeaderCond::Regex(
            name,
            Regex::new(&format!("^(?:{re})$")).map_err(|e| e.to_string())?,
        ),
        (_, _, Some(p)) => HeaderCond::Present(name, p),
        _ => HeaderCond::Present(name, true),
    })
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(yaml_routes: &str) -> RouteTable {
        let doc = format!(
            "listeners: [ {{ name: l, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n{yaml_routes}\nclusters:\n  - {{ name: a }}\n  - {{ name: b }}\n"
        );
        let c = Config::from_yaml(&doc).unwrap();
        RouteTable::compile(&c.routes).unwrap()
    }

    fn find(
        t: &RouteTable,
        host: &str,
        method: &str,
        path: &str,
        hdrs: &[(&str, &str)],
    ) -> Option<String> {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        t.lookup(host, &m, path, &h)
            .map(|id| t.route(id).name.clone())
    }

    #[test]
    fn host_specificity_and_fallthrough() {
        let t = table(
            r#"
  - { name: any, backends: [ { cluster: a } ] }
  - { name: wild, match: { host: "*.example.com" }, backends: [ { cluster: a } ] }
  - { name: deep, match: { host: "*.api.example.com" }, backends: [ { cluster: a } ] }
  - { name: exact, match: { host: www.example.com, path: /only }, backends: [ { cluster: b } ] }
"#,
        );
        assert_eq!(
            find(&t, "www.example.com:8080", "GET", "/only", &[]).as_deref(),
            Some("exact")
        );
        // exact host has no match for this path → falls through to the wildcard
        assert_eq!(
            find(&t, "WWW.Example.com", "GET", "/other", &[]).as_deref(),
            Some("wild")
        );
        assert_eq!(
            find(&t, "v1.api.example.com", "GET", "/", &[]).as_deref(),
            Some("deep")
        );
        assert_eq!(
            find(&t, "example.com", "GET", "/", &[]).as_deref(),
            Some("any")
        );
        assert_eq!(
            find(&t, "other.org", "GET", "/", &[]).as_deref(),
            Some("any")
        );
    }

    #[test]
    fn first_route_in_order_wins_across_path_kinds() {
        let t = table(
            r#"
  - { name: re, match: { path_regex: "/users/[0-9]+" }, backends: [ { cluster: a } ] }
  - { name: prefix-api, match: { path_prefix: /api }, backends: [ { cluster: a } ] }
  - { name: exact, match: { path: /api/health }, backends: [ { cluster: a } ] }
  - { name: prefix-api-v2, match: { path_prefix: /api/v2 }, backends: [ { cluster: a } ] }
"#,
        );
        assert_eq!(
            find(&t, "h", "GET", "/users/42", &[]).as_deref(),
            Some("re")
        );
        assert_eq!(find(&t, "h", "GET", "/users/x", &[]), None);
        // /api comes before /api/health and /api/v2 in config order
        assert_eq!(
            find(&t, "h", "GET", "/api/health", &[]).as_deref(),
            Some("prefix-api")
        );
        assert_eq!(
            find(&t, "h", "GET", "/api/v2/x", &[]).as_deref(),
            Some("prefix-api")
        );
        assert_eq!(find(&t, "h", "GET", "/nothing", &[]), None);
    }

    #[test]
    fn method_and_header_conditions() {
        let t = table(
            r#"
  - { name: canary, match: { headers: [ { name: x-canary, exact: "1" } ] }, backends: [ { cluster: b } ] }
  - { name: re, match: { headers: [ { name: x-user, regex: "admin-.*" } ] }, backends: [ { cluster: b } ] }
  - { name: nodebug, match: { path: /d, headers: [ { name: x-debug, present: false } ] }, backends: [ { cluster: b } ] }
  - { name: post, match: { methods: [POST, PUT] }, backends: [ { cluster: a } ] }
  - { name: rest, backends: [ { cluster: a } ] }
"#,
        );
        assert_eq!(
            find(&t, "h", "GET", "/", &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            find(&t, "h", "GET", "/", &[("x-canary", "2")]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            find(&t, "h", "GET", "/", &[("x-user", "admin-7")]).as_deref(),
            Some("re")
        );
        assert_eq!(
            find(&t, "h", "GET", "/", &[("x-user", "xadmin-7")]).as_deref(),
            Some("rest")
        );
        assert_eq!(find(&t, "h", "GET", "/d", &[]).as_deref(), Some("nodebug"));
        assert_eq!(
            find(&t, "h", "GET", "/d", &[("x-debug", "")]).as_deref(),
            Some("rest")
        );
        assert_eq!(find(&t, "h", "PUT", "/", &[]).as_deref(), Some("post"));
    }

    #[test]
    fn weights_pick_in_proportion() {
        let t = table(
            "  - { name: w, backends: [ { cluster: a, weight: 90 }, { cluster: b, weight: 10 } ] }",
        );
        let r = t.route(0);
        let n = 20_000;
        let b = (0..n).filter(|_| r.pick_backend() == 1).count();
        let share = b as f64 / n as f64;
        assert!((0.08..0.12).contains(&share), "share of b = {share}");
    }

    #[test]
    fn thousands_of_routes_compile_and_resolve() {
        let mut s = String::new();
        for i in 0..5000 {
            s.push_str(&format!(
                "  - {{ name: r{i}, match: {{ host: svc{i}.ns.svc, path_prefix: /v{} }}, backends: [ {{ cluster: a }} ] }}\n",
                i % 7
            ));
        }
        let t = table(&s);
        assert_eq!(
            find(&t, "svc4321.ns.svc", "GET", "/v2/x", &[]).as_deref(),
            Some("r4321")
        );
        assert_eq!(find(&t, "svc4321.ns.svc", "GET", "/v5/x", &[]), None);
    }

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
