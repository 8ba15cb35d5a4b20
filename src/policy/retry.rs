//! Retry layer: retries what can safely be retried, with exponential
//! backoff and full jitter, on a different endpoint where there is one,
//! within a retry budget that is always on.
//!
//! - Only idempotent methods are retried unless the route opts in, and only
//!   bodies of at most `max_body_bytes` (kept in memory for replay); a
//!   larger body is streamed once, whole.
//! - The budget lets retries add at most `percent` % to the route's
//!   requests, plus `min_per_second`, so a dead upstream cannot turn into a
//!   retry storm whatever the attempt count says.
//! - A cluster's `max_retries` caps retries in flight.
//! - The response (or error) says how many attempts it took:
//!   `x-outrigger-attempts`.

use super::PolicyFuture;
use super::circuit_breaker::Limits;
use crate::balance::Tried;
use crate::body::{self, Buffered, ReqBody};
use crate::config::{self, RetryOn};
use crate::context::Trail;
use crate::error::{ATTEMPTS, Limit, ProxyError, TimeoutKind, UpstreamError};
use http::{HeaderValue, Method, Request, Response};
use parking_lot::Mutex;
use prometheus::IntCounter;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;

/// Token bucket of retries: each request deposits `percent`/100, each retry
/// takes 1, time adds `min_per_second`. The balance is capped so that a
/// long healthy spell cannot bank a storm.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    cap: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(cfg: &config::Budget) -> Self {
        let ratio = cfg.percent / 100.0;
        RetryBudget {
            ratio,
            min_per_second: cfg.min_per_second,
            cap: (cfg.min_per_second * 10.0 + ratio * 1000.0).max(1.0),
            state: Mutex::new((cfg.min_per_second, Instant::now())),
        }
    }

    pub fn deposit(&self) {
        let mut s = self.state.lock();
        s.0 = (s.0 + self.ratio).min(self.cap);
    }

    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut s = self.state.lock();
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.min_per_second).min(self.cap);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct RetryPolicy {
    cfg: config::Retry,
    route: String,
    budget: RetryBudget,
    exhausted: IntCounter,
}

impl RetryPolicy {
    pub fn new(cfg: &config::Retry, route: &str) -> Arc<Self> {
        Arc::new(RetryPolicy {
            cfg: cfg.clone(),
            route: route.to_string(),
            budget: RetryBudget::new(&cfg.budget),
            exhausted: crate::telemetry::metrics()
                .retry_budget_exhausted
                .with_label_values(&[route]),
        })
    }

    fn on(&self, c: RetryOn) -> bool {
        self.cfg.on.contains(&c)
    }

