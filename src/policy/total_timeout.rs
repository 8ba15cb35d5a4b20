//! Total timeout: bounds the whole exchange, response body included. The
//! route `timeout` ends at the response head (so that a long download or a
//! gRPC stream is not cut by a timeout meant for the answer to start); a
//! route that must bound everything sets `total_timeout` too. Before the
//! head it fires `ProxyError::Timeout` (504 / `grpc-status: 4`); after it,
//! the response body carries the deadline and the stream is reset (HTTP/2
//! RST_STREAM, HTTP/1 close) when it passes.

use super::PolicyFuture;
use crate::balance::RespBody;
use crate::error::{ProxyError, TimeoutKind};
use http::{Request, Response};
use prometheus::IntCounter;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// The timeout and its counter, present only where a total timeout is set:
/// a route without one clones and drops nothing for it per request.
#[derive(Clone)]
pub struct TotalTimeoutLayer {
    armed: Option<(Duration, IntCounter)>,
}

impl TotalTimeoutLayer {
    pub fn new(after: Option<Duration>, route: &str) -> Self {
        TotalTimeoutLayer {
            armed: after.map(|after| {
                let fired = crate::telemetry::metrics()
                    .timeouts
                    .with_label_values(&[route, TimeoutKind::Total.as_str()]);
                (after, fired)
            }),
        }
    }
}

impl<S> tower::Layer<S> for TotalTimeoutLayer {
    type Service = TotalTimeout<S>;
    fn layer(&self, inner: S) -> TotalTimeout<S> {
        TotalTimeout {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TotalTimeout<S> {
    inner: S,
    layer: TotalTimeoutLayer,
}

impl<S, B> tower::Service<Request<B>> for TotalTimeout<S>
where
    S: tower::Service<Request<B>, Response = Response<RespBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future, Result<Response<RespBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((after, fired)) = &self.layer.armed else {
            return PolicyFuture::direct(self.inner.call(req));
        };
        let after = *after;
        let deadline = Instant::now() + after;
        let fired = fired.clone();
        let inner = self.inner.call(req);
        PolicyFuture::boxed(move || async move {
            match tokio::time::timeout_at(deadline, inner).await {
                Ok(Ok(mut resp)) => {
                    if let RespBody::Upstream(b) = resp.body_mut() {
                        b.set_deadline(deadline, fired);
                    }
                    Ok(resp)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    fired.inc();
                    Err(ProxyError::Timeout {
                        kind: TimeoutKind::Total,
                        after,
                    })
                }
            }
        })
    }
}
