//! The control plane's server: HTTP/2 over TLS (port 15010).
//!
//! - `GET /v1/feed?node=ID&service=S&namespace=NS&address=IP&inbound=P&outbound=P&app=P&ready=0|1&draining=0|1&epoch=N`:
//!   a long-lived stream of newline-delimited JSON messages, readable with
//!   curl: `{"type":"snapshot","version":N,"config":{…}}`, and when only
//!   endpoints changed `{"type":"endpoints","version":N,"clusters":{name:[…]}}`.
//!   One message waits at most: a proxy that does not read gets the newest
//!   config when it does, never a backlog.
//! - `POST /v1/ack`: `{"node","version","ack":bool,"error"}` for each message.
//! - `POST /v1/drain?node=ID`: the proxy is stopping; callers stop getting it.
//! - `GET /v1/nodes`: every proxy, its version, last ack/nack, connected-since.
//! - `POST /v1/report`: a proxy's traffic counters (see `report`), every 5 s
//!   on its feed connection; `GET /v1/mesh`: the mesh's traffic over the
//!   last minute from them (see `traffic`).
//! - `GET /`: the dashboard, a static page that reads `/v1/mesh` (see
//!   `dashboard`); the one path served without a caller's identity.
//! - `POST /v1/certificate`: the mesh CA signs a CSR (PEM body) for the
//!   identity the caller proved: `{"certificate","roots"}`.
//! - `GET /metrics`, `GET /healthz`.
//!
//! Who asks: a client certificate of the trust domain (mTLS), or a bearer
//! token — from the tokens file, or a Kubernetes ServiceAccount token
//! checked with the TokenReview API. A caller gets a feed and certificates
//! for its own identity only. Replicas share nothing but the CA key; a
//! proxy whose control plane dies reconnects to another.

use super::model::Mesh;
use super::render::{self, Node, Registration, Settings};
use super::report::Report;
use super::traffic::{self, Ack, Nack, NodeStats};
use crate::telemetry::metrics;
use crate::tls::ca::Ca;
use crate::tls::spiffe::SpiffeId;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// The model the proxies' configs are made from, with its version.
pub struct State {
    pub mesh: Arc<Mesh>,
    pub version: u64,
    /// The registrations this version was made with: every proxy renders
    /// a version from the same ones, and (with `--state-dir`) they were
    /// written down before it went out, unless the write failed (logged).
    pub registrations: Arc<Vec<Registration>>,
}

struct NodeEntry {
    node: Node,
    connected: bool,
    connected_since: u64,
    /// Has applied a config: may receive traffic.
    ready: bool,
    draining: bool,
    /// The proxy process's own number (0: not said): a drain is kept
    /// across a reconnect of the same process.
    epoch: u64,
    /// The last version sent, and the last one rendered (sent or not:
    /// a version that changes nothing for this proxy is not sent).
    sent: u64,
    seen: u64,
    last_ack: Option<Ack>,
    last_nack: Option<Nack>,
    /// Which stream is the live one (a reconnect replaces the entry).
    stream: u64,
    /// The proxy refused a config: its next message is a whole snapshot
    /// (an endpoint delta would apply to a config it does not have).
    resync: bool,
    /// A newer version went out behind the refused one: send the current
    /// one whole at once.
    resend: bool,
    /// Wakes the node's stream to resend at once.
    wake: Arc<tokio::sync::Notify>,
}

impl NodeEntry {
    /// Callers may send to it: it serves, is not leaving, and has an
    /// inbound listener.
    fn is_endpoint(&self) -> bool {
        self.ready && !self.draining && self.node.inbound_port > 0
    }
}

/// How callers prove who they are besides a client certificate.
#[derive(Default)]
pub struct Tokens {
    pub static_tokens: HashMap<String, SpiffeId>,
    /// Kubernetes: TokenReview with this client.
    pub review: Option<kube::Client>,
}

pub struct ControlPlane {
    pub settings: Settings,
    state: watch::Sender<Arc<State>>,
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    ca: Ca,
    tokens: Tokens,
    cert_ttl: Duration,
    grace: Duration,
    /// When each recent version was made, for the push latency.
    made_at: Mutex<VecDeque<(u64, Instant)>>,
    streams: std::sync::atomic::AtomicU64,
    registrations_dirty: tokio::sync::Notify,
    started: Instant,
    /// Where the registrations outlive a restart (`--state-dir`).
    store: Option<super::persist::Store>,
    /// Held from taking the registrations to publishing the version made
    /// with them: two bumps at once (the debounce, a drain) must not
    /// publish or save an older table after a newer one.
    bump_lock: Mutex<()>,
    /// How long a registration taken back from the store waits for its
    /// proxy to reconnect.
    reregister_window: Duration,
    /// The latest render per group of proxies with the same inputs.
    renders: Mutex<HashMap<render::GroupKey, RenderSlot>>,
    /// Each node's traffic reports (locked after `nodes` when both are).
    traffic: Mutex<HashMap<String, Arc<Mutex<NodeStats>>>>,
    /// `outrigger_cp_reports_total`, by [`REPORT_RESULTS`].
    reports_total: [std::sync::atomic::AtomicU64; 5],
    /// The last `/v1/mesh` answer: however many dashboards poll, the view
    /// is computed at most once per `MESH_CACHE`.
    mesh_cache: Mutex<Option<(Instant, Bytes)>>,
}

