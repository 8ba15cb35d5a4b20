//! What a request carries down the stack and back up: the route's metric
//! labels, the upstream that served it, and what went wrong. Ground floor:
//! the proxy fills it in, the metrics layer reads it.

use crate::telemetry::RouteStats;
use std::net::SocketAddr;
use std::sync::Arc;

/// What the request path knows of the route that served a request; carried
/// in the response's extensions to the metrics layer.
#[derive(Clone, Debug, Default)]
pub struct RouteMeta {
    pub stats: Option<Arc<RouteStats>>,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    /// The full error text, for the access log (never sent to a client
    /// unless the listener asks for it).
    pub detail: Option<Box<str>>,
    /// The `x-request-id` the request went on with (the client's, or ours).
    pub request_id: Option<http::HeaderValue>,
}

impl RouteMeta {
    pub fn failed(reason: &'static str) -> Self {
        RouteMeta {
            error: Some(reason),
            ..Default::default()
        }
    }
}
