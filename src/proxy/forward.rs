//! Forwarding one request: the checks a request must pass (framing, host
//! and authority, header limits), route match, header rewriting, the
//! route's policy stack (which picks the endpoint and talks to it), and
//! tunnels (allowed upgrades, CONNECT).
//!
//! Everything up to the stack runs synchronously in `call`; the future is
//! a plain struct around the stack's own future, so a request costs no
//! boxed future here. Returns typed errors (`Routed`); `error::ErrorLayer`
//! turns them into responses.

use super::error::{ProxyError, Routed};
use super::headers;
use super::tunnel::{self, TunnelGuard};
use super::{ConnInfo, ListenerInfo};
use crate::balance::{Proto, RespBody};
use crate::body::{ClientBody, ReqBody};
use crate::config::Role;
use crate::context::RouteMeta;
use crate::http_util;
use crate::route::filters::Filters;
use crate::snapshot::{RouteStack, Target};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
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
        let index = self.conn.requests.fetch_add(1, Relaxed);
        match prepare(&self.conn, req, index) {
            Ok(Prepared::Sent(sent)) => ForwardFuture::Sent {
                inner: sent.inner,
                after: Some(sent.after),
            },
            Ok(Prepared::Connect(inner)) => ForwardFuture::Connect { inner },
            Err(e) => ForwardFuture::Failed { error: Some(e) },
        }
    }
}

type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<RespBody>, Routed>> + Send>>;

/// What the response needs once the stack answers.
struct After {
    meta: RouteMeta,
    /// The client's side of an upgrade the route allows, and its protocol.
    upgrade: Option<(OnUpgrade, http::HeaderValue)>,
    downstream: Proto,
    conn: Arc<ConnInfo>,
    /// The route's filters, for its response header edits.
    filters: Option<Arc<Filters>>,
}

struct Sent {
    inner: Oneshot<RouteStack, Request<ReqBody>>,
    after: After,
}

// `Sent` is the hot path and lives on the stack only until `call` returns.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    Sent(Sent),
    /// A CONNECT tunnel being opened (rare: boxed).
    Connect(BoxResponse),
}

pin_project_lite::pin_project! {
    #[project = ForwardProj]
    pub enum ForwardFuture {
        Sent { #[pin] inner: Oneshot<RouteStack, Request<ReqBody>>, after: Option<After> },
        Connect { inner: BoxResponse },
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
            ForwardProj::Connect { inner } => inner.as_mut().poll(cx),
            ForwardProj::Sent { inner, after } => {
                let result = match inner.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                let Some(after) = after.take() else {
                    return Poll::Pending;
                };
                Poll::Ready(match result {
                    Ok(resp) => finish(resp, after),
                    Err(error) => Err(Routed::with(error, after.meta)),
                })
            }
        }
    }
}

/// RFC 9112 §3.2 and RFC 9113 §8.3.1: exactly one host, and where a
/// request carries both `:authority` (or an absolute-form target) and a
/// `Host` header, one authority wins: the URI's on HTTP/1.1 (the upstream
/// gets it as Host), and on HTTP/2 the two must agree. Returns whether
/// a duplicate `Host` header should be dropped (HTTP/2, equal to
/// `:authority`).
fn check_host<B>(req: &Request<B>, downstream: Proto) -> Result<bool, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::DuplicateHost);
    }
    let authority = req.uri().authority();
    if authority.is_some_and(|a| a.as_str().contains('@')) {
        // RFC 9110 §4.2.4: userinfo has no place in an http(s) URI.
        return Err(ProxyError::BadHost);
    }
    match (authority, host) {
        (Some(a), Some(h)) if downstream == Proto::Http2 => {
            if a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) {
                Ok(true)
            } else {
                Err(ProxyError::ConflictingHost)
            }
        }
        (Some(_), _) => Ok(false),
        (None, Some(h)) => {
            if valid_host(h.as_bytes()) {
                Ok(false)
            } else {
                Err(ProxyError::BadHost)
            }
        }
        // HTTP/1.0 may omit Host; HTTP/1.1 and HTTP/2 may not.
        (None, None) if req.version() == http::Version::HTTP_10 => Ok(false),
        (None, None) => Err(ProxyError::MissingHost),
    }
}

