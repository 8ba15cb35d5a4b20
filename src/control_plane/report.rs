//! What a proxy tells the control plane about its traffic (`POST
//! /v1/report`), made from its own Prometheus registry.
//!
//! Why the proxies report over their feed rather than the control plane
//! scraping them: a thousand proxies sit behind NAT, network policies and
//! mTLS inbound listeners the control plane is no client of; scraping
//! would mean opening, authenticating and keeping a connection to every
//! one of them, and finding their admin ports. Each proxy already holds
//! one HTTP/2 + TLS session to the control plane, authenticated as its
//! identity (the one it acks on): a report is one more small request on
//! it, every [`REPORT_INTERVAL`], and the control plane knows at once
//! which node and identity it comes from.
//!
//! A report carries **cumulative** counters (since the proxy started), so
//! a lost report loses nothing: the control plane takes deltas between
//! consecutive reports. Per (listener, route, cluster): requests, 5xx
//! answers, the latency histogram's buckets and sum; per (listener, peer
//! identity): requests on inbound listeners; the clusters with ejected or
//! unhealthy endpoints. Only series that changed since the last report
//! this session are sent (an absent series is unchanged), which keeps an
//! idle proxy's report to a few hundred bytes and any report under
//! [`MAX_REPORT_BYTES`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How often a proxy reports (and once right after its first config).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// What a proxy puts in one report at most; the control plane refuses
/// bodies over 64 KiB. Series left out go in the next report.
pub const MAX_REPORT_BYTES: usize = 56 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    /// Random per proxy process: a new one means the counters restarted.
    #[serde(default)]
    pub epoch: u64,
    /// Upper bounds (seconds) of the latency histogram's buckets; the last
    /// bucket, `+Inf`, is implied.
    #[serde(default)]
    pub le: Vec<f64>,
    #[serde(default)]
    pub routes: Vec<RouteCounters>,
    #[serde(default)]
    pub peers: Vec<PeerCounter>,
    /// Clusters with endpoints not healthy (all of them, every report).
    #[serde(default)]
    pub endpoints: Vec<EndpointStates>,
}

/// One (listener, route, cluster): cumulative since the proxy started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteCounters {
    pub listener: String,
    pub route: String,
    pub cluster: String,
    pub requests: u64,
    /// Answers with a 5xx status.
    #[serde(default)]
    pub errors: u64,
    /// Requests per latency bucket (not cumulative over `le`; the last is
    /// `+Inf`), trailing zeros left out.
    #[serde(default)]
    pub buckets: Vec<u64>,
    /// Total seconds.
    #[serde(default)]
    pub sum: f64,
}

/// (listener, route, cluster).
type RouteKey = (String, String, String);
/// What marks a route series as told: (requests, histogram count).
type Mark = (u64, u64);

impl RouteCounters {
    fn key(&self) -> RouteKey {
        (
            self.listener.clone(),
            self.route.clone(),
            self.cluster.clone(),
        )
    }
}

/// Requests an inbound listener took from one verified peer identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerCounter {
    pub listener: String,
    pub peer: String,
    pub requests: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStates {
    pub cluster: String,
    #[serde(default)]
    pub healthy: u64,
    #[serde(default)]
    pub ejected: u64,
    #[serde(default)]
    pub unhealthy: u64,
    /// The ejected endpoints' addresses, when the proxy knows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected_addresses: Vec<String>,
}

/// One sample: name, labels, value.
type Sample<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// One sample of the Prometheus text format.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once('=')?;
            let mut chars = r.strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim(), value));
            rest = &r[1 + end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, v))
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v.as_str())
}

