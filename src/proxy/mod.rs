//! Listeners (inbound, outbound, gateway): binding, the accept loop, the
//! hyper server for HTTP/1.1 and HTTP/2 on one port, the per-connection
//! service stack, config application and draining.

pub mod error;
mod forward;
pub mod framing;
pub mod headers;
mod streams;
mod tunnel;
mod woken;

use crate::config::{Config, Listener, Role, TlsMode};
use crate::policy::authz::PeerIdentity;
use crate::policy::metrics::{ListenerScope, MetricsLayer};
use crate::snapshot::Snapshot;
use crate::telemetry::{RouteStats, metrics};
use crate::tls::identity::IdentityStore;
use arc_swap::ArcSwap;
use error::ErrorLayer;
use forward::Forward;
use http::HeaderValue;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use streams::{StreamExec, Streams};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};

pub use crate::context::RouteMeta;

/// State every listener and connection shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub draining: AtomicBool,
    /// Listeners still serving out their drain delay.
    delayed: AtomicUsize,
    active: AtomicUsize,
    idle: Notify,
}

pub struct ListenerInfo {
    pub name: String,
    pub role: Role,
    pub address: SocketAddr,
    pub shared: Arc<Shared>,
    /// Name, access-log flag and unmatched labels, for the metrics layer.
    pub scope: Arc<ListenerScope>,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: u32,
    pub max_tunnels: u32,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// Gateway: who may say where a request came from.
    pub trust: headers::Trust,
    pub trust_request_id: bool,
    pub error_detail: bool,
    /// A plain gateway listener that redirects to HTTPS on this port.
    pub redirect_https: Option<u16>,
    /// Takes connections redirected by `outrigger init` (see `intercept`).
    pub transparent: bool,
    /// Set when this listener's connections are to finish (drain).
    drain: watch::Receiver<bool>,
    /// TLS on this listener (mTLS between sidecars, or gateway termination).
    pub tls: Option<Arc<ListenerTls>>,
    /// Label sets resolved once per listener, not per connection.
    connections: prometheus::IntGauge,
    connections_total: prometheus::IntCounter,
    pub tunnels: prometheus::IntGauge,
    rejected_connections: prometheus::IntCounter,
}

impl ListenerInfo {
    /// Counts a refusal by one of the listener's limits.
    pub fn limit_hit(&self, limit: &str) {
        metrics()
            .limit_rejections
            .with_label_values(&[&self.name, limit])
            .inc();
    }

    pub fn bad_request(&self, reason: &str) {
        metrics()
            .bad_requests
            .with_label_values(&[&self.name, reason])
            .inc();
    }
}

/// One downstream connection, shared by its requests and by a tunnel it
/// turns into: while any of them lives, the connection is counted open.
pub struct ConnInfo {
    pub listener: Arc<ListenerInfo>,
    pub peer: SocketAddr,
    /// What the HTTP/1 framing watch found on this connection.
    pub framing: Arc<framing::Framing>,
    /// Requests started on this connection, for the idle watchdog and the
    /// framing watch's head index.
    pub requests: AtomicU64,
    /// The connection came over TLS.
    pub tls: bool,
    /// The verified identity of the peer (mTLS), with its request counter
    /// resolved once per connection.
    pub peer_id: Option<(PeerIdentity, HeaderValue, prometheus::IntCounter)>,
    _open: ConnGuard,
}

/// What a listener's TLS needs at accept time.
pub struct ListenerTls {
    pub mode: TlsMode,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
    pub hsts: Option<HeaderValue>,
}

