//! The admin server (`/config`, `/clusters`, `/metrics`, `POST /shutdown`,
//! loopback only) and the probe server (`/ready`, `/live`, `/metrics`).

mod app_probe;

use crate::proxy::Proxy;
use crate::telemetry;
use crate::telemetry::tap::{DroppedLine, Tapped};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the admin endpoints see: the proxy once it is up, and the shutdown trigger.
#[derive(Default)]
pub struct State {
    proxy: OnceLock<Arc<Proxy>>,
    shutdown: watch::Sender<bool>,
}

impl State {
    pub fn new() -> Arc<State> {
        Arc::new(State::default())
    }

    pub fn set_proxy(&self, p: Arc<Proxy>) {
        let _ = self.proxy.set(p);
    }

    /// Resolves when `POST /shutdown` was called.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Ready: config applied, not draining, and at least one listener serving.
    fn ready(&self) -> bool {
        self.proxy
            .get()
            .is_some_and(|p| !p.shared.draining.load(SeqCst) && p.listening() > 0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Admin,
    Probes,
}

/// Connections each admin or probe server serves at once; more are closed.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this, and an idle keep-alive
/// connection is closed after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds and serves; returns the bound address.
pub async fn serve(addr: SocketAddr, kind: Kind, state: Arc<State>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Some(HEADER_TIMEOUT));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(16)
            .keep_alive_interval(HEADER_TIMEOUT)
            .keep_alive_timeout(HEADER_TIMEOUT);
        let builder = Arc::new(builder);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = crate::proxy::ACCEPT_BACKOFF_MIN;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors: back off, never spin.
                    tracing::warn!(?kind, error = %e, "admin accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(crate::proxy::ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            backoff = crate::proxy::ACCEPT_BACKOFF_MIN;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(?kind, "admin connection limit reached; closing");
                continue;
            };
            let state = state.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        if kind == Kind::Probes
                            && req.method() == Method::GET
                            && let Some(probe) = app_probe(&state, req.uri().path())
                        {
                            return Ok(app_probe::check(&probe, &req).await.map(Either::Left));
                        }
                        if kind == Kind::Admin
                            && req.method() == Method::GET
                            && req.uri().path() == "/tap"
                            && admin_refusal(&req).is_none()
                        {
                            return Ok(tap(req.uri().query()).map(Either::Right));
                        }
                        Ok::<_, Infallible>(handle(kind, &state, req).map(Either::Left))
                    }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                drop(slot);
            });
        }
    });
    tracing::info!(?kind, address = %bound, "admin server listening");
    Ok(bound)
}

/// `GET /tap?seconds=S&max=N`: the requests answered in the next S seconds
/// (default 1, at most 30), up to N (default 100, at most 10,000), one JSON
/// object per line, each sent as it is answered (a chunked body). The tap
/// is subscribed before the response head goes out: a request sent once the
/// head arrived is seen. `outrigger tap` asks again for longer views. A
/// reader too slow for the traffic gets `{"dropped":N}` where N events went
/// by unseen.
fn tap(
    query: Option<&str>,
) -> Response<impl Body<Data = Bytes, Error = Infallible> + Send + use<>> {
    let arg = |k: &str, default: u64, max: u64| {
        query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(default)
            .min(max)
    };
    let (secs, max) = (arg("seconds", 1, 30), arg("max", 100, 10_000));
    let tap = telemetry::tap::Tap::new();
    let window = Box::pin(tokio::time::sleep(Duration::from_secs(secs)));
    // Ends at the window's end, after `max` events, or when the client
    // goes (the body, and with it the tap, is dropped).
    let lines = futures_util::stream::unfold(
        (tap, window, 0),
        move |(mut tap, mut window, n)| async move {
            if n >= max {
                return None;
            }
            loop {
                tokio::select! {
                    _ = &mut window => return None,
                    e = tap.next() => {
                        // A gap is a line of its own and not counted in `max`.
                        let (line, counted) = match e? {
                            Tapped::Event(e) => (serde_json::to_vec(&e), 1),
                            Tapped::Dropped(dropped) => (serde_json::to_vec(&DroppedLine { dropped }), 0),
                        };
                        let Ok(mut line) = line else { continue };
                        line.push(b'\n');
                        let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(line)));
                        return Some((frame, (tap, window, n + counted)));
                    }
                }
            }
        },
    );
    let mut r = Response::new(StreamBody::new(lines));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// The app probe the config lists at `path`, if any.
fn app_probe(state: &State, path: &str) -> Option<crate::config::AppProbe> {
    if !path.starts_with("/app-health/") {
        return None;
    }
    let p = state.proxy.get()?;
    p.snapshot().config.admin.app_probes.get(path).cloned()
}

