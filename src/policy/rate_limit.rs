//! Local rate limiting: a token bucket per route (this layer) and per
//! listener (checked by the listener before routing). Over the limit →
//! `ProxyError::RateLimited` → 429 with `retry-after`.

use super::PolicyFuture;
use crate::config;
use crate::error::ProxyError;
use http::Request;
use parking_lot::Mutex;
use prometheus::IntCounter;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Token bucket refilled continuously at `rate` per second up to `burst`.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
    limited: IntCounter,
}

impl TokenBucket {
    pub fn new(cfg: &config::RateLimit, scope: &str, name: &str) -> Arc<Self> {
        let burst = f64::from(
            cfg.burst
                .unwrap_or_else(|| cfg.requests_per_second.ceil().max(1.0) as u32),
        );
        Arc::new(TokenBucket {
            rate: cfg.requests_per_second,
            burst,
            state: Mutex::new((burst, Instant::now())),
            limited: crate::telemetry::metrics()
                .rate_limited
                .with_label_values(&[scope, name]),
        })
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_acquire(&self) -> Result<(), ProxyError> {
        let now = Instant::now();
        let mut s = self.state.lock();
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - s.0) / self.rate;
        drop(s);
        self.limited.inc();
        Err(ProxyError::RateLimited {
            retry_after_secs: wait.ceil().max(1.0) as u64,
        })
    }
}

#[derive(Clone)]
pub struct RateLimitLayer {
    bucket: Option<Arc<TokenBucket>>,
}

impl RateLimitLayer {
    pub fn new(bucket: Option<Arc<TokenBucket>>) -> Self {
        RateLimitLayer { bucket }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Option<Arc<TokenBucket>>,
}

impl<S> RateLimit<S> {
    /// The bucket this limiter draws from, if any.
    pub fn bucket(&self) -> Option<&Arc<TokenBucket>> {
        self.bucket.as_ref()
    }
}

impl<S, B, R> tower::Service<Request<B>> for RateLimit<S>
where
    S: tower::Service<Request<B>, Response = R, Error = ProxyError>,
{
    type Response = R;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future, Result<R, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(b) = &self.bucket
            && let Err(e) = b.try_acquire()
        {
            return PolicyFuture::ready(Err(e));
        }
        PolicyFuture::direct(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn allows_the_burst_then_the_rate() {
        let b = TokenBucket::new(
            &config::RateLimit {
                requests_per_second: 10.0,
                burst: Some(5),
            },
            "route",
            "rl-test",
        );
        assert!((0..5).all(|_| b.try_acquire().is_ok()));
        match b.try_acquire() {
            Err(ProxyError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        // 300 ms at 10/s → 3 tokens
        assert!((0..3).all(|_| b.try_acquire().is_ok()));
        assert!(b.try_acquire().is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        // never more than the burst
        assert_eq!((0..10).filter(|_| b.try_acquire().is_ok()).count(), 5);
    }
}