/// A `Host` value that is an authority (`host[:port]`, IPv6 in brackets),
/// checked without building one: nothing that would change the URI.
fn valid_host(h: &[u8]) -> bool {
    !h.is_empty()
        && h.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'-'
                        | b'_'
                        | b':'
                        | b'['
                        | b']'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

/// RFC 9113 §6.5.2: a header list's size is its names and values plus 32
/// bytes per field.
fn header_list_size<B>(req: &Request<B>) -> usize {
    let pseudo = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + 4 * 32
        + 4;
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + pseudo
}

/// The checks every request passes before anything else looks at it.
fn admit(
    conn: &ConnInfo,
    req: &Request<Incoming>,
    index: u64,
    downstream: Proto,
) -> Result<bool, ProxyError> {
    let l = &conn.listener;
    let h = req.headers();
    if downstream == Proto::Http1 {
        // RFC 9112 §6.3: both framings at once is how requests are smuggled.
        if conn.framing.conflict_at(index)
            || (h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH))
        {
            l.bad_request("conflicting-framing");
            return Err(ProxyError::ConflictingFraming);
        }
    } else if header_list_size(req) > l.max_header_bytes {
        // h2 accepted up to twice the limit so that this is a counted 431,
        // as on HTTP/1, not a bare stream reset.
        l.bad_request("header-too-large");
        return Err(ProxyError::HeaderTooLarge {
            limit: l.max_header_bytes,
        });
    }
    if h.len() > l.max_headers {
        l.bad_request("too-many-headers");
        l.limit_hit("headers");
        return Err(ProxyError::TooManyHeaders {
            limit: l.max_headers,
        });
    }
    check_host(req, downstream).inspect_err(|_| l.bad_request("bad-host"))
}