#[derive(Default)]
struct Series {
    requests: u64,
    errors: u64,
    /// (le, cumulative count) as the text gives them.
    cumulative: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Report {
    /// The report of everything in a Prometheus text page (a proxy's own
    /// registry, or its admin port's `/metrics`); series never used are
    /// left out.
    pub fn from_prometheus_text(text: &str) -> Report {
        let mut series: BTreeMap<RouteKey, Series> = BTreeMap::new();
        let mut peers: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut endpoints: BTreeMap<String, EndpointStates> = BTreeMap::new();
        let key = |l: &[(&str, String)]| {
            (
                label(l, "listener").to_string(),
                label(l, "route").to_string(),
                label(l, "cluster").to_string(),
            )
        };
        for line in text.lines() {
            let Some((name, labels, v)) = parse_sample(line) else {
                continue;
            };
            let n = if v.is_finite() && v > 0.0 {
                v as u64
            } else {
                0
            };
            match name {
                "outrigger_requests_total" => {
                    let s = series.entry(key(&labels)).or_default();
                    s.requests += n;
                    if label(&labels, "code").starts_with('5') {
                        s.errors += n;
                    }
                }
                "outrigger_request_duration_seconds_bucket" => {
                    let le = match label(&labels, "le") {
                        "+Inf" => f64::INFINITY,
                        x => x.parse().unwrap_or(f64::INFINITY),
                    };
                    series
                        .entry(key(&labels))
                        .or_default()
                        .cumulative
                        .push((le, n));
                }
                "outrigger_request_duration_seconds_sum" => {
                    series.entry(key(&labels)).or_default().sum = v;
                }
                "outrigger_request_duration_seconds_count" => {
                    series.entry(key(&labels)).or_default().count = n;
                }
                "outrigger_peer_requests_total" if n > 0 => {
                    *peers
                        .entry((
                            label(&labels, "listener").to_string(),
                            label(&labels, "peer").to_string(),
                        ))
                        .or_default() += n;
                }
                "outrigger_endpoints" => {
                    let cluster = label(&labels, "cluster");
                    let e =
                        endpoints
                            .entry(cluster.to_string())
                            .or_insert_with(|| EndpointStates {
                                cluster: cluster.to_string(),
                                ..Default::default()
                            });
                    match label(&labels, "state") {
                        "healthy" => e.healthy = n,
                        "ejected" => e.ejected = n,
                        _ => e.unhealthy += n,
                    }
                }
                _ => {}
            }
        }
        // The histogram's bounds: one family, the same for every series.
        let le: Vec<f64> = series
            .values()
            .find(|s| !s.cumulative.is_empty())
            .map(|s| {
                let mut b: Vec<f64> = s
                    .cumulative
                    .iter()
                    .map(|(le, _)| *le)
                    .filter(|le| le.is_finite())
                    .collect();
                b.sort_by(f64::total_cmp);
                b
            })
            .unwrap_or_default();
        let routes = series
            .into_iter()
            .filter(|(_, s)| s.requests > 0 || s.count > 0)
            .map(|((listener, route, cluster), mut s)| {
                s.cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
                let at = |bound: f64| {
                    s.cumulative
                        .iter()
                        .rev()
                        .find(|(l, _)| *l <= bound)
                        .map_or(0, |(_, c)| *c)
                };
                let mut buckets = Vec::with_capacity(le.len() + 1);
                let mut below = 0u64;
                for &bound in &le {
                    let c = at(bound).max(below);
                    buckets.push(c - below);
                    below = c;
                }
                buckets.push(s.count.max(at(f64::INFINITY)).saturating_sub(below));
                while buckets.last() == Some(&0) {
                    buckets.pop();
                }
                RouteCounters {
                    listener,
                    route,
                    cluster,
                    requests: s.requests,
                    errors: s.errors,
                    buckets,
                    sum: s.sum,
                }
            })
            .collect();
        Report {
            node: String::new(),
            epoch: 0,
            le,
            routes,
            peers: peers
                .into_iter()
                .map(|((listener, peer), requests)| PeerCounter {
                    listener,
                    peer,
                    requests,
                })
                .collect(),
            endpoints: endpoints
                .into_values()
                .filter(|e| e.ejected > 0 || e.unhealthy > 0)
                .collect(),
        }
    }
}

/// What this session already told the control plane: a proxy sends only
/// the series that changed since, within [`MAX_REPORT_BYTES`].
#[derive(Default)]
pub struct Outbox {
    routes: HashMap<RouteKey, Mark>,
    peers: HashMap<(String, String), u64>,
}

/// The series a report carries, to mark as told once it is accepted.
#[derive(Default)]
pub struct Pending {
    routes: Vec<(RouteKey, Mark)>,
    peers: Vec<((String, String), u64)>,
}

impl Outbox {
    /// The report to send now out of `full` (everything the registry
    /// holds): changed series only, at most `max_bytes` of them.
    pub fn next(&self, full: Report, max_bytes: usize) -> (Report, Pending) {
        let mut pending = Pending::default();
        let Report {
            node,
            epoch,
            le,
            routes: all_routes,
            peers: all_peers,
            endpoints,
        } = full;
        let head = Report {
            node,
            epoch,
            le,
            routes: Vec::new(),
            peers: Vec::new(),
            endpoints,
        };
        let mut size = serde_json::to_vec(&head).map_or(0, |v| v.len());
        let mut fits = |len: usize| {
            size += len + 1;
            size <= max_bytes
        };
        let mut routes = Vec::new();
        for r in all_routes {
            let mark = (r.requests, r.buckets.iter().sum::<u64>());
            let key = r.key();
            if self.routes.get(&key) == Some(&mark) {
                continue;
            }
            if !fits(serde_json::to_vec(&r).map_or(0, |v| v.len())) {
                break;
            }
            pending.routes.push((key, mark));
            routes.push(r);
        }
        let mut peers = Vec::new();
        for p in all_peers {
            let key = (p.listener.clone(), p.peer.clone());
            if self.peers.get(&key) == Some(&p.requests) {
                continue;
            }
            if !fits(serde_json::to_vec(&p).map_or(0, |v| v.len())) {
                break;
            }
            pending.peers.push((key, p.requests));
            peers.push(p);
        }
        (
            Report {
                routes,
                peers,
                ..head
            },
            pending,
        )
    }

