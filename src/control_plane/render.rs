//! From the mesh model to one proxy's config: the same document a proxy
//! reads from a file. A proxy gets its inbound side (its own service's
//! authorization) and outbound routes and clusters only for the services
//! it may call, so its memory does not grow with the whole mesh.
//!
//! - Every Service gets a cluster per port (`name.namespace:port`) whose
//!   endpoints are its EndpointSlices' ready addresses and the proxies that
//!   registered for it, each with the SPIFFE ID it must present (mTLS).
//! - HTTPRoutes and GRPCRoutes attached to a Service (GAMMA) become routes
//!   for the Service's host names, in order, then a catch-all to its
//!   first port. Matches, weighted backends, header and redirect and
//!   rewrite filters, `timeouts` and `retry` (GEP-1731) map one to one.
//! - TrafficPolicies set the clusters' balancing, limits and outlier
//!   detection and the routes' retry budget and rate limit.
//! - AuthorizationPolicies on a Service become its proxies' inbound
//!   authorization, and decide which callers get routes to it at all.

use super::kinds::{AuthorizationPolicy, TrafficPolicy};
use super::model::{Key, Mesh};
use crate::config::{self, Config, Dur};
use crate::tls::spiffe::{IdPattern, SpiffeId};
use gateway_api::apis::experimental::httproutes::{
    HttpRouteRules, HttpRouteRulesFilters, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesPathType,
};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// A connected proxy, as it described itself and as it authenticated.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    pub namespace: String,
    pub service: String,
    pub identity: SpiffeId,
    /// Where callers reach its inbound listener (self-registration).
    pub address: IpAddr,
    /// 0: no inbound listener.
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub app_port: u16,
}

/// What a proxy's config depends on besides the model: proxies with the
/// same key (the replicas of a workload) get the same config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    namespace: String,
    service: String,
    identity: String,
    ports: (u16, u16, u16),
}

impl Node {
    pub fn group_key(&self) -> GroupKey {
        GroupKey {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            identity: self.identity.to_string(),
            ports: (self.inbound_port, self.outbound_port, self.app_port),
        }
    }
}

/// A proxy registered as an endpoint of its service.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub namespace: String,
    pub service: String,
    pub endpoint: SocketAddr,
    pub identity: SpiffeId,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    pub cluster_domain: String,
    /// Sidecars talk mTLS: inbound strict, endpoints with identities.
    pub mtls: bool,
}

/// The annotation naming the service account a Service's pods run as
/// (their SPIFFE ID); absent, the Service's own name.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "outrigger.io/service-account";

fn ports(s: &Service) -> Vec<ServicePort> {
    s.spec
        .as_ref()
        .and_then(|sp| sp.ports.clone())
        .unwrap_or_default()
}

fn cluster_name(ns: &str, name: &str, port: i32) -> String {
    format!("{name}.{ns}:{port}")
}

/// The Service a rendered cluster is for: `name.namespace:port` →
/// `(namespace, name)`; `None` for any other name (a proxy's own
/// `inbound:…` cluster, one from a hand-written config).
pub fn cluster_service(cluster: &str) -> Option<(&str, &str)> {
    let (host, port) = cluster.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let (name, ns) = host.split_once('.')?;
    (!name.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((ns, name))
}

/// The Service's virtual addresses (not `None`: headless).
fn cluster_ips(s: &Service) -> Vec<String> {
    let spec = s.spec.as_ref();
    let mut ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if let Some(ip) = spec.and_then(|s| s.cluster_ip.clone())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips.retain(|ip| ip.parse::<IpAddr>().is_ok());
    // IPv6 hosts are written in brackets.
    ips.iter()
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            }
        })
        .collect()
}

/// The names a Service is called by: short names only from its namespace.
fn hostnames(key: &Key, from_ns: &str, cluster_domain: &str) -> Vec<String> {
    let (ns, name) = key;
    let mut h = Vec::new();
    if ns == from_ns {
        h.push(name.clone());
    }
    h.push(format!("{name}.{ns}"));
    h.push(format!("{name}.{ns}.svc"));
    h.push(format!("{name}.{ns}.svc.{cluster_domain}"));
    h
}

fn service_identity(s: &Service, key: &Key, td: &str) -> Option<SpiffeId> {
    let sa = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION).cloned())
        .unwrap_or_else(|| key.1.clone());
    SpiffeId::workload(td, &key.0, &sa).ok()
}