/// How a report was taken (the index into `reports_total`). A counter of
/// our own rather than a Prometheus family: shown in `/v1/mesh`.
const REPORT_RESULTS: [&str; 5] = [
    "accepted",
    "forbidden",
    "unknown-node",
    "garbled",
    "too-large",
];

const MESH_CACHE: Duration = Duration::from_secs(1);

/// A group's latest render; locked while rendering, so a group renders once.
type RenderSlot = Arc<Mutex<Option<Arc<Rendered>>>>;

/// One proxy config rendered for one version, shared by every proxy of its
/// group (the replicas of a workload render the same config): the control
/// plane's memory and CPU grow with workloads, not with pods.
pub struct Rendered {
    version: u64,
    config: crate::config::Config,
    /// The snapshot message, serialized once.
    snapshot: Bytes,
    /// What changed since the group's previous render (its version).
    since: Option<(u64, Change)>,
}

/// What a proxy at the previous render must be sent.
enum Change {
    Nothing,
    Endpoints(Bytes),
    Snapshot,
}

#[derive(Serialize)]
struct SnapshotMsg<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    version: u64,
    config: &'a crate::config::Config,
}

#[derive(Serialize)]
struct EndpointsMsg<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    version: u64,
    clusters: BTreeMap<&'a str, &'a Vec<crate::config::Endpoint>>,
}