    /// Why this outcome should be retried, if it should.
    pub fn retry_reason<B>(&self, r: &Result<Response<B>, ProxyError>) -> Option<&'static str> {
        match r {
            Ok(resp) => {
                let s = resp.status().as_u16();
                if let Some(g) = resp.headers().get(&crate::error::GRPC_STATUS) {
                    let reason = match g.as_bytes() {
                        b"14" if self.on(RetryOn::Unavailable) => Some("unavailable"),
                        b"1" if self.on(RetryOn::Cancelled) => Some("cancelled"),
                        b"4" if self.on(RetryOn::DeadlineExceeded) => Some("deadline-exceeded"),
                        b"8" if self.on(RetryOn::ResourceExhausted) => Some("resource-exhausted"),
                        _ => None,
                    };
                    if reason.is_some() {
                        return reason;
                    }
                }
                if s >= 500 && self.on(RetryOn::FiveXx) {
                    Some("5xx")
                } else if matches!(s, 502..=504) && self.on(RetryOn::GatewayError) {
                    Some("gateway-error")
                } else if self.on(RetryOn::RetriableStatusCodes)
                    && self.cfg.retriable_status_codes.contains(&s)
                {
                    Some("status")
                } else {
                    None
                }
            }
            Err(e) => {
                let broad = self.on(RetryOn::FiveXx) || self.on(RetryOn::GatewayError);
                match e {
                    ProxyError::Upstream(u) if u.nothing_sent() => {
                        (broad || self.on(RetryOn::ConnectFailure)).then_some("connect-failure")
                    }
                    ProxyError::Upstream(u @ UpstreamError::Request { .. })
                        if u.is_refused_stream() =>
                    {
                        (broad || self.on(RetryOn::RefusedStream) || self.on(RetryOn::Reset))
                            .then_some("refused-stream")
                    }
                    ProxyError::Upstream(_) => {
                        (broad || self.on(RetryOn::Reset)).then_some("reset")
                    }
                    ProxyError::Timeout {
                        kind: TimeoutKind::PerTry,
                        ..
                    } => (broad || self.on(RetryOn::Reset)).then_some("per-try-timeout"),
                    _ => None,
                }
            }
        }
    }

    fn allows_method(&self, m: &Method) -> bool {
        self.cfg.non_idempotent
            || matches!(
                *m,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    /// Full jitter: uniform in [0, min(max, base·2^(retry-1))].
    pub fn backoff(&self, retry: u32) -> Duration {
        let b = &self.cfg.backoff;
        let ceiling = b
            .base
            .0
            .saturating_mul(1u32 << (retry - 1).min(16))
            .min(b.max.0);
        ceiling.mul_f64(fastrand::f64())
    }
}

#[derive(Clone)]
pub struct RetryLayer {
    policy: Option<Arc<RetryPolicy>>,
    limits: Arc<Limits>,
}

impl RetryLayer {
    pub fn new(policy: Option<Arc<RetryPolicy>>, limits: Arc<Limits>) -> Self {
        RetryLayer { policy, limits }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Option<Arc<RetryPolicy>>,
    limits: Arc<Limits>,
}

type Resp<B> = Response<B>;

impl<S, RB> tower::Service<Request<ReqBody>> for Retry<S>
where
    S: tower::Service<Request<ReqBody>, Response = Resp<RB>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Resp<RB>;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future, Result<Resp<RB>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(policy) = self.policy.clone() else {
            return PolicyFuture::direct(self.inner.call(req));
        };
        policy.budget.deposit();
        let inner = self.inner.clone();
        let limits = self.limits.clone();
        PolicyFuture::boxed(retry_loop(policy, limits, inner, req))
    }
}

fn with_attempts<B>(
    r: Result<Response<B>, ProxyError>,
    attempts: u32,
) -> Result<Response<B>, ProxyError> {
    match r {
        Ok(mut resp) => {
            // Static name and values: no parsing or allocation per response.
            static NAME: http::HeaderName = http::HeaderName::from_static(ATTEMPTS);
            const DIGITS: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
            let value = match DIGITS.get(attempts as usize) {
                Some(d) => HeaderValue::from_static(d),
                None => HeaderValue::from(attempts),
            };
            resp.headers_mut().insert(NAME.clone(), value);
            Ok(resp)
        }
        Err(e) => Err(ProxyError::Attempts {
            attempts,
            last: Box::new(e),
        }),
    }
}

/// Runs one attempt and names the endpoint the balancer picked for it, also
/// when a per-try timeout dropped it before any answer (the pick happens
/// inside this attempt's poll; see `balance::take_pick`).
async fn with_pick<F: std::future::Future>(f: F) -> (F::Output, Option<std::net::SocketAddr>) {
    let mut f = std::pin::pin!(f);
    let mut picked = None;
    let out = std::future::poll_fn(|cx| {
        if picked.is_none() {
            crate::balance::take_pick();
        }
        let r = f.as_mut().poll(cx);
        if picked.is_none() {
            picked = crate::balance::take_pick();
        }
        r
    })
    .await;
    (out, picked)
}