/// The identity patterns an AuthorizationPolicy rule allows.
fn rule_from(r: &super::kinds::AuthorizationRule, td: &str) -> Option<Vec<String>> {
    if r.identities.is_none() && r.service_accounts.is_none() {
        return None;
    }
    let mut from: Vec<String> = r.identities.clone().unwrap_or_default();
    for sa in r.service_accounts.iter().flatten() {
        if let Some((ns, name)) = sa.split_once('/') {
            from.push(format!("spiffe://{td}/ns/{ns}/sa/{name}"));
        }
    }
    Some(from)
}

/// Whether `node` may call the Service `key` (no policy: anyone may).
fn may_call(mesh: &Mesh, key: &Key, node: &Node, td: &str) -> bool {
    let policies: Vec<&AuthorizationPolicy> = mesh
        .authz
        .iter()
        .filter(|((ns, _), p)| *ns == key.0 && p.spec.target_ref.name == key.1 && !p.spec.dry_run)
        .map(|(_, p)| p)
        .collect();
    policies.is_empty()
        || policies.iter().any(|p| {
            p.spec.rules.iter().any(|r| match rule_from(r, td) {
                None => true,
                Some(from) => from
                    .iter()
                    .filter_map(|f| IdPattern::parse(f).ok())
                    .any(|pat| pat.matches(&node.identity)),
            })
        })
}

fn traffic_for<'a>(mesh: &'a Mesh, key: &Key) -> Option<&'a TrafficPolicy> {
    mesh.traffic
        .iter()
        .find(|((ns, _), p)| *ns == key.0 && p.spec.target_ref.name == key.1)
        .map(|(_, p)| p)
}

fn dur(s: &Option<String>) -> Option<Dur> {
    s.as_deref()
        .and_then(|s| config::parse_duration(s).ok())
        .map(Dur)
}

/// The clusters of one Service, one per port.
fn clusters_of(
    mesh: &Mesh,
    regs: &[Registration],
    key: &Key,
    svc: &Service,
    set: &Settings,
) -> Vec<config::Cluster> {
    let identity = set
        .mtls
        .then(|| service_identity(svc, key, &set.trust_domain))
        .flatten();
    let traffic = traffic_for(mesh, key);
    let slices: Vec<_> = mesh
        .slices
        .iter()
        .filter(|((ns, _), s)| {
            *ns == key.0
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    == Some(&key.1)
        })
        .map(|(_, s)| s)
        .collect();
    let mut out = Vec::new();
    for p in ports(svc) {
        let mut endpoints: Vec<config::Endpoint> = Vec::new();
        for slice in &slices {
            // The slice's port for this Service port (by name, or the only one).
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|sp| sp.name == p.name || slice.ports.as_ref().is_some_and(|v| v.len() == 1))
                .and_then(|sp| sp.port)
                .unwrap_or(p.port);
            for e in &slice.endpoints {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                for a in &e.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        let address = SocketAddr::new(ip, u16::try_from(port).unwrap_or(0));
                        if !endpoints.iter().any(|x| x.address == address.into()) {
                            endpoints.push(config::Endpoint {
                                address: address.into(),
                                identity: identity.as_ref().map(|i| i.to_string()),
                            });
                        }
                    }
                }
            }
        }
        for r in regs
            .iter()
            .filter(|r| r.namespace == key.0 && r.service == key.1)
        {
            if !endpoints.iter().any(|x| x.address == r.endpoint.into()) {
                endpoints.push(config::Endpoint {
                    address: r.endpoint.into(),
                    identity: set.mtls.then(|| r.identity.to_string()),
                });
            }
        }
        let app = p.app_protocol.as_deref().unwrap_or("");
        let protocol = if app == "kubernetes.io/h2c" || app == "grpc" || app == "http2" {
            config::Protocol::Http2
        } else {
            config::Protocol::Auto
        };
        let mut c = config::Cluster {
            name: cluster_name(&key.0, &key.1, p.port),
            protocol,
            lb: config::LbPolicy::default(),
            hash_on: None,
            connect_timeout: Dur::secs(1),
            idle_timeout: Dur::secs(90),
            max_idle_per_endpoint: 256,
            circuit_breaker: config::CircuitBreaker::default(),
            outlier_detection: None,
            health_check: None,
            endpoints,
            dns_refresh: Dur::secs(5),
        };
        if let Some(t) = traffic {
            apply_traffic(&mut c, t);
        }
        out.push(c);
    }
    out
}