fn line<T: Serialize>(msg: &T) -> Bytes {
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// From `prev` to `next`: nothing, endpoints only, or a whole snapshot.
fn change(prev: &crate::config::Config, next: &crate::config::Config, version: u64) -> Change {
    if prev == next {
        return Change::Nothing;
    }
    if !same_but_endpoints(prev, next) {
        return Change::Snapshot;
    }
    let clusters = next
        .clusters
        .iter()
        .zip(&prev.clusters)
        .filter(|(a, b)| a.endpoints != b.endpoints)
        .map(|(a, _)| (a.name.as_str(), &a.endpoints))
        .collect();
    Change::Endpoints(line(&EndpointsMsg {
        kind: "endpoints",
        version,
        clusters,
    }))
}

const REGISTRATION_DEBOUNCE: Duration = Duration::from_millis(100);
const DRAIN_WAIT: Duration = Duration::from_secs(2);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

impl ControlPlane {
    pub fn new(
        settings: Settings,
        ca: Ca,
        tokens: Tokens,
        cert_ttl: Duration,
        grace: Duration,
        store: Option<super::persist::Store>,
        reregister_window: Duration,
    ) -> Arc<ControlPlane> {
        let (state, _) = watch::channel(Arc::new(State {
            mesh: Arc::new(Mesh::default()),
            version: 0,
            registrations: Arc::new(Vec::new()),
        }));
        Arc::new(ControlPlane {
            settings,
            state,
            nodes: Mutex::new(BTreeMap::new()),
            ca,
            tokens,
            cert_ttl,
            grace,
            made_at: Mutex::new(VecDeque::new()),
            streams: Default::default(),
            renders: Mutex::new(HashMap::new()),
            registrations_dirty: tokio::sync::Notify::new(),
            started: Instant::now(),
            store,
            bump_lock: Mutex::new(()),
            reregister_window,
            traffic: Mutex::new(HashMap::new()),
            reports_total: Default::default(),
            mesh_cache: Mutex::new(None),
        })
    }

    /// A validated model replaces the current one; an invalid one is
    /// refused (logged with every error, counted) and nothing changes.
    pub fn set_mesh(&self, mesh: Mesh, origin: &str) -> bool {
        let m = metrics();
        if let Err(errors) = mesh.validate() {
            m.cp_model_updates.with_label_values(&["invalid"]).inc();
            let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
            tracing::warn!(origin, errors = ?list, "mesh model refused; the last good one keeps serving");
            return false;
        }
        m.cp_model_updates.with_label_values(&["applied"]).inc();
        self.bump(Some(Arc::new(mesh)));
        tracing::info!(
            origin,
            version = self.state.borrow().version,
            "mesh model applied"
        );
        true
    }

    /// Registrations come in bursts (a rollout, every proxy reconnecting
    /// to a restarted control plane): one version per burst, at most
    /// `REGISTRATION_DEBOUNCE` after its first change, instead of a render
    /// and a push to every proxy per registration. Model changes are not
    /// delayed.
    fn registrations_changed(&self) {
        self.registrations_dirty.notify_one();
    }

    async fn debounce_registrations(self: Arc<Self>) {
        loop {
            self.registrations_dirty.notified().await;
            tokio::time::sleep(REGISTRATION_DEBOUNCE).await;
            self.bump(None);
        }
    }

    /// The proxies that are endpoints of their services now, written down
    /// first (with `--state-dir`).
    fn take_registrations(&self) -> Arc<Vec<Registration>> {
        let nodes: Vec<Node> = self
            .nodes
            .lock()
            .values()
            .filter(|e| e.is_endpoint())
            .map(|e| e.node.clone())
            .collect();
        if let Some(store) = &self.store
            && let Err(e) = store.save(nodes.iter())
        {
            tracing::warn!(error = %e, "registrations not saved; a restart will wait for their proxies");
        }
        Arc::new(
            nodes
                .into_iter()
                .map(|n| Registration {
                    endpoint: SocketAddr::new(n.address, n.inbound_port),
                    namespace: n.namespace,
                    service: n.service,
                    identity: n.identity,
                })
                .collect(),
        )
    }

    /// Takes back the registrations a previous run saved: endpoints from
    /// the first push on, until their proxies re-register or the window
    /// ends.
    pub fn restore(self: &Arc<Self>) {
        let Some(store) = &self.store else {
            return;
        };
        let saved = match store.load() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "saved registrations unreadable; waiting for the proxies");
                return;
            }
        };
        let mut restored = 0;
        {
            let mut nodes = self.nodes.lock();
            for node in saved {
                let id = node.id.clone();
                if nodes.contains_key(&id) {
                    continue;
                }
                nodes.insert(
                    id.clone(),
                    NodeEntry {
                        node,
                        connected: false,
                        connected_since: 0,
                        ready: true,
                        draining: false,
                        epoch: 0,
                        sent: 0,
                        seen: 0,
                        last_ack: None,
                        last_nack: None,
                        // No stream yet: any reconnect replaces the entry.
                        stream: 0,
                        resync: false,
                        resend: false,
                        wake: Default::default(),
                    },
                );
                self.expire(id, 0, self.reregister_window, true);
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::info!(restored, window = ?self.reregister_window, "registrations taken back until their proxies reconnect");
            // In the first version, not one debounce later: the first
            // push (after the startup grace) must have them.
            self.bump(None);
        }
    }

    /// A new version: a new model (with the registrations of the last
    /// version), or new registrations with the same model. Returns it.
    fn bump(&self, mesh: Option<Arc<Mesh>>) -> u64 {
        // Only registration bumps are ordered: a model bump takes the
        // published registrations inside `send_modify`, and never waits
        // on the disk.
        let _order = mesh.is_none().then(|| self.bump_lock.lock());
        let registrations = match mesh {
            Some(_) => None,
            None => Some(self.take_registrations()),
        };
        let mut made_version = 0;
        self.state.send_modify(|s| {
            let version = s.version + 1;
            made_version = version;
            *s = Arc::new(State {
                mesh: mesh.unwrap_or_else(|| s.mesh.clone()),
                version,
                registrations: registrations.unwrap_or_else(|| s.registrations.clone()),
            });
            let mut made = self.made_at.lock();
            made.push_back((version, Instant::now()));
            while made.len() > 64 {
                made.pop_front();
            }
            metrics().cp_model_version.set(version as i64);
        });
        made_version
    }

    pub fn version(&self) -> u64 {
        self.state.borrow().version
    }

    fn nodes_json(&self) -> serde_json::Value {
        let nodes = self.nodes.lock();
        serde_json::Value::Array(
            nodes
                .iter()
                .map(|(id, e)| {
                    serde_json::json!({
                        "node": id,
                        "namespace": e.node.namespace,
                        "service": e.node.service,
                        "identity": e.node.identity.as_str(),
                        "address": e.node.address.to_string(),
                        "connected": e.connected,
                        "connected_since": e.connected_since,
                        "ready": e.ready,
                        "draining": e.draining,
                        // The last version sent; `current` is the model
                        // version its config is up to date with (a version
                        // that changes nothing for a proxy is not sent).
                        "version": e.sent,
                        "current": e.seen,
                        "last_ack": e.last_ack,
                        "last_nack": e.last_nack,
                    })
                })
                .collect(),
        )
    }

    /// Who the caller is: its client certificate, else its bearer token.
    async fn identify(&self, peer: Option<&SpiffeId>, req: &Request<Incoming>) -> Option<SpiffeId> {
        if let Some(id) = peer
            && id.trust_domain() == self.settings.trust_domain
        {
            return Some(id.clone());
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim()
            .to_string();
        if let Some(id) = self.tokens.static_tokens.get(&token) {
            return Some(id.clone());
        }
        let client = self.tokens.review.as_ref()?;
        token_review(client, &token, &self.settings.trust_domain).await
    }
}

