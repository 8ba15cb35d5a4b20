//! The control plane's view of the mesh's traffic (`GET /v1/mesh`, the
//! dashboard, `outrigger stat`), from the proxies' reports.
//!
//! Per node it keeps the last cumulative value of every series the proxy
//! reported, and the **deltas** of its last [`KEPT`] reports (a minute at
//! one report per 5 s), each a handful of integers per series that moved.
//! A report costs O(series in it): one hash lookup and a subtraction
//! each. `/v1/mesh` sums the deltas of the last [`WINDOW`] over every
//! node, so its cost is bounded by nodes × [`KEPT`] × active series, with
//! no per-request work and nothing shared between proxies but the answer.
//!
//! Per node, rates are its requests over the time its deltas cover (not a
//! fixed minute): a proxy that started 10 s ago shows its real rate.
//! Services' figures are what their callers saw: the outbound calls of
//! every proxy *to* the service's clusters (`name.namespace:port`);
//! what the service's own proxies saw on their inbound listeners is
//! beside it (`inbound`).

use super::render::cluster_service;
use super::report::{EndpointStates, Report, quantile};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The figures are over the last minute.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Reports kept per node: a minute's worth.
pub const KEPT: usize = 12;
/// Series kept per node (a proxy's routes × backends; as many peers);
/// more are ignored. With [`MAX_LABEL`], what one proxy can make the
/// control plane keep is bounded (about 2 MiB at worst; ~10 KiB for a
/// proxy using ten routes).
pub const MAX_SERIES: usize = 1024;
/// A series with a longer label (listener, route, cluster, peer) is
/// ignored; generated names are far shorter.
pub const MAX_LABEL: usize = 512;

fn too_long(labels: &[&str]) -> bool {
    labels.iter().any(|l| l.len() > MAX_LABEL)
}

type RouteKey = (String, String, String);
type PeerKey = (String, String);

#[derive(Default)]
struct Totals {
    requests: u64,
    errors: u64,
    buckets: Vec<u64>,
}

/// What moved between two reports.
struct Delta {
    from: Instant,
    to: Instant,
    routes: Vec<RouteDelta>,
    peers: Vec<(u32, u32)>,
}

struct RouteDelta {
    series: u32,
    requests: u32,
    errors: u32,
    buckets: Box<[u32]>,
}

/// One node's reports.
#[derive(Default)]
pub struct NodeStats {
    epoch: u64,
    le: Vec<f64>,
    keys: Vec<Arc<RouteKey>>,
    index: HashMap<Arc<RouteKey>, u32>,
    totals: Vec<Totals>,
    peer_keys: Vec<Arc<PeerKey>>,
    peer_index: HashMap<Arc<PeerKey>, u32>,
    peer_totals: Vec<u64>,
    endpoints: Vec<EndpointStates>,
    deltas: VecDeque<Delta>,
    last: Option<Instant>,
}