fn apply_traffic(c: &mut config::Cluster, t: &TrafficPolicy) {
    let s = &t.spec;
    if let Some(lb) = &s.load_balancer {
        c.lb = match lb.as_str() {
            "least-request" => config::LbPolicy::LeastRequest,
            "round-robin" => config::LbPolicy::RoundRobin,
            "random" => config::LbPolicy::Random,
            _ => config::LbPolicy::P2cEwma,
        };
    }
    if let Some(d) = dur(&s.connect_timeout) {
        c.connect_timeout = d;
    }
    if let Some(cb) = &s.circuit_breaker {
        let b = &mut c.circuit_breaker;
        b.max_connections = cb.max_connections.unwrap_or(b.max_connections);
        b.max_pending = cb.max_pending.unwrap_or(b.max_pending);
        b.max_requests = cb.max_requests.unwrap_or(b.max_requests);
        b.max_retries = cb.max_retries.unwrap_or(b.max_retries);
    }
    if let Some(o) = &s.outlier_detection {
        let mut od = config::OutlierDetection::default();
        if let Some(v) = o.consecutive5xx {
            od.consecutive_5xx = v;
        }
        if let Some(v) = o.consecutive_gateway_errors {
            od.consecutive_gateway_errors = v;
        }
        if let Some(d) = dur(&o.interval) {
            od.interval = d;
        }
        if let Some(d) = dur(&o.base_ejection) {
            od.base_ejection = d;
        }
        if let Some(p) = o.max_ejection_percent {
            od.max_ejection_percent = p;
        }
        c.outlier_detection = Some(od);
    }
}

/// The route fields a rule's filters set.
fn apply_filters(r: &mut config::Route, filters: &[HttpRouteRulesFilters]) {
    for f in filters {
        if let Some(m) = &f.request_header_modifier {
            r.request_headers = Some(config::HeaderEdits {
                add: m
                    .add
                    .iter()
                    .flatten()
                    .map(|h| hv(&h.name, &h.value))
                    .collect(),
                set: m
                    .set
                    .iter()
                    .flatten()
                    .map(|h| hv(&h.name, &h.value))
                    .collect(),
                remove: m.remove.clone().unwrap_or_default(),
            });
        }
        if let Some(m) = &f.response_header_modifier {
            r.response_headers = Some(config::HeaderEdits {
                add: m
                    .add
                    .iter()
                    .flatten()
                    .map(|h| hv(&h.name, &h.value))
                    .collect(),
                set: m
                    .set
                    .iter()
                    .flatten()
                    .map(|h| hv(&h.name, &h.value))
                    .collect(),
                remove: m.remove.clone().unwrap_or_default(),
            });
        }
        if let Some(rd) = &f.request_redirect {
            let path = rd.path.as_ref();
            r.redirect = Some(config::Redirect {
                scheme: rd.scheme.as_ref().map(|s| {
                    serde_json::to_value(s)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_lowercase))
                        .unwrap_or_else(|| "http".into())
                }),
                host: rd.hostname.clone(),
                port: rd.port.and_then(|p| u16::try_from(p).ok()),
                path: path.and_then(|p| p.replace_full_path.clone()),
                path_prefix: path.and_then(|p| p.replace_prefix_match.clone()),
                status: rd
                    .status_code
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(302),
            });
            r.backends.clear();
        }
        if let Some(rw) = &f.url_rewrite {
            let path = rw.path.as_ref();
            r.rewrite = Some(config::Rewrite {
                path_prefix: path.and_then(|p| p.replace_prefix_match.clone()),
                path: path.and_then(|p| p.replace_full_path.clone()),
                host: rw.hostname.clone(),
            });
        }
    }
}

fn hv(name: &str, value: &str) -> config::HeaderValueConfig {
    config::HeaderValueConfig {
        name: name.to_string(),
        value: value.to_string(),
    }
}