/// A loopback host (`localhost`, `127.x.y.z`, `[::1]`, any port).
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The admin port only answers requests addressed to a loopback host, from
/// no web origin other than a loopback one: a page the developer visits
/// cannot shut the proxy down, and DNS rebinding cannot read `/config`.
fn admin_refusal<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| h.get(header::HOST).and_then(|v| v.to_str().ok()));
    if !host.is_some_and(loopback_host) {
        return Some("the admin server answers only requests to a loopback host\n");
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| {
                o.strip_prefix("http://")
                    .or_else(|| o.strip_prefix("https://"))
            })
            .is_some_and(loopback_host);
        if !ok {
            return Some("cross-origin requests to the admin server are refused\n");
        }
    }
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Some("cross-site requests to the admin server are refused\n");
    }
    None
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn handle(kind: Kind, state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if kind == Kind::Admin
        && let Some(why) = admin_refusal(&req)
    {
        return text(StatusCode::FORBIDDEN, why, PLAIN);
    }
    match (req.method(), req.uri().path(), kind) {
        (&Method::GET, "/live", _) => text(StatusCode::OK, "live\n", PLAIN),
        (&Method::GET, "/ready", _) => {
            if state.ready() {
                text(StatusCode::OK, "ready\n", PLAIN)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n", PLAIN)
            }
        }
        (&Method::GET, "/metrics", _) => text(
            StatusCode::OK,
            telemetry::render(),
            "text/plain; version=0.0.4",
        ),
        (&Method::GET, "/config", Kind::Admin) => match state.proxy.get() {
            Some(p) => {
                let snap = p.snapshot();
                let mut body = format!("# version: {}\n", p.version());
                // The certificate in force, never its key.
                if let Some(store) = &p.identity {
                    let c = store.current();
                    body.push_str(&format!(
                        "# identity: {}\n# certificate: serial {}, expires {} (unix {})\n",
                        c.id,
                        c.serial,
                        rfc3339(c.not_after),
                        c.not_after
                    ));
                }
                body.push_str(&snap.config.to_yaml());
                text(StatusCode::OK, body, "application/yaml")
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n", PLAIN),
        },
        (&Method::GET, "/clusters", Kind::Admin) => match state.proxy.get() {
            Some(p) => text(StatusCode::OK, clusters_json(p), "application/json"),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n", PLAIN),
        },
        (&Method::POST, "/shutdown", Kind::Admin) => {
            let _ = state.shutdown.send(true);
            text(StatusCode::OK, "draining\n", PLAIN)
        }
        (_, "/shutdown", Kind::Admin) => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n", PLAIN),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn clusters_json(p: &Proxy) -> String {
    let snap = p.snapshot();
    let mut names: Vec<&String> = snap.clusters.keys().collect();
    names.sort();
    let mut all: Vec<_> = names.into_iter().map(|n| &snap.clusters[n]).collect();
    let mut inbound: Vec<_> = snap
        .listeners
        .values()
        .filter_map(|l| l.forward.as_ref().map(|t| &t.cluster))
        .collect();
    all.append(&mut inbound);
    let now = crate::clock::now_ns();
    let clusters: Vec<_> = all
        .iter()
        .map(|c| {
            let endpoints: Vec<_> = c
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.addr.to_string(),
                        "state": e.health.state(now),
                        "in_flight": e.in_flight(),
                        "ewma_ms": e.ewma.get_ns() / 1e6,
                        "requests": e.requests.load(SeqCst),
                        "failures": e.failures.load(SeqCst),
                        "idle_connections": e.idle_connections(),
                    })
                })
                .collect();
            use crate::policy::circuit_breaker::Limit;
            // Totals since the cluster was made, and what is open now (the
            // circuit breaker's gauges: 0 when idle).
            let total = |f: fn(&crate::balance::Endpoint) -> u64| -> u64 {
                c.endpoints.iter().map(|e| f(e)).sum()
            };
            json!({
                "name": c.name,
                "lb": c.config.lb,
                "protocol": c.config.protocol,
                "requests_total": total(|e| e.requests.load(SeqCst)),
                "failures_total": total(|e| e.failures.load(SeqCst)),
                "open": {
                    "connections": c.limits.used(Limit::Connections),
                    "pending": c.limits.used(Limit::Pending),
                    "requests": c.limits.used(Limit::Requests),
                    "retries": c.limits.used(Limit::Retries),
                },
                "endpoints": endpoints,
            })
        })
        .collect();
    let doc = json!({ "version": p.version(), "clusters": clusters });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, origin: Option<&str>) -> Request<()> {
        let mut b = Request::post("/shutdown").header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_loopback_hosts_and_origins_reach_the_admin() {
        for ok in [
            "127.0.0.1:15000",
            "localhost:15000",
            "[::1]:15000",
            "localhost",
        ] {
            assert_eq!(admin_refusal(&req(ok, None)), None, "{ok}");
        }
        assert!(admin_refusal(&req("attacker.example:15000", None)).is_some());
        assert!(admin_refusal(&req("127.0.0.1.nip.io", None)).is_some());
        assert!(admin_refusal(&req("127.0.0.1:15000", Some("https://evil.example"))).is_some());
        assert!(admin_refusal(&req("127.0.0.1:15000", Some("null"))).is_some());
        assert_eq!(
            admin_refusal(&req("127.0.0.1:15000", Some("http://localhost:15000"))),
            None
        );
    }
}