/// The audience of the projected ServiceAccount token a proxy presents
/// (the chart's injected volume asks for it).
pub const TOKEN_AUDIENCE: &str = "outrigger";

/// Checks a ServiceAccount token with the Kubernetes TokenReview API:
/// `system:serviceaccount:<ns>:<sa>` → `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub async fn token_review(client: &kube::Client, token: &str, td: &str) -> Option<SpiffeId> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let done = match api.create(&Default::default(), &review).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "token review failed");
            return None;
        }
    };
    let status = done.status?;
    if status.authenticated != Some(true) {
        tracing::warn!(
            error = status.error.as_deref().unwrap_or(""),
            "token review: not authenticated"
        );
        return None;
    }
    // A token for another audience (the API server's own) is not for us.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == TOKEN_AUDIENCE))
    {
        tracing::warn!("token review: the token is not for audience {TOKEN_AUDIENCE}");
        return None;
    }
    let user = status.user?.username?;
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    SpiffeId::workload(td, ns, sa).ok()
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string() + "\n")).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg }))
}

const MAX_BODY: usize = 64 * 1024;

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A streamed response body fed by a channel of one message.
struct Stream {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for Stream {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Deserialize)]
struct AckBody {
    node: String,
    version: u64,
    ack: bool,
    #[serde(default)]
    error: Option<String>,
}

impl ControlPlane {
    async fn handle(
        self: Arc<Self>,
        peer: Option<SpiffeId>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => json(
                StatusCode::OK,
                &serde_json::json!({ "ok": true, "version": self.version() }),
            ),
            // The dashboard holds no data: it is served to anyone; the
            // `/v1/mesh` it reads asks for a token like the rest.
            (&Method::GET, "/") => super::dashboard::response(),
            (&Method::GET, "/metrics") => {
                let mut r =
                    Response::new(Full::new(Bytes::from(crate::telemetry::render())).boxed());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => {
                let r = self.clone().api(peer, req).await;
                // Every refusal counted, by kind: a token that fails review,
                // a feed or ack for someone else, a garbled body.
                let reason = match r.status() {
                    StatusCode::UNAUTHORIZED => Some("unauthenticated"),
                    StatusCode::FORBIDDEN => Some("forbidden"),
                    s if s.is_client_error() => Some("bad-request"),
                    _ => None,
                };
                if let Some(reason) = reason {
                    metrics().cp_refused.with_label_values(&[reason]).inc();
                }
                r
            }
        }
    }

