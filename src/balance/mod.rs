//! Clusters: endpoint sets, the balancer that picks among them (skipping
//! ejected and unhealthy endpoints, and those a retry already tried), the
//! per-endpoint connection pools, and active health checks.

pub mod dns;
mod ewma;
mod health;
mod io;
mod lb;
mod pool;
mod sniff;

pub use lb::{Lb, hash_bytes};
pub use pool::{Endpoint, PoolSettings, PooledBody, Proto};

use crate::body::{BoxError, ReqBody, take_data};
use crate::clock::now_ns;
use crate::config;
use crate::context::Trail;
use crate::error::{Limit, ProxyError, UpstreamError};
use crate::policy::circuit_breaker::Limits;
use crate::policy::outlier::{Detector, EndpointHealth, Outcome};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub config: config::Cluster,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub limits: Arc<Limits>,
    lb: Lb,
    outlier: Option<Detector>,
    /// Endpoints failing active health checks (kept by the checker).
    unhealthy: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Detector")
    }
}

fn health(e: &Arc<Endpoint>) -> &EndpointHealth {
    &e.health
}

/// Endpoints a request's earlier attempts went to; the balancer avoids them.
#[derive(Clone, Debug, Default)]
pub struct Tried(pub Arc<Mutex<Vec<SocketAddr>>>);