fn sat(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl NodeStats {
    /// Takes one report received at `now`. The first report (of a proxy
    /// process, or after a minute without any) is the baseline the next
    /// ones are counted from; a counter that went down restarted from 0.
    pub fn ingest(&mut self, r: &Report, now: Instant) {
        // (A report without histograms says nothing of its bounds.)
        let le_changed = !r.le.is_empty() && !self.le.is_empty() && r.le != self.le;
        if r.epoch != self.epoch || le_changed {
            // Another process: its counters started over.
            *self = NodeStats {
                epoch: r.epoch,
                ..Default::default()
            };
        }
        if self.le.is_empty() {
            self.le = r.le.clone();
        }
        let baseline = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) > WINDOW);
        let mut delta = Delta {
            from: self.last.unwrap_or(now),
            to: now,
            routes: Vec::new(),
            peers: Vec::new(),
        };
        for rc in &r.routes {
            if too_long(&[&rc.listener, &rc.route, &rc.cluster]) {
                continue;
            }
            let key = (rc.listener.clone(), rc.route.clone(), rc.cluster.clone());
            let id = match self.index.get(&key) {
                Some(id) => *id as usize,
                None if self.keys.len() < MAX_SERIES => {
                    let key = Arc::new(key);
                    self.index.insert(key.clone(), self.keys.len() as u32);
                    self.keys.push(key);
                    self.totals.push(Totals::default());
                    self.keys.len() - 1
                }
                None => continue,
            };
            let t = &mut self.totals[id];
            let n = rc.buckets.len().max(t.buckets.len());
            let bucket = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
            let reset = rc.requests < t.requests
                || rc.errors < t.errors
                || (0..n).any(|i| bucket(&rc.buckets, i) < bucket(&t.buckets, i));
            let (requests, errors, buckets): (u64, u64, Box<[u32]>) = if reset {
                (
                    rc.requests,
                    rc.errors,
                    rc.buckets.iter().map(|b| sat(*b)).collect(),
                )
            } else {
                let mut b: Vec<u32> = (0..n)
                    .map(|i| sat(bucket(&rc.buckets, i) - bucket(&t.buckets, i)))
                    .collect();
                while b.last() == Some(&0) {
                    b.pop();
                }
                (
                    rc.requests - t.requests,
                    rc.errors - t.errors,
                    b.into_boxed_slice(),
                )
            };
            *t = Totals {
                requests: rc.requests,
                errors: rc.errors,
                buckets: rc.buckets.clone(),
            };
            if requests > 0 || !buckets.is_empty() {
                delta.routes.push(RouteDelta {
                    series: id as u32,
                    requests: sat(requests),
                    errors: sat(errors),
                    buckets,
                });
            }
        }
        for p in &r.peers {
            if too_long(&[&p.listener, &p.peer]) {
                continue;
            }
            let key = (p.listener.clone(), p.peer.clone());
            let id = match self.peer_index.get(&key) {
                Some(id) => *id as usize,
                None if self.peer_keys.len() < MAX_SERIES => {
                    let key = Arc::new(key);
                    self.peer_index
                        .insert(key.clone(), self.peer_keys.len() as u32);
                    self.peer_keys.push(key);
                    self.peer_totals.push(0);
                    self.peer_keys.len() - 1
                }
                None => continue,
            };
            let prev = std::mem::replace(&mut self.peer_totals[id], p.requests);
            let d = if p.requests < prev {
                p.requests
            } else {
                p.requests - prev
            };
            if d > 0 {
                delta.peers.push((id as u32, sat(d)));
            }
        }
        self.endpoints = r.endpoints.clone();
        self.last = Some(now);
        if baseline {
            self.deltas.clear();
            return;
        }
        delta.routes.shrink_to_fit();
        delta.peers.shrink_to_fit();
        self.deltas.push_back(delta);
        while self.deltas.len() > KEPT {
            self.deltas.pop_front();
        }
    }

    /// When the last report came.
    pub fn last(&self) -> Option<Instant> {
        self.last
    }

    /// The deltas of the window and the weight (1 / seconds covered) that
    /// makes their counts per-second rates.
    fn window(&self, now: Instant) -> (impl Iterator<Item = &Delta>, f64) {
        let live = move |d: &&Delta| now.saturating_duration_since(d.to) <= WINDOW;
        let from = self.deltas.iter().filter(live).map(|d| d.from).min();
        let to = self.deltas.iter().filter(live).map(|d| d.to).max();
        let span = match (from, to) {
            (Some(f), Some(t)) => t.saturating_duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        (self.deltas.iter().filter(live), 1.0 / span.max(1.0))
    }

    /// Heap and inline bytes this node's reports take (an estimate from
    /// the capacities of what is kept).
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        let s = |x: &String| x.capacity();
        let map_entry = size_of::<usize>() * 2 + 8;
        let mut n = size_of::<Self>() + self.le.capacity() * 8;
        n += self.keys.capacity() * size_of::<Arc<RouteKey>>()
            + self
                .keys
                .iter()
                .map(|k| 16 + size_of::<RouteKey>() + s(&k.0) + s(&k.1) + s(&k.2))
                .sum::<usize>();
        n += self.index.capacity() * map_entry;
        n += self.totals.capacity() * size_of::<Totals>()
            + self
                .totals
                .iter()
                .map(|t| t.buckets.capacity() * 8)
                .sum::<usize>();
        n += self.peer_keys.capacity() * size_of::<Arc<PeerKey>>()
            + self
                .peer_keys
                .iter()
                .map(|k| 16 + size_of::<PeerKey>() + s(&k.0) + s(&k.1))
                .sum::<usize>()
            + self.peer_index.capacity() * map_entry
            + self.peer_totals.capacity() * 8;
        n += self
            .endpoints
            .iter()
            .map(|e| size_of::<EndpointStates>() + s(&e.cluster) + e.ejected_addresses.len() * 40)
            .sum::<usize>();
        n += self.deltas.capacity() * size_of::<Delta>()
            + self
                .deltas
                .iter()
                .map(|d| {
                    d.routes.capacity() * size_of::<RouteDelta>()
                        + d.routes.iter().map(|r| r.buckets.len() * 4).sum::<usize>()
                        + d.peers.capacity() * 8
                })
                .sum::<usize>();
        n
    }
}

