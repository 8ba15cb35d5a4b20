//! Metrics and access-log layer: counts every answered request by route,
//! cluster and status, observes its latency to the response head, and
//! writes the access-log line when the listener asks for one.
//!
//! It sits outside the error layer, so it sees the final status of every
//! request, proxy errors included. Label sets come pre-resolved in the
//! response's `RouteMeta`; requests without one use the listener's.

use crate::context::{RouteMeta, Trail};
use crate::telemetry::RouteStats;
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// What the layer knows of its listener: its name, whether it writes an
/// access log, and the labels of requests that matched no route.
pub struct ListenerScope {
    pub name: String,
    pub access_log: bool,
    pub unmatched: Arc<RouteStats>,
}

#[derive(Clone)]
pub struct MetricsLayer {
    listener: Arc<ListenerScope>,
    /// The connection's verified peer identity (mTLS), for the access log.
    peer: Option<Arc<str>>,
    /// The connection's client address, for the access log.
    client: std::net::SocketAddr,
}

impl MetricsLayer {
    pub fn new(
        listener: Arc<ListenerScope>,
        peer: Option<Arc<str>>,
        client: std::net::SocketAddr,
    ) -> Self {
        MetricsLayer {
            listener,
            peer,
            client,
        }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Metrics {
            inner,
            listener: self.listener.clone(),
            peer: self.peer.clone(),
            client: self.client,
        }
    }
}

#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    listener: Arc<ListenerScope>,
    peer: Option<Arc<str>>,
    client: std::net::SocketAddr,
}

/// Access-log flags: what went wrong (`timeout`, `circuit_open`, ...) and `retry`.
fn flags(error: Option<&'static str>, attempts: u32) -> String {
    let mut f = String::new();
    if let Some(e) = error {
        f.push_str(if e == "overloaded" { "circuit_open" } else { e });
    }
    if attempts > 1 {
        if !f.is_empty() {
            f.push(',');
        }
        f.push_str("retry");
    }
    f
}

/// What the access log needs of the request, captured before it moves on.
struct Access {
    trail: Arc<Trail>,
    method: http::Method,
    authority: Option<String>,
    path: String,
    peer: Option<Arc<str>>,
    client: std::net::SocketAddr,
    version: http::Version,
    user_agent: Option<http::HeaderValue>,
    /// The declared length (`content-length`), when there is one.
    request_bytes: Option<u64>,
}

fn declared_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

impl<S, B, RB> tower::Service<Request<B>> for Metrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let tapping = crate::telemetry::tap::active();
        let start = Instant::now();
        let access = (self.listener.access_log || tapping).then(|| Access {
            trail: {
                let t = Trail::new(start);
                req.extensions_mut().insert(t.clone());
                t
            },
            method: req.method().clone(),
            authority: crate::http_util::authority(&req).map(str::to_owned),
            path: req.uri().path().to_owned(),
            peer: self.peer.clone(),
            client: self.client,
            version: req.version(),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            request_bytes: declared_length(req.headers()),
        });
        MetricsFuture {
            inner: self.inner.call(req),
            start,
            listener: self.listener.clone(),
            access,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        listener: Arc<ListenerScope>,
        access: Option<Access>,
    }
}

impl<F, RB, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(out) => out,
        };
        if let Ok(resp) = &out {
            let elapsed = this.start.elapsed();
            let meta = resp.extensions().get::<RouteMeta>();
            let stats: &RouteStats = meta
                .and_then(|m| m.stats.as_deref())
                .unwrap_or(&this.listener.unmatched);
            let status = resp.status().as_u16();
            stats.record(status, elapsed.as_secs_f64());
            if let Some(a) = this.access.take() {
                let trace_id = resp
                    .extensions()
                    .get::<crate::telemetry::trace::Context>()
                    .map(|c| c.trace_hex())
                    .unwrap_or_default();
                // The upstream that answered, else the one last tried (a
                // timed-out attempt leaves no response naming it).
                let upstream = meta
                    .and_then(|m| m.upstream)
                    .or_else(|| a.trail.upstream())
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if crate::telemetry::tap::active() {
                    crate::telemetry::tap::publish(crate::telemetry::tap::Event {
                        listener: this.listener.name.clone(),
                        method: a.method.to_string(),
                        authority: a.authority.clone().unwrap_or_default(),
                        path: a.path.clone(),
                        route: stats.route().to_string(),
                        status,
                        duration_ms: elapsed.as_secs_f64() * 1e3,
                        upstream: upstream.clone(),
                        peer: a.peer.as_deref().unwrap_or("").to_string(),
                        trace_id: trace_id.clone(),
                    });
                }
                if !this.listener.access_log {
                    return Poll::Ready(out);
                }
                let attempts = resp
                    .headers()
                    .get(&crate::error::ATTEMPTS_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                    .unwrap_or(1);
                tracing::info!(
                    target: "outrigger::access",
                    listener = %this.listener.name,
                    method = %a.method,
                    authority = a.authority.as_deref().unwrap_or(""),
                    path = %a.path,
                    route = stats.route(),
                    cluster = stats.cluster(),
                    status,
                    duration_ms = elapsed.as_secs_f64() * 1e3,
                    upstream,
                    upstream_ttfb_ms = a.trail.to_first_byte().map(|d| d.as_secs_f64() * 1e3),
                    attempts,
                    flags = %flags(meta.and_then(|m| m.error), attempts),
                    error = meta.and_then(|m| m.detail.as_deref()).unwrap_or(""),
                    peer = a.peer.as_deref().unwrap_or(""),
                    trace_id,
                    client = %a.client,
                    request_id = meta
                        .and_then(|m| m.request_id.as_ref())
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    protocol = ?a.version,
                    user_agent = a
                        .user_agent
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    request_bytes = a.request_bytes,
                    response_bytes = declared_length(resp.headers()),
                    "access"
                );
            }
        }
        Poll::Ready(out)
    }
}
