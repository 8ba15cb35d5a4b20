//! Timeout layer: the route timeout (the whole request, retries included,
//! shortened by a gRPC client's `grpc-timeout` and by the time the caller
//! still waits, `x-outrigger-expected-timeout-ms` from a sidecar upstream)
//! or the per-try timeout. Either way the request goes on with the time
//! left written in `x-outrigger-expected-timeout-ms` (and a reduced
//! `grpc-timeout` for gRPC), so the next hop and the app stop working on
//! requests nobody waits for. (Across retries the header is the time left
//! when the request entered the route; a per-try timeout shortens it.)
//! Fires `ProxyError::Timeout`, which the error layer answers with 504, or
//! for gRPC with `grpc-status: 4` (DEADLINE_EXCEEDED).

use crate::error::{ProxyError, TimeoutKind};
use crate::wheel::{Deadline, Wheel};
use http::header::Entry;
use http::{HeaderMap, HeaderValue, Request};
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Clone)]
pub struct TimeoutLayer {
    after: Option<Duration>,
    /// What the next hop is told when the request brings nothing shorter:
    /// `after`, or the per-try timeout below if that is shorter.
    floor: Option<Duration>,
    /// `floor` as a header value, made once: most requests are told it.
    told: Option<HeaderValue>,
    /// False for a per-try layer whose route layer already told the next
    /// hop about it: one header write a request instead of two, no read.
    tells: bool,
    kind: TimeoutKind,
    fired: Option<IntCounter>,
    /// The runtime's deadline wheel, found at the first request (a layer
    /// may be built before the runtime runs).
    wheel: Arc<OnceLock<Option<Arc<Wheel>>>>,
}

impl TimeoutLayer {
    pub fn new(after: Option<Duration>, kind: TimeoutKind, route: &str) -> Self {
        let fired = crate::telemetry::metrics()
            .timeouts
            .with_label_values(&[route, kind.as_str()]);
        TimeoutLayer {
            after,
            floor: after,
            told: after.map(ms_value),
            tells: true,
            kind,
            fired: Some(fired),
            // Made now for a configured timeout; for one that only a
            // request can bring (`grpc-timeout`), at the first such request.
            wheel: Arc::new(match after.and_then(|_| Wheel::current()) {
                Some(w) => Some(w).into(),
                None => OnceLock::new(),
            }),
        }
    }

    /// The route's timeout layer and, below the retry layer, its per-try
    /// one. The route layer tells the next hop the shorter of the two, so
    /// that the per-try layer need not read and rewrite the header on
    /// every attempt (across retries the next hop is told the same: the
    /// time left at the route's entry, shortened by the per-try timeout).
    pub fn route_and_per_try(
        route: Option<Duration>,
        per_try: Option<Duration>,
        name: &str,
    ) -> (TimeoutLayer, TimeoutLayer) {
        let mut outer = TimeoutLayer::new(route, TimeoutKind::Route, name);
        outer.floor = [route, per_try].into_iter().flatten().min();
        outer.told = outer.floor.map(ms_value);
        let mut inner = TimeoutLayer::new(per_try, TimeoutKind::PerTry, name);
        inner.tells = false;
        (outer, inner)
    }
}

impl TimeoutLayer {
    /// A wheel deadline for the usual timeouts; a tokio timer for one
    /// beyond the wheel's window (a long request's, where its cost is
    /// nothing next to the request's life).
    fn timer(&self, after: Duration) -> Timer {
        match self.wheel.get_or_init(Wheel::current) {
            Some(wheel) if after < crate::wheel::WINDOW => Timer::Wheel(wheel.deadline(after)),
            _ => Timer::Tokio(Box::pin(tokio::time::sleep(after))),
        }
    }
}

/// A deadline on the runtime's coarse wheel (src/wheel.rs), or a tokio
/// timer beyond its window or where there is no wheel (a layer used
/// outside a runtime's context, which the proxy never does).
enum Timer {
    Wheel(Deadline),
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl Timer {
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Timer::Wheel(d) => d.poll_elapsed(cx),
            Timer::Tokio(s) => s.as_mut().poll(cx),
        }
    }
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    /// Shared: the route's stack is cloned for every request, and one
    /// reference count costs less than the layer's own.
    layer: Arc<TimeoutLayer>,
}

/// `x-outrigger-expected-timeout-ms`'s value.
fn expected_timeout(v: &HeaderValue) -> Option<Duration> {
    let ms: u64 = std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis().max(1)).unwrap_or(u64::MAX)
}

fn ms_value(d: Duration) -> HeaderValue {
    HeaderValue::from(ms(d))
}

