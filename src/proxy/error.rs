//! The one place where a proxy error becomes the response the client sees:
//! HTTP status and `x-outrigger-reason`, or for gRPC requests a
//! trailers-only response with `grpc-status`, which gRPC clients can read
//! where an HTTP 503 would only surface as a protocol error.

use crate::balance::RespBody;
use crate::context::RouteMeta;
pub use crate::error::{
    ATTEMPTS, OVERLOADED, ProxyError, REASON, TimeoutKind, UpstreamError, is_grpc,
};
use http::{HeaderValue, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// An error together with what was known of the route when it happened.
#[derive(Debug)]
pub struct Routed {
    pub error: ProxyError,
    /// Boxed: errors are the rare path, and a small `Result` keeps every
    /// request's future small.
    pub meta: Option<Box<RouteMeta>>,
}

impl Routed {
    pub fn with(error: ProxyError, meta: RouteMeta) -> Self {
        Routed {
            error,
            meta: Some(Box::new(meta)),
        }
    }
}

impl From<ProxyError> for Routed {
    fn from(error: ProxyError) -> Self {
        Routed { error, meta: None }
    }
}

/// Builds the response for `err`. The body says only the reason (the
/// `x-outrigger-reason` token): addresses and library errors stay in the
/// logs, unless the listener asks for `detail` (debugging).
pub fn to_response(err: &ProxyError, grpc: bool, detail: bool) -> Response<RespBody> {
    let mut r = body_response(err, grpc, detail);
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
        ProxyError::Redirect { location, .. } => {
            if let Ok(v) = HeaderValue::from_str(location) {
                h.insert(http::header::LOCATION, v);
            }
        }
        ProxyError::ConnectNotAllowed => {
            h.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
        }
        // The request's framing cannot be trusted: nothing more is read from
        // this connection.
        ProxyError::ConflictingFraming => {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    r
}

fn body_response(err: &ProxyError, grpc: bool, detail: bool) -> Response<RespBody> {
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
    let body = if detail {
        RespBody::text(format!("{err}\n"))
    } else {
        RespBody::text(format!("{}\n", err.reason()))
    };
    let mut r = Response::new(body);
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
pub struct ErrorLayer {
    detail: bool,
}

impl ErrorLayer {
    pub fn new(detail: bool) -> Self {
        ErrorLayer { detail }
    }
}

impl<S> tower::Layer<S> for ErrorLayer {
    type Service = ErrorService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorService {
            inner,
            detail: self.detail,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ErrorService<S> {
    inner: S,
    detail: bool,
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
            detail: self.detail,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ErrorFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
        detail: bool,
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
                let mut r = to_response(&error, *this.grpc, *this.detail);
                let mut meta = meta.map(|m| *m).unwrap_or_default();
                meta.error = Some(error.reason());
                // The whole story for the access log; the client got the reason.
                meta.detail = Some(error.to_string().into());
                if meta.upstream.is_none() {
                    meta.upstream = error.upstream();
                }
                r.extensions_mut().insert(meta);
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
        let r = to_response(&e, false, false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[REASON], "connect-failure");
        assert_eq!(
            to_response(&ProxyError::NoRoute, false, false).status(),
            404
        );
        assert_eq!(
            to_response(&ProxyError::ConflictingFraming, false, false).status(),
            400
        );
    }

    #[test]
    fn grpc_gets_trailers_only() {
        let r = to_response(&ProxyError::NoEndpoints("c".into()), true, false);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[REASON], "no-endpoints");
        assert_eq!(
            to_response(&ProxyError::NoRoute, true, false).headers()["grpc-status"],
            "12"
        );
    }
}
