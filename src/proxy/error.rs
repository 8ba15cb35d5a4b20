//! The one place where a proxy error becomes the response the client sees:
//! HTTP status and `x-outrigger-reason`, or for gRPC requests a
//! trailers-only response with `grpc-status`, which gRPC clients can read
//! where an HTTP 503 would only surface as a protocol error.

use crate::balance::UpstreamError;
use crate::body::RespBody;
use crate::proxy::RouteMeta;
use http::{HeaderValue, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub const REASON: &str = "x-outrigger-reason";
pub const ATTEMPTS: &str = "x-outrigger-attempts";
pub const OVERLOADED: &str = "x-outrigger-overloaded";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("cluster {0} has no endpoints")]
    NoEndpoints(String),
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("request carries both content-length and transfer-encoding")]
    ConflictingFraming,
    #[error("request has no host")]
    MissingHost,
    #[error("listener is being removed")]
    ListenerGone,
    #[error("{} timeout after {after:?}", kind.as_str())]
    Timeout {
        kind: TimeoutKind,
        after: std::time::Duration,
    },
    #[error("circuit breaker open: {limit} limit reached")]
    Overloaded { limit: &'static str },
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("fault injected: abort with {status}")]
    FaultAbort { status: u16 },
    #[error("request head not received in time")]
    HeaderTimeout,
    #[error("the request body stalled past the stream idle timeout")]
    ClientStalled,
    #[error("reading the request body failed: {0}")]
    ClientBody(crate::body::BoxError),
    #[error("{last} (after {attempts} attempts)")]
    Attempts {
        attempts: u32,
        last: Box<ProxyError>,
    },
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Overloaded(l) => ProxyError::Overloaded { limit: l.as_str() },
            e if e.is_client_stall() => ProxyError::ClientStalled,
            e if e.is_client_body() => ProxyError::ClientBody(Box::new(e)),
            e => ProxyError::Upstream(e),
        }
    }
}

/// Which timeout fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// The route timeout (or a shorter `grpc-timeout`), across retries.
    Route,
    /// One attempt.
    PerTry,
}

impl TimeoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Route => "route",
            TimeoutKind::PerTry => "per-try",
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Attempts { last, .. } => last.status(),
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::FaultAbort { status } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientStalled => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints(_) | ProxyError::ListenerGone => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(e) if e.is_connect() => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConflictingFraming | ProxyError::MissingHost => StatusCode::BAD_REQUEST,
        }
    }

    /// Short, stable token for the reason header, logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Attempts { last, .. } => last.reason(),
            ProxyError::Timeout {
                kind: TimeoutKind::Route,
                ..
            } => "timeout",
            ProxyError::Timeout {
                kind: TimeoutKind::PerTry,
                ..
            } => "per-try-timeout",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::HeaderTimeout => "header-timeout",
            ProxyError::ClientBody(_) => "client-body-error",
            ProxyError::ClientStalled => "client-stalled",
            ProxyError::NoRoute => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Upstream(UpstreamError::Connect { .. }) => "connect-failure",
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => "connect-timeout",
            ProxyError::Upstream(UpstreamError::Handshake { .. }) => "upstream-handshake",
            ProxyError::Upstream(UpstreamError::Request { .. }) => "upstream-reset",
            ProxyError::Upstream(UpstreamError::Overloaded(_)) => "overloaded",
            ProxyError::ConflictingFraming => "conflicting-framing",
            ProxyError::MissingHost => "missing-host",
            ProxyError::ListenerGone => "listener-gone",
        }
    }

    /// gRPC status code (grpc/doc/statuscodes.md) for the same failure.
    fn grpc_status(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "12",
            StatusCode::BAD_REQUEST => "13",
            StatusCode::GATEWAY_TIMEOUT => "4",
            StatusCode::TOO_MANY_REQUESTS => "8",
            _ => "14",
        }
    }

    /// Attempts made, when a retry policy was involved.
    pub fn attempts(&self) -> Option<u32> {
        match self {
            ProxyError::Attempts { attempts, .. } => Some(*attempts),
            _ => None,
        }
    }

    /// The error of the last attempt.
    pub fn root(&self) -> &ProxyError {
        match self {
            ProxyError::Attempts { last, .. } => last.root(),
            e => e,
        }
    }
}

/// An error together with what was known of the route when it happened.
#[derive(Debug)]
pub struct Routed {
    pub error: ProxyError,
    pub meta: Option<RouteMeta>,
}

impl From<ProxyError> for Routed {
    fn from(error: ProxyError) -> Self {
        Routed { error, meta: None }
    }
}

pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Builds the response for `err`.
pub fn to_response(err: &ProxyError, grpc: bool) -> Response<RespBody> {
    let mut r = body_response(err, grpc);
    let h = r.headers_mut();
    if let Some(n) = err.attempts() {
        h.insert(ATTEMPTS, HeaderValue::from(n));
    }
    match err.root() {
        ProxyError::Overloaded { .. } => {
            h.insert(OVERLOADED, HeaderValue::from_static("true"));
        }
        ProxyError::RateLimited { retry_after_secs } => {
            h.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(*retry_after_secs),
            );
        }
        _ => {}
    }
    r
}

fn body_response(err: &ProxyError, grpc: bool) -> Response<RespBody> {
    let reason = HeaderValue::from_static(err.reason());
    if grpc {
        let mut r = Response::new(RespBody::empty());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(err.grpc_status()));
        h.insert("grpc-message", reason.clone());
        h.insert(REASON, reason);
        return r;
    }
    let mut r = Response::new(RespBody::text(format!("{}\n", err)));
    *r.status_mut() = err.status();
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    h.insert(REASON, reason);
    r
}

/// Layer that turns `Err(Routed)` from the inner service into a response.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorLayer;

impl<S> tower::Layer<S> for ErrorLayer {
    type Service = ErrorService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ErrorService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ErrorService<S>
where
    S: tower::Service<http::Request<B>, Response = Response<RespBody>, Error = Routed>,
{
    type Response = Response<RespBody>;
    type Error = std::convert::Infallible;
    type Future = ErrorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        ErrorFuture {
            inner: self.inner.call(req),
            grpc,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ErrorFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
    }
}

impl<F> Future for ErrorFuture<F>
where
    F: Future<Output = Result<Response<RespBody>, Routed>>,
{
    type Output = Result<Response<RespBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(r)) => Poll::Ready(Ok(r)),
            Poll::Ready(Err(Routed { error, meta })) => {
                tracing::debug!(error = %error, "request failed");
                let mut r = to_response(&error, *this.grpc);
                if let Some(mut meta) = meta {
                    meta.error = Some(error.reason());
                    r.extensions_mut().insert(meta);
                } else {
                    r.extensions_mut().insert(RouteMeta::failed(error.reason()));
                }
                Poll::Ready(Ok(r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_reasons() {
        let e = ProxyError::Upstream(UpstreamError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        let r = to_response(&e, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[REASON], "connect-failure");
        assert_eq!(to_response(&ProxyError::NoRoute, false).status(), 404);
        assert_eq!(
            to_response(&ProxyError::ConflictingFraming, false).status(),
            400
        );
    }

    #[test]
    fn grpc_gets_trailers_only() {
        let r = to_response(&ProxyError::NoEndpoints("c".into()), true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[REASON], "no-endpoints");
        assert_eq!(
            to_response(&ProxyError::NoRoute, true).headers()["grpc-status"],
            "12"
        );
    }
}