/// Requests per second, success and latency of one thing over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests per second.
    pub rate: f64,
    /// The share of answers that were not 5xx (none without requests).
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests counted in the window.
    pub requests: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub version: u64,
    pub at: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Nack {
    pub version: u64,
    pub error: String,
    pub at: u64,
}

/// `GET /v1/mesh`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshView {
    pub window_seconds: u64,
    /// Unix time.
    pub generated_at: u64,
    /// The control plane's model version.
    pub version: u64,
    pub services: Vec<ServiceRow>,
    pub routes: Vec<RouteRow>,
    pub edges: Vec<EdgeRow>,
    pub proxies: Vec<ProxyRow>,
    pub ejected: Vec<EjectedRow>,
    /// `outrigger_cp_reports_total` by result (accepted, forbidden,
    /// unknown-node, garbled, too-large), since the control plane started.
    pub reports_total: BTreeMap<String, u64>,
    /// What the kept reports take in memory, all nodes together.
    pub report_memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// `namespace/name`.
    pub service: String,
    /// What callers saw: every proxy's outbound calls to the service.
    #[serde(flatten)]
    pub calls: Figures,
    /// What the service's own proxies saw on their inbound listeners.
    pub inbound: Option<Figures>,
    /// Its connected proxies.
    pub proxies: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteRow {
    pub route: String,
    /// One proxy's view (`outrigger stat --admin`): the listener.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub listener: String,
    /// The services (or clusters) it sent to.
    pub services: Vec<String>,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeRow {
    pub from: String,
    pub to: String,
    /// The callers' identities (as they authenticated to the control plane).
    pub from_identities: Vec<String>,
    /// The identities the callee's proxies run as.
    pub to_identities: Vec<String>,
    /// The callee's proxies counted requests from a caller identity on
    /// their inbound listeners: a verified mTLS peer.
    pub mtls: bool,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyRow {
    pub node: String,
    pub service: String,
    pub identity: String,
    pub connected: bool,
    pub ready: bool,
    pub draining: bool,
    /// The last version sent; `current`, the model version it is up to date with.
    pub version: u64,
    pub current: u64,
    pub last_ack: Option<Ack>,
    pub last_nack: Option<Nack>,
    /// Its last answer was a nack.
    pub nacked: bool,
    pub last_report_seconds_ago: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EjectedRow {
    /// The proxy that ejected them, and its service.
    pub node: String,
    pub service: String,
    pub cluster: String,
    /// The service the cluster is for.
    pub target: String,
    pub ejected: u64,
    pub unhealthy: u64,
    pub total: u64,
    pub addresses: Vec<EjectedAddress>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EjectedAddress {
    pub address: String,
    /// The proxy registered at that address, if one is.
    pub node: Option<String>,
}

/// A node as the control plane knows it (from its feed and acks).
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub id: String,
    pub namespace: String,
    pub service: String,
    pub identity: String,
    /// Its inbound listener, when it is an endpoint.
    pub address: Option<SocketAddr>,
    pub connected: bool,
    pub ready: bool,
    pub draining: bool,
    pub version: u64,
    pub current: u64,
    pub last_ack: Option<Ack>,
    pub last_nack: Option<Nack>,
}

/// Counts and a latency histogram, summed over nodes.
#[derive(Default)]
struct Acc {
    rate: f64,
    requests: u64,
    errors: u64,
    le: Vec<f64>,
    buckets: Vec<u64>,
}

impl Acc {
    fn add(&mut self, d: &RouteDelta, le: &[f64], w: f64) {
        self.rate += f64::from(d.requests) * w;
        self.requests += u64::from(d.requests);
        self.errors += u64::from(d.errors);
        self.add_buckets(le, d.buckets.iter().map(|c| u64::from(*c)));
    }

    fn merge(&mut self, o: &Acc) {
        self.rate += o.rate;
        self.requests += o.requests;
        self.errors += o.errors;
        self.add_buckets(&o.le, o.buckets.iter().copied());
    }

    fn is_empty(&self) -> bool {
        self.requests == 0 && self.buckets.iter().all(|b| *b == 0)
    }

    fn add_buckets(&mut self, le: &[f64], counts: impl ExactSizeIterator<Item = u64>) {
        if counts.len() == 0 {
            return;
        }
        if self.le.is_empty() {
            self.le = le.to_vec();
        }
        self.buckets.resize(self.le.len() + 1, 0);
        // Same bounds (one binary): bucket to bucket; else into the first
        // bucket at least as high.
        let same = le == self.le.as_slice();
        for (i, c) in counts.enumerate() {
            let j = if same {
                i
            } else {
                let bound = le.get(i).copied().unwrap_or(f64::INFINITY);
                self.le
                    .iter()
                    .position(|b| *b >= bound)
                    .unwrap_or(self.le.len())
            };
            self.buckets[j.min(self.le.len())] += c;
        }
    }

    fn figures(&self) -> Figures {
        let ms = |q| quantile(q, &self.le, &self.buckets).map(|s| s * 1000.0);
        Figures {
            rate: self.rate,
            success: (self.requests > 0).then(|| 1.0 - self.errors as f64 / self.requests as f64),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            requests: self.requests,
        }
    }
}

#[derive(Default)]
struct ServiceAcc {
    calls: Acc,
    inbound: Acc,
    proxies: usize,
    identities: BTreeSet<String>,
}

#[derive(Default)]
struct EdgeAcc {
    acc: Acc,
    from: BTreeSet<String>,
}

#[derive(Default)]
struct RouteAcc {
    acc: Acc,
    services: BTreeSet<String>,
}

fn is_inbound(key: &RouteKey) -> bool {
    key.2.starts_with("inbound:")
}

fn route_name(r: &str) -> String {
    if r.is_empty() {
        "(no route)".into()
    } else {
        r.to_string()
    }
}

/// The mesh from `nodes` and their reports at `now`; `services` are the
/// model's (`namespace/name`), shown even without traffic.
pub fn mesh_view(
    nodes: &[NodeInfo],
    stats: &HashMap<String, Arc<parking_lot::Mutex<NodeStats>>>,
    services: impl IntoIterator<Item = String>,
    now: Instant,
) -> MeshView {
    let mut svcs: BTreeMap<String, ServiceAcc> = services
        .into_iter()
        .map(|s| (s, ServiceAcc::default()))
        .collect();
    let mut edges: BTreeMap<(String, String), EdgeAcc> = BTreeMap::new();
    let mut routes: BTreeMap<String, RouteAcc> = BTreeMap::new();
    // (callee service, caller identity) seen on inbound listeners.
    let mut peers: BTreeSet<(String, String)> = BTreeSet::new();
    let mut ejected = Vec::new();
    let mut proxies = Vec::new();
    let at: HashMap<String, &str> = nodes
        .iter()
        .filter_map(|n| Some((n.address?.to_string(), n.id.as_str())))
        .collect();
    for n in nodes {
        let mine = format!("{}/{}", n.namespace, n.service);
        let s = svcs.entry(mine.clone()).or_default();
        if n.connected {
            s.proxies += 1;
        }
        s.identities.insert(n.identity.clone());
        let nacked = match (&n.last_ack, &n.last_nack) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(a), Some(k)) => (k.version, k.at) >= (a.version, a.at),
        };
        let mut row = ProxyRow {
            node: n.id.clone(),
            service: mine.clone(),
            identity: n.identity.clone(),
            connected: n.connected,
            ready: n.ready,
            draining: n.draining,
            version: n.version,
            current: n.current,
            last_ack: n.last_ack.clone(),
            last_nack: n.last_nack.clone(),
            nacked,
            last_report_seconds_ago: None,
        };
        let Some(st) = stats.get(&n.id) else {
            proxies.push(row);
            continue;
        };
        let st = st.lock();
        row.last_report_seconds_ago = st
            .last
            .map(|t| now.saturating_duration_since(t).as_secs_f64());
        proxies.push(row);
        // The node's window per series first: names are looked at once
        // per series, not once per report.
        let mut per: Vec<Acc> = Vec::new();
        let mut seen_peers: Vec<bool> = Vec::new();
        let (deltas, w) = st.window(now);
        for d in deltas {
            for r in &d.routes {
                let i = r.series as usize;
                if per.len() <= i {
                    per.resize_with(st.keys.len(), Acc::default);
                }
                per[i].add(r, &st.le, w);
            }
            for (p, _) in &d.peers {
                let i = *p as usize;
                if seen_peers.len() <= i {
                    seen_peers.resize(st.peer_keys.len(), false);
                }
                seen_peers[i] = true;
            }
        }
        for (i, a) in per.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            let key = &st.keys[i];
            if is_inbound(key) {
                svcs.entry(mine.clone()).or_default().inbound.merge(a);
                continue;
            }
            let route = routes.entry(route_name(&key.1)).or_default();
            route.acc.merge(a);
            let Some(dest) = cluster_service(&key.2).map(|(ns, name)| format!("{ns}/{name}"))
            else {
                if !key.2.is_empty() {
                    route.services.insert(key.2.clone());
                }
                continue;
            };
            route.services.insert(dest.clone());
            svcs.entry(dest.clone()).or_default().calls.merge(a);
            let e = edges.entry((mine.clone(), dest)).or_default();
            e.acc.merge(a);
            e.from.insert(n.identity.clone());
        }
        for (i, _) in seen_peers.iter().enumerate().filter(|(_, s)| **s) {
            peers.insert((mine.clone(), st.peer_keys[i].1.clone()));
        }
        for e in st.endpoints.iter().filter(|e| e.ejected > 0) {
            ejected.push(EjectedRow {
                node: n.id.clone(),
                service: mine.clone(),
                cluster: e.cluster.clone(),
                target: cluster_service(&e.cluster)
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .unwrap_or_default(),
                ejected: e.ejected,
                unhealthy: e.unhealthy,
                total: e.healthy + e.ejected + e.unhealthy,
                addresses: e
                    .ejected_addresses
                    .iter()
                    .map(|a| EjectedAddress {
                        address: a.clone(),
                        node: at.get(a).map(|s| s.to_string()),
                    })
                    .collect(),
            });
        }
    }
    let edges = edges
        .into_iter()
        .map(|((from, to), e)| {
            let to_identities: Vec<String> = svcs
                .get(&to)
                .map(|s| s.identities.iter().cloned().collect())
                .unwrap_or_default();
            EdgeRow {
                mtls: e
                    .from
                    .iter()
                    .any(|id| peers.contains(&(to.clone(), id.clone()))),
                from_identities: e.from.into_iter().collect(),
                to_identities,
                figures: e.acc.figures(),
                from,
                to,
            }
        })
        .collect();
    MeshView {
        window_seconds: WINDOW.as_secs(),
        services: svcs
            .into_iter()
            .map(|(service, s)| ServiceRow {
                service,
                calls: s.calls.figures(),
                inbound: (s.inbound.requests > 0).then(|| s.inbound.figures()),
                proxies: s.proxies,
            })
            .collect(),
        routes: routes
            .into_iter()
            .map(|(route, r)| RouteRow {
                route,
                listener: String::new(),
                services: r.services.into_iter().collect(),
                figures: r.acc.figures(),
            })
            .collect(),
        edges,
        proxies,
        ejected,
        ..Default::default()
    }
}

