//! Trace layer: reads the caller's trace context (W3C or B3), starts a
//! trace when there is none (head sampling per listener, the caller's
//! sampled flag honoured), writes this proxy's span as the parent for the
//! next hop, and when the request is answered queues the span for export.
//! The trace id travels back in the response's extensions to the access
//! log.
//!
//! It sits between the metrics layer and the error layer, so the span sees
//! the final status (proxy errors included) and the route that served it.

use crate::config::Role;
use crate::context::RouteMeta;
use crate::telemetry::metrics;
use crate::telemetry::trace::{self, AttrValue, Context as TraceContext, Finished, Tracer};
use http::{Request, Response};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

#[derive(Clone)]
pub struct TraceLayer {
    listener: Arc<str>,
    kind: SpanKind,
    peer: Option<Arc<str>>,
}

impl TraceLayer {
    pub fn new(listener: &str, role: Role, peer: Option<Arc<str>>) -> Self {
        TraceLayer {
            listener: listener.into(),
            // A sidecar's outbound hop is the client side of the call; the
            // inbound side and the gateway serve it.
            kind: match role {
                Role::Outbound => SpanKind::Client,
                _ => SpanKind::Server,
            },
            peer,
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

/// A request being traced.
struct Pending {
    tracer: Arc<Tracer>,
    ctx: TraceContext,
    parent: Option<[u8; 8]>,
    start: SystemTime,
    /// Captured only for spans that are exported.
    request: Option<(http::Method, String)>,
}

impl<S, B, RB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(tracer) = trace::tracer() else {
            return TraceFuture {
                inner: self.inner.call(req),
                pending: None,
                layer: None,
            };
        };
        let incoming = trace::read(req.headers());
        if incoming.invalid {
            metrics().trace_context_invalid.inc();
        }
        let sampled = match (&incoming.parent, incoming.sampled_hint) {
            (Some(p), _) => p.sampled,
            (None, Some(hint)) => hint,
            (None, None) => tracer.sample(&self.layer.listener),
        };
        let ctx = trace::child(incoming.parent.as_ref(), sampled);
        trace::write(
            req.headers_mut(),
            &ctx,
            incoming.format,
            incoming.parent.as_ref(),
        );
        let request = (sampled && tracer.exports())
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let pending = Pending {
            tracer,
            ctx,
            parent: incoming.parent.map(|p| p.span_id),
            start: SystemTime::now(),
            request,
        };
        TraceFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
            layer: Some(self.layer.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
        layer: Option<TraceLayer>,
    }
}

impl<F, RB, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(out) => out,
        };
        if let (Some(p), Some(layer), Ok(resp)) =
            (this.pending.take(), this.layer.as_ref(), out.as_mut())
        {
            resp.extensions_mut().insert(p.ctx);
            if let Some((method, path)) = p.request {
                let meta = resp.extensions().get::<RouteMeta>();
                let stats = meta.and_then(|m| m.stats.as_deref());
                let route = stats.map_or("", |s| s.route());
                let status = resp.status().as_u16();
                let attempts = resp
                    .headers()
                    .get(&crate::error::ATTEMPTS_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                    .unwrap_or(1);
                let mut attributes = vec![
                    (
                        "outrigger.listener",
                        AttrValue::Str(layer.listener.to_string()),
                    ),
                    ("outrigger.route", AttrValue::Str(route.to_string())),
                    (
                        "outrigger.cluster",
                        AttrValue::Str(stats.map_or("", |s| s.cluster()).to_string()),
                    ),
                    ("http.request.method", AttrValue::Str(method.to_string())),
                    ("url.path", AttrValue::Str(path)),
                    (
                        "http.response.status_code",
                        AttrValue::Int(i64::from(status)),
                    ),
                    ("outrigger.attempts", AttrValue::Int(i64::from(attempts))),
                ];
                if let Some(up) = meta.and_then(|m| m.upstream) {
                    attributes.push(("server.address", AttrValue::Str(up.to_string())));
                }
                if let Some(e) = meta.and_then(|m| m.error) {
                    attributes.push(("error.type", AttrValue::Str(e.to_string())));
                }
                if let Some(peer) = &layer.peer {
                    attributes.push(("outrigger.peer", AttrValue::Str(peer.to_string())));
                }
                p.tracer.finish(Finished {
                    ctx: p.ctx,
                    parent: p.parent,
                    name: if route.is_empty() {
                        format!("{} {method}", layer.listener)
                    } else {
                        format!("{} {route}", layer.listener)
                    },
                    kind: layer.kind,
                    start: p.start,
                    end: SystemTime::now(),
                    attributes,
                    retries: attempts.saturating_sub(1),
                    error: status >= 500,
                });
            }
        }
        Poll::Ready(out)
    }
}