    /// The authenticated API: who asks first, then what.
    async fn api(
        self: Arc<Self>,
        peer: Option<SpiffeId>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let id = self.identify(peer.as_ref(), &req).await;
        let (parts, body) = req.into_parts();
        // Bodies are small (a CSR, an ack): read whole, bounded, and
        // before any answer, so that an early refusal is not a reset.
        let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                if parts.uri.path() == "/v1/report" {
                    self.count_report(4);
                }
                return error(StatusCode::PAYLOAD_TOO_LARGE, "a body over 64 KiB");
            }
        };
        let Some(id) = id else {
            return error(
                StatusCode::UNAUTHORIZED,
                "present a client certificate or a bearer token",
            );
        };
        match (parts.method.clone(), parts.uri.path()) {
            (Method::GET, "/v1/nodes") => json(StatusCode::OK, &self.nodes_json()),
            (Method::GET, "/v1/mesh") => self.mesh(),
            (Method::POST, "/v1/report") => self.report(id, &body),
            (Method::GET, "/v1/feed") => self.feed(id, &parts.uri),
            (Method::POST, "/v1/ack") => self.ack(id, &body),
            (Method::POST, "/v1/drain") => self.drain(id, &parts.uri).await,
            (Method::POST, "/v1/certificate") => self.certificate(id, &body),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    fn feed(self: Arc<Self>, id: SpiffeId, uri: &http::Uri) -> Response<Body> {
        let q = query(uri);
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        let port = |k: &str| get(k).parse::<u16>().unwrap_or(0);
        let Some(node_id) = q.get("node").filter(|n| !n.is_empty()).cloned() else {
            return error(StatusCode::BAD_REQUEST, "the feed needs ?node=ID");
        };
        let namespace = get("namespace");
        // A caller gets the feed of its own identity only.
        if id.as_str()
            != format!(
                "spiffe://{}/ns/{namespace}/sa/{}",
                self.settings.trust_domain,
                sa_of(&id)
            )
        {
            return error(
                StatusCode::FORBIDDEN,
                "a feed is for the caller's own namespace",
            );
        }
        let address: IpAddr = get("address")
            .parse()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let node = Node {
            id: node_id.clone(),
            service: if get("service").is_empty() {
                sa_of(&id).to_string()
            } else {
                get("service")
            },
            namespace,
            identity: id,
            address,
            inbound_port: port("inbound"),
            outbound_port: port("outbound"),
            app_port: port("app"),
        };
        let stream = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // A proxy that reconnects while serving a config (this replica
        // restarted, or another one died) is an endpoint from the start:
        // its callers must not lose it while it waits for a push.
        let serving = get("ready") == "1";
        // A proxy that reconnects while it drains stays out of the sets:
        // it says so, and a drain the same process (same epoch) posted
        // before is kept, whatever a query written before it says.
        let epoch = get("epoch").parse::<u64>().unwrap_or(0);
        let wake = Arc::new(tokio::sync::Notify::new());
        let (was_endpoint, draining) = {
            let mut nodes = self.nodes.lock();
            let before = nodes.get(&node_id);
            let was_endpoint = before.is_some_and(NodeEntry::is_endpoint);
            let draining = get("draining") == "1"
                || before.is_some_and(|e| {
                    e.draining && epoch != 0 && e.epoch == epoch && e.node.identity == node.identity
                });
            let (last_ack, last_nack) = before
                .map(|e| (e.last_ack.clone(), e.last_nack.clone()))
                .unwrap_or_default();
            nodes.insert(
                node_id.clone(),
                NodeEntry {
                    node: node.clone(),
                    connected: true,
                    connected_since: unix_now(),
                    ready: serving,
                    draining,
                    epoch,
                    sent: 0,
                    seen: 0,
                    last_ack,
                    last_nack,
                    stream,
                    resync: false,
                    resend: false,
                    wake: wake.clone(),
                },
            );
            (was_endpoint, draining)
        };
        metrics().cp_connected.inc();
        // A new endpoint, or one that is not one any more (a proxy back
        // without a config, over its old or restored entry).
        if was_endpoint || (serving && !draining && node.inbound_port > 0) {
            self.registrations_changed();
        }
        tracing::info!(node = %node_id, identity = %node.identity, serving, draining, "proxy subscribed");
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(self.stream_node(node, stream, tx, wake));
        let mut r = Response::new(Stream { rx }.boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }

    /// The group's render for `state`, made once for the whole group.
    fn rendered(&self, node: &Node, state: &State) -> Arc<Rendered> {
        let slot = self
            .renders
            .lock()
            .entry(node.group_key())
            .or_default()
            .clone();
        let mut slot = slot.lock();
        if let Some(r) = slot.as_ref().filter(|r| r.version == state.version) {
            return r.clone();
        }
        let config = render::render(&state.mesh, &state.registrations, node, &self.settings);
        let since = slot
            .as_ref()
            .map(|p| (p.version, change(&p.config, &config, state.version)));
        let snapshot = line(&SnapshotMsg {
            kind: "snapshot",
            version: state.version,
            config: &config,
        });
        let r = Arc::new(Rendered {
            version: state.version,
            config,
            snapshot,
            since,
        });
        *slot = Some(r.clone());
        r
    }

    /// Sends the node's config whenever the model or the registrations
    /// change, until the proxy goes away.
    async fn stream_node(
        self: Arc<Self>,
        node: Node,
        stream: u64,
        tx: mpsc::Sender<Bytes>,
        wake: Arc<tokio::sync::Notify>,
    ) {
        // A control plane that just started does not know yet which
        // proxies are alive: for one grace period it lets the serving ones
        // re-register before pushing endpoint sets that would miss them.
        tokio::select! {
            _ = tokio::time::sleep_until(self.started + self.grace) => {}
            _ = tx.closed() => {}
        }
        let mut rx = self.state.subscribe();
        let mut last: Option<Arc<Rendered>> = None;
        loop {
            let state = rx.borrow_and_update().clone();
            let r = self.rendered(&node, &state);
            // What this proxy needs besides a resync: all of it at first,
            // then what changed since the last render it got.
            let delta = match &last {
                None => None,
                Some(prev) => {
                    let computed;
                    let c = match &r.since {
                        Some((v, c)) if *v == prev.version => c,
                        // This proxy is behind its group: compare itself.
                        _ => {
                            computed = change(&prev.config, &r.config, r.version);
                            &computed
                        }
                    };
                    match c {
                        Change::Nothing => Some(None),
                        Change::Endpoints(b) => Some(Some(b.clone())),
                        Change::Snapshot => None,
                    }
                }
            };
            // Decided and recorded under the node's lock, before the send:
            // a nack arriving meanwhile sees that a newer version went out.
            let msg = {
                let mut nodes = self.nodes.lock();
                let e = nodes.get_mut(&node.id).filter(|e| e.stream == stream);
                let (resend, resync) = e.as_ref().map_or((false, false), |e| (e.resend, e.resync));
                let msg = match delta {
                    // A refused config is never the base of a delta; and a
                    // newer one behind a refused one goes again, whole.
                    Some(Some(_)) | Some(None) if resend => Some((true, r.snapshot.clone())),
                    Some(Some(_)) if resync => Some((true, r.snapshot.clone())),
                    Some(Some(b)) => Some((false, b)),
                    Some(None) => None,
                    None => Some((true, r.snapshot.clone())),
                };
                if let Some(e) = e {
                    e.resend = false;
                    if msg.is_some() {
                        e.resync = false;
                        e.sent = state.version;
                    }
                    e.seen = state.version;
                }
                msg
            };
            if let Some((whole, bytes)) = msg {
                let kind = if whole { "snapshot" } else { "endpoints" };
                metrics().cp_pushes.with_label_values(&[kind]).inc();
                // At most one message waits for a slow reader; newer
                // versions coalesce into the next render.
                let sent = tokio::select! {
                    r = tx.send(bytes) => r.is_ok(),
                    _ = tx.closed() => false,
                };
                if !sent {
                    break;
                }
            }
            last = Some(r);
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = wake.notified() => {}
                _ = tx.closed() => break,
            }
        }
        drop(last);
        self.disconnected(&node.id, stream).await;
    }

    async fn disconnected(self: &Arc<Self>, node_id: &str, stream: u64) {
        metrics().cp_connected.dec();
        let was_endpoint = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(node_id).filter(|e| e.stream == stream) {
                Some(e) => {
                    e.connected = false;
                    e.ready && !e.draining
                }
                None => return,
            }
        };
        tracing::info!(node = %node_id, "proxy disconnected");
        // Callers keep the endpoint for a grace period (a reconnect to
        // another replica, a blip), then it goes.
        self.expire(node_id.to_string(), stream, self.grace, was_endpoint);
    }

    /// Removes the node `after` from now unless stream `stream` was
    /// replaced by a reconnect meanwhile.
    fn expire(self: &Arc<Self>, id: String, stream: u64, after: Duration, was_endpoint: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let removed = {
                let mut nodes = me.nodes.lock();
                let gone = nodes
                    .get(&id)
                    .is_some_and(|e| e.stream == stream && !e.connected);
                if gone && let Some(e) = nodes.remove(&id) {
                    // Its reports go with it.
                    me.traffic.lock().remove(&id);
                    // The group's render goes with its last proxy.
                    let key = e.node.group_key();
                    if !nodes.values().any(|x| x.node.group_key() == key) {
                        me.renders.lock().remove(&key);
                    }
                }
                gone
            };
            if removed && was_endpoint {
                me.registrations_changed();
            }
        });
    }

    fn ack(self: Arc<Self>, id: SpiffeId, body: &Bytes) -> Response<Body> {
        let a: AckBody = match serde_json::from_slice(body) {
            Ok(a) => a,
            Err(e) => {
                metrics().cp_acks.with_label_values(&["garbled"]).inc();
                return error(StatusCode::BAD_REQUEST, &format!("not an ack: {e}"));
            }
        };
        let newly_ready = {
            let mut nodes = self.nodes.lock();
            let Some(e) = nodes.get_mut(&a.node) else {
                return error(StatusCode::NOT_FOUND, "no such node");
            };
            if e.node.identity != id {
                return error(StatusCode::FORBIDDEN, "an ack for another proxy");
            }
            if a.ack {
                e.last_ack = Some(Ack {
                    version: a.version,
                    at: unix_now(),
                });
                let was = e.ready;
                e.ready = true;
                !was && e.node.inbound_port > 0
            } else {
                e.last_nack = Some(Nack {
                    version: a.version,
                    error: a.error.clone().unwrap_or_default(),
                    at: unix_now(),
                });
                // A nack for a version never sent is noise.
                if a.version <= e.sent {
                    e.resync = true;
                    // Something newer went out on top of the refused one:
                    // send it whole now. The newest refused waits for the
                    // next version (resent, it would be refused again).
                    if e.sent > a.version {
                        e.resend = true;
                        e.wake.notify_one();
                    }
                }
                false
            }
        };
        let m = metrics();
        if a.ack {
            m.cp_acks.with_label_values(&["ack"]).inc();
            if let Some((_, at)) = self.made_at.lock().iter().find(|(v, _)| *v == a.version) {
                m.cp_push_latency.observe(at.elapsed().as_secs_f64());
            }
        } else {
            m.cp_acks.with_label_values(&["nack"]).inc();
            tracing::warn!(node = %a.node, version = a.version, error = a.error.as_deref().unwrap_or(""), "proxy refused its config");
        }
        if newly_ready {
            // A new endpoint for its service's callers.
            self.registrations_changed();
        }
        json(StatusCode::OK, &serde_json::json!({ "ok": true }))
    }

    fn count_report(&self, result: usize) {
        self.reports_total[result].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A proxy's traffic report, taken like its acks: for a node this
    /// control plane feeds, from the identity that node subscribed as.
    fn report(self: Arc<Self>, id: SpiffeId, body: &Bytes) -> Response<Body> {
        let r: Report = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                self.count_report(3);
                return error(StatusCode::BAD_REQUEST, &format!("not a report: {e}"));
            }
        };
        let stats = {
            let nodes = self.nodes.lock();
            match nodes.get(&r.node) {
                None => {
                    self.count_report(2);
                    return error(StatusCode::NOT_FOUND, "no such node");
                }
                Some(e) if e.node.identity != id => {
                    self.count_report(1);
                    return error(StatusCode::FORBIDDEN, "a report for another proxy");
                }
                Some(_) => {}
            }
            // Under the nodes lock: a node removed meanwhile takes its
            // reports with it, none come back after.
            self.traffic
                .lock()
                .entry(r.node.clone())
                .or_default()
                .clone()
        };
        stats.lock().ingest(&r, std::time::Instant::now());
        self.count_report(0);
        json(StatusCode::OK, &serde_json::json!({ "ok": true }))
    }

    /// `GET /v1/mesh`: computed from the kept reports on request, at most
    /// once per `MESH_CACHE`.
    fn mesh(self: Arc<Self>) -> Response<Body> {
        let cached = self
            .mesh_cache
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < MESH_CACHE)
            .map(|(_, b)| b.clone());
        let body = match cached {
            Some(b) => b,
            None => {
                let b = Bytes::from(serde_json::to_vec(&self.mesh_view()).unwrap_or_default());
                *self.mesh_cache.lock() = Some((Instant::now(), b.clone()));
                b
            }
        };
        let mut r = Response::new(Full::new(body).boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    pub fn mesh_view(&self) -> traffic::MeshView {
        let infos: Vec<traffic::NodeInfo> = self
            .nodes
            .lock()
            .iter()
            .map(|(id, e)| traffic::NodeInfo {
                id: id.clone(),
                namespace: e.node.namespace.clone(),
                service: e.node.service.clone(),
                identity: e.node.identity.to_string(),
                address: (e.node.inbound_port > 0)
                    .then(|| SocketAddr::new(e.node.address, e.node.inbound_port)),
                connected: e.connected,
                ready: e.ready,
                draining: e.draining,
                version: e.sent,
                current: e.seen,
                last_ack: e.last_ack.clone(),
                last_nack: e.last_nack.clone(),
            })
            .collect();
        let stats = self.traffic.lock().clone();
        let (services, version) = {
            let s = self.state.borrow();
            let names: Vec<String> = s
                .mesh
                .services
                .keys()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect();
            (names, s.version)
        };
        let mut v = traffic::mesh_view(&infos, &stats, services, std::time::Instant::now());
        v.version = version;
        v.generated_at = unix_now();
        v.reports_total = REPORT_RESULTS
            .iter()
            .zip(&self.reports_total)
            .map(|(k, n)| (k.to_string(), n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect();
        v.report_memory_bytes = stats.values().map(|s| s.lock().approx_bytes() as u64).sum();
        v
    }

    /// A proxy is stopping: it leaves its service's endpoints at once (not
    /// debounced), and the answer waits until every connected proxy has
    /// acked a config without it (at most `DRAIN_WAIT`), so that when the
    /// proxy closes its listeners no caller still sends to it.
    async fn drain(self: Arc<Self>, id: SpiffeId, uri: &http::Uri) -> Response<Body> {
        let q = query(uri);
        let node = q.get("node").cloned().unwrap_or_default();
        let changed = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&node) {
                Some(e) if e.node.identity == id => {
                    let was = e.ready && !e.draining;
                    e.draining = true;
                    was
                }
                Some(_) => return error(StatusCode::FORBIDDEN, "another proxy"),
                None => return error(StatusCode::NOT_FOUND, "no such node"),
            }
        };
        if changed {
            tracing::info!(node, "proxy draining; removed from its service's endpoints");
            let v = self.bump(None);
            let deadline = Instant::now() + DRAIN_WAIT;
            while Instant::now() < deadline && !self.all_acked(v, &node) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        json(StatusCode::OK, &serde_json::json!({ "ok": true }))
    }

    /// Whether every connected proxy but `except` has version `v` (acked,
    /// or not sent because nothing changed for it).
    fn all_acked(&self, v: u64, except: &str) -> bool {
        self.nodes.lock().iter().all(|(id, e)| {
            id == except
                || !e.connected
                || (e.seen >= v
                    && (e.sent < v || e.last_ack.as_ref().is_some_and(|a| a.version >= e.sent)))
        })
    }

    fn certificate(self: Arc<Self>, id: SpiffeId, body: &Bytes) -> Response<Body> {
        let m = metrics();
        let csr = String::from_utf8_lossy(body).into_owned();
        match self.ca.sign_csr(&csr, &id, self.cert_ttl) {
            Ok(cert) => {
                m.cp_certificates.with_label_values(&["issued"]).inc();
                tracing::info!(identity = %id, "certificate issued");
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "certificate": cert, "roots": self.ca.cert_pem }),
                )
            }
            Err(e) => {
                m.cp_certificates.with_label_values(&["refused"]).inc();
                tracing::warn!(identity = %id, error = %e, "certificate refused");
                error(StatusCode::FORBIDDEN, &e.to_string())
            }
        }
    }
}

