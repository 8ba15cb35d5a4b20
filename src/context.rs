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

/// What the attempts of one request leave for its access-log line: the
/// endpoint last tried (also when that attempt then timed out, which
/// leaves no response to say where it went) and when the last response
/// head arrived from upstream. On the request only while a log line or a
/// tap will read it: most requests of a quiet sidecar pay nothing.
#[derive(Debug)]
pub struct Trail {
    start: tokio::time::Instant,
    upstream: parking_lot::Mutex<Option<SocketAddr>>,
    /// Microseconds from `start` to the response head, plus one (0: none).
    head_us: std::sync::atomic::AtomicU64,
}

impl Trail {
    pub fn new(start: tokio::time::Instant) -> Arc<Trail> {
        Arc::new(Trail {
            start,
            upstream: parking_lot::Mutex::new(None),
            head_us: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// An attempt is going to `addr`.
    pub fn tried(&self, addr: SocketAddr) {
        *self.upstream.lock() = Some(addr);
        // A first byte is that of the endpoint tried last, if it answers.
        self.head_us.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The attempt's response head has arrived.
    pub fn answered(&self) {
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.head_us
            .store(us + 1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn upstream(&self) -> Option<SocketAddr> {
        *self.upstream.lock()
    }

    /// From the request's arrival to the first byte of the upstream's
    /// answer (Envoy's `%RESPONSE_DURATION%`); none if no answer came.
    pub fn to_first_byte(&self) -> Option<std::time::Duration> {
        match self.head_us.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(std::time::Duration::from_micros(n - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_trail_keeps_the_last_endpoint_and_the_time_to_its_answer() {
        let t = Trail::new(tokio::time::Instant::now());
        assert_eq!((t.upstream(), t.to_first_byte()), (None, None));
        t.tried("127.0.0.1:1".parse().unwrap());
        t.answered();
        t.tried("127.0.0.1:2".parse().unwrap());
        // The retry has not answered (yet): no first byte to show.
        assert_eq!(t.to_first_byte(), None);
        tokio::time::advance(std::time::Duration::from_millis(7)).await;
        t.answered();
        assert_eq!(t.upstream(), Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(t.to_first_byte(), Some(std::time::Duration::from_millis(7)));
    }
}
