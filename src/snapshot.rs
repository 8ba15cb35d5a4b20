//! A config snapshot compiled for the request path: per-listener route
//! tables, clusters with their pools, and pre-resolved metric label sets.
//!
//! Built once per config version. Clusters whose config did not change keep
//! their `Arc<Cluster>` across snapshots, and with it their pools and
//! latency estimates.

use crate::balance::dns::Resolved;
use crate::balance::{Cluster, ClusterService};
use crate::config::{self, Config, Role};
use crate::policy::authz::{Authz, AuthzLayer, AuthzService};
use crate::policy::fault::{Fault, FaultLayer};
use crate::policy::rate_limit::{RateLimit, RateLimitLayer, TokenBucket};
use crate::policy::retry::{Retry, RetryLayer, RetryPolicy};
use crate::policy::timeout::{Timeout, TimeoutLayer};
use crate::policy::total_timeout::{TotalTimeout, TotalTimeoutLayer};
use crate::route::filters::Filters;
use crate::route::{CompileError, RouteTable};
use crate::telemetry::RouteStats;
use crate::tls::identity::IdentityStore;
use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

/// A route's per-backend service stack, in request order: authorization
/// (the listener's) → rate limit →
/// total timeout → route timeout → fault → retry → per-try timeout →
/// cluster (circuit breaker, balancer, endpoint). The fault sits inside
/// the timeouts, so that an injected delay is bounded like a slow upstream.
pub type RouteStack =
    AuthzService<RateLimit<TotalTimeout<Timeout<Fault<Retry<Timeout<ClusterService>>>>>>>;

/// What all of a route's stacks share: its rate-limit bucket and retry budget.
type RouteShared = (Option<Arc<TokenBucket>>, Option<Arc<RetryPolicy>>);

/// Where a route's backend sends requests, with its metric labels.
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub stats: Arc<RouteStats>,
    pub stack: RouteStack,
    /// `Upgrade` tokens tunnelled, lowercase.
    pub upgrades: Arc<[String]>,
    /// CONNECT opens a TCP tunnel to the cluster.
    pub connect: bool,
}

impl Target {
    pub fn allows_upgrade(&self, token: &str) -> bool {
        self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(token))
    }
}

fn upgrades(list: &[String]) -> Arc<[String]> {
    list.iter().map(|u| u.to_ascii_lowercase()).collect()
}

/// Builds the stack of one route toward one cluster. `bucket` and `retry`
/// are shared by all the route's backends.
fn route_stack(
    r: Option<&config::Route>,
    route_name: &str,
    cluster: &Arc<Cluster>,
    authz: Option<Arc<Authz>>,
    bucket: Option<Arc<TokenBucket>>,
    retry: Option<Arc<RetryPolicy>>,
) -> RouteStack {
    let per_try = r
        .and_then(|r| r.retry.as_ref())
        .and_then(|rt| rt.per_try_timeout)
        .map(|d| d.0);
    let (route_timeout, per_try_timeout) = TimeoutLayer::route_and_per_try(
        r.and_then(|r| r.timeout).map(|d| d.0),
        per_try,
        route_name,
    );
    tower::ServiceBuilder::new()
        .layer(AuthzLayer::new(authz))
        .layer(RateLimitLayer::new(bucket))
        .layer(TotalTimeoutLayer::new(
            r.and_then(|r| r.total_timeout).map(|d| d.0),
            route_name,
        ))
        .layer(route_timeout)
        .layer(FaultLayer::new(
            r.and_then(|r| r.fault.as_ref()),
            route_name,
        ))
        .layer(RetryLayer::new(retry, cluster.limits.clone()))
        .layer(per_try_timeout)
        .service(ClusterService {
            cluster: cluster.clone(),
        })
}

pub struct ListenerRoutes {
    pub table: RouteTable,
    /// `targets[route][backend]`
    pub targets: Vec<Vec<Target>>,
    /// `filters[route]`: header edits, rewrites, redirects.
    pub filters: Vec<Option<Arc<Filters>>>,
    /// Inbound listeners: the local app, for requests no route claims.
    pub forward: Option<Target>,
    /// The listener's own rate limit, before routing.
    pub rate_limit: Option<Arc<TokenBucket>>,
}