fn sa_of(id: &SpiffeId) -> &str {
    id.as_str().rsplit('/').next().unwrap_or("")
}

/// Whether two configs differ in endpoints only (same clusters in order).
fn same_but_endpoints(a: &crate::config::Config, b: &crate::config::Config) -> bool {
    if a.clusters.len() != b.clusters.len() {
        return false;
    }
    let strip = |c: &crate::config::Config| {
        let mut c = c.clone();
        for cl in &mut c.clusters {
            cl.endpoints.clear();
        }
        c
    };
    strip(a) == strip(b)
}

/// The control plane's TLS: its own certificate (from its CA), client
/// certificates of the mesh accepted but not required (a proxy without one
/// shows a token).
pub fn server_tls(
    ca: &Ca,
    identity: &SpiffeId,
    dns: &[String],
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = ca
        .issue(identity, Duration::from_secs(365 * 86400), dns)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .filter_map(Result::ok)
            .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes())
        .filter_map(Result::ok)
    {
        roots.add(c).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut c = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Binds and serves; returns the bound address.
pub async fn serve(
    cp: Arc<ControlPlane>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(cp.clone().debounce_registrations());
    tokio::spawn(async move {
        let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(
            TokioExecutor::new(),
        ));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (cp, acceptor, builder) = (cp.clone(), acceptor.clone(), builder.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| SpiffeId::of_certificate(c).ok());
                let svc = hyper::service::service_fn(move |req| {
                    let (cp, peer) = (cp.clone(), peer.clone());
                    async move { Ok::<_, std::convert::Infallible>(cp.handle(peer, req).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    tracing::info!(address = %bound, "control plane listening");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::persist::Store;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            namespace: "shop".into(),
            service: "orders".into(),
            identity: SpiffeId::parse("spiffe://td/ns/shop/sa/orders").unwrap(),
            address: IpAddr::from([127, 0, 0, 1]),
            inbound_port: 15006,
            outbound_port: 15001,
            app_port: 8080,
        }
    }

    /// A control plane on a state directory holding `saved`.
    fn control_plane(name: &str, saved: &[Node]) -> (Arc<ControlPlane>, Store) {
        let dir = std::env::temp_dir().join(format!("outrigger-cp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Store::new(&dir).save(saved.iter()).unwrap();
        let settings = Settings {
            trust_domain: "td".into(),
            cluster_domain: "cluster.local".into(),
            mtls: true,
        };
        let (ca, _) = Ca::generate("td").unwrap();
        let cp = ControlPlane::new(
            settings,
            ca,
            Tokens::default(),
            Duration::from_secs(3600),
            Duration::from_millis(300),
            Some(Store::new(&dir)),
            Duration::from_secs(45),
        );
        tokio::spawn(cp.clone().debounce_registrations());
        (cp, Store::new(&dir))
    }

    fn published(cp: &ControlPlane) -> Vec<SocketAddr> {
        cp.state
            .borrow()
            .registrations
            .iter()
            .map(|r| r.endpoint)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn restored_registrations_are_in_the_first_version_and_go_after_the_window() {
        let (cp, store) = control_plane("restore", &[node("orders-1")]);
        cp.restore();
        assert_eq!(cp.version(), 1);
        assert_eq!(published(&cp), ["127.0.0.1:15006".parse().unwrap()]);
        // Its proxy never reconnects: gone after the window (and the
        // debounce), from the published version and from the file.
        tokio::time::sleep(Duration::from_secs(44)).await;
        assert_eq!(published(&cp).len(), 1, "gone before the window ended");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(published(&cp).is_empty());
        assert!(store.load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(store.dir());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_proxy_is_neither_published_nor_saved() {
        let (cp, store) = control_plane("drain", &[node("orders-1"), node("orders-2")]);
        cp.restore();
        let mut two = node("orders-2");
        two.inbound_port = 15007;
        cp.nodes.lock().get_mut("orders-2").unwrap().node = two;
        let id = node("orders-1").identity;
        let uri: http::Uri = "/v1/drain?node=orders-1".parse().unwrap();
        let v = cp.version();
        let r = cp.clone().drain(id, &uri).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(cp.version(), v + 1);
        assert_eq!(published(&cp), ["127.0.0.1:15007".parse().unwrap()]);
        let saved: Vec<String> = store.load().unwrap().into_iter().map(|n| n.id).collect();
        assert_eq!(saved, ["orders-2"]);
        let _ = std::fs::remove_dir_all(store.dir());
    }
}