/// One proxy's routes (`outrigger stat --admin`): per listener and route.
pub fn proxy_routes(st: &NodeStats, now: Instant) -> Vec<RouteRow> {
    let mut routes: BTreeMap<(String, String), RouteAcc> = BTreeMap::new();
    let (deltas, w) = st.window(now);
    for d in deltas {
        for r in &d.routes {
            let key = &st.keys[r.series as usize];
            let e = routes
                .entry((key.0.clone(), route_name(&key.1)))
                .or_default();
            e.acc.add(r, &st.le, w);
            if !key.2.is_empty() {
                e.services.insert(
                    cluster_service(&key.2)
                        .map(|(ns, name)| format!("{ns}/{name}"))
                        .unwrap_or_else(|| key.2.clone()),
                );
            }
        }
    }
    // Every route the proxy has used, idle ones too.
    for k in &st.keys {
        routes.entry((k.0.clone(), route_name(&k.1))).or_default();
    }
    routes
        .into_iter()
        .map(|((listener, route), r)| RouteRow {
            route,
            listener,
            services: r.services.into_iter().collect(),
            figures: r.acc.figures(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::report::{PeerCounter, RouteCounters};

    const LE: [f64; 3] = [0.001, 0.01, 0.1];

    fn rc(route: &str, cluster: &str, requests: u64, errors: u64, b: &[u64]) -> RouteCounters {
        RouteCounters {
            listener: if cluster.starts_with("inbound:") {
                "inbound"
            } else {
                "outbound"
            }
            .into(),
            route: route.into(),
            cluster: cluster.into(),
            requests,
            errors,
            buckets: b.to_vec(),
            sum: 0.0,
        }
    }

    fn report(node: &str, epoch: u64, routes: Vec<RouteCounters>) -> Report {
        Report {
            node: node.into(),
            epoch,
            le: LE.to_vec(),
            routes,
            ..Default::default()
        }
    }

    fn info(id: &str, svc: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            namespace: "shop".into(),
            service: svc.into(),
            identity: format!("spiffe://td/ns/shop/sa/{svc}"),
            connected: true,
            ..Default::default()
        }
    }

    type Stats = HashMap<String, Arc<parking_lot::Mutex<NodeStats>>>;

    fn feed(stats: &mut Stats, r: &Report, at: Instant) {
        stats
            .entry(r.node.clone())
            .or_default()
            .lock()
            .ingest(r, at);
    }

    #[test]
    fn rates_success_and_latency_from_deltas() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut stats = Stats::new();
        // web calls orders: baseline, then +50 requests (5 failed) per 5 s.
        for (i, n) in [0u64, 50, 100, 150].iter().enumerate() {
            let r = report(
                "web-1",
                7,
                vec![rc(
                    "orders.shop",
                    "orders.shop:8080",
                    1000 + n,
                    10 + n / 10,
                    &[500, 500 + n],
                )],
            );
            feed(&mut stats, &r, s(5 * i as u64));
        }
        // orders' own inbound, with the caller's identity.
        for (i, n) in [0u64, 150].iter().enumerate() {
            let mut r = report(
                "orders-1",
                9,
                vec![rc("inbound", "inbound:inbound", 10 + n, 0, &[10 + n])],
            );
            r.peers = vec![PeerCounter {
                listener: "inbound".into(),
                peer: "spiffe://td/ns/shop/sa/web".into(),
                requests: 10 + n,
            }];
            feed(&mut stats, &r, s(15 * i as u64));
        }
        let nodes = [info("web-1", "web"), info("orders-1", "orders")];
        let v = mesh_view(&nodes, &stats, ["shop/payments".to_string()], s(15));
        let orders = v
            .services
            .iter()
            .find(|x| x.service == "shop/orders")
            .unwrap();
        assert!((orders.calls.rate - 10.0).abs() < 1e-9, "{orders:?}");
        assert_eq!(orders.calls.requests, 150);
        assert!((orders.calls.success.unwrap() - 0.9).abs() < 1e-9);
        // Every request in (1 ms, 10 ms].
        let p50 = orders.calls.p50_ms.unwrap();
        assert!(p50 > 1.0 && p50 < 10.0, "{p50}");
        assert_eq!(orders.inbound.as_ref().unwrap().requests, 150);
        assert_eq!(orders.proxies, 1);
        let payments = v
            .services
            .iter()
            .find(|x| x.service == "shop/payments")
            .unwrap();
        assert_eq!(payments.calls.rate, 0.0);
        assert_eq!(payments.calls.success, None);
        assert_eq!(v.edges.len(), 1);
        let e = &v.edges[0];
        assert_eq!(
            (e.from.as_str(), e.to.as_str()),
            ("shop/web", "shop/orders")
        );
        assert_eq!(e.from_identities, vec!["spiffe://td/ns/shop/sa/web"]);
        assert_eq!(e.to_identities, vec!["spiffe://td/ns/shop/sa/orders"]);
        assert!(e.mtls);
        assert_eq!(v.routes.len(), 1);
        assert_eq!(v.routes[0].services, vec!["shop/orders"]);
        // A minute later without reports, nothing is left in the window.
        let v = mesh_view(&nodes, &stats, [], s(15 + 61));
        let orders = v
            .services
            .iter()
            .find(|x| x.service == "shop/orders")
            .unwrap();
        assert_eq!(orders.calls.requests, 0);
    }

    #[test]
    fn restarts_resets_and_the_kept_reports() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut st = NodeStats::default();
        let r = |epoch, n| report("a", epoch, vec![rc("r", "x.ns:80", n, 0, &[n])]);
        st.ingest(&r(1, 100), s(0));
        assert!(st.deltas.is_empty(), "the first report is the baseline");
        for i in 1..=20u64 {
            st.ingest(&r(1, 100 + i), s(5 * i));
        }
        assert_eq!(st.deltas.len(), KEPT);
        // A counter that went down restarted: its value is the delta.
        st.ingest(&r(1, 3), s(105));
        assert_eq!(st.deltas.back().unwrap().routes[0].requests, 3);
        // An unchanged series is not sent, and costs nothing.
        st.ingest(&report("a", 1, vec![]), s(110));
        assert!(st.deltas.back().unwrap().routes.is_empty());
        // A new process: a new baseline.
        st.ingest(&r(2, 50), s(115));
        assert!(st.deltas.is_empty());
        st.ingest(&r(2, 60), s(120));
        assert_eq!(st.deltas.back().unwrap().routes[0].requests, 10);
        // A minute of silence: the next report is a baseline again.
        st.ingest(&r(2, 90), s(200));
        assert!(st.deltas.is_empty());
        // Bounded: over-long labels, and series past MAX_SERIES, are left out.
        let long = "x".repeat(MAX_LABEL + 1);
        let many: Vec<RouteCounters> = (0..MAX_SERIES + 10)
            .map(|i| rc(&format!("r{i}"), "x.ns:80", 1, 0, &[1]))
            .chain([rc(&long, "x.ns:80", 1, 0, &[1])])
            .collect();
        st.ingest(&report("a", 2, many), s(205));
        assert_eq!(st.keys.len(), MAX_SERIES);
        assert!(st.keys.iter().all(|k| k.1.len() <= MAX_LABEL));
    }

    #[test]
    fn nacks_and_ejected_endpoints() {
        let t0 = Instant::now();
        let mut stats = Stats::new();
        let mut r = report("web-1", 1, vec![]);
        r.endpoints = vec![EndpointStates {
            cluster: "orders.shop:8080".into(),
            healthy: 1,
            ejected: 1,
            unhealthy: 0,
            ejected_addresses: vec!["10.0.0.2:15006".into()],
        }];
        feed(&mut stats, &r, t0);
        let mut web = info("web-1", "web");
        web.last_ack = Some(Ack {
            version: 3,
            at: 100,
        });
        web.last_nack = Some(Nack {
            version: 4,
            error: "bad".into(),
            at: 101,
        });
        let mut orders = info("orders-2", "orders");
        orders.address = Some("10.0.0.2:15006".parse().unwrap());
        let v = mesh_view(&[web, orders], &stats, [], t0);
        assert!(v.proxies[0].nacked);
        assert!(!v.proxies[1].nacked);
        assert_eq!(v.ejected.len(), 1);
        assert_eq!(v.ejected[0].target, "shop/orders");
        assert_eq!(v.ejected[0].total, 2);
        assert_eq!(v.ejected[0].addresses[0].node.as_deref(), Some("orders-2"));
    }

    /// 1,000 proxies (50 services × 20), each calling 5 services over 2
    /// routes, a minute of reports: the memory per proxy and the cost of
    /// `/v1/mesh`.
    #[test]
    fn a_thousand_proxies() {
        let t0 = Instant::now();
        let mut stats = Stats::new();
        let mut nodes = Vec::new();
        let series = |i: usize, k: u64| -> Vec<RouteCounters> {
            (0..10)
                .map(|j| {
                    let dest = (i / 20 + 1 + j / 2) % 50;
                    rc(
                        &format!("bench.svc{dest}.r{}.m0", j % 2),
                        &format!("svc{dest}.shop:8080"),
                        100 * k,
                        k,
                        &[10 * k, 50 * k, 40 * k],
                    )
                })
                .collect()
        };
        let ingest_start = Instant::now();
        for k in 0..=KEPT as u64 {
            for i in 0..1000 {
                let r = report(&format!("svc{}-{i}", i / 20), 1, series(i, k + 1));
                feed(&mut stats, &r, t0 + Duration::from_secs(5 * k));
            }
        }
        let per_report = ingest_start.elapsed() / (1000 * (KEPT as u32 + 1));
        for i in 0..1000 {
            nodes.push(info(
                &format!("svc{}-{i}", i / 20),
                &format!("svc{}", i / 20),
            ));
        }
        let bytes: usize = stats.values().map(|s| s.lock().approx_bytes()).sum();
        let start = Instant::now();
        let v = mesh_view(
            &nodes,
            &stats,
            [],
            t0 + Duration::from_secs(5 * KEPT as u64),
        );
        let took = start.elapsed();
        let json = serde_json::to_vec(&v).unwrap();
        eprintln!(
            "1,000 proxies × 10 active series: {} B kept per proxy, {per_report:?} per report, /v1/mesh in {took:?} ({} KiB)",
            bytes / 1000,
            json.len() / 1024
        );
        assert_eq!(v.proxies.len(), 1000);
        assert_eq!(v.services.len(), 50);
        let rate: f64 = v.services.iter().map(|s| s.calls.rate).sum();
        // 1,000 proxies × 10 series × 100 requests per 5 s.
        assert!((rate - 1000.0 * 10.0 * 20.0).abs() < 1e-6, "{rate}");
        assert!(bytes / 1000 < 32 * 1024, "{} B per proxy", bytes / 1000);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