thread_local! {
    /// The endpoint this thread's balancer picked last. A pick happens
    /// inside the poll of the request's future, so a caller that clears it
    /// before polling and reads it after learns which endpoint its own
    /// attempt went to (also when a per-try timeout then drops the attempt)
    /// without a per-request allocation.
    static PICKED: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

/// Takes (and clears) the endpoint picked last on this thread.
pub fn take_pick() -> Option<SocketAddr> {
    PICKED.with(|p| p.take())
}

/// Records the endpoint a request was just sent to (see `PICKED`).
pub fn note_pick(addr: SocketAddr) {
    PICKED.with(|p| p.set(Some(addr)));
}

impl Cluster {
    /// A cluster of plaintext endpoints.
    pub fn new(c: &config::Cluster) -> Arc<Cluster> {
        Self::with_identity(c, None)
    }

    /// A cluster whose endpoints with an identity are reached over mTLS
    /// with the proxy's `identity` (validation guarantees there is one).
    pub fn with_identity(
        c: &config::Cluster,
        identity: Option<&Arc<crate::tls::identity::IdentityStore>>,
    ) -> Arc<Cluster> {
        Self::with_previous(c, identity, None)
    }

    /// Whether `a` and `b` differ at most in their endpoints (and how
    /// often names are looked up).
    pub fn same_but_endpoints(a: &config::Cluster, b: &config::Cluster) -> bool {
        let strip = |c: &config::Cluster| config::Cluster {
            endpoints: Vec::new(),
            dns_refresh: config::Dur::default(),
            ..c.clone()
        };
        strip(a) == strip(b)
    }

    /// A cluster like `prev` (same settings, `same_but_endpoints`) with
    /// another endpoint set: an endpoint that stays is the same endpoint,
    /// its pool, latency estimate, ejection and health with it, and the
    /// circuit breaker's counts go on (Envoy's host-set update). Only new
    /// addresses start afresh.
    pub fn with_previous(
        c: &config::Cluster,
        identity: Option<&Arc<crate::tls::identity::IdentityStore>>,
        prev: Option<&Cluster>,
    ) -> Arc<Cluster> {
        let settings = PoolSettings {
            connect_timeout: c.connect_timeout.0,
            idle_timeout: c.idle_timeout.0,
            max_idle: c.max_idle_per_endpoint,
        };
        let limits = match prev {
            Some(p) => p.limits.clone(),
            None => Limits::new(&c.circuit_breaker, &c.name),
        };
        // What `prev` has, by address and identity (its endpoints were
        // made from its config's addresses, in order).
        let kept: HashMap<(SocketAddr, Option<&str>), &Arc<Endpoint>> = prev
            .map(|p| {
                p.config
                    .endpoints
                    .iter()
                    .filter_map(|e| Some((e.address.ip()?, e.identity.as_deref())))
                    .zip(&p.endpoints)
                    .collect()
            })
            .unwrap_or_default();
        // Names were resolved into addresses before (dns::expand).
        let endpoints: Vec<_> = c
            .endpoints
            .iter()
            .filter_map(|e| Some((e.address.ip()?, e)))
            .map(|(addr, e)| {
                if let Some(old) = kept.get(&(addr, e.identity.as_deref())) {
                    return Arc::clone(old);
                }
                let tls = match (&e.identity, identity) {
                    (Some(id), Some(store)) => crate::tls::spiffe::SpiffeId::parse(id)
                        .ok()
                        .map(|id| Arc::new(crate::tls::mesh_client(store, id))),
                    _ => None,
                };
                Endpoint::with_tls(addr, &c.name, settings, limits.clone(), tls)
            })
            .collect();
        let lb = Lb::new(c.lb, c.hash_on.as_ref(), &endpoints);
        let outlier = c
            .outlier_detection
            .as_ref()
            .map(|o| Detector::new(o, &c.name));
        let cluster = Arc::new(Cluster {
            name: c.name.clone(),
            config: c.clone(),
            endpoints,
            limits,
            lb,
            outlier,
            unhealthy: Default::default(),
        });
        // Kept endpoints may be ejected or failing health checks: the new
        // cluster's counts start from what they are.
        let now = now_ns();
        cluster.set_unhealthy(
            cluster
                .endpoints
                .iter()
                .filter(|e| e.health.state(now) == "unhealthy")
                .count() as u32,
        );
        if let Some(d) = &cluster.outlier {
            d.recount(&cluster.endpoints, health);
        } else {
            crate::policy::outlier::refresh_gauges(
                &crate::policy::outlier::state_gauges(&c.name),
                &cluster.endpoints,
                health,
            );
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(maintain(Arc::downgrade(&cluster), c.idle_timeout.0));
            if let Some(hc) = &c.health_check {
                tokio::spawn(health::run(Arc::downgrade(&cluster), hc.clone()));
            }
        }
        cluster
    }

    /// Whether some endpoint may be out right now; while not, a pick costs
    /// no health check at all (one or two atomic loads).
    pub(crate) fn health_aware(&self) -> bool {
        self.outlier.as_ref().is_some_and(Detector::any_ejected)
            || self.unhealthy.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    pub(crate) fn set_unhealthy(&self, n: u32) {
        self.unhealthy
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Picks an endpoint index, or `None` when the cluster has none.
    pub fn pick(&self, headers: &HeaderMap, tried: Option<&Tried>) -> Option<usize> {
        let eps = &self.endpoints;
        if eps.is_empty() {
            return None;
        }
        let key = self.lb.hash_key(headers);
        // Read under the lock (no await here) rather than copying the list.
        let guard = tried.map(|t| t.0.lock());
        let tried: &[SocketAddr] = guard.as_deref().map_or(&[], Vec::as_slice);
        if !self.health_aware() && tried.is_empty() {
            return Some(self.lb.pick(eps, key));
        }
        let now = now_ns();
        let available = |i: usize| eps[i].health.available(now);
        let n_available = if self.health_aware() {
            (0..eps.len()).filter(|&i| available(i)).count()
        } else {
            eps.len()
        };
        // Panic mode: too few left to honour health (Envoy's panic threshold).
        let panic = n_available == 0
            || self
                .outlier
                .as_ref()
                .is_some_and(|d| d.panic(n_available, eps.len()));
        let healthy = |i: usize| panic || available(i);
        let fresh = |i: usize| healthy(i) && !tried.contains(&eps[i].addr);
        // A retry goes to an endpoint not tried yet when there is one.
        if (0..eps.len()).any(fresh) {
            Some(self.lb.pick_filtered(eps, key, &fresh))
        } else {
            Some(self.lb.pick_filtered(eps, key, &healthy))
        }
    }

    /// The upstream protocol for a request that arrived as `downstream`:
    /// `auto` keeps the caller's, except that gRPC always goes as HTTP/2
    /// (an endpoint found to speak only HTTP/1.1 is handled at the send).
    pub fn proto(&self, downstream: Proto, grpc: bool) -> Proto {
        match self.config.protocol {
            config::Protocol::Http1 => Proto::Http1,
            config::Protocol::Http2 => Proto::Http2,
            config::Protocol::Auto if grpc => Proto::Http2,
            config::Protocol::Auto => downstream,
        }
    }

    /// A TCP connection to one of the endpoints, for a CONNECT tunnel:
    /// picked as a request would be, and counted as a request and a
    /// connection of the cluster for as long as it lives.
    pub async fn connect_tcp(&self, headers: &HeaderMap) -> Result<TcpTunnel, ProxyError> {
        let request = self
            .limits
            .try_acquire(Limit::Requests)
            .ok_or(ProxyError::Overloaded {
                limit: Limit::Requests.as_str(),
            })?;
        let connection =
            self.limits
                .try_acquire(Limit::Connections)
                .ok_or(ProxyError::Overloaded {
                    limit: Limit::Connections.as_str(),
                })?;
        let idx = self
            .pick(headers, None)
            .ok_or_else(|| ProxyError::NoEndpoints(self.name.clone()))?;
        let endpoint = &self.endpoints[idx];
        if endpoint.identity().is_some() {
            // Raw bytes to a sidecar that expects mTLS would go in the clear.
            return Err(ProxyError::ConnectNotAllowed);
        }
        match endpoint.connect_tcp().await {
            Ok(stream) => Ok(TcpTunnel {
                stream,
                addr: endpoint.addr,
                _permits: (request, connection),
            }),
            Err(e) => {
                self.observe(idx, Outcome::ConnectFailure);
                Err(e.into())
            }
        }
    }

    fn observe(&self, idx: usize, outcome: Outcome) {
        if let Some(d) = &self.outlier {
            d.observe(&self.endpoints, health, idx, outcome);
        }
    }
}

/// A CONNECT tunnel's upstream side.
pub struct TcpTunnel {
    pub stream: tokio::net::TcpStream,
    pub addr: SocketAddr,
    _permits: (
        crate::policy::circuit_breaker::Permit,
        crate::policy::circuit_breaker::Permit,
    ),
}

/// Closes idle upstream connections past their timeout and reviews
/// ejections; ends with the cluster.
async fn maintain(cluster: Weak<Cluster>, idle: Duration) {
    let outlier_every = cluster
        .upgrade()
        .and_then(|c| c.outlier.as_ref().map(|d| d.interval()));
    let mut period = (idle / 2).max(Duration::from_millis(500));
    if let Some(o) = outlier_every {
        period = period.min(o);
    }
    loop {
        tokio::time::sleep(period).await;
        let Some(c) = cluster.upgrade() else { return };
        for e in &c.endpoints {
            e.sweep();
        }
        if let Some(d) = &c.outlier {
            d.sweep(&c.endpoints, health);
        }
    }
}

/// The innermost service of a route: the cluster's request limit, the
/// pick, the exchange with the endpoint, and the outcome for outlier
/// detection. The request arrives already rewritten for the upstream
/// protocol (its version says which).
#[derive(Clone)]
pub struct ClusterService {
    pub cluster: Arc<Cluster>,
}

impl tower::Service<Request<ReqBody>> for ClusterService {
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RespBody>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    /// The endpoint is picked in the future's first poll, on the polling
    /// thread, and noted there (`note_pick`): the retry layer learns where
    /// an attempt went (also one a per-try timeout then abandons) from
    /// it. Picking here in `call`, or on another task, would break that.
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let cluster = self.cluster.clone();
        crate::policy::boxed(move || async move {
            let Some(permit) = cluster.limits.try_acquire(Limit::Requests) else {
                return Err(ProxyError::Overloaded {
                    limit: Limit::Requests.as_str(),
                });
            };
            let tried = req.extensions().get::<Tried>().cloned();
            let Some(idx) = cluster.pick(req.headers(), tried.as_ref()) else {
                return Err(ProxyError::NoEndpoints(cluster.name.clone()));
            };
            let endpoint = cluster.endpoints[idx].clone();
            note_pick(endpoint.addr);
            if let Some(t) = &tried {
                t.0.lock().push(endpoint.addr);
            }
            let trail = req.extensions().get::<Arc<Trail>>().cloned();
            if let Some(t) = &trail {
                t.tried(endpoint.addr);
            }
            let mut req = req;
            let mut proto = if req.version() == http::Version::HTTP_2 {
                Proto::Http2
            } else {
                Proto::Http1
            };
            // `auto` sends HTTP/2 where the caller spoke it, but an endpoint
            // that speaks only HTTP/1.1 gets HTTP/1.1 (gRPC needs HTTP/2).
            let fallback = proto == Proto::Http2
                && cluster.config.protocol == config::Protocol::Auto
                && !crate::error::is_grpc(req.headers());
            if fallback && endpoint.http1_only(now_ns()) {
                crate::http_util::to_http1(&mut req);
                proto = Proto::Http1;
            }
            match endpoint.send(req, proto, fallback, Some(permit)).await {
                Ok(mut resp) => {
                    if let Some(t) = &trail {
                        t.answered();
                    }
                    cluster.observe(idx, Outcome::Status(resp.status().as_u16()));
                    // The proxy's own headers come from a proxy, never from an
                    // app: kept only from a mesh peer verified by mTLS (whose
                    // sidecar stripped them from its own app's responses).
                    if endpoint.identity().is_none() {
                        crate::http_util::strip_own(resp.headers_mut());
                    }
                    Ok(resp.map(RespBody::Upstream))
                }
                Err(e) => {
                    match &e {
                        // Not the endpoint's fault: nothing for outlier detection.
                        UpstreamError::Overloaded(_) => {}
                        e if e.is_client_body() => {}
                        e if e.nothing_sent() => cluster.observe(idx, Outcome::ConnectFailure),
                        _ => cluster.observe(idx, Outcome::Reset),
                    }
                    Err(e.into())
                }
            }
        })
    }
}

/// A response body on its way downstream: streamed from upstream, or made here.
#[derive(Debug)]
pub enum RespBody {
    Upstream(PooledBody),
    Bytes(Option<Bytes>),
}

impl RespBody {
    /// The upstream address that served this response (none for an answer
    /// the proxy made itself). Read off the body rather than an extension:
    /// the first extension costs a response three allocations.
    pub fn served_by(&self) -> Option<SocketAddr> {
        match self {
            RespBody::Upstream(b) => Some(b.endpoint_addr()),
            RespBody::Bytes(_) => None,
        }
    }
    pub fn text(s: impl Into<Bytes>) -> Self {
        RespBody::Bytes(Some(s.into()))
    }
    pub fn empty() -> Self {
        RespBody::Bytes(None)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            RespBody::Bytes(b) => Poll::Ready(take_data(b).map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(b) => b.is_end_stream(),
            RespBody::Bytes(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(b) => b.size_hint(),
            RespBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