/// Builds a listener's TLS from its config: mTLS with the proxy's identity,
/// or a gateway's certificates by SNI. Errors name the file.
fn listener_tls(
    l: &Listener,
    identity: Option<&Arc<IdentityStore>>,
) -> Result<Option<Arc<ListenerTls>>, String> {
    let t = l.tls();
    let config = match t.mode {
        TlsMode::Disabled => return Ok(None),
        TlsMode::Strict | TlsMode::Permissive => {
            let store = identity.ok_or("mTLS needs the proxy's identity")?;
            crate::tls::mesh_server(store).map_err(|e| e.to_string())?
        }
        TlsMode::Terminate => {
            let mut certs = crate::tls::SniCerts::default();
            for (j, hc) in t.certificates.iter().enumerate() {
                let ck = crate::tls::load_certified(&hc.cert, &hc.key)
                    .map_err(|e| format!("certificates[{j}]: {e}"))?;
                for h in &hc.hosts {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('*') {
                        Some(suffix) => certs.wildcard.push((suffix.to_string(), ck.clone())),
                        None => {
                            certs.exact.insert(h, ck.clone());
                        }
                    }
                }
                if hc.default {
                    certs.default = Some(ck);
                }
            }
            crate::tls::gateway_server(certs, t.min_version == "1.2").map_err(|e| e.to_string())?
        }
    };
    let hsts = match &t.hsts {
        Some(v) => Some(
            HeaderValue::from_str(v).map_err(|_| format!("hsts: `{v}` is not a header value"))?,
        ),
        None => None,
    };
    Ok(Some(Arc::new(ListenerTls {
        mode: t.mode,
        acceptor: tokio_rustls::TlsAcceptor::from(config),
        handshake_timeout: t.handshake_timeout.0,
        hsts,
    })))
}

/// Looks endpoint names up again when due and rebuilds the snapshot when
/// their addresses change: clusters whose addresses stayed are kept as
/// they are; a removed address's requests in flight finish on it.
async fn refresh_dns(proxy: std::sync::Weak<Proxy>) {
    loop {
        let next = match proxy.upgrade() {
            Some(p) => p.dns.next_due(),
            None => return,
        };
        // Without names, look again now and then: a reload may add one
        // (it is then looked up by the reload itself).
        // At most a second: a reload may bring a name due sooner.
        let soon = tokio::time::Instant::now() + Duration::from_secs(1);
        let at = next.map_or(soon, |n| n.min(soon));
        tokio::time::sleep_until(at).await;
        let Some(p) = proxy.upgrade() else { return };
        if p.dns.refresh().await
            && let Err(e) = p.reresolve().await
        {
            tracing::warn!(error = %e, "dns: the new addresses could not be applied");
        }
    }
}

/// What a listener's accept loop serves with; swapped in place when only
/// the listener's settings change, so its socket never closes.
struct Serving {
    info: Arc<ListenerInfo>,
    builder: Arc<auto::Builder<StreamExec>>,
}