fn http_match(m: &HttpRouteRulesMatches, hosts: &[String]) -> config::RouteMatch {
    let mut out = config::RouteMatch {
        host: Some(config::Hosts::Many(hosts.to_vec())),
        ..Default::default()
    };
    if let Some(p) = &m.path {
        let v = p.value.clone().unwrap_or_else(|| "/".into());
        match p
            .r#type
            .clone()
            .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
        {
            HttpRouteRulesMatchesPathType::Exact => out.path = Some(v),
            HttpRouteRulesMatchesPathType::PathPrefix => out.path_prefix = Some(v),
            HttpRouteRulesMatchesPathType::RegularExpression => out.path_regex = Some(v),
        }
    }
    for h in m.headers.iter().flatten() {
        let regex = h.r#type.as_ref() == Some(&HttpRouteRulesMatchesHeadersType::RegularExpression);
        out.headers.push(config::HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            exact: (!regex).then(|| h.value.clone()),
            regex: regex.then(|| h.value.clone()),
            present: None,
        });
    }
    if let Some(method) = &m.method
        && let Some(s) = serde_json::to_value(method)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
    {
        out.methods.push(s);
    }
    out
}

/// The routes of one HTTPRoute rule toward the clusters it names.
#[allow(clippy::too_many_arguments)]
fn http_rule_routes(
    name: &str,
    rule: &HttpRouteRules,
    hosts: &[String],
    route_ns: &str,
    mesh: &Mesh,
    traffic: Option<&TrafficPolicy>,
    out: &mut Vec<config::Route>,
) {
    let backends: Vec<config::Backend> = rule
        .backend_refs
        .iter()
        .flatten()
        .filter_map(|b| {
            let ns = b.namespace.clone().unwrap_or_else(|| route_ns.to_string());
            let svc = mesh.services.get(&(ns.clone(), b.name.clone()))?;
            let port = b.port.or_else(|| ports(svc).first().map(|p| p.port))?;
            Some(config::Backend {
                cluster: cluster_name(&ns, &b.name, port),
                weight: b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
            })
        })
        .collect();
    let default_match = [HttpRouteRulesMatches::default()];
    let matches: &[HttpRouteRulesMatches] = match &rule.matches {
        Some(m) if !m.is_empty() => m,
        _ => &default_match,
    };
    for (j, m) in matches.iter().enumerate() {
        let mut r = route(
            format!("{name}.m{j}"),
            http_match(m, hosts),
            backends.clone(),
            traffic,
        );
        if let Some(t) = &rule.timeouts {
            r.total_timeout = dur(&t.request);
            if let Some(per_try) = dur(&t.backend_request) {
                r.retry.get_or_insert_with(default_retry).per_try_timeout = Some(per_try);
            }
        }
        if let Some(rt) = &rule.retry {
            let retry = r.retry.get_or_insert_with(default_retry);
            // GEP-1731 counts retries; `attempts` here counts the first too.
            if let Some(a) = rt.attempts {
                retry.attempts = u32::try_from(a + 1).unwrap_or(1).clamp(1, 10);
            }
            if let Some(b) = dur(&rt.backoff) {
                retry.backoff.base = b;
                retry.backoff.max = Dur(b.0.max(retry.backoff.max.0));
            }
            if let Some(codes) = &rt.codes {
                retry.retriable_status_codes = codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect();
                retry.on = vec![
                    config::RetryOn::RetriableStatusCodes,
                    config::RetryOn::ConnectFailure,
                    config::RetryOn::Reset,
                ];
            }
        }
        apply_filters(&mut r, rule.filters.as_deref().unwrap_or_default());
        out.push(r);
    }
}

fn default_retry() -> config::Retry {
    config::Retry::default()
}

fn route(
    name: String,
    matches: config::RouteMatch,
    backends: Vec<config::Backend>,
    traffic: Option<&TrafficPolicy>,
) -> config::Route {
    let mut r = config::Route {
        name,
        listeners: Some(vec!["outbound".into()]),
        matches,
        backends,
        request_headers: None,
        response_headers: None,
        rewrite: None,
        redirect: None,
        timeout: None,
        retry: None,
        rate_limit: None,
        fault: None,
        total_timeout: None,
        upgrades: config::default_upgrades(),
        connect: false,
    };
    if let Some(t) = traffic {
        if let Some(rl) = &t.spec.rate_limit {
            r.rate_limit = Some(config::RateLimit {
                requests_per_second: rl.requests_per_second,
                burst: rl.burst,
            });
        }
        if let Some(b) = &t.spec.retry_budget {
            let retry = r.retry.get_or_insert_with(default_retry);
            retry.budget.percent = b.percent;
            if let Some(m) = b.min_per_second {
                retry.budget.min_per_second = m;
            }
        }
    }
    r
}