/// Routing and header rewriting, up to handing the request to the route's stack.
fn prepare(
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    index: u64,
) -> Result<Prepared, Routed> {
    let downstream = if req.version() == http::Version::HTTP_2 {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let drop_host = admit(conn, &req, index, downstream)?;
    let l = &conn.listener;
    // Route, authorize and forward one canonical path.
    match http_util::normalize_path(req.uri().path()) {
        Ok(None) => {}
        Ok(Some(p)) => http_util::set_path(&mut req, &p).map_err(|_| ProxyError::BadPath)?,
        Err(_) => {
            l.bad_request("bad-path");
            return Err(ProxyError::BadPath.into());
        }
    }
    if let Some(port) = l.redirect_https {
        return Err(ProxyError::Redirect {
            status: 308,
            location: https_location(&req, port),
        }
        .into());
    }

    let snap = l.shared.snapshot.load();
    let routes = snap
        .listeners
        .get(&l.name)
        .ok_or(ProxyError::ListenerGone)?;
    if let Some(bucket) = &routes.rate_limit {
        bucket.try_acquire()?;
    }
    let connect = req.method() == Method::CONNECT;
    let host = http_util::authority(&req).unwrap_or("");
    // A CONNECT target has no path; it matches routes as `/`.
    let path = if connect { "/" } else { req.uri().path() };
    let route_id = routes.table.lookup(host, req.method(), path, req.headers());
    let filters = route_id.and_then(|id| routes.filters[id as usize].clone());
    if let Some(to) = filters.as_ref().and_then(|f| f.redirect.as_ref()) {
        let scheme = if conn.tls { "https" } else { "http" };
        return Err(ProxyError::Redirect {
            status: to.status,
            location: to.location(scheme, host, req.uri().path(), req.uri().query()),
        }
        .into());
    }
    let target = match route_id {
        Some(id) => {
            let b = routes.table.route(id).pick_backend();
            routes.targets[id as usize].get(b)
        }
        None => routes.forward.as_ref(),
    };
    let Some(target) = target else {
        return Err(ProxyError::NoRoute.into());
    };
    let mut meta = RouteMeta {
        stats: Some(target.stats.clone()),
        ..Default::default()
    };
    if connect {
        if !target.connect {
            return Err(Routed::with(ProxyError::ConnectNotAllowed, meta));
        }
        // A tunnel skips the route's stack: its authorization and rate
        // limit are checked here.
        let peer = conn.peer_id.as_ref().map(|(id, _, _)| &*id.0);
        let admitted = target
            .stack
            .check(peer, req.method(), "/")
            .and_then(|()| match target.stack.inner().bucket() {
                Some(b) => b.try_acquire(),
                None => Ok(()),
            })
            .and_then(|()| check_tunnel_room(l));
        if let Err(e) = admitted {
            return Err(Routed::with(e, meta));
        }
        return Ok(Prepared::Connect(open_connect(conn, target, req, meta)));
    }

    // Only upgrades the route allows are tunnelled (WebSocket by default):
    // any other, `h2c` above all, would carry traffic past every route,
    // policy and log. Those requests are served as plain HTTP/1.1.
    let upgrade_token = (downstream == Proto::Http1)
        .then(|| headers::upgrade_token(req.headers()))
        .flatten()
        .filter(|t| target.allows_upgrade(t))
        .and_then(|t| http::HeaderValue::from_str(t).ok());
    let upgrade = upgrade_token.is_some();
    if upgrade {
        check_tunnel_room(l).map_err(|e| Routed::with(e, meta.clone()))?;
    }
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
    if let Some(f) = &filters {
        if let Some(p) = f.rewritten_path(req.uri().path()) {
            http_util::set_path(&mut req, &p).map_err(|_| ProxyError::BadPath)?;
        }
        if let Some(a) = &f.rewrite_host {
            http_util::set_authority(&mut req, a);
        }
    }
    let hdrs = req.headers_mut();
    headers::strip_hop_by_hop(hdrs, upgrade);
    if let Some(t) = &upgrade_token {
        // Only the protocol the route allows goes upstream, and only it
        // may come back in the 101.
        hdrs.insert(header::UPGRADE, t.clone());
    }
    if drop_host {
        hdrs.remove(header::HOST);
    }
    meta.request_id = match l.role {
        Role::Gateway => {
            // The internet may not ask for faults, claim attempts or an
            // identity, choose the request id, nor say where it came from
            // unless trusted.
            headers::strip_own(hdrs);
            let id = headers::set_request_id(hdrs, !l.trust_request_id);
            let proto = if conn.tls { "https" } else { "http" };
            headers::set_forwarded(hdrs, conn.peer.ip(), proto, &l.trust);
            id
        }
        Role::Inbound => {
            // The app may trust this header: only the proxy sets it.
            hdrs.remove(&PEER_IDENTITY_HEADER);
            let id = headers::ensure_request_id(hdrs);
            if let Some((id, value, counter)) = &conn.peer_id {
                hdrs.insert(PEER_IDENTITY_HEADER.clone(), value.clone());
                counter.inc();
                req.extensions_mut().insert(id.clone());
            }
            id
        }
        Role::Outbound => headers::ensure_request_id(hdrs),
    };
    if let Some(e) = filters.as_ref().and_then(|f| f.request.as_ref()) {
        e.apply(req.headers_mut());
        // A route's edits may set or remove the id: the access log names
        // the one the upstream gets.
        meta.request_id = req.headers().get(headers::REQUEST_ID).cloned();
    }
    match proto {
        Proto::Http1 => http_util::to_http1(&mut req),
        Proto::Http2 => http_util::to_http2(&mut req, authority),
    }
    let upgrade = upgrade_token.map(|t| (hyper::upgrade::on(&mut req), t));
    Ok(Prepared::Sent(Sent {
        inner: stack.oneshot(
            req.map(|b| ReqBody::Incoming(ClientBody::new(b, Some(l.stream_idle_timeout)))),
        ),
        after: After {
            meta,
            upgrade,
            downstream,
            conn: conn.clone(),
            filters,
        },
    }))
}

fn check_tunnel_room(l: &ListenerInfo) -> Result<(), ProxyError> {
    if l.tunnels.get() >= i64::from(l.max_tunnels) {
        l.limit_hit("tunnels");
        return Err(ProxyError::TooManyTunnels {
            limit: l.max_tunnels,
        });
    }
    Ok(())
}

/// CONNECT: a TCP connection to the route's cluster, then 200 and the
/// bytes both ways.
fn open_connect(
    conn: &Arc<ConnInfo>,
    target: &Target,
    mut req: Request<Incoming>,
    mut meta: RouteMeta,
) -> BoxResponse {
    let cluster = target.cluster.clone();
    let conn = conn.clone();
    let down = hyper::upgrade::on(&mut req);
    Box::pin(async move {
        let up = match cluster.connect_tcp(req.headers()).await {
            Ok(up) => up,
            Err(error) => {
                return Err(Routed::with(error, meta));
            }
        };
        meta.upstream = Some(up.addr);
        let l = conn.listener.clone();
        let guard = TunnelGuard::new(l.tunnels.clone());
        conn.framing.set_opaque();
        tokio::spawn(async move {
            match down.await {
                Ok(d) => {
                    let idle = l.tunnel_idle_timeout;
                    let addr = up.addr;
                    let crate::balance::TcpTunnel { stream, .. } = up;
                    let hold = (conn, guard);
                    let (sent, received) = tunnel::run(TokioIo::new(d), stream, idle, hold).await;
                    tracing::debug!(%addr, sent, received, "CONNECT tunnel closed");
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        let mut resp = Response::new(RespBody::empty());
        resp.extensions_mut().insert(meta);
        Ok(resp)
    })
}

/// The response on its way back: upgrade tunnel, stream idle timer, hop-by-hop headers.
fn finish(mut resp: Response<RespBody>, after: After) -> Result<Response<RespBody>, Routed> {
    let After {
        mut meta,
        upgrade,
        downstream,
        conn,
        filters,
    } = after;
    meta.upstream = resp.body().served_by();

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 the client did not ask for, or to another protocol than the
        // one the route allows, would carry traffic nobody checked.
        let switched_to = resp.headers().get(header::UPGRADE);
        let Some((down, _)) = upgrade.filter(|(_, asked)| {
            switched_to.is_some_and(|s| s.as_bytes().eq_ignore_ascii_case(asked.as_bytes()))
        }) else {
            return Err(Routed::with(ProxyError::UnexpectedUpgrade, meta));
        };
        let up = hyper::upgrade::on(&mut resp);
        // The upstream body holds the cluster's request permit and the
        // connection's: the tunnel keeps them.
        let mut body = std::mem::replace(resp.body_mut(), RespBody::empty());
        if let RespBody::Upstream(b) = &mut body {
            b.forget_connection();
        }
        let l = conn.listener.clone();
        let guard = TunnelGuard::new(l.tunnels.clone());
        conn.framing.set_opaque();
        let idle = l.tunnel_idle_timeout;
        tokio::spawn(async move {
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let hold = (conn, body, guard);
                    let (sent, received) =
                        tunnel::run(TokioIo::new(d), TokioIo::new(u), idle, hold).await;
                    tracing::debug!(sent, received, "upgraded connection closed");
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        resp.extensions_mut().insert(meta);
        return Ok(resp);
    }

    if let RespBody::Upstream(body) = resp.body_mut() {
        body.set_idle_timeout(conn.listener.stream_idle_timeout);
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    if let Some(e) = filters.as_ref().and_then(|f| f.response.as_ref()) {
        e.apply(resp.headers_mut());
    }
    if conn.tls
        && let Some(hsts) = conn.listener.tls.as_ref().and_then(|t| t.hsts.clone())
    {
        resp.headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
    *resp.version_mut() = match downstream {
        Proto::Http1 => http::Version::HTTP_11,
        Proto::Http2 => http::Version::HTTP_2,
    };
    resp.extensions_mut().insert(meta);
    Ok(resp)
}

/// The header an inbound listener tells the app the caller's identity in.
pub const PEER_IDENTITY: &str = "x-outrigger-peer-identity";
/// The same, ready-made: removed and written on every inbound request.
static PEER_IDENTITY_HEADER: http::HeaderName = http::HeaderName::from_static(PEER_IDENTITY);

/// `https://<host without port>[:port]<path>` for a plain-HTTP request.
fn https_location<B>(req: &Request<B>, port: u16) -> String {
    let host = http_util::authority(req).unwrap_or("");
    let name = match host.rfind(']') {
        Some(end) => &host[..=end],
        None => host.split(':').next().unwrap_or(host),
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if port == 443 {
        format!("https://{name}{pq}")
    } else {
        format!("https://{name}:{port}{pq}")
    }
}

fn host_authority(host: &str) -> Option<Option<Authority>> {
    if host.is_empty() {
        return None;
    }
    Authority::try_from(host).ok().map(Some)
}