struct Running {
    config: Listener,
    serving: Arc<ArcSwap<Serving>>,
    stop: watch::Sender<bool>,
    /// Asks this listener's open connections to finish.
    drain: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Compile(#[from] crate::route::CompileError),
    #[error("listeners[{index}].tls: {message}")]
    Tls { index: usize, message: String },
    #[error("identity: the proxy started without an identity; adding one takes a restart")]
    IdentityAdded,
    #[error("listeners[{index}].address: cannot bind {address}: {source}")]
    Bind {
        index: usize,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// The data plane: the snapshot in force and the listeners serving it.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// The proxy's credentials, when it has an identity (mTLS).
    pub identity: Option<Arc<IdentityStore>>,
    listeners: Mutex<HashMap<String, Running>>,
    version: AtomicU64,
    /// Serialises config application; requests never take it.
    apply_lock: tokio::sync::Mutex<()>,
    /// What the endpoint names resolve to, refreshed in the background.
    dns: Arc<crate::balance::dns::Dns>,
}

impl Proxy {
    /// Builds the first snapshot and binds its listeners.
    pub async fn start(
        config: Config,
        identity: Option<Arc<IdentityStore>>,
    ) -> Result<Arc<Proxy>, ApplyError> {
        let dns = Arc::new(crate::balance::dns::Dns::system());
        let resolved = dns.prime(&config).await;
        let snap = Snapshot::build_resolved(config.clone(), 0, None, identity.as_ref(), &resolved)?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snap),
            draining: AtomicBool::new(false),
            delayed: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let proxy = Arc::new(Proxy {
            shared,
            identity,
            listeners: Mutex::new(HashMap::new()),
            version: AtomicU64::new(0),
            apply_lock: tokio::sync::Mutex::new(()),
            dns,
        });
        proxy.apply(config).await?;
        tokio::spawn(refresh_dns(Arc::downgrade(&proxy)));
        Ok(proxy)
    }

    pub fn version(&self) -> u64 {
        self.version.load(SeqCst)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Applies a validated config: compiles it, binds new listeners, swaps
    /// the snapshot atomically, then stops listeners that went away. On any
    /// error nothing changes.
    pub async fn apply(&self, config: Config) -> Result<u64, ApplyError> {
        let _guard = self.apply_lock.lock().await;
        self.apply_locked(config).await
    }

    /// Rebuilds the snapshot in force with what its names resolve to now.
    async fn reresolve(&self) -> Result<u64, ApplyError> {
        let _guard = self.apply_lock.lock().await;
        // The config in force under the lock: a reload meanwhile wins.
        let config = (*self.shared.snapshot.load().config).clone();
        self.apply_locked(config).await
    }

    async fn apply_locked(&self, config: Config) -> Result<u64, ApplyError> {
        let version = self.version.load(SeqCst) + 1;
        let current = self.shared.snapshot.load_full();
        if config.identity.is_some() && self.identity.is_none() {
            return Err(ApplyError::IdentityAdded);
        }
        let resolved = self.dns.prime(&config).await;
        let snap = Snapshot::build_resolved(
            config.clone(),
            version,
            Some(&current),
            self.identity.as_ref(),
            &resolved,
        )?;
        // TLS for the listeners that are new or changed, before anything is
        // swapped: a certificate that does not load changes nothing.
        let mut tls = HashMap::new();
        {
            let running = self.listeners.lock();
            for (index, l) in config.listeners.iter().enumerate() {
                if running.get(&l.name).is_some_and(|r| r.config == *l) {
                    continue;
                }
                let state = listener_tls(l, self.identity.as_ref())
                    .map_err(|message| ApplyError::Tls { index, message })?;
                tls.insert(l.name.clone(), state);
            }
        }

        // Bind what is new or moved before anything is swapped. A listener
        // whose address stays keeps its socket; only its settings change.
        let mut bound = Vec::new();
        {
            let running = self.listeners.lock();
            for (index, l) in config.listeners.iter().enumerate() {
                if running
                    .get(&l.name)
                    .is_some_and(|r| r.config.address == l.address)
                {
                    continue;
                }
                let sock = bind(l.address).map_err(|source| ApplyError::Bind {
                    index,
                    address: l.address,
                    source,
                })?;
                bound.push((l.clone(), sock));
            }
        }

        self.shared.snapshot.store(Arc::new(snap));
        self.version.store(version, SeqCst);
        self.dns.retain(&config);
        crate::telemetry::trace::configure(&config);
        metrics().config_version.set(version as i64);

        let mut running = self.listeners.lock();
        for l in &config.listeners {
            if let Some(r) = running.get_mut(&l.name)
                && r.config != *l
                && r.config.address == l.address
            {
                let address = r.serving.load().info.address;
                let t = tls.get(&l.name).cloned().flatten();
                r.serving
                    .store(Arc::new(self.serving(l, address, t, r.drain.subscribe())));
                r.config = l.clone();
                tracing::info!(listener = %l.name, "listener settings updated");
            }
        }
        for (l, sock) in bound {
            let address = sock.local_addr().unwrap_or(l.address);
            let t = tls.get(&l.name).cloned().flatten();
            let (drain, drain_rx) = watch::channel(self.shared.draining.load(SeqCst));
            let serving = Arc::new(ArcSwap::from_pointee(
                self.serving(&l, address, t, drain_rx),
            ));
            let (stop, stop_rx) = watch::channel(false);
            tracing::info!(listener = %l.name, role = l.role.as_str(), %address, "listening");
            tokio::spawn(accept_loop(sock, l.name.clone(), serving.clone(), stop_rx));
            if let Some(old) = running.insert(
                l.name.clone(),
                Running {
                    config: l,
                    serving,
                    stop,
                    drain,
                },
            ) {
                let _ = old.stop.send(true);
            }
        }
        let keep: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        running.retain(|name, r| {
            let k = keep.contains(&name.as_str());
            if !k {
                tracing::info!(listener = %name, "listener removed");
                let _ = r.stop.send(true);
            }
            k
        });
        Ok(version)
    }

    fn serving(
        &self,
        l: &Listener,
        address: SocketAddr,
        tls: Option<Arc<ListenerTls>>,
        drain: watch::Receiver<bool>,
    ) -> Serving {
        Serving {
            info: Arc::new(ListenerInfo {
                name: l.name.clone(),
                role: l.role,
                address,
                shared: self.shared.clone(),
                scope: Arc::new(ListenerScope {
                    name: l.name.clone(),
                    access_log: l.access_log,
                    unmatched: RouteStats::new(&l.name, "", ""),
                }),
                max_header_bytes: l.max_header_bytes,
                max_headers: l.max_headers,
                max_connections: l.max_connections,
                max_tunnels: l.max_tunnels,
                idle_timeout: l.idle_timeout.0,
                header_read_timeout: l.header_read_timeout.0,
                stream_idle_timeout: l.stream_idle_timeout.0,
                tunnel_idle_timeout: l.tunnel_idle_timeout.unwrap_or(l.stream_idle_timeout).0,
                trust: headers::Trust {
                    hops: l.trusted_hops,
                    proxies: l.trusted_proxies.clone(),
                },
                trust_request_id: l.trust_request_id,
                error_detail: l.error_detail,
                redirect_https: l.redirect_https,
                transparent: l.transparent,
                drain,
                tls,
                connections: metrics().connections.with_label_values(&[&l.name]),
                connections_total: metrics().connections_total.with_label_values(&[&l.name]),
                tunnels: metrics().tunnels.with_label_values(&[&l.name]),
                rejected_connections: metrics()
                    .limit_rejections
                    .with_label_values(&[&l.name, "connections"]),
            }),
            builder: server_builder(l),
        }
    }

    /// Starts draining: listeners stop accepting, open connections are
    /// asked to finish (HTTP/1 `connection: close`, HTTP/2 GOAWAY).
    pub fn begin_drain(&self) {
        if self.shared.draining.swap(true, SeqCst) {
            return;
        }
        tracing::info!("draining");
        for (name, r) in self.listeners.lock().iter() {
            match r.config.drain_delay {
                None => {
                    let _ = r.stop.send(true);
                    let _ = r.drain.send(true);
                }
                Some(delay) => {
                    let (stop, drain) = (r.stop.clone(), r.drain.clone());
                    let open = r.serving.load().info.connections.clone();
                    let name = name.clone();
                    let shared = self.shared.clone();
                    shared.delayed.fetch_add(1, SeqCst);
                    tokio::spawn(async move {
                        delayed_stop(&name, delay.0, open).await;
                        let _ = stop.send(true);
                        let _ = drain.send(true);
                        shared.delayed.fetch_sub(1, SeqCst);
                        shared.idle.notify_waiters();
                    });
                }
            }
        }
    }

    /// Waits until no downstream connection is open, or `deadline` passes.
    /// Returns whether it went idle.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let n = self.shared.idle.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if self.shared.active.load(SeqCst) == 0 && self.shared.delayed.load(SeqCst) == 0 {
                    return;
                }
                n.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }

    /// Listeners accepting connections.
    pub fn listening(&self) -> usize {
        if self.shared.draining.load(SeqCst) {
            return 0;
        }
        self.listeners.lock().len()
    }

    pub fn active_connections(&self) -> usize {
        self.shared.active.load(SeqCst)
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Restarts must not wait for TIME_WAIT sockets of a previous process.
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

fn server_builder(l: &Listener) -> Arc<auto::Builder<StreamExec>> {
    let mut b = auto::Builder::new(StreamExec);
    b.http1()
        .timer(TokioTimer::new())
        .max_buf_size(l.max_header_bytes)
        .max_headers(l.max_headers)
        // hyper's header timer allocates a sleep per request; the per-connection
        // idle watchdog in `serve_connection` bounds idle and slow clients instead.
        .header_read_timeout(None)
        // Heads and small bodies go out in one copy-and-write rather than a
        // writev of queued buffers: ~370 fewer instructions a response
        // (benches/README.md).
        .writev(false);
    // h2 accepts twice the header limit, so that a list over the limit
    // reaches the service and gets the same counted 431 as on HTTP/1
    // rather than h2's bare stream reset.
    let h2_list = l.max_header_bytes.saturating_mul(2);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(h2_list).unwrap_or(u32::MAX))
        .max_concurrent_streams(l.max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(60));
    Arc::new(b)
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    serving: Arc<ArcSwap<Serving>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let s = serving.load();
                    if s.info.connections.get() >= i64::from(s.info.max_connections) {
                        // Closed at once: a client gets a reset, not a queue.
                        s.info.rejected_connections.inc();
                        drop(stream);
                        continue;
                    }
                    tokio::spawn(serve_connection(stream, peer, s.info.clone(), s.builder.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
    // Close the socket before saying so: whoever reads the log may connect next.
    drop(listener);
    tracing::info!(listener = %name, "stopped accepting");
}

/// A listener with a drain delay keeps serving until the delay passes, or
/// until it has had no open connection for a second: the app next to the
/// proxy is still stopping and makes its last calls through it.
async fn delayed_stop(name: &str, delay: Duration, open: prometheus::IntGauge) {
    let quiet_for = Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    let mut quiet_since: Option<tokio::time::Instant> = None;
    while start.elapsed() < delay {
        let now = tokio::time::Instant::now();
        if open.get() > 0 {
            quiet_since = None;
        } else if now.duration_since(*quiet_since.get_or_insert(now)) >= quiet_for {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(listener = name, "drain delay over; no longer accepting");
}

/// Accept errors (out of file descriptors) back off from 5 ms up to 1 s.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

struct ConnGuard {
    shared: Arc<Shared>,
    gauge: prometheus::IntGauge,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        if self.shared.active.fetch_sub(1, SeqCst) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    info: Arc<ListenerInfo>,
    builder: Arc<auto::Builder<StreamExec>>,
) {
    let shared = info.shared.clone();
    shared.active.fetch_add(1, SeqCst);
    let gauge = info.connections.clone();
    gauge.inc();
    info.connections_total.inc();
    let open = ConnGuard {
        shared: shared.clone(),
        gauge,
    };
    let _ = stream.set_nodelay(true);
    if info.transparent
        && let Some(dst) = crate::intercept::original_dst(&stream)
    {
        // Sent to the proxy's own port: passing it on would come back here.
        if dst.port() == info.address.port() {
            metrics()
                .tcp_passthrough
                .with_label_values(&[&info.name, "loop"])
                .inc();
            tracing::debug!(listener = %info.name, %peer, %dst, "redirect loop refused");
            return;
        }
        let routed = |host: &str| {
            info.shared
                .snapshot
                .load()
                .listeners
                .get(&info.name)
                .is_some_and(|r| r.table.serves_host(host))
        };
        match crate::intercept::detect(&stream, routed).await {
            crate::intercept::Protocol::Http => {}
            crate::intercept::Protocol::Opaque(reason) => {
                return crate::intercept::passthrough(stream, dst, &info.name, reason).await;
            }
        }
    }
    let Some(tls) = info.tls.clone() else {
        return serve_http(stream, peer, info, builder, open, false, None).await;
    };
    let started = tokio::time::Instant::now();
    let count = |result: &str| {
        metrics()
            .tls_handshakes
            .with_label_values(&[&info.name, result])
            .inc();
    };
    // TLS or plaintext: a TLS record starts with a handshake byte (0x16).
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(tls.handshake_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        Ok(_) => return,
        Err(_) => return count("timeout"),
    };
    if !is_tls {
        if tls.mode == TlsMode::Permissive {
            return serve_http(stream, peer, info, builder, open, false, None).await;
        }
        tracing::debug!(listener = %info.name, %peer, "plaintext on a TLS listener; refused");
        return count("plaintext-refused");
    }
    let tls_stream = match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let result = crate::tls::verify::classify(&e);
            tracing::debug!(listener = %info.name, %peer, result, error = %e, "TLS handshake failed");
            return count(result);
        }
        Err(_) => return count("timeout"),
    };
    count("ok");
    metrics()
        .tls_handshake_duration
        .with_label_values(&[&info.name])
        .observe(started.elapsed().as_secs_f64());
    // The verifier accepted the chain; the identity is the leaf's SPIFFE ID.
    let peer_id = if tls.mode == TlsMode::Terminate {
        None
    } else {
        tls_stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| crate::tls::spiffe::SpiffeId::of_certificate(leaf).ok())
            .and_then(|id| {
                let header = HeaderValue::from_str(id.as_str()).ok()?;
                let counter = metrics()
                    .peer_requests
                    .with_label_values(&[&info.name, id.as_str()]);
                Some((PeerIdentity(Arc::new(id)), header, counter))
            })
    };
    serve_http(tls_stream, peer, info, builder, open, true, peer_id).await
}

/// Serves HTTP/1.1 and HTTP/2 on one accepted connection, plain or TLS.
async fn serve_http<I>(
    stream: I,
    peer: SocketAddr,
    info: Arc<ListenerInfo>,
    builder: Arc<auto::Builder<StreamExec>>,
    open: ConnGuard,
    tls: bool,
    peer_id: Option<(PeerIdentity, HeaderValue, prometheus::IntCounter)>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stream = framing::FramingWatch::new(stream, Some(info.header_read_timeout));
    let framing = stream.framing.clone();

    let peer_name: Option<Arc<str>> = peer_id.as_ref().map(|(id, _, _)| id.0.as_str().into());
    let conn_info = Arc::new(ConnInfo {
        listener: info.clone(),
        peer,
        framing: framing.clone(),
        requests: AtomicU64::new(0),
        tls,
        peer_id,
        _open: open,
    });
    let stack = tower::ServiceBuilder::new()
        .layer(MetricsLayer::new(
            info.scope.clone(),
            peer_name.clone(),
            peer,
        ))
        .layer(crate::policy::trace::TraceLayer::new(
            &info.name, info.role, peer_name,
        ))
        .layer(ErrorLayer::new(info.error_detail))
        .service(Forward {
            conn: conn_info.clone(),
        });
    // An Option: `Streams::drive` drops the connection as soon as it ends.
    let conn = Some(
        builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(stack)),
    );
    tokio::pin!(conn);
    let mut streams = Streams::for_this_runtime();
    let mut drain = info.drain.clone();
    // Ask the connection to close when the proxy drains, or when a whole idle
    // period passed without a new request (one timer per connection, none per request).
    let close_when = woken::WhenWoken::new(async {
        let idle = async {
            let mut last = 0;
            loop {
                tokio::time::sleep(info.idle_timeout).await;
                let now = conn_info.requests.load(SeqCst);
                if now == last {
                    return;
                }
                last = now;
            }
        };
        tokio::select! {
            _ = drain.wait_for(|d| *d) => {}
            _ = idle => tracing::debug!(listener = %info.name, %peer, "closing idle connection"),
        }
    });
    let result = tokio::select! {
        r = streams.drive(conn.as_mut()) => r,
        _ = close_when => {
            if let Some(c) = conn.as_mut().as_pin_mut() {
                c.graceful_shutdown();
            }
            streams.drive(conn.as_mut()).await
        }
    };
    drop(conn_info);
    if framing.timed_out.load(SeqCst) {
        info.bad_request("header-timeout");
        tracing::debug!(listener = %info.name, %peer, "request head timed out (408)");
    } else if let Err(e) = result {
        let reason = classify(e.as_ref());
        if let Some(reason) = reason {
            info.bad_request(reason);
            tracing::debug!(listener = %info.name, %peer, reason, error = %e, "bad request");
        } else {
            tracing::debug!(listener = %info.name, %peer, error = %e, "connection ended with error");
        }
    }
}

/// The client's fault, answered by hyper with a 4xx before our service ran.
fn classify(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Some("header-too-large");
            }
            if h.is_parse() {
                return Some("malformed");
            }
            if h.is_timeout() {
                return Some("header-timeout");
            }
            return None;
        }
        cur = err.source();
    }
    None
}