    /// The control plane took the report: its series are told.
    pub fn accepted(&mut self, p: Pending) {
        self.routes.extend(p.routes);
        self.peers.extend(p.peers);
    }
}

/// The `q` quantile (0..1) of a histogram with bucket `counts` (per
/// bucket; the last, past `le`, is `+Inf`), interpolated linearly inside
/// its bucket as Prometheus' `histogram_quantile` does; a rank in the
/// `+Inf` bucket gives the highest finite bound.
pub fn quantile(q: f64, le: &[f64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        let above = below + c;
        if c > 0 && above as f64 >= rank {
            let Some(&upper) = le.get(i) else {
                return le.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { le[i - 1] };
            return Some(lower + (upper - lower) * ((rank - below as f64) / c as f64).max(0.0));
        }
        below = above;
    }
    le.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP outrigger_requests_total Requests answered.
# TYPE outrigger_requests_total counter
outrigger_requests_total{cluster="orders.shop:8080",code="200",listener="outbound",route="orders.shop"} 90
outrigger_requests_total{cluster="orders.shop:8080",code="503",listener="outbound",route="orders.shop"} 10
outrigger_requests_total{cluster="inbound:inbound",code="200",listener="inbound",route="inbound"} 4
outrigger_request_duration_seconds_bucket{cluster="orders.shop:8080",listener="outbound",route="orders.shop",le="0.001"} 50
outrigger_request_duration_seconds_bucket{cluster="orders.shop:8080",listener="outbound",route="orders.shop",le="0.01"} 90
outrigger_request_duration_seconds_bucket{cluster="orders.shop:8080",listener="outbound",route="orders.shop",le="+Inf"} 100
outrigger_request_duration_seconds_sum{cluster="orders.shop:8080",listener="outbound",route="orders.shop"} 0.5
outrigger_request_duration_seconds_count{cluster="orders.shop:8080",listener="outbound",route="orders.shop"} 100
outrigger_request_duration_seconds_bucket{cluster="idle.shop:80",listener="outbound",route="idle.shop",le="0.001"} 0
outrigger_request_duration_seconds_bucket{cluster="idle.shop:80",listener="outbound",route="idle.shop",le="0.01"} 0
outrigger_request_duration_seconds_bucket{cluster="idle.shop:80",listener="outbound",route="idle.shop",le="+Inf"} 0
outrigger_request_duration_seconds_count{cluster="idle.shop:80",listener="outbound",route="idle.shop"} 0
outrigger_peer_requests_total{listener="inbound",peer="spiffe://td/ns/shop/sa/web"} 4
outrigger_endpoints{cluster="orders.shop:8080",state="healthy"} 2
outrigger_endpoints{cluster="orders.shop:8080",state="ejected"} 1
outrigger_endpoints{cluster="orders.shop:8080",state="unhealthy"} 0
outrigger_endpoints{cluster="idle.shop:80",state="healthy"} 3
outrigger_weird{a="x\"y\\z",b="w"} 3
"#;

    #[test]
    fn a_report_from_the_text_format() {
        let r = Report::from_prometheus_text(TEXT);
        assert_eq!(r.le, vec![0.001, 0.01]);
        assert_eq!(r.routes.len(), 2, "{r:?}");
        let o = r.routes.iter().find(|x| x.route == "orders.shop").unwrap();
        assert_eq!((o.requests, o.errors), (100, 10));
        assert_eq!(o.buckets, vec![50, 40, 10]);
        assert_eq!(o.sum, 0.5);
        let i = r.routes.iter().find(|x| x.route == "inbound").unwrap();
        assert_eq!((i.requests, i.buckets.len()), (4, 0));
        assert_eq!(r.peers.len(), 1);
        assert_eq!(r.peers[0].requests, 4);
        assert_eq!(r.endpoints.len(), 1);
        assert_eq!(r.endpoints[0].ejected, 1);
        let (name, labels, v) = parse_sample(TEXT.lines().last().unwrap()).unwrap();
        assert_eq!((name, v), ("outrigger_weird", 3.0));
        assert_eq!(labels[0], ("a", "x\"y\\z".to_string()));
        assert_eq!(labels[1], ("b", "w".to_string()));
    }

    #[test]
    fn the_outbox_sends_what_changed_within_the_size() {
        let full = Report::from_prometheus_text(TEXT);
        let mut out = Outbox::default();
        let (r, p) = out.next(full.clone(), MAX_REPORT_BYTES);
        assert_eq!((r.routes.len(), r.peers.len()), (2, 1));
        // Not accepted: everything again.
        let (r, _) = out.next(full.clone(), MAX_REPORT_BYTES);
        assert_eq!(r.routes.len(), 2);
        out.accepted(p);
        let (r, _) = out.next(full.clone(), MAX_REPORT_BYTES);
        assert_eq!((r.routes.len(), r.peers.len()), (0, 0));
        assert_eq!(r.endpoints.len(), 1, "endpoint states go every time");
        // Too small for a series: the rest waits for the next report.
        let (r, _) = Outbox::default().next(full, 300);
        assert!(r.routes.len() < 2);
        assert!(serde_json::to_vec(&r).unwrap().len() <= 300);
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        let le = [0.001, 0.01, 0.1];
        assert_eq!(quantile(0.5, &le, &[]), None);
        // 100 requests, all in (1 ms, 10 ms]: p50 at the middle.
        let p50 = quantile(0.5, &le, &[0, 100]).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        // 99 fast, 1 slow in +Inf: p99 in the first bucket, p100 the top bound.
        let p99 = quantile(0.99, &le, &[99, 0, 0, 1]).unwrap();
        assert!(p99 <= 0.001, "{p99}");
        assert_eq!(quantile(1.0, &le, &[99, 0, 0, 1]), Some(0.1));
    }
}