async fn retry_loop<S, RB>(
    policy: Arc<RetryPolicy>,
    limits: Arc<Limits>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<RB>, ProxyError>
where
    S: tower::Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError> + Clone,
{
    let (parts, body) = req.into_parts();
    let replayable = policy.allows_method(&parts.method)
        && policy.cfg.attempts > 1
        && !parts.headers.contains_key(http::header::UPGRADE);
    if !replayable {
        let r = inner
            .ready()
            .await?
            .call(Request::from_parts(parts, body))
            .await;
        return with_attempts(r, 1);
    }
    let (data, trailers) = match body::buffer(body, policy.cfg.max_body_bytes).await {
        Ok(Buffered::Whole { data, trailers }) => (data, trailers),
        Ok(Buffered::TooLarge(body)) => {
            // Too large to keep: sent once, whole.
            let r = inner
                .ready()
                .await?
                .call(Request::from_parts(parts, body))
                .await;
            return with_attempts(r, 1);
        }
        Err(e) => return Err(ProxyError::ClientBody(e)),
    };
    // Which endpoints earlier attempts went to, made at the first retry
    // (the common, first-try-answers request allocates nothing for it).
    let mut tried: Option<Tried> = None;
    let mut attempt = 1;
    loop {
        let mut req = Request::new(ReqBody::Replay {
            data: Some(data.clone()),
            trailers: trailers.clone(),
        });
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        if let Some(t) = &tried {
            req.extensions_mut().insert(t.clone());
        }
        if let Some(t) = parts.extensions.get::<Arc<Trail>>() {
            req.extensions_mut().insert(t.clone());
        }
        let (r, picked) = with_pick(inner.ready().await?.call(req)).await;
        let Some(reason) = policy.retry_reason(&r) else {
            return with_attempts(r, attempt);
        };
        if attempt >= policy.cfg.attempts {
            return with_attempts(r, attempt);
        }
        let Some(_permit) = limits.try_acquire(Limit::Retries) else {
            return with_attempts(r, attempt);
        };
        if !policy.budget.withdraw() {
            policy.exhausted.inc();
            return with_attempts(r, attempt);
        }
        crate::telemetry::metrics()
            .retries
            .with_label_values(&[&policy.route, reason])
            .inc();
        if tried.is_none() {
            let t = Tried::default();
            t.0.lock().extend(picked);
            tried = Some(t);
        }
        // The failed attempt's body (if any) is dropped here, before we wait.
        drop(r);
        tokio::time::sleep(policy.backoff(attempt)).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::Service;

    fn cfg(attempts: u32, on: Vec<RetryOn>) -> config::Retry {
        config::Retry {
            attempts,
            on,
            retriable_status_codes: vec![409],
            per_try_timeout: None,
            backoff: config::Backoff::default(),
            budget: config::Budget {
                percent: 20.0,
                min_per_second: 0.0,
            },
            non_idempotent: false,
            max_body_bytes: 16,
        }
    }

    fn limits() -> Arc<Limits> {
        Limits::new(&config::CircuitBreaker::default(), "retry-test")
    }

    /// An upstream that answers the statuses in turn and counts calls.
    fn upstream(
        statuses: Vec<u16>,
        calls: Arc<AtomicU32>,
    ) -> impl tower::Service<
        Request<ReqBody>,
        Response = Response<()>,
        Error = ProxyError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Request<ReqBody>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            let s = statuses[n.min(statuses.len() - 1)];
            async move { Ok::<_, ProxyError>(Response::builder().status(s).body(()).unwrap()) }
        })
    }

    /// A retry layer with a well-funded budget over `upstream(statuses)`.
    fn funded(
        c: config::Retry,
        route: &str,
        statuses: Vec<u16>,
        calls: &Arc<AtomicU32>,
    ) -> Retry<
        impl tower::Service<Request<ReqBody>, Response = Response<()>, Error = ProxyError, Future: Send>
        + Clone
        + Send
        + 'static,
    > {
        let p = RetryPolicy::new(&c, route);
        for _ in 0..50 {
            p.budget.deposit();
        }
        tower::Layer::layer(
            &RetryLayer::new(Some(p), limits()),
            upstream(statuses, calls.clone()),
        )
    }

    fn get() -> Request<ReqBody> {
        Request::new(ReqBody::empty())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_gateway_errors_and_counts_attempts() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = funded(
            cfg(3, vec![RetryOn::GatewayError]),
            "r1",
            vec![503, 502, 200],
            &calls,
        );
        let r = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[ATTEMPTS], "3");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_attempts_and_keeps_the_last_answer() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = funded(
            cfg(2, vec![RetryOn::RetriableStatusCodes]),
            "r2",
            vec![409],
            &calls,
        );
        let r = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(r.status(), 409);
        assert_eq!(r.headers()[ATTEMPTS], "2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn post_and_large_bodies_are_sent_once() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = funded(cfg(3, vec![RetryOn::FiveXx]), "r3", vec![500], &calls);
        let mut post = get();
        *post.method_mut() = Method::POST;
        let r = svc.ready().await.unwrap().call(post).await.unwrap();
        assert_eq!(r.headers()[ATTEMPTS], "1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_retries_to_a_share_of_requests() {
        let calls = Arc::new(AtomicU32::new(0));
        let p = RetryPolicy::new(&cfg(5, vec![RetryOn::FiveXx]), "r4");
        let mut svc = tower::Layer::layer(
            &RetryLayer::new(Some(p), limits()),
            upstream(vec![500], calls.clone()),
        );
        let n = 1000;
        for _ in 0..n {
            let r = svc.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(r.status(), 500);
        }
        let total = calls.load(Ordering::SeqCst);
        assert!(
            total <= n * 12 / 10 + 1,
            "{total} attempts for {n} requests"
        );
        assert!(total > n, "some retries were allowed");
    }

    #[test]
    fn backoff_is_jittered_under_an_exponential_ceiling() {
        let p = RetryPolicy::new(&cfg(5, vec![]), "r5");
        for retry in 1..6 {
            let ceiling =
                Duration::from_millis(25 * (1 << (retry - 1))).min(Duration::from_millis(250));
            for _ in 0..50 {
                assert!(p.backoff(retry) <= ceiling);
            }
        }
    }

    #[test]
    fn classifies_errors() {
        let p = RetryPolicy::new(&cfg(3, vec![RetryOn::ConnectFailure]), "r6");
        let refused: Result<Response<()>, _> = Err(ProxyError::Upstream(UpstreamError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        }));
        assert_eq!(p.retry_reason(&refused), Some("connect-failure"));
        let timeout: Result<Response<()>, _> = Err(ProxyError::Timeout {
            kind: TimeoutKind::Route,
            after: Duration::ZERO,
        });
        assert_eq!(p.retry_reason(&timeout), None, "the route timeout is final");
        let grpc = Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        let p = RetryPolicy::new(&cfg(3, vec![RetryOn::Unavailable]), "r6");
        assert_eq!(p.retry_reason(&Ok(grpc)), Some("unavailable"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_moves_the_retry_to_another_endpoint() {
        use crate::policy::timeout::TimeoutLayer;
        let slow: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        // A cluster stand-in: picks `slow` first, as the balancer would note
        // it in its first poll, and hangs there; a retry that was told to
        // avoid `slow` gets an answer, one that was not gets a 500.
        let cluster = tower::service_fn(move |req: Request<ReqBody>| {
            let avoid = req
                .extensions()
                .get::<Tried>()
                .is_some_and(|t| t.0.lock().contains(&slow));
            async move {
                if avoid {
                    return Ok::<_, ProxyError>(Response::builder().status(200).body(()).unwrap());
                }
                crate::balance::note_pick(slow);
                std::future::pending::<()>().await;
                Ok(Response::builder().status(500).body(()).unwrap())
            }
        });
        let mut c = cfg(2, vec![RetryOn::Reset]);
        c.per_try_timeout = Some(config::Dur(Duration::from_millis(100)));
        let p = RetryPolicy::new(&c, "r-pick");
        for _ in 0..10 {
            p.budget.deposit();
        }
        let (_, per_try) =
            TimeoutLayer::route_and_per_try(None, Some(Duration::from_millis(100)), "r-pick");
        let mut svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new(Some(p), limits()))
            .layer(per_try)
            .service(cluster);
        let r = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[ATTEMPTS], "2");
    }
}