pub struct Snapshot {
    pub version: u64,
    pub config: Arc<Config>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub listeners: HashMap<String, ListenerRoutes>,
    /// Per route, its rate limit and retry budget with the config they
    /// were made from: kept across snapshots while that config stays, so a
    /// reload (or a DNS change) neither refills a bucket nor resets a
    /// budget.
    route_state: HashMap<String, RouteState>,
    /// Per listener, its rate limit likewise.
    listener_buckets: HashMap<String, (config::RateLimit, Arc<TokenBucket>)>,
}

struct RouteState {
    rate_limit: Option<(config::RateLimit, Arc<TokenBucket>)>,
    retry: Option<(config::Retry, Arc<RetryPolicy>)>,
}

impl Snapshot {
    /// A snapshot of plaintext clusters (tests, benches).
    pub fn build(
        config: Config,
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, CompileError> {
        Self::build_with(config, version, prev, None)
    }

    /// A snapshot whose endpoints with an identity are reached over mTLS.
    pub fn build_with(
        config: Config,
        version: u64,
        prev: Option<&Snapshot>,
        identity: Option<&Arc<IdentityStore>>,
    ) -> Result<Snapshot, CompileError> {
        Self::build_resolved(config, version, prev, identity, &Default::default())
    }

    /// A snapshot whose endpoint names are the addresses in `resolved`.
    pub fn build_resolved(
        config: Config,
        version: u64,
        prev: Option<&Snapshot>,
        identity: Option<&Arc<IdentityStore>>,
        resolved: &Resolved,
    ) -> Result<Snapshot, CompileError> {
        let mut clusters = HashMap::default();
        // A cluster is kept, pools, estimates and outlier state with it,
        // while its config and the addresses its names resolve to stay.
        let reuse = |c: &config::Cluster| -> Arc<Cluster> {
            let c = crate::balance::dns::expand(c, resolved);
            match prev.and_then(|p| p.clusters.get(&c.name)) {
                Some(old) if old.config == *c => old.clone(),
                Some(old) if Cluster::same_but_endpoints(&old.config, &c) => {
                    Cluster::with_previous(&c, identity, Some(old))
                }
                _ => Cluster::with_identity(&c, identity),
            }
        };
        for c in &config.clusters {
            clusters.insert(c.name.clone(), reuse(c));
        }
        // One rate-limit bucket and one retry budget per route, shared by
        // every listener and backend the route serves.
        let mut route_state = HashMap::default();
        let shared: HashMap<&str, RouteShared> = config
            .routes
            .iter()
            .map(|r| {
                let old = prev.and_then(|p| p.route_state.get(&r.name));
                let bucket =
                    r.rate_limit
                        .as_ref()
                        .map(|rl| match old.and_then(|o| o.rate_limit.as_ref()) {
                            Some((c, b)) if c == rl => b.clone(),
                            _ => TokenBucket::new(rl, "route", &r.name),
                        });
                let retry = r
                    .retry
                    .as_ref()
                    .map(|rt| match old.and_then(|o| o.retry.as_ref()) {
                        Some((c, p)) if c == rt => p.clone(),
                        _ => RetryPolicy::new(rt, &r.name),
                    });
                route_state.insert(
                    r.name.clone(),
                    RouteState {
                        rate_limit: r.rate_limit.clone().zip(bucket.clone()),
                        retry: r.retry.clone().zip(retry.clone()),
                    },
                );
                (r.name.as_str(), (bucket, retry))
            })
            .collect();
        let mut listener_buckets = HashMap::default();
        let mut listeners = HashMap::default();
        for l in &config.listeners {
            let authz = Authz::for_listener(&config.authorization, &l.name);
            let routes: Vec<&config::Route> = config
                .routes
                .iter()
                .filter(|r| match &r.listeners {
                    Some(ls) => ls.contains(&l.name),
                    None => l.role != Role::Inbound,
                })
                .collect();
            let table = RouteTable::compile(routes.iter().copied())?;
            let targets = routes
                .iter()
                .map(|r| {
                    let (bucket, retry) = shared.get(r.name.as_str()).cloned().unwrap_or_default();
                    r.backends
                        .iter()
                        .filter_map(|b| {
                            let cluster = clusters.get(&b.cluster)?.clone();
                            let stats = RouteStats::new(&l.name, &r.name, &b.cluster);
                            let stack = route_stack(
                                Some(r),
                                &r.name,
                                &cluster,
                                authz.clone(),
                                bucket.clone(),
                                retry.clone(),
                            );
                            Some(Target {
                                cluster,
                                stats,
                                stack,
                                upgrades: upgrades(&r.upgrades),
                                connect: r.connect,
                            })
                        })
                        .collect()
                })
                .collect();
            let forward = l.forward_to.map(|addr| {
                let name = format!("inbound:{}", l.name);
                let cc = config::Cluster {
                    name: name.clone(),
                    protocol: config::Protocol::Auto,
                    lb: config::LbPolicy::RoundRobin,
                    hash_on: None,
                    connect_timeout: config::Dur::secs(1),
                    idle_timeout: config::Dur::secs(90),
                    max_idle_per_endpoint: 256,
                    circuit_breaker: Default::default(),
                    outlier_detection: None,
                    health_check: None,
                    endpoints: vec![config::Endpoint {
                        address: addr.into(),
                        identity: None,
                    }],
                    dns_refresh: config::Dur::secs(5),
                };
                let cluster = match prev
                    .and_then(|p| p.listeners.get(&l.name))
                    .and_then(|p| p.forward.as_ref())
                {
                    Some(t) if t.cluster.config == cc => t.cluster.clone(),
                    _ => Cluster::with_identity(&cc, identity),
                };
                let stack = route_stack(None, "inbound", &cluster, authz.clone(), None, None);
                Target {
                    cluster,
                    stats: RouteStats::new(&l.name, "inbound", &name),
                    stack,
                    upgrades: upgrades(&config::default_upgrades()),
                    connect: false,
                }
            });
            let filters = routes
                .iter()
                .map(|r| Filters::compile(r).map(Arc::new))
                .collect();
            listeners.insert(
                l.name.clone(),
                ListenerRoutes {
                    table,
                    targets,
                    filters,
                    forward,
                    rate_limit: l.rate_limit.as_ref().map(|rl| {
                        let b = match prev.and_then(|p| p.listener_buckets.get(&l.name)) {
                            Some((c, b)) if c == rl => b.clone(),
                            _ => TokenBucket::new(rl, "listener", &l.name),
                        };
                        listener_buckets.insert(l.name.clone(), (rl.clone(), b.clone()));
                        b
                    }),
                },
            );
        }
        Ok(Snapshot {
            version,
            config: Arc::new(config),
            clusters,
            listeners,
            route_state,
            listener_buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_clusters_are_kept_across_snapshots() {
        let a = Config::from_yaml(
            "listeners: [ { name: l, role: outbound, address: 127.0.0.1:0 } ]\nclusters:\n  - { name: a, endpoints: [ { address: 127.0.0.1:1 } ] }\n  - { name: b }\n",
        )
        .unwrap();
        let s1 = Snapshot::build(a, 1, None).unwrap();
        let b = Config::from_yaml(
            "listeners: [ { name: l, role: outbound, address: 127.0.0.1:0 } ]\nclusters:\n  - { name: a, endpoints: [ { address: 127.0.0.1:1 } ] }\n  - { name: b, lb: random }\n",
        )
        .unwrap();
        let s2 = Snapshot::build(b, 2, Some(&s1)).unwrap();
        assert!(Arc::ptr_eq(&s1.clusters["a"], &s2.clusters["a"]));
        assert!(!Arc::ptr_eq(&s1.clusters["b"], &s2.clusters["b"]));
    }

    #[test]
    fn rate_limits_and_retry_budgets_outlive_a_reload_that_keeps_them() {
        let yaml = |rps: u32| {
            format!(
                "listeners: [ {{ name: l, role: outbound, address: 127.0.0.1:0, rate_limit: {{ requests_per_second: {rps} }} }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: a }} ], rate_limit: {{ requests_per_second: {rps} }}, retry: {{ attempts: 2 }} }} ]\nclusters:\n  - {{ name: a, endpoints: [ {{ address: 127.0.0.1:1 }} ] }}\n"
            )
        };
        let s1 = Snapshot::build(Config::from_yaml(&yaml(10)).unwrap(), 1, None).unwrap();
        let s2 = Snapshot::build(Config::from_yaml(&yaml(10)).unwrap(), 2, Some(&s1)).unwrap();
        let route = |s: &Snapshot| s.route_state["r"].rate_limit.clone().unwrap().1;
        let retry = |s: &Snapshot| s.route_state["r"].retry.clone().unwrap().1;
        let listener = |s: &Snapshot| s.listener_buckets["l"].1.clone();
        assert!(Arc::ptr_eq(&route(&s1), &route(&s2)));
        assert!(Arc::ptr_eq(&retry(&s1), &retry(&s2)));
        assert!(Arc::ptr_eq(&listener(&s1), &listener(&s2)));
        // The bucket the requests use is the kept one.
        let used = s2.listeners["l"].rate_limit.clone().unwrap();
        assert!(Arc::ptr_eq(&used, &listener(&s1)));
        // A changed limit starts afresh; the unchanged retry stays.
        let s3 = Snapshot::build(Config::from_yaml(&yaml(20)).unwrap(), 3, Some(&s2)).unwrap();
        assert!(!Arc::ptr_eq(&route(&s2), &route(&s3)));
        assert!(!Arc::ptr_eq(&listener(&s2), &listener(&s3)));
        assert!(Arc::ptr_eq(&retry(&s2), &retry(&s3)));
    }

    #[test]
    fn a_new_endpoint_set_keeps_the_endpoints_that_stay() {
        let yaml = |eps: &str, connect: &str| {
            format!(
                "listeners: [ {{ name: l, role: outbound, address: 127.0.0.1:0 }} ]\nclusters:\n  - {{ name: a, connect_timeout: {connect}, health_check: {{ path: /h }}, endpoints: [ {eps} ] }}\n"
            )
        };
        let ep = |s: &Snapshot, port: u16| {
            s.clusters["a"]
                .endpoints
                .iter()
                .find(|e| e.addr.port() == port)
                .cloned()
                .unwrap()
        };
        let s1 = Snapshot::build(
            Config::from_yaml(&yaml(
                "{ address: 127.0.0.1:1 }, { address: 127.0.0.1:2 }",
                "1s",
            ))
            .unwrap(),
            1,
            None,
        )
        .unwrap();
        // Endpoint 2 fails its health checks.
        ep(&s1, 2)
            .health
            .checked_healthy
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let s2 = Snapshot::build(
            Config::from_yaml(&yaml(
                "{ address: 127.0.0.1:2 }, { address: 127.0.0.1:3 }",
                "1s",
            ))
            .unwrap(),
            2,
            Some(&s1),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(&s1.clusters["a"], &s2.clusters["a"]));
        assert!(
            Arc::ptr_eq(&ep(&s1, 2), &ep(&s2, 2)),
            "the endpoint that stayed"
        );
        assert!(Arc::ptr_eq(
            &s1.clusters["a"].limits,
            &s2.clusters["a"].limits
        ));
        // Its state came with it: the new cluster steers around it.
        assert!(s2.clusters["a"].health_aware());
        // Other settings changed: everything starts afresh.
        let s3 = Snapshot::build(
            Config::from_yaml(&yaml(
                "{ address: 127.0.0.1:2 }, { address: 127.0.0.1:3 }",
                "2s",
            ))
            .unwrap(),
            3,
            Some(&s2),
        )
        .unwrap();
        assert!(!Arc::ptr_eq(&ep(&s2, 2), &ep(&s3, 2)));
    }

    #[test]
    fn a_route_on_two_listeners_shares_one_rate_limit() {
        let c = Config::from_yaml(
            r#"
listeners:
  - { name: a, role: outbound, address: 127.0.0.1:0 }
  - { name: b, role: gateway, address: 127.0.0.1:0 }
routes:
  - { name: r, backends: [ { cluster: c } ], rate_limit: { requests_per_second: 1, burst: 2 } }
clusters: [ { name: c } ]
"#,
        )
        .unwrap();
        let s = Snapshot::build(c, 1, None).unwrap();
        let bucket = |l: &str| {
            s.listeners[l].targets[0][0]
                .stack
                .inner()
                .bucket()
                .cloned()
                .unwrap()
        };
        assert!(Arc::ptr_eq(&bucket("a"), &bucket("b")));
    }

    #[test]
    fn inbound_listeners_take_only_named_routes() {
        let c = Config::from_yaml(
            r#"
listeners:
  - { name: in, role: inbound, address: 127.0.0.1:15006, forward_to: 127.0.0.1:8080 }
  - { name: out, role: outbound, address: 127.0.0.1:15001 }
routes:
  - { name: r, backends: [ { cluster: a } ] }
clusters: [ { name: a } ]
"#,
        )
        .unwrap();
        let s = Snapshot::build(c, 1, None).unwrap();
        assert_eq!(s.listeners["in"].table.routes.len(), 0);
        assert!(s.listeners["in"].forward.is_some());
        assert_eq!(s.listeners["out"].table.routes.len(), 1);
    }
}
