//! Typed errors of the request path, shared by every layer: what went
//! wrong, the status and reason each maps to, and the header names the
//! proxy answers with. Ground floor: imports no module of the request path,
//! so `policy/` and `balance/` use it without reaching up into `proxy/`.
//! Turning an error into a response happens in one place, `proxy::error`.

use http::StatusCode;
use std::net::SocketAddr;
use std::time::Duration;

pub const REASON: &str = "x-outrigger-reason";
pub const ATTEMPTS: &str = "x-outrigger-attempts";
/// The same, ready-made: written on every answer of a retried route.
pub static ATTEMPTS_HEADER: http::HeaderName = http::HeaderName::from_static(ATTEMPTS);
/// The time the caller still waits, in milliseconds: told to the next hop
/// and the app, so nobody works on a request nobody waits for.
pub const EXPECTED_TIMEOUT: &str = "x-outrigger-expected-timeout-ms";
/// The same, ready to use: a `&str` name is parsed (and a custom one
/// copied) on every lookup and insert, twice per request on a route with
/// both timeouts.
pub static EXPECTED_TIMEOUT_HEADER: http::HeaderName =
    http::HeaderName::from_static(EXPECTED_TIMEOUT);
/// `grpc-status`, ready-made: read on every response of a retried route.
pub static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
pub const OVERLOADED: &str = "x-outrigger-overloaded";

/// True for gRPC requests (`content-type: application/grpc*`).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Which circuit-breaker limit a request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Pending => "pending",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
        }
    }
}

/// Why a request could not be sent upstream or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("mTLS to {addr} failed ({result}): {detail}")]
    Tls {
        addr: SocketAddr,
        /// A bounded label: identity-mismatch, untrusted, expired, timeout, malformed.
        result: &'static str,
        detail: String,
    },
    #[error("{addr} does not speak HTTP/2: it answered the HTTP/2 connection preface {answer}")]
    NotHttp2 {
        addr: SocketAddr,
        answer: &'static str,
    },
    #[error("upstream {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{} limit reached", .0.as_str())]
    Overloaded(Limit),
}

impl UpstreamError {
    /// No byte of the request was sent: a failed mTLS handshake, a refused
    /// HTTP/2 preface, or a connection that was never made.
    pub fn nothing_sent(&self) -> bool {
        self.is_connect()
            || matches!(
                self,
                UpstreamError::Tls { .. } | UpstreamError::NotHttp2 { .. }
            )
    }

    /// True when nothing reached the upstream application.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. }
        )
    }

    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Request { source, .. } = self else {
            return false;
        };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cur {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cur = e.source();
        }
        false
    }

    /// The request body failed (the client stalled or went away): the
    /// client's fault, not the endpoint's.
    pub fn is_client_body(&self) -> bool {
        matches!(self, UpstreamError::Request { source, .. } if source.is_user())
    }

    /// The client's body stalled past the stream idle timeout.
    pub fn is_client_stall(&self) -> bool {
        let UpstreamError::Request { source, .. } = self else {
            return false;
        };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cur {
            if e.is::<crate::body::StreamIdle>() {
                return true;
            }
            cur = e.source();
        }
        false
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            UpstreamError::Connect { addr, .. }
            | UpstreamError::ConnectTimeout { addr, .. }
            | UpstreamError::Handshake { addr, .. }
            | UpstreamError::NotHttp2 { addr, .. }
            | UpstreamError::Tls { addr, .. }
            | UpstreamError::Request { addr, .. } => *addr,
            UpstreamError::Overloaded(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

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
    #[error("request has more than one Host header")]
    DuplicateHost,
    #[error("the Host header disagrees with the request's :authority")]
    ConflictingHost,
    #[error("the request's host is not a valid authority")]
    BadHost,
    #[error("the request path has encoded slashes or dot segments that cannot be made canonical")]
    BadPath,
    #[error("request header list over {limit} bytes")]
    HeaderTooLarge { limit: usize },
    #[error("request has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("the listener's tunnel limit ({limit}) is reached")]
    TooManyTunnels { limit: u32 },
    #[error("CONNECT is not allowed on this route")]
    ConnectNotAllowed,
    #[error("the upstream switched protocols although the request did not ask to")]
    UnexpectedUpgrade,
    #[error("not authorized")]
    Unauthorized,
    #[error("redirected to {location}")]
    Redirect { status: u16, location: String },
    #[error("listener is being removed")]
    ListenerGone,
    #[error("{} timeout after {after:?}", kind.as_str())]
    Timeout { kind: TimeoutKind, after: Duration },
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
    /// The whole exchange, response body included.
    Total,
}

impl TimeoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Route => "route",
            TimeoutKind::PerTry => "per-try",
            TimeoutKind::Total => "total",
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
            ProxyError::Upstream(UpstreamError::Tls { .. }) => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(e) if e.is_connect() => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConflictingFraming
            | ProxyError::MissingHost
            | ProxyError::DuplicateHost
            | ProxyError::ConflictingHost
            | ProxyError::BadHost
            | ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::HeaderTooLarge { .. } | ProxyError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::TooManyTunnels { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnexpectedUpgrade => StatusCode::BAD_GATEWAY,
            ProxyError::Unauthorized => StatusCode::FORBIDDEN,
            ProxyError::Redirect { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND)
            }
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
            ProxyError::Timeout {
                kind: TimeoutKind::Total,
                ..
            } => "total-timeout",
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
            ProxyError::Upstream(UpstreamError::NotHttp2 { .. }) => "protocol-mismatch",
            ProxyError::Upstream(UpstreamError::Tls {
                result: "identity-mismatch",
                ..
            }) => "identity-mismatch",
            ProxyError::Upstream(UpstreamError::Tls { .. }) => "upstream-tls",
            ProxyError::Upstream(UpstreamError::Request { .. }) => "upstream-reset",
            ProxyError::Upstream(UpstreamError::Overloaded(_)) => "overloaded",
            ProxyError::ConflictingFraming => "conflicting-framing",
            ProxyError::MissingHost => "missing-host",
            ProxyError::DuplicateHost => "duplicate-host",
            ProxyError::ConflictingHost => "conflicting-host",
            ProxyError::BadHost => "bad-host",
            ProxyError::BadPath => "bad-path",
            ProxyError::HeaderTooLarge { .. } => "header-too-large",
            ProxyError::TooManyHeaders { .. } => "too-many-headers",
            ProxyError::TooManyTunnels { .. } => "too-many-tunnels",
            ProxyError::ConnectNotAllowed => "connect-not-allowed",
            ProxyError::UnexpectedUpgrade => "unexpected-upgrade",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Redirect { .. } => "redirect",
            ProxyError::ListenerGone => "listener-gone",
        }
    }

    /// gRPC status code (grpc/doc/statuscodes.md) for the same failure.
    pub fn grpc_status(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "12",
            StatusCode::FORBIDDEN => "7",
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

    /// The upstream endpoint the error happened with, if one was involved.
    pub fn upstream(&self) -> Option<SocketAddr> {
        match self.root() {
            ProxyError::Upstream(UpstreamError::Overloaded(_)) => None,
            ProxyError::Upstream(u) => Some(u.addr()),
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