/// Writes the time left for the next hop (and `grpc-timeout`, if shorter)
/// into the header's entry, found once for the read and the write (the
/// name is long and not a standard one: each lookup hashes all of it);
/// `ready` is the value already made for `left`, if there is one.
fn tell(told: Entry<'_, HeaderValue>, left: Duration, ready: Option<&HeaderValue>) {
    let value = match ready {
        Some(v) => v.clone(),
        None => HeaderValue::from(ms(left)),
    };
    match told {
        Entry::Occupied(mut o) => {
            o.insert(value);
        }
        Entry::Vacant(v) => {
            v.insert(value);
        }
    }
}

/// Parses `grpc-timeout` (gRPC over HTTP/2: value and unit H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B, R> tower::Service<Request<B>> for Timeout<S>
where
    S: tower::Service<Request<B>, Response = R, Error = ProxyError>,
{
    type Response = R;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Only gRPC requests carry grpc-timeout; checking the content type
        // (a standard header) first keeps other requests from hashing the name.
        if !self.layer.tells {
            return self.future(self.layer.after, req);
        }
        let is_grpc = crate::error::is_grpc(req.headers());
        let grpc = if is_grpc {
            grpc_timeout(req.headers())
        } else {
            None
        };
        if self.layer.floor.is_none() && !is_grpc {
            // Nothing of its own to tell (a route without timeouts): the
            // next hop reads what came in as it came, and the map is only
            // read (finding an entry to write may grow it).
            let told = req
                .headers()
                .get(&crate::error::EXPECTED_TIMEOUT_HEADER)
                .and_then(expected_timeout);
            let after = match self.layer.kind {
                TimeoutKind::Route => told,
                TimeoutKind::PerTry | TimeoutKind::Total => self.layer.after,
            };
            return self.future(after, req);
        }
        let entry = req
            .headers_mut()
            .entry(&crate::error::EXPECTED_TIMEOUT_HEADER);
        let told = match &entry {
            Entry::Occupied(o) => expected_timeout(o.get()),
            Entry::Vacant(_) => None,
        };
        let after = match self.layer.kind {
            TimeoutKind::Route => [self.layer.after, grpc, told].into_iter().flatten().min(),
            TimeoutKind::PerTry | TimeoutKind::Total => self.layer.after,
        };
        // What the next hop is told: the least of everything known.
        if let Some(left) = [after, self.layer.floor, told, grpc]
            .into_iter()
            .flatten()
            .min()
        {
            let ready = self
                .layer
                .told
                .as_ref()
                .filter(|_| Some(left) == self.layer.floor);
            tell(entry, left, ready);
            if is_grpc
                && grpc.is_none_or(|g| left < g)
                && let Ok(v) = HeaderValue::from_str(&format!("{}m", ms(left).min(99_999_999)))
            {
                req.headers_mut().insert("grpc-timeout", v);
            }
        }
        self.future(after, req)
    }
}

impl<S> Timeout<S> {
    fn future<B, R>(&mut self, after: Option<Duration>, req: Request<B>) -> TimeoutFuture<S::Future>
    where
        S: tower::Service<Request<B>, Response = R, Error = ProxyError>,
    {
        let timer = after.map(|a| self.layer.timer(a));
        // The counter only where a timer can fire: no reference count to
        // take and give back for the requests of a route without timeout.
        let fired = match timer {
            Some(_) => self.layer.fired.clone(),
            None => None,
        };
        TimeoutFuture {
            inner: self.inner.call(req),
            timer,
            after: after.unwrap_or_default(),
            kind: self.layer.kind,
            fired,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future raced against a timer; no timer when none applies.
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        timer: Option<Timer>,
        after: Duration,
        kind: TimeoutKind,
        fired: Option<IntCounter>,
    }
}

impl<F, R> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<R, ProxyError>>,
{
    type Output = Result<R, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(timer) = this.timer
            && timer.poll_elapsed(cx).is_ready()
        {
            if let Some(c) = this.fired {
                c.inc();
            }
            return Poll::Ready(Err(ProxyError::Timeout {
                kind: *this.kind,
                after: *this.after,
            }));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    fn slow(
        d: Duration,
    ) -> impl Service<Request<()>, Response = &'static str, Error = ProxyError, Future: Send> + Clone
    {
        tower::service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(d).await;
            Ok::<_, ProxyError>("done")
        })
    }