/// The whole config of one proxy.
pub fn render(mesh: &Mesh, regs: &[Registration], node: &Node, set: &Settings) -> Config {
    let mut c = Config {
        node: config::Node {
            // The proxy keeps its own id (bootstrap): one render serves
            // every proxy of a group.
            id: String::new(),
            service: node.service.clone(),
            namespace: node.namespace.clone(),
        },
        ..Default::default()
    };
    if set.mtls {
        c.identity = Some(config::Identity {
            trust_domain: set.trust_domain.clone(),
            source: config::CertSource {
                files: None,
                control_plane: true,
            },
        });
    }
    let listener = |name: &str, role: config::Role, address: SocketAddr| {
        let mut l = config::Listener::new(name, role, address);
        l.access_log = true;
        l
    };
    if node.inbound_port > 0 {
        let mut l = listener(
            "inbound",
            config::Role::Inbound,
            SocketAddr::new(IpAddr::from([0, 0, 0, 0]), node.inbound_port),
        );
        l.forward_to = Some(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), node.app_port));
        if set.mtls {
            l.tls = Some(config::ListenerTlsField::Mode(config::TlsMode::Strict));
        }
        c.listeners.push(l);
        // Who may call this proxy's service.
        let me: Key = (node.namespace.clone(), node.service.clone());
        for ((ns, name), p) in &mesh.authz {
            if *ns != me.0 || p.spec.target_ref.name != me.1 {
                continue;
            }
            c.authorization.push(config::AuthorizationPolicy {
                name: format!("{ns}/{name}"),
                listener: "inbound".into(),
                dry_run: p.spec.dry_run,
                allow: p
                    .spec
                    .rules
                    .iter()
                    .map(|r| config::AllowRule {
                        from: rule_from(r, &set.trust_domain),
                        paths: r.paths.clone().unwrap_or_default(),
                        methods: r.methods.clone().unwrap_or_default(),
                    })
                    .collect(),
            });
        }
    }
    if node.outbound_port > 0 {
        let mut l = listener(
            "outbound",
            config::Role::Outbound,
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), node.outbound_port),
        );
        // The app's connections arrive redirected (`outrigger init`).
        l.transparent = true;
        // On shutdown the app is still stopping: its calls keep working
        // (up to 5 s, or until it has no connection open), while the
        // inbound side stops at once so callers move away.
        l.drain_delay = Some(Dur::secs(5));
        c.listeners.push(l);
    }
    // The services this proxy may call, their clusters and routes (none
    // without an outbound listener: a server-only workload).
    let callable: Vec<(&Key, &Service)> = mesh
        .services
        .iter()
        .filter(|_| node.outbound_port > 0)
        .filter(|(k, _)| may_call(mesh, k, node, &set.trust_domain))
        .collect();
    let mut clusters = BTreeMap::new();
    for (k, s) in &callable {
        for cl in clusters_of(mesh, regs, k, s, set) {
            clusters.insert(cl.name.clone(), cl);
        }
    }
    for (k, s) in &callable {
        let mut hosts = hostnames(k, &node.namespace, &set.cluster_domain);
        // An app that calls the Service's address (its ClusterIP) reaches
        // the same routes.
        hosts.extend(cluster_ips(s));
        let traffic = traffic_for(mesh, k);
        let attached = |kind: Option<&str>, name: &str, ns: Option<&str>, route_ns: &str| {
            kind == Some("Service") && name == k.1 && ns.unwrap_or(route_ns) == k.0
        };
        for ((rns, rname), hr) in &mesh.http_routes {
            if !hr
                .spec
                .parent_refs
                .iter()
                .flatten()
                .any(|p| attached(p.kind.as_deref(), &p.name, p.namespace.as_deref(), rns))
            {
                continue;
            }
            for (i, rule) in hr.spec.rules.iter().flatten().enumerate() {
                http_rule_routes(
                    &format!("{rns}.{rname}.r{i}"),
                    rule,
                    &hosts,
                    rns,
                    mesh,
                    traffic,
                    &mut c.routes,
                );
            }
        }
        for ((rns, rname), gr) in &mesh.grpc_routes {
            if !gr
                .spec
                .parent_refs
                .iter()
                .flatten()
                .any(|p| attached(p.kind.as_deref(), &p.name, p.namespace.as_deref(), rns))
            {
                continue;
            }
            for (i, rule) in gr.spec.rules.iter().flatten().enumerate() {
                let backends: Vec<config::Backend> = rule
                    .backend_refs
                    .iter()
                    .flatten()
                    .filter_map(|b| {
                        let ns = b.namespace.clone().unwrap_or_else(|| rns.clone());
                        let svc = mesh.services.get(&(ns.clone(), b.name.clone()))?;
                        let port = b.port.or_else(|| ports(svc).first().map(|p| p.port))?;
                        Some(config::Backend {
                            cluster: cluster_name(&ns, &b.name, port),
                            weight: b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)),
                        })
                    })
                    .collect();
                let matches = rule.matches.clone().unwrap_or_default();
                let paths: Vec<(Option<String>, Option<String>)> = if matches.is_empty() {
                    vec![(None, None)]
                } else {
                    matches
                        .iter()
                        .map(|m| {
                            let svc = m.method.as_ref().and_then(|x| x.service.clone());
                            let method = m.method.as_ref().and_then(|x| x.method.clone());
                            match (svc, method) {
                                (Some(s), Some(me)) => (Some(format!("/{s}/{me}")), None),
                                (Some(s), None) => (None, Some(format!("/{s}/"))),
                                _ => (None, None),
                            }
                        })
                        .collect()
                };
                for (j, (exact, prefix)) in paths.into_iter().enumerate() {
                    let m = config::RouteMatch {
                        host: Some(config::Hosts::Many(hosts.clone())),
                        path: exact,
                        path_prefix: prefix,
                        ..Default::default()
                    };
                    c.routes.push(route(
                        format!("{rns}.{rname}.g{i}.m{j}"),
                        m,
                        backends.clone(),
                        traffic,
                    ));
                }
            }
        }
        // Anything else for the service: its first port.
        if let Some(p) = ports(s).first() {
            c.routes.push(route(
                format!("{}.{}", k.1, k.0),
                config::RouteMatch {
                    host: Some(config::Hosts::Many(hosts.clone())),
                    ..Default::default()
                },
                vec![config::Backend {
                    cluster: cluster_name(&k.0, &k.1, p.port),
                    weight: 1,
                }],
                traffic,
            ));
        }
    }
    // Drop backends to clusters this proxy does not have (a service it may
    // not call), and routes left with none (unless they redirect).
    for r in &mut c.routes {
        r.backends.retain(|b| clusters.contains_key(&b.cluster));
    }
    c.routes
        .retain(|r| !r.backends.is_empty() || r.redirect.is_some());
    c.clusters = clusters.into_values().collect();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(text: &str) -> Mesh {
        let mut m = Mesh::default();
        let mut errs = Vec::new();
        m.load_text("t.yaml", text, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        m.validate().unwrap();
        m
    }

    fn node(ns: &str, svc: &str, sa: &str) -> Node {
        Node {
            id: format!("{svc}-1"),
            namespace: ns.into(),
            service: svc.into(),
            identity: SpiffeId::workload("td", ns, sa).unwrap(),
            address: "10.0.0.9".parse().unwrap(),
            inbound_port: 15006,
            outbound_port: 15001,
            app_port: 8080,
        }
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: orders, namespace: shop }
spec: { ports: [ { name: http, port: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: payments, namespace: shop }
spec: { ports: [ { name: http, port: 9090 } ] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: orders-1, namespace: shop, labels: { kubernetes.io/service-name: orders } }
addressType: IPv4
ports: [ { name: http, port: 8080 } ]
endpoints: [ { addresses: [10.1.0.7] }, { addresses: [10.1.0.8], conditions: { ready: false } } ]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: orders, namespace: shop }
spec:
  parentRefs: [ { group: "", kind: Service, name: orders } ]
  rules:
    - matches: [ { path: { type: PathPrefix, value: /api } } ]
      backendRefs: [ { name: orders, port: 8080, weight: 90 }, { name: payments, port: 9090, weight: 10 } ]
      timeouts: { request: 2s, backendRequest: 500ms }
      retry: { attempts: 2, codes: [503] }
---
apiVersion: outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: payments-callers, namespace: shop }
spec:
  targetRef: { kind: Service, name: payments }
  rules: [ { serviceAccounts: [shop/checkout], paths: ["/pay/*"] } ]
"#;

    fn settings() -> Settings {
        Settings {
            trust_domain: "td".into(),
            cluster_domain: "cluster.local".into(),
            mtls: true,
        }
    }

    #[test]
    fn a_cluster_names_its_service() {
        let n = cluster_name("shop", "orders", 8080);
        assert_eq!(cluster_service(&n), Some(("shop", "orders")));
        assert_eq!(cluster_service("inbound:inbound"), None);
        assert_eq!(cluster_service("backend"), None);
        assert_eq!(cluster_service("a.b.c:80"), None);
    }

    #[test]
    fn a_proxy_without_an_outbound_listener_gets_no_routes() {
        let m = mesh(MESH);
        let mut n = node("shop", "orders", "orders");
        n.outbound_port = 0;
        let c = render(&m, &[], &n, &settings());
        assert!(c.routes.is_empty() && c.clusters.is_empty());
        assert_eq!(c.listeners.len(), 1);
        let mut merged = c.clone();
        merged.feed = Some(crate::config::Feed {
            control_plane: vec!["https://127.0.0.1:1".into()],
            ca: Some("/x".into()),
            ca_pem: None,
            control_plane_identity: None,
            token_file: None,
            service_account: "orders".into(),
            address: None,
            inbound_port: 15006,
            outbound_port: 0,
            app_port: 8080,
            cache_dir: None,
        });
        merged.validate().unwrap();
    }

    #[test]
    fn a_proxy_gets_routes_only_to_what_it_may_call() {
        let m = mesh(MESH);
        let web = render(&m, &[], &node("shop", "web", "web"), &settings());
        // A proxy validates the snapshot merged with its bootstrap `feed`.
        let mut merged = web.clone();
        merged.feed = Some(crate::config::Feed {
            control_plane: vec!["https://127.0.0.1:1".into()],
            ca: Some("/x".into()),
            ca_pem: None,
            control_plane_identity: None,
            token_file: None,
            service_account: "web".into(),
            address: None,
            inbound_port: 0,
            outbound_port: 15001,
            app_port: 0,
            cache_dir: None,
        });
        merged.validate().unwrap();
        let names: Vec<&str> = web.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["orders.shop:8080"], "payments is not for web");
        let orders = &web.clusters[0];
        assert_eq!(
            orders.endpoints.len(),
            1,
            "not-ready endpoints are left out"
        );
        assert_eq!(
            orders.endpoints[0].identity.as_deref(),
            Some("spiffe://td/ns/shop/sa/orders")
        );
        let api = &web.routes[0];
        assert_eq!(
            api.backends.len(),
            1,
            "the split's payments half is dropped for web"
        );
        assert_eq!(api.total_timeout, Some(Dur::secs(2)));
        let retry = api.retry.as_ref().unwrap();
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.retriable_status_codes, [503]);
        assert_eq!(retry.per_try_timeout, Some(Dur::millis(500)));

        let checkout = render(&m, &[], &node("shop", "checkout", "checkout"), &settings());
        assert_eq!(checkout.clusters.len(), 2);
        assert_eq!(
            checkout.routes[0].backends.len(),
            2,
            "both halves of the split"
        );
        // The payments proxy gets the inbound authorization.
        let payments = render(&m, &[], &node("shop", "payments", "payments"), &settings());
        assert_eq!(payments.authorization.len(), 1);
        assert_eq!(
            payments.authorization[0].allow[0].from.as_deref(),
            Some(&["spiffe://td/ns/shop/sa/checkout".to_string()][..])
        );
    }

    #[test]
    fn registered_proxies_are_endpoints_of_their_service() {
        let m = mesh(MESH);
        let reg = Registration {
            namespace: "shop".into(),
            service: "orders".into(),
            endpoint: "127.0.0.1:17006".parse().unwrap(),
            identity: SpiffeId::workload("td", "shop", "orders").unwrap(),
        };
        let c = render(&m, &[reg], &node("shop", "web", "web"), &settings());
        let eps: Vec<String> = c.clusters[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(eps, ["10.1.0.7:8080", "127.0.0.1:17006"]);
    }
}
