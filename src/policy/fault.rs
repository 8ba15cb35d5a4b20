//! Fault injection for chaos tests: abort or delay a share of a route's
//! requests, or those that ask for it with `x-outrigger-fault-abort:
//! STATUS` / `x-outrigger-fault-delay: DURATION` when the route allows
//! header faults.

use super::PolicyFuture;
use crate::config;
use crate::error::ProxyError;
use http::Request;
use prometheus::IntCounter;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub const ABORT_HEADER: &str = "x-outrigger-fault-abort";
pub const DELAY_HEADER: &str = "x-outrigger-fault-delay";

pub struct FaultPolicy {
    cfg: config::Fault,
    aborted: IntCounter,
    delayed: IntCounter,
}

#[derive(Clone)]
pub struct FaultLayer {
    policy: Option<Arc<FaultPolicy>>,
}

impl FaultLayer {
    pub fn new(cfg: Option<&config::Fault>, route: &str) -> Self {
        let m = crate::telemetry::metrics();
        FaultLayer {
            policy: cfg.map(|cfg| {
                Arc::new(FaultPolicy {
                    cfg: cfg.clone(),
                    aborted: m.faults.with_label_values(&[route, "abort"]),
                    delayed: m.faults.with_label_values(&[route, "delay"]),
                })
            }),
        }
    }
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    policy: Option<Arc<FaultPolicy>>,
}

fn roll(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

impl FaultPolicy {
    fn abort(&self, h: &http::HeaderMap) -> Option<u16> {
        if self.cfg.headers
            && let Some(s) = h
                .get(ABORT_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok())
            && (200..=599).contains(&s)
        {
            return Some(s);
        }
        let a = self.cfg.abort.as_ref()?;
        roll(a.percent).then_some(a.status)
    }

    fn delay(&self, h: &http::HeaderMap) -> Option<Duration> {
        if self.cfg.headers
            && let Some(d) = h
                .get(DELAY_HEADER)
                .and_then(|v| config::parse_duration(v.to_str().ok()?).ok())
        {
            return Some(d.min(self.cfg.max_header_delay.0));
        }
        let d = self.cfg.delay.as_ref()?;
        roll(d.percent).then_some(d.duration.0)
    }
}

impl<S, B, R> tower::Service<Request<B>> for Fault<S>
where
    S: tower::Service<Request<B>, Response = R, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future, Result<R, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(p) = &self.policy else {
            return PolicyFuture::direct(self.inner.call(req));
        };
        if let Some(status) = p.abort(req.headers()) {
            p.aborted.inc();
            return PolicyFuture::ready(Err(ProxyError::FaultAbort { status }));
        }
        match p.delay(req.headers()) {
            None => PolicyFuture::direct(self.inner.call(req)),
            Some(d) => {
                p.delayed.inc();
                let mut inner = self.inner.clone();
                PolicyFuture::boxed(move || async move {
                    tokio::time::sleep(d).await;
                    tower::ServiceExt::ready(&mut inner).await?.call(req).await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    fn ok() -> impl Service<Request<()>, Response = (), Error = ProxyError, Future: Send + 'static>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|_r: Request<()>| async { Ok::<_, ProxyError>(()) })
    }

    #[tokio::test]
    async fn aborts_about_the_configured_share() {
        let cfg = config::Fault {
            abort: Some(config::FaultAbort {
                percent: 50.0,
                status: 503,
            }),
            delay: None,
            headers: false,
            max_header_delay: config::Dur::secs(10),
        };
        let mut svc = FaultLayer::new(Some(&cfg), "f1").layer(ok());
        let mut aborted = 0;
        for _ in 0..2000 {
            if let Err(ProxyError::FaultAbort { status: 503 }) =
                svc.ready().await.unwrap().call(Request::new(())).await
            {
                aborted += 1;
            }
        }
        assert!((850..1150).contains(&aborted), "{aborted}");
    }

    #[tokio::test(start_paused = true)]
    async fn header_faults_only_when_allowed() {
        let cfg = config::Fault {
            abort: None,
            delay: None,
            headers: true,
            max_header_delay: config::Dur::secs(1),
        };
        let mut svc = FaultLayer::new(Some(&cfg), "f2").layer(ok());
        let req = Request::builder()
            .header(ABORT_HEADER, "418")
            .body(())
            .unwrap();
        assert!(matches!(
            svc.ready().await.unwrap().call(req).await,
            Err(ProxyError::FaultAbort { status: 418 })
        ));
        let start = tokio::time::Instant::now();
        let req = Request::builder()
            .header(DELAY_HEADER, "250ms")
            .body(())
            .unwrap();
        assert!(svc.ready().await.unwrap().call(req).await.is_ok());
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        let start = tokio::time::Instant::now();
        let req = Request::builder()
            .header(DELAY_HEADER, "1000000000s")
            .body(())
            .unwrap();
        assert!(svc.ready().await.unwrap().call(req).await.is_ok());
        assert_eq!(start.elapsed(), Duration::from_secs(1), "capped");

        let mut off = FaultLayer::new(
            Some(&config::Fault {
                abort: None,
                delay: None,
                headers: false,
                max_header_delay: config::Dur::secs(10),
            }),
            "f2",
        )
        .layer(ok());
        let req = Request::builder()
            .header(ABORT_HEADER, "418")
            .body(())
            .unwrap();
        assert!(off.ready().await.unwrap().call(req).await.is_ok());
    }
}
