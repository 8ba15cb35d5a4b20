//! Forwarding one request: route match, header rewriting, the route's
//! policy stack (which picks the endpoint and talks to it), and upgrade
//! tunnels.
//!
//! Everything up to the stack runs synchronously in `call`; the future is
//! a plain struct around the stack's own future, so a request costs no
//! boxed future here. Returns typed errors (`Routed`); `error::ErrorLayer`
//! turns them into responses.

use super::ConnInfo;
use super::error::{ProxyError, Routed};
use super::headers;
use crate::balance::RespBody;
use crate::balance::{Proto, Served};
use crate::body::{ClientBody, ReqBody};
use crate::config::Role;
use crate::context::RouteMeta;
use crate::http_util;
use crate::snapshot::RouteStack;
use crate::telemetry::metrics;
use http::uri::Authority;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::ServiceExt;
use tower::util::Oneshot;

/// The innermost service of a downstream connection.
#[derive(Clone)]
pub struct Forward {
    pub conn: Arc<ConnInfo>,
}

impl tower::Service<Request<Incoming>> for Forward {
    type Response = Response<RespBody>;
    type Error = Routed;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Routed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> ForwardFuture {
        self.conn.requests.fetch_add(1, Relaxed);
        match prepare(&self.conn, req) {
            Ok(sent) => ForwardFuture::Sent {
                inner: sent.inner,
                after: Some(sent.after),
            },
            Err(e) => ForwardFuture::Failed { error: Some(e) },
        }
    }
}

/// What the response needs once the stack answers.
struct After {
    meta: RouteMeta,
    upgrade: Option<OnUpgrade>,
    downstream: Proto,
    stream_idle: Duration,
}

struct Sent {
    inner: Oneshot<RouteStack, Request<ReqBody>>,
    after: After,
}

pin_project_lite::pin_project! {
    #[project = ForwardProj]
    pub enum ForwardFuture {
        Sent { #[pin] inner: Oneshot<RouteStack, Request<ReqBody>>, after: Option<After> },
        Failed { error: Option<Routed> },
    }
}

impl Future for ForwardFuture {
    type Output = Result<Response<RespBody>, Routed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ForwardProj::Failed { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ForwardProj::Sent { inner, after } => {
                let result = match inner.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                let Some(after) = after.take() else {
                    return Poll::Pending;
                };
                Poll::Ready(match result {
                    Ok(resp) => Ok(finish(resp, after)),
                    Err(error) => Err(Routed {
                        error,
                        meta: Some(after.meta),
                    }),
                })
            }
        }
    }
}

/// Routing and header rewriting, up to handing the request to the route's stack.
fn prepare(conn: &ConnInfo, mut req: Request<Incoming>) -> Result<Sent, Routed> {
    let downstream = if req.version() == http::Version::HTTP_2 {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let h = req.headers();
    // RFC 9112 §6.3: both framings at once is how requests are smuggled; refuse it.
    if downstream == Proto::Http1
        && (conn.framing_conflict.load(Relaxed)
            || (h.contains_key(header::TRANSFER_ENCODING)
                && h.contains_key(header::CONTENT_LENGTH)))
    {
        metrics()
            .bad_requests
            .with_label_values(&[&conn.listener.name, "conflicting-framing"])
            .inc();
        return Err(ProxyError::ConflictingFraming.into());
    }

    let snap = conn.listener.shared.snapshot.load();
    let routes = snap
        .listeners
        .get(&conn.listener.name)
        .ok_or(ProxyError::ListenerGone)?;
    if let Some(bucket) = &routes.rate_limit {
        bucket.try_acquire()?;
    }
    let host = http_util::authority(&req).unwrap_or("");
    let target = match routes
        .table
        .lookup(host, req.method(), req.uri().path(), req.headers())
    {
        Some(id) => {
            let b = routes.table.route(id).pick_backend();
            routes.targets[id as usize].get(b)
        }
        None => routes.forward.as_ref(),
    };
    let Some(target) = target else {
        return Err(ProxyError::NoRoute.into());
    };
    let meta = RouteMeta {
        stats: Some(target.stats.clone()),
        upstream: None,
        error: None,
    };

    let upgrade = downstream == Proto::Http1 && headers::wants_upgrade(req.headers());
    // Upgrades are an HTTP/1.1 mechanism: they go upstream over HTTP/1.1.
    let proto = if upgrade {
        Proto::Http1
    } else {
        target
            .cluster
            .proto(downstream, crate::error::is_grpc(req.headers()))
    };
    let authority = match proto {
        Proto::Http2 if req.uri().authority().is_none() => host_authority(host).ok_or(Routed {
            error: ProxyError::MissingHost,
            meta: None,
        })?,
        _ => None,
    };
    let stack = target.stack.clone();
    drop(snap);
    let hdrs = req.headers_mut();
    headers::strip_hop_by_hop(hdrs, upgrade);
    headers::ensure_request_id(hdrs);
    if conn.listener.role == Role::Gateway {
        headers::add_forwarded(hdrs, conn.peer.ip(), "http");
    }
    match proto {
        Proto::Http1 => http_util::to_http1(&mut req),
        Proto::Http2 => http_util::to_http2(&mut req, authority),
    }
    let upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    Ok(Sent {
        inner: stack.oneshot(req.map(|b| {
            ReqBody::Incoming(ClientBody::new(b, Some(conn.listener.stream_idle_timeout)))
        })),
        after: After {
            meta,
            upgrade,
            downstream,
            stream_idle: conn.listener.stream_idle_timeout,
        },
    })
}

/// The response on its way back: upgrade tunnel, stream idle timer, hop-by-hop headers.
fn finish(mut resp: Response<RespBody>, after: After) -> Response<RespBody> {
    let After {
        mut meta,
        upgrade,
        downstream,
        stream_idle,
    } = after;
    meta.upstream = resp.extensions().get::<Served>().map(|s| s.0);

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = upgrade {
            let up = hyper::upgrade::on(&mut resp);
            if let RespBody::Upstream(body) = resp.body_mut() {
                body.forget_connection();
            }
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(d),
                            &mut TokioIo::new(u),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
        resp.extensions_mut().insert(meta);
        return resp;
    }

    if let RespBody::Upstream(body) = resp.body_mut() {
        body.set_idle_timeout(stream_idle);
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    *resp.version_mut() = match downstream {
        Proto::Http1 => http::Version::HTTP_11,
        Proto::Http2 => http::Version::HTTP_2,
    };
    resp.extensions_mut().insert(meta);
    resp
}

fn host_authority(host: &str) -> Option<Option<Authority>> {
    if host.is_empty() {
        return None;
    }
    Authority::try_from(host).ok().map(Some)
}
