//! Circuit breaking: per-cluster limits on connections, pending requests,
//! requests in flight and retries in flight. Over a limit, a request is
//! refused at once (503, `x-outrigger-overloaded: true`); nothing queues
//! beyond the pending limit.
//!
//! One meaning for HTTP/1 and HTTP/2: `max_requests` counts requests, never
//! connections, so an HTTP/2 cluster multiplexing a thousand streams over
//! one connection trips it exactly as an HTTP/1 cluster would.
//!
//! The limits are checked where the work happens, not in a tower layer of
//! their own: a request's permit must live until its response body ends,
//! and only the endpoint's body owns that moment. The balancer takes the
//! request permit, the retry layer the retry permit, the pool the
//! connection and pending ones.

use crate::config;
pub use crate::error::Limit;
use prometheus::IntCounter;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::AcqRel};

pub struct Limits {
    max: [u32; 4],
    used: [AtomicU32; 4],
    rejected: [IntCounter; 4],
    /// Told when a connection permit is given back, for requests waiting
    /// for a connection.
    freed: tokio::sync::Notify,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("max", &self.max).finish()
    }
}

const ALL: [Limit; 4] = [
    Limit::Connections,
    Limit::Pending,
    Limit::Requests,
    Limit::Retries,
];

impl Limits {
    pub fn new(cfg: &config::CircuitBreaker, cluster: &str) -> Arc<Limits> {
        let m = crate::telemetry::metrics();
        Arc::new(Limits {
            max: [
                cfg.max_connections,
                cfg.max_pending,
                cfg.max_requests,
                cfg.max_retries,
            ],
            used: Default::default(),
            rejected: ALL.map(|l| m.cb_rejections.with_label_values(&[cluster, l.as_str()])),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Takes one unit of `limit`, or counts a rejection and returns `None`.
    pub fn try_acquire(self: &Arc<Self>, limit: Limit) -> Option<Permit> {
        let i = limit as usize;
        let prev = self.used[i].fetch_add(1, AcqRel);
        if prev >= self.max[i] {
            self.used[i].fetch_sub(1, AcqRel);
            self.rejected[i].inc();
            return None;
        }
        Some(Permit {
            limits: self.clone(),
            limit,
        })
    }

    /// Whether a unit of `limit` is free, without taking it.
    pub fn has_room(&self, limit: Limit) -> bool {
        let i = limit as usize;
        self.used[i].load(std::sync::atomic::Ordering::Acquire) < self.max[i]
    }

    /// Resolves once a connection permit is given back.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    pub fn used(&self, limit: Limit) -> u32 {
        self.used[limit as usize].load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One unit of a limit, given back on drop.
pub struct Permit {
    limits: Arc<Limits>,
    limit: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.used[self.limit as usize].fetch_sub(1, AcqRel);
        if self.limit == Limit::Connections {
            self.limits.freed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.limit.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_one_over_the_limit_and_frees_on_drop() {
        let cfg = config::CircuitBreaker {
            max_connections: 1,
            max_pending: 1,
            max_requests: 2,
            max_retries: 0,
        };
        let l = Limits::new(&cfg, "cb-test");
        let a = l.try_acquire(Limit::Requests).unwrap();
        let _b = l.try_acquire(Limit::Requests).unwrap();
        assert!(l.try_acquire(Limit::Requests).is_none());
        assert_eq!(l.used(Limit::Requests), 2);
        drop(a);
        assert!(l.try_acquire(Limit::Requests).is_some());
        assert!(
            l.try_acquire(Limit::Retries).is_none(),
            "max_retries 0 allows none"
        );
        let m = crate::telemetry::metrics()
            .cb_rejections
            .with_label_values(&["cb-test", "requests"])
            .get();
        assert_eq!(m, 1);
    }
}