    #[tokio::test(start_paused = true)]
    async fn fires_after_the_route_timeout() {
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(Some(Duration::from_millis(100)), TimeoutKind::Route, "t1"),
            slow(Duration::from_secs(5)),
        );
        let r = svc.ready().await.unwrap().call(Request::new(())).await;
        assert!(matches!(
            r,
            Err(ProxyError::Timeout {
                kind: TimeoutKind::Route,
                ..
            })
        ));
        let mut fast = tower::Layer::layer(
            &TimeoutLayer::new(Some(Duration::from_millis(100)), TimeoutKind::Route, "t1"),
            slow(Duration::from_millis(10)),
        );
        assert_eq!(
            fast.ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap(),
            "done"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_without_timeouts_stops_when_the_caller_does() {
        let told = |ms: &str| {
            Request::builder()
                .header(crate::error::EXPECTED_TIMEOUT, ms)
                .body(())
                .unwrap()
        };
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(None, TimeoutKind::Route, "t5"),
            slow(Duration::from_secs(5)),
        );
        let r = svc.ready().await.unwrap().call(told("100")).await;
        assert!(matches!(
            r,
            Err(ProxyError::Timeout {
                kind: TimeoutKind::Route,
                ..
            })
        ));
        // Nothing told: no deadline at all.
        let r = svc.ready().await.unwrap().call(Request::new(())).await;
        assert_eq!(r.unwrap(), "done");
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_timeout_shortens_the_route_timeout() {
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(Some(Duration::from_secs(10)), TimeoutKind::Route, "t2"),
            slow(Duration::from_secs(1)),
        );
        let req = Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "200m")
            .body(())
            .unwrap();
        let start = tokio::time::Instant::now();
        let r = svc.ready().await.unwrap().call(req).await;
        assert!(matches!(r, Err(ProxyError::Timeout { .. })));
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        // no route timeout: grpc-timeout alone applies
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(None, TimeoutKind::Route, "t2"),
            slow(Duration::from_secs(3)),
        );
        let req = Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "1S")
            .body(())
            .unwrap();
        let start = tokio::time::Instant::now();
        assert!(svc.ready().await.unwrap().call(req).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // per-try timeouts ignore grpc-timeout
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(None, TimeoutKind::PerTry, "t2"),
            slow(Duration::from_secs(3)),
        );
        let req = Request::builder()
            .header("grpc-timeout", "1S")
            .body(())
            .unwrap();
        assert!(svc.ready().await.unwrap().call(req).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_layer_tells_a_shorter_per_try_timeout_once() {
        // What the app is told, seen from the innermost service.
        let told = tower::service_fn(|req: Request<()>| async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap_or_default().to_string())
            };
            Ok::<_, ProxyError>((h(crate::error::EXPECTED_TIMEOUT), h("grpc-timeout")))
        });
        let stack = |route: Option<u64>, per_try: Option<u64>| {
            let ms = |v: Option<u64>| v.map(Duration::from_millis);
            let (route_layer, per_try_layer) =
                TimeoutLayer::route_and_per_try(ms(route), ms(per_try), "t3");
            tower::ServiceBuilder::new()
                .layer(route_layer)
                .layer(per_try_layer)
                .service(told)
        };
        let call = |mut svc: Timeout<Timeout<_>>, req: Request<()>| async move {
            svc.ready().await.unwrap().call(req).await.unwrap()
        };
        let plain = || Request::new(());
        // The per-try timeout is shorter: told once, by the route layer.
        assert_eq!(
            call(stack(Some(2000), Some(500)), plain())
                .await
                .0
                .as_deref(),
            Some("500")
        );
        // The route timeout is shorter.
        assert_eq!(
            call(stack(Some(300), Some(500)), plain())
                .await
                .0
                .as_deref(),
            Some("300")
        );
        // A per-try timeout alone is told too.
        assert_eq!(
            call(stack(None, Some(700)), plain()).await.0.as_deref(),
            Some("700")
        );
        // What the caller has left wins when it is shorter, and gRPC's
        // timeout is reduced to it.
        let req = Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "1S")
            .header(crate::error::EXPECTED_TIMEOUT, "200")
            .body(())
            .unwrap();
        assert_eq!(
            call(stack(Some(2000), Some(500)), req).await,
            (Some("200".into()), Some("200m".into()))
        );
        // Nothing known: nothing told.
        assert_eq!(call(stack(None, None), plain()).await, (None, None));
        // No timeout of its own: the caller's time left passes on as it came.
        let told = |ms: &str| {
            Request::builder()
                .header(crate::error::EXPECTED_TIMEOUT, ms)
                .body(())
                .unwrap()
        };
        assert_eq!(
            call(stack(None, None), told("250")).await,
            (Some("250".into()), None)
        );
        // A longer timeout of its own: the caller's shorter one replaces
        // the header; a shorter one of its own replaces the caller's.
        assert_eq!(
            call(stack(Some(2000), Some(500)), told("250")).await,
            (Some("250".into()), None)
        );
        assert_eq!(
            call(stack(Some(2000), Some(500)), told("9000")).await,
            (Some("500".into()), None)
        );
    }

    #[test]
    fn parses_grpc_timeout_units() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("100m"), Some(Duration::from_millis(100)));
        assert_eq!(h("2S"), Some(Duration::from_secs(2)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("5u"), Some(Duration::from_micros(5)));
        assert_eq!(h("x"), None);
        assert_eq!(h("123456789S"), None);
    }
}
