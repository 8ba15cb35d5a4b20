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
//! - A response (or error) that took more than one attempt says how many:
//!   `x-outrigger-attempts`. One attempt, the usual case, writes nothing:
//!   the header would cost every healthy request a header-map insert.

use super::BoxFuture;
use super::circuit_breaker::{Limits, Permit};
use crate::balance::Tried;
use crate::body::{self, Buffered, ReqBody};
use crate::config::{self, RetryOn};
use crate::context::Trail;
use crate::error::{ATTEMPTS_HEADER, Limit, ProxyError, TimeoutKind, UpstreamError};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use parking_lot::Mutex;
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;

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
    /// Whether any gRPC status is retried: otherwise no answer's
    /// `grpc-status` is looked up (a custom name, hashed whole per lookup).
    grpc: bool,
    route: String,
    budget: RetryBudget,
    exhausted: IntCounter,
}

impl RetryPolicy {
    pub fn new(cfg: &config::Retry, route: &str) -> Arc<Self> {
        let grpc = [
            RetryOn::Unavailable,
            RetryOn::Cancelled,
            RetryOn::DeadlineExceeded,
            RetryOn::ResourceExhausted,
        ]
        .iter()
        .any(|c| cfg.on.contains(c));
        Arc::new(RetryPolicy {
            cfg: cfg.clone(),
            grpc,
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
                if self.grpc
                    && let Some(g) = resp.headers().get(&crate::error::GRPC_STATUS)
                {
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

/// The route's policy and the cluster's limits, present only where the
/// route retries: a route without retries clones and drops nothing for it
/// per request.
#[derive(Clone)]
pub struct RetryLayer {
    policy: Option<(Arc<RetryPolicy>, Arc<Limits>)>,
}

impl RetryLayer {
    pub fn new(policy: Option<Arc<RetryPolicy>>, limits: Arc<Limits>) -> Self {
        RetryLayer {
            policy: policy.map(|p| (p, limits)),
        }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Option<(Arc<RetryPolicy>, Arc<Limits>)>,
}

impl<S, RB> tower::Service<Request<ReqBody>> for Retry<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError> + Clone,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = RetryFuture<S, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some((policy, limits)) = &self.policy else {
            return RetryFuture::once(self.inner.call(req));
        };
        policy.budget.deposit();
        let replayable = policy.allows_method(req.method())
            && policy.cfg.attempts > 1
            && !req.headers().contains_key(http::header::UPGRADE);
        if !replayable {
            return RetryFuture::once(self.inner.call(req));
        }
        let trail = req.extensions().get::<Arc<Trail>>().cloned();
        let replay = |head: Head, extensions| {
            Box::new(Replay {
                inner: self.inner.clone(),
                policy: policy.clone(),
                limits: limits.clone(),
                head,
                trail,
                extensions,
                data: Bytes::new(),
                trailers: None,
                tried: None,
                attempt: 1,
                once: None,
                picked: None,
                backoff: None,
            })
        };
        if req.body().is_end_stream() {
            // No body to keep (the usual GET): the first attempt goes out as
            // it came, extensions and all, with no wait (`self.inner` was
            // made ready by the caller); the head is copied for the
            // attempts after it.
            let head = Head {
                method: req.method().clone(),
                uri: req.uri().clone(),
                version: req.version(),
                headers: Headers::copy_of(req.headers()),
            };
            let replay = replay(head, None);
            return RetryFuture {
                phase: Phase::Attempt {
                    fut: self.inner.call(req),
                },
                replay: Some(replay),
                _body: std::marker::PhantomData,
            };
        }
        // A body to read first: the first attempt is built from the replay
        // state like the others, so the head moves there with no copy.
        let (parts, body) = req.into_parts();
        let head = Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: Headers::Map(parts.headers),
        };
        RetryFuture {
            phase: Phase::Buffering {
                fut: Box::pin(body::buffer(body, policy.cfg.max_body_bytes)),
            },
            replay: Some(replay(head, Some(parts.extensions))),
            _body: std::marker::PhantomData,
        }
    }
}

/// The request head that every attempt after the first is rebuilt from.
struct Head {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: Headers,
}

/// The head's headers: the request's own map where it moved here (a body
/// was read first, and the first attempt is built from here too), or a
/// plain list copied from it. A list is one allocation where a map's clone
/// is two, and the common request is never retried; a retry pays for
/// hashing the names into a map again.
enum Headers {
    Map(http::HeaderMap),
    Copy(Vec<(http::HeaderName, HeaderValue)>),
}

impl Headers {
    fn copy_of(map: &http::HeaderMap) -> Self {
        Headers::Copy(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn to_map(&self) -> http::HeaderMap {
        match self {
            Headers::Map(m) => m.clone(),
            Headers::Copy(list) => {
                let mut m = http::HeaderMap::with_capacity(list.len());
                for (k, v) in list {
                    m.append(k.clone(), v.clone());
                }
                m
            }
        }
    }

    fn take_map(&mut self) -> http::HeaderMap {
        match self {
            Headers::Map(m) => std::mem::take(m),
            Headers::Copy(_) => self.to_map(),
        }
    }
}

/// What a replayable request needs for its next attempt; boxed, so that a
/// route without retries (whose future is only `Phase::Once`) carries no
/// room for it.
struct Replay<S> {
    /// Ready-polled before each attempt after the first.
    inner: S,
    policy: Arc<RetryPolicy>,
    limits: Arc<Limits>,
    head: Head,
    trail: Option<Arc<Trail>>,
    /// The original extensions, for the first attempt when it is built
    /// here (after its body was read).
    extensions: Option<http::Extensions>,
    data: Bytes,
    trailers: Option<Box<http::HeaderMap>>,
    /// Which endpoints earlier attempts went to, made at the first retry
    /// (the common, first-try-answers request allocates nothing for it).
    tried: Option<Tried>,
    attempt: u32,
    /// A body too large to keep: its request, sent once, whole.
    once: Option<Request<ReqBody>>,
    /// The endpoint the balancer picked for the attempt in flight, learnt
    /// in its first poll (see `balance::take_pick`).
    picked: Option<std::net::SocketAddr>,
    /// The wait before the next attempt, and the retry permit it holds.
    backoff: Option<(Pin<Box<tokio::time::Sleep>>, Permit)>,
}

impl<S> Replay<S> {
    fn next_request(&mut self) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Replay {
            data: Some(self.data.clone()),
            trailers: self.trailers.clone(),
        });
        *req.method_mut() = self.head.method.clone();
        *req.uri_mut() = self.head.uri.clone();
        *req.version_mut() = self.head.version;
        *req.headers_mut() = self.head.headers.to_map();
        if let Some(e) = self.extensions.take() {
            *req.extensions_mut() = e;
            return req;
        }
        if let Some(t) = &self.tried {
            req.extensions_mut().insert(t.clone());
        }
        if let Some(t) = &self.trail {
            req.extensions_mut().insert(t.clone());
        }
        req
    }
}

type BufferFuture = BoxFuture<Result<Buffered, body::BoxError>>;

pin_project_lite::pin_project! {
    #[project = PhaseProj]
    enum Phase<F> {
        /// The only attempt: no retries, or a request that cannot be
        /// replayed.
        Once { #[pin] fut: F },
        /// Reading the body into memory before the first attempt.
        Buffering { fut: BufferFuture },
        /// Waiting for the service to be ready for the next attempt.
        Ready,
        /// An attempt in flight.
        Attempt { #[pin] fut: F },
        /// Waiting before the next attempt (`Replay::backoff`).
        Backoff,
        Done,
    }
}

pin_project_lite::pin_project! {
    /// The retry layer's future, written out by hand: a route with retries
    /// pays one allocation (the replay state) and no moves of an async
    /// block's state between attempts.
    pub struct RetryFuture<S: tower::Service<Request<ReqBody>>, RB> {
        #[pin]
        phase: Phase<S::Future>,
        replay: Option<Box<Replay<S>>>,
        _body: std::marker::PhantomData<fn() -> RB>,
    }
}

impl<S, RB> RetryFuture<S, RB>
where
    S: tower::Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError>,
{
    fn once(fut: S::Future) -> Self {
        RetryFuture {
            phase: Phase::Once { fut },
            replay: None,
            _body: std::marker::PhantomData,
        }
    }
}

impl<S, RB> Future for RetryFuture<S, RB>
where
    S: tower::Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError>,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let replay = match this.phase.as_mut().project() {
                // Not set to `Done` when ready: a future is not polled after
                // its answer, and setting a phase copies a whole `Phase`.
                // The only attempt's answer is returned as it comes (no
                // moves of a response through locals): one attempt is not
                // written down.
                PhaseProj::Once { fut } => return fut.poll(cx),
                PhaseProj::Done => panic!("RetryFuture polled after its answer"),
                // Every other phase has the replay state, made with it in
                // `Retry::call`.
                phase => match this.replay.as_deref_mut() {
                    Some(replay) => (phase, replay),
                    None => unreachable!("a replay phase without replay state"),
                },
            };
            match replay {
                (PhaseProj::Buffering { fut }, replay) => {
                    match ready!(fut.as_mut().poll(cx)) {
                        Ok(Buffered::Whole { data, trailers }) => {
                            replay.data = data;
                            replay.trailers = trailers;
                        }
                        Ok(Buffered::TooLarge(body)) => {
                            // Too large to keep: sent once, whole.
                            let mut req = Request::new(body);
                            *req.method_mut() = replay.head.method.clone();
                            *req.uri_mut() = std::mem::take(&mut replay.head.uri);
                            *req.version_mut() = replay.head.version;
                            *req.headers_mut() = replay.head.headers.take_map();
                            *req.extensions_mut() = replay.extensions.take().unwrap_or_default();
                            replay.once = Some(req);
                        }
                        Err(e) => {
                            this.phase.set(Phase::Done);
                            return Poll::Ready(Err(ProxyError::ClientBody(e)));
                        }
                    }
                    this.phase.set(Phase::Ready);
                }
                (PhaseProj::Ready, replay) => {
                    if let Err(e) = ready!(replay.inner.poll_ready(cx)) {
                        this.phase.set(Phase::Done);
                        return Poll::Ready(Err(e));
                    }
                    if let Some(req) = replay.once.take() {
                        let fut = replay.inner.call(req);
                        this.phase.set(Phase::Once { fut });
                    } else {
                        let req = replay.next_request();
                        let fut = replay.inner.call(req);
                        replay.picked = None;
                        this.phase.set(Phase::Attempt { fut });
                    }
                }
                (PhaseProj::Attempt { fut }, replay) => {
                    if replay.picked.is_none() {
                        crate::balance::take_pick();
                    }
                    let r = fut.poll(cx);
                    if replay.picked.is_none() {
                        replay.picked = crate::balance::take_pick();
                    }
                    let r = ready!(r);
                    match replay.after(r) {
                        Ok(done) => return Poll::Ready(done),
                        Err(permit) => {
                            let wait = replay.policy.backoff(replay.attempt);
                            replay.backoff = Some((Box::pin(tokio::time::sleep(wait)), permit));
                            this.phase.set(Phase::Backoff);
                        }
                    }
                }
                (PhaseProj::Backoff, replay) => {
                    if let Some((sleep, _)) = &mut replay.backoff {
                        ready!(sleep.as_mut().poll(cx));
                    }
                    // Gives the retry permit back: it bounds retries waiting.
                    replay.backoff = None;
                    replay.attempt += 1;
                    this.phase.set(Phase::Ready);
                }
                (PhaseProj::Once { .. } | PhaseProj::Done, _) => {
                    unreachable!("answered in the match above")
                }
            }
        }
    }
}

impl<S> Replay<S> {
    /// After an attempt: the answer to return (`Ok`), or a retry to make
    /// after a backoff, with the permit it holds meanwhile (`Err`).
    fn after<RB>(
        &mut self,
        r: Result<Response<RB>, ProxyError>,
    ) -> Result<Result<Response<RB>, ProxyError>, Permit> {
        let attempt = self.attempt;
        let Some(reason) = self.policy.retry_reason(&r) else {
            return Ok(with_attempts(r, attempt));
        };
        if attempt >= self.policy.cfg.attempts {
            return Ok(with_attempts(r, attempt));
        }
        let Some(permit) = self.limits.try_acquire(Limit::Retries) else {
            return Ok(with_attempts(r, attempt));
        };
        if !self.policy.budget.withdraw() {
            self.policy.exhausted.inc();
            return Ok(with_attempts(r, attempt));
        }
        crate::telemetry::metrics()
            .retries
            .with_label_values(&[&self.policy.route, reason])
            .inc();
        if self.tried.is_none() {
            let t = Tried::default();
            t.0.lock().extend(self.picked);
            self.tried = Some(t);
        }
        // The failed attempt's body (if any) is dropped here, before the wait.
        drop(r);
        Err(permit)
    }
}

/// Writes the attempts down where there was more than one.
fn with_attempts<B>(
    r: Result<Response<B>, ProxyError>,
    attempts: u32,
) -> Result<Response<B>, ProxyError> {
    if attempts <= 1 {
        return r;
    }
    match r {
        Ok(mut resp) => {
            // Static name and values: no parsing or allocation per response.
            const DIGITS: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
            let value = match DIGITS.get(attempts as usize) {
                Some(d) => HeaderValue::from_static(d),
                None => HeaderValue::from(attempts),
            };
            resp.headers_mut().insert(ATTEMPTS_HEADER.clone(), value);
            Ok(resp)
        }
        Err(e) => Err(ProxyError::Attempts {
            attempts,
            last: Box::new(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ATTEMPTS;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::{Service, ServiceExt};

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

    /// What the tests put under the retry layer.
    trait Upstream:
        tower::Service<Request<ReqBody>, Response = Response<()>, Error = ProxyError, Future: Send>
        + Clone
        + Send
        + 'static
    {
    }

    impl<T> Upstream for T where
        T: tower::Service<
                Request<ReqBody>,
                Response = Response<()>,
                Error = ProxyError,
                Future: Send,
            > + Clone
            + Send
            + 'static
    {
    }

    /// An upstream that answers the statuses in turn and counts calls.
    fn upstream(statuses: Vec<u16>, calls: Arc<AtomicU32>) -> impl Upstream {
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
    ) -> Retry<impl Upstream> {
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
        // One attempt is not written down.
        assert_eq!(r.headers().get(ATTEMPTS), None);
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

    /// An upstream that records each attempt's body and whether it saw the
    /// caller's own extension and a `Tried`, answering the statuses in turn.
    fn recording(statuses: Vec<u16>, seen: Arc<Mutex<Vec<(Bytes, bool, bool)>>>) -> impl Upstream {
        tower::service_fn(move |req: Request<ReqBody>| {
            let seen = seen.clone();
            let statuses = statuses.clone();
            async move {
                use http_body_util::BodyExt;
                let marked = req.extensions().get::<Marker>().is_some();
                let tried = req.extensions().get::<Tried>().is_some();
                let data = req.into_body().collect().await.unwrap().to_bytes();
                let mut seen = seen.lock();
                seen.push((data, marked, tried));
                let s = statuses[(seen.len() - 1).min(statuses.len() - 1)];
                Ok::<_, ProxyError>(Response::builder().status(s).body(()).unwrap())
            }
        })
    }

    #[derive(Clone)]
    struct Marker;

    #[tokio::test(start_paused = true)]
    async fn a_retry_sends_the_same_head_repeated_headers_in_order() {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let upstream = tower::service_fn(move |req: Request<ReqBody>| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock();
                seen.push((
                    req.method().clone(),
                    req.uri().clone(),
                    req.headers().clone(),
                ));
                let s = if seen.len() == 1 { 503 } else { 200 };
                Ok::<_, ProxyError>(Response::builder().status(s).body(()).unwrap())
            }
        });
        let p = RetryPolicy::new(&cfg(2, vec![RetryOn::GatewayError]), "r-head");
        for _ in 0..10 {
            p.budget.deposit();
        }
        let mut svc = tower::Layer::layer(&RetryLayer::new(Some(p), limits()), upstream);
        // With no body (the head copied) and with a body (the head moved).
        for data in [None, Some(Bytes::from_static(b"hi"))] {
            heads.lock().clear();
            let mut req = Request::new(ReqBody::Replay {
                data,
                trailers: None,
            });
            *req.method_mut() = Method::PUT;
            *req.uri_mut() = "/a?b=c".parse().unwrap();
            let h = req.headers_mut();
            h.append("x-one", HeaderValue::from_static("1"));
            h.append(http::header::ACCEPT, HeaderValue::from_static("text/plain"));
            h.append("x-one", HeaderValue::from_static("2"));
            h.append(http::header::ACCEPT, HeaderValue::from_static("*/*"));
            let r = svc.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(r.headers()[ATTEMPTS], "2");
            let heads = heads.lock();
            assert_eq!(heads.len(), 2);
            assert_eq!(heads[0], heads[1], "the retry's head differs");
            let all = |n: &str| -> Vec<&[u8]> {
                heads[1].2.get_all(n).iter().map(|v| v.as_bytes()).collect()
            };
            assert_eq!(all("x-one"), [&b"1"[..], b"2"]);
            assert_eq!(all("accept"), [&b"text/plain"[..], b"*/*"]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_body_is_replayed_whole_and_the_first_attempt_keeps_the_extensions() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let p = RetryPolicy::new(&cfg(3, vec![RetryOn::GatewayError]), "r-body");
        for _ in 0..10 {
            p.budget.deposit();
        }
        let mut svc = tower::Layer::layer(
            &RetryLayer::new(Some(p), limits()),
            recording(vec![503, 200], seen.clone()),
        );
        for body in [&b"twelve bytes"[..], b""] {
            seen.lock().clear();
            let mut req = Request::new(ReqBody::Replay {
                data: Some(Bytes::from_static(body)),
                trailers: None,
            });
            *req.method_mut() = Method::PUT;
            req.extensions_mut().insert(Marker);
            let r = svc.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()[ATTEMPTS], "2");
            assert_eq!(
                *seen.lock(),
                vec![
                    (Bytes::from_static(body), true, false),
                    (Bytes::from_static(body), false, true),
                ],
                "{body:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_permit_is_held_through_the_backoff_and_given_back() {
        let calls = Arc::new(AtomicU32::new(0));
        let p = RetryPolicy::new(&cfg(2, vec![RetryOn::GatewayError]), "r-permit");
        for _ in 0..50 {
            p.budget.deposit();
        }
        let one_retry = Limits::new(
            &config::CircuitBreaker {
                max_retries: 1,
                ..Default::default()
            },
            "r-permit",
        );
        // A fails and waits to retry; B fails meanwhile and may not retry;
        // A's retry answers; C fails and retries, A's permit given back.
        let mut svc = tower::Layer::layer(
            &RetryLayer::new(Some(p), one_retry),
            upstream(vec![503, 503, 200, 503, 200], calls.clone()),
        );
        let mut a = std::pin::pin!(svc.ready().await.unwrap().call(get()));
        let first = std::future::poll_fn(|cx| Poll::Ready(a.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "A waits out its backoff");
        let b = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(
            (b.status().as_u16(), b.headers().get(ATTEMPTS)),
            (503, None)
        );
        let a = a.await.unwrap();
        assert_eq!(
            (a.status().as_u16(), a.headers()[ATTEMPTS].as_bytes()),
            (200, &b"2"[..])
        );
        let c = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(
            (c.status().as_u16(), c.headers()[ATTEMPTS].as_bytes()),
            (200, &b"2"[..])
        );
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    /// Ready for the layer's own `poll_ready`, refused for the clone that
    /// makes the attempts.
    #[derive(Clone)]
    struct ReadyOnce(Arc<AtomicU32>);

    impl tower::Service<Request<ReqBody>> for ReadyOnce {
        type Response = Response<()>;
        type Error = ProxyError;
        type Future = std::future::Ready<Result<Response<()>, ProxyError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(()),
                _ => Err(ProxyError::Overloaded { limit: "test" }),
            })
        }
        fn call(&mut self, _: Request<ReqBody>) -> Self::Future {
            std::future::ready(Ok(Response::new(())))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_refusing_after_the_body_is_read_fails_the_request_as_is() {
        let p = RetryPolicy::new(&cfg(3, vec![RetryOn::FiveXx]), "r-ready");
        let mut svc = tower::Layer::layer(
            &RetryLayer::new(Some(p), limits()),
            ReadyOnce(Arc::new(AtomicU32::new(0))),
        );
        let mut put = Request::new(ReqBody::Replay {
            data: Some(Bytes::from_static(b"body")),
            trailers: None,
        });
        *put.method_mut() = Method::PUT;
        let r = svc.ready().await.unwrap().call(put).await;
        assert!(
            matches!(r, Err(ProxyError::Overloaded { limit: "test" })),
            "{:?}",
            r.err()
        );
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
