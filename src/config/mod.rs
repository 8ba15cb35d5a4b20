//! The configuration model: serde structs, defaults, loading and validation.
//!
//! The same document is read from a file or streamed by the control plane.
//! `validate()` collects every problem with its field path before returning,
//! so one run of `outrigger validate` shows them all. The hot path never
//! touches these structs: `route` and `balance` compile them into their own
//! types once per snapshot.

mod address;
mod diff;
mod duration;
mod lint;
mod policy;
mod security;

pub use address::{EndpointAddr, parse_bind};
pub use diff::diff;
pub use duration::{Dur, parse_duration};
pub use lint::Checked;
pub use policy::*;
pub use security::*;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// The proxy's workload identity; absent → plaintext only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthorizationPolicy>,
    /// Config from a control plane: this document is then the bootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<Feed>,
    /// Distributed tracing: trace context on every hop, spans to OTLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

/// `tracing:` — W3C trace context (and B3) propagated on every hop, a
/// trace started here when a request has none, one span per request
/// exported over OTLP/HTTP (protobuf) when `otlp` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP traces endpoint (`http://host:4318/v1/traces`);
    /// absent: context is propagated, no span is exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<String>,
    /// Head sampling of the traces this proxy starts (0.0 to 1.0); a
    /// caller's sampled flag is honoured. A listener may override it.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// Spans waiting for export at most; more are dropped and counted.
    #[serde(default = "default_trace_queue")]
    pub max_queue: usize,
    #[serde(default = "default_trace_batch")]
    pub max_batch: usize,
    #[serde(default = "default_trace_flush")]
    pub flush_interval: Dur,
    /// `service.name` of the spans (default: the node's service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

fn default_sampling() -> f64 {
    1.0
}
fn default_trace_queue() -> usize {
    2048
}
fn default_trace_batch() -> usize {
    512
}
fn default_trace_flush() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Admin server: `/config`, `/shutdown`, `/clusters`, `/metrics`. Loopback only.
    #[serde(default = "default_admin_address", deserialize_with = "address::bind")]
    pub address: SocketAddr,
    /// Probe server: `/ready`, `/live`, `/metrics`.
    #[serde(default = "default_probes_address", deserialize_with = "address::bind")]
    pub probes: SocketAddr,
    /// The app's own HTTP probes, answered on the probe port by asking the
    /// app on loopback: behind strict mTLS the kubelet cannot reach the
    /// app's port (injection rewrites the pod's probes to these paths).
    /// Only these exact paths are forwarded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_probes: BTreeMap<String, AppProbe>,
}

/// One app probe: `GET http://127.0.0.1:<port><path>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
}

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_probes_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: default_admin_address(),
            probes: default_probes_address(),
            app_probes: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Inbound,
    Outbound,
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Inbound => "inbound",
            Role::Outbound => "outbound",
            Role::Gateway => "gateway",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub role: Role,
    #[serde(deserialize_with = "address::bind")]
    pub address: SocketAddr,
    /// Inbound only: the local application every request is forwarded to
    /// when no route of this listener matches.
    #[serde(
        default,
        deserialize_with = "address::bind_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub forward_to: Option<SocketAddr>,
    /// One JSON access-log line per request.
    #[serde(default)]
    pub access_log: bool,
    /// Limit on the request head (HTTP/1) or header list (HTTP/2); over it → 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Close downstream connections idle for this long.
    #[serde(default = "default_downstream_idle")]
    pub idle_timeout: Dur,
    /// A request head not complete this long after the connection opened → 408.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A request or response body on which the sender sends nothing this
    /// long is reset (HTTP/2 RST_STREAM; HTTP/1 closes the connection).
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: Dur,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Downstream connections open at once; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// HTTP/2 streams open at once on one downstream connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Header fields in one request; more → 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Upgraded connections (WebSocket, CONNECT) open at once; more → 503.
    #[serde(default = "default_max_tunnels")]
    pub max_tunnels: u32,
    /// A tunnel with no byte either way this long is closed (default: the
    /// stream idle timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_idle_timeout: Option<Dur>,
    /// Gateway: proxies in front of this listener (a cloud load balancer)
    /// trusted to have appended to `x-forwarded-for`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trusted_hops: u32,
    /// Gateway: peers (CIDRs) trusted to set `x-forwarded-for`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<Cidr>,
    /// Gateway: keep a client's `x-request-id` instead of replacing it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub trust_request_id: bool,
    /// Error bodies carry the whole error text (addresses, library
    /// messages): for debugging; off, a client sees only the reason.
    #[serde(default, skip_serializing_if = "is_false")]
    pub error_detail: bool,
    /// `strict`, `permissive`, `disabled` (inbound mTLS), or `{ mode:
    /// terminate, certificates: [...] }` (gateway TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsField>,
    /// A plain-HTTP gateway listener that answers every request with a
    /// redirect to HTTPS on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<u16>,
    /// On shutdown, keep accepting for up to this long, or until no
    /// connection has been open for a second (the app in the same pod is
    /// still stopping and needs its outbound calls); other listeners stop
    /// at once, so callers move away first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_delay: Option<Dur>,
    /// This listener's head sampling (overrides `tracing.sampling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_sampling: Option<f64>,
    /// Connections redirected here by `outrigger init`: HTTP the routes
    /// know is proxied, anything else passes through opaque to where the
    /// app sent it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub transparent: bool,
}

impl Listener {
    /// A listener with every setting at its default.
    pub fn new(name: &str, role: Role, address: SocketAddr) -> Listener {
        Listener {
            name: name.to_string(),
            role,
            address,
            forward_to: None,
            access_log: false,
            max_header_bytes: default_max_header_bytes(),
            idle_timeout: default_downstream_idle(),
            header_read_timeout: default_header_read_timeout(),
            stream_idle_timeout: default_stream_idle_timeout(),
            rate_limit: None,
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_headers: default_max_headers(),
            max_tunnels: default_max_tunnels(),
            tunnel_idle_timeout: None,
            trusted_hops: 0,
            trusted_proxies: Vec::new(),
            trust_request_id: false,
            error_detail: false,
            tls: None,
            redirect_https: None,
            drain_delay: None,
            trace_sampling: None,
            transparent: false,
        }
    }

    pub fn tls(&self) -> ListenerTls {
        self.tls
            .as_ref()
            .map(ListenerTlsField::resolved)
            .unwrap_or_default()
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn default_max_connections() -> u32 {
    16384
}
fn default_max_concurrent_streams() -> u32 {
    256
}
fn default_max_headers() -> usize {
    100
}
fn default_max_tunnels() -> u32 {
    1024
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32` (a bare address is /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(a), V4(b)) => mask_eq(&a.octets(), &b.octets(), self.prefix),
            (V6(a), V6(b)) => mask_eq(&a.octets(), &b.octets(), self.prefix),
            _ => false,
        }
    }
}

fn mask_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    a[..full] == b[..full] && (rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0)
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("`{s}` is not an address block like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_stream_idle_timeout() -> Dur {
    Dur::secs(300)
}

fn default_header_read_timeout() -> Dur {
    Dur::secs(10)
}

fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_downstream_idle() -> Dur {
    Dur::secs(300)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// Listeners this route serves; absent → every outbound and gateway listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<String>>,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Where requests go; may be empty only with a `redirect`.
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEdits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// The whole request, retries included → 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Bounds the whole exchange, response body included (`timeout` ends
    /// at the response head) → 504 before the head, a reset after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_timeout: Option<Dur>,
    /// HTTP/1.1 upgrades tunnelled to the backend, by `Upgrade` token;
    /// any other upgrade request is served as plain HTTP/1.1.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// CONNECT requests open a TCP tunnel to the backend; otherwise 405.
    #[serde(default, skip_serializing_if = "is_false")]
    pub connect: bool,
}

pub fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// `orders.default.svc`, `*.example.com` or `*`, or a list of them
    /// (short and long names of one service); the port is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Hosts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// One host pattern or several.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Hosts {
    One(String),
    Many(Vec<String>),
}

impl Hosts {
    pub fn list(&self) -> Vec<&str> {
        match self {
            Hosts::One(h) => vec![h.as_str()],
            Hosts::Many(hs) => hs.iter().map(String::as_str).collect(),
        }
    }
}

impl From<&str> for Hosts {
    fn from(h: &str) -> Self {
        Hosts::One(h.to_string())
    }
}

/// Headers to add (appended), set (replacing) and remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValueConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValueConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueConfig {
    pub name: String,
    pub value: String,
}

/// Rewrites before the request goes upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the part of the path the route's `path_prefix` matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Replaces the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the authority (`Host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Answers with a redirect instead of forwarding; what is not set is kept
/// from the request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the matched `path_prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// 301, 302, 303, 307 or 308 (default 302).
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true` → the header must be present; `false` → absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub cluster: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    Http2,
    /// The downstream request's protocol (gRPC: HTTP/2), falling back to
    /// HTTP/1.1 for an endpoint that does not speak HTTP/2.
    #[default]
    Auto,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbPolicy {
    #[default]
    P2cEwma,
    LeastRequest,
    RoundRobin,
    Random,
    RingHash,
}

/// What ring-hash hashes: one header or one cookie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub lb: LbPolicy,
    /// ring-hash only: what the hash is taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Pooled upstream connections idle this long are closed.
    #[serde(default = "default_upstream_idle")]
    pub idle_timeout: Dur,
    /// Idle HTTP/1 connections kept per endpoint.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// How often endpoint names are resolved again.
    #[serde(
        default = "default_dns_refresh",
        skip_serializing_if = "is_default_dns_refresh"
    )]
    pub dns_refresh: Dur,
}

fn default_dns_refresh() -> Dur {
    Dur::secs(5)
}
fn is_default_dns_refresh(d: &Dur) -> bool {
    *d == default_dns_refresh()
}

fn default_connect_timeout() -> Dur {
    Dur::secs(1)
}
fn default_upstream_idle() -> Dur {
    Dur::secs(90)
}
fn default_max_idle() -> usize {
    256
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`, or `host:port`: each address the name resolves to is an
    /// endpoint of its own (Envoy's strict DNS).
    pub address: EndpointAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Everything wrong with a config document, each with its field path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<FieldError>);

#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
    /// Where in the document, when it was read from text.
    pub at: Option<Location>,
}

/// A position in a YAML document, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl FieldError {
    pub fn new(path: String, message: String) -> FieldError {
        FieldError {
            path,
            message,
            at: None,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some(at) = self.at {
            write!(f, " at line {} column {}", at.line, at.column)?;
        }
        Ok(())
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

impl Config {
    /// Parses and validates a YAML document: every error (unknown fields,
    /// wrong types, bad values, semantic problems) with its path and line.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        let checked = lint::check(text, false);
        match checked.config {
            Some(c) => Ok(c),
            None => Err(ConfigErrors(checked.errors)),
        }
    }

    /// `from_yaml` with the warnings too (shadowed routes, clusters with no
    /// endpoints, deprecated spellings): what `outrigger validate` prints.
    pub fn check_yaml(text: &str) -> Checked {
        lint::check(text, true)
    }

    /// `from_yaml` for a document about to be served: its warnings are
    /// logged.
    pub fn load_text(text: &str) -> Result<Config, ConfigErrors> {
        let checked = Config::check_yaml(text);
        if !checked.warnings.is_empty() {
            let list: Vec<String> = checked.warnings.iter().map(|w| w.to_string()).collect();
            crate::telemetry::log_json(
                "WARN",
                "outrigger::config",
                "config warnings",
                serde_json::json!({ "warnings": list }),
            );
        }
        match checked.config {
            Some(c) => Ok(c),
            None => Err(ConfigErrors(checked.errors)),
        }
    }

    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text).map_err(LoadError::Invalid)
    }

    pub fn to_yaml(&self) -> String {
        // Serializing plain data to YAML cannot fail; fall back to a comment if it ever does.
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Collects every semantic problem with its field path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: String| errs.push(FieldError::new(path, message));

        if !self.admin.address.ip().is_loopback() {
            err(
                "admin.address".into(),
                "the admin server must bind a loopback address".into(),
            );
        }
        for (path, p) in &self.admin.app_probes {
            if !path.starts_with("/app-health/") {
                err(
                    format!("admin.app_probes.{path}"),
                    "app probe paths start with /app-health/".into(),
                );
            }
            if p.port == 0 || !p.path.starts_with('/') || p.path.parse::<http::Uri>().is_err() {
                err(
                    format!("admin.app_probes.{path}"),
                    "a probe is { port: 1-65535, path: /absolute }".into(),
                );
            }
        }

        if self.listeners.is_empty() && self.feed.is_none() {
            // An empty or truncated file must never be applied: it would
            // stop every listener while the process looks healthy.
            err(
                "listeners".into(),
                "at least one listener is needed (an empty document would stop all traffic)".into(),
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        if let Some(t) = &self.tracing {
            if !(0.0..=1.0).contains(&t.sampling) {
                err("tracing.sampling".into(), "a share from 0.0 to 1.0".into());
            }
            if let Some(u) = &t.otlp
                && !u
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some())
            {
                err(
                    "tracing.otlp".into(),
                    format!("`{u}`: an http:// URL of the collector's /v1/traces"),
                );
            }
            if t.max_queue == 0 || t.max_batch == 0 {
                err(
                    "tracing.max_queue".into(),
                    "max_queue and max_batch are at least 1".into(),
                );
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.trace_sampling.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
                err(
                    format!("listeners[{i}].trace_sampling"),
                    "a share from 0.0 to 1.0".into(),
                );
            }
            let p = format!("listeners[{i}]");
            if l.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !names.insert(l.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate listener name `{}`", l.name),
                );
            }
            // Port 0 (tests, ephemeral ports) never collides.
            if l.address.port() != 0 && !addrs.insert(l.address) {
                err(
                    format!("{p}.address"),
                    format!("address {} is used twice", l.address),
                );
            }
            if l.forward_to.is_some() && l.role != Role::Inbound {
                err(
                    format!("{p}.forward_to"),
                    "only inbound listeners forward to a local app".into(),
                );
            }
            if l.max_header_bytes < 8192 {
                err(
                    format!("{p}.max_header_bytes"),
                    "must be at least 8192".into(),
                );
            }
            if l.idle_timeout.0.is_zero() {
                err(
                    format!("{p}.idle_timeout"),
                    "must be greater than zero".into(),
                );
            }
            for (field, v) in [
                ("max_connections", l.max_connections),
                ("max_concurrent_streams", l.max_concurrent_streams),
                ("max_tunnels", l.max_tunnels),
            ] {
                if v == 0 {
                    err(format!("{p}.{field}"), "must be at least 1".into());
                }
            }
            if !(16..=10_000).contains(&l.max_headers) {
                err(
                    format!("{p}.max_headers"),
                    "must be between 16 and 10000".into(),
                );
            }
            if l.tunnel_idle_timeout.is_some_and(|t| t.0.is_zero()) {
                err(
                    format!("{p}.tunnel_idle_timeout"),
                    "must be greater than zero".into(),
                );
            }
            if l.role != Role::Gateway {
                for (field, set) in [
                    ("trusted_hops", l.trusted_hops > 0),
                    ("trusted_proxies", !l.trusted_proxies.is_empty()),
                    ("trust_request_id", l.trust_request_id),
                ] {
                    if set {
                        err(
                            format!("{p}.{field}"),
                            "only gateway listeners take forwarding headers from outside".into(),
                        );
                    }
                }
            }
        }

        let cluster_names: HashSet<&str> = self.clusters.iter().map(|c| c.name.as_str()).collect();
        let mut route_names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if r.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !route_names.insert(r.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate route name `{}`", r.name),
                );
            }
            if let Some(ls) = &r.listeners {
                for (j, l) in ls.iter().enumerate() {
                    if !names.contains(l.as_str()) {
                        err(
                            format!("{p}.listeners[{j}]"),
                            format!("no listener named `{l}`"),
                        );
                    }
                }
            }
            let m = &r.matches;
            let paths = [&m.path, &m.path_prefix, &m.path_regex]
                .iter()
                .filter(|p| p.is_some())
                .count();
            if paths > 1 {
                err(
                    format!("{p}.match"),
                    "set at most one of path, path_prefix and path_regex".into(),
                );
            }
            for (field, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
                if let Some(v) = v
                    && !v.starts_with('/')
                {
                    err(
                        format!("{p}.match.{field}"),
                        format!("`{v}` must start with `/`"),
                    );
                }
            }
            if let Some(re) = &m.path_regex
                && let Err(e) = regex::Regex::new(re)
            {
                err(
                    format!("{p}.match.path_regex"),
                    format!("invalid regex: {e}"),
                );
            }
            if let Some(hosts) = &m.host {
                let many = matches!(hosts, Hosts::Many(_));
                for (j, h) in hosts.list().iter().enumerate() {
                    if let Err(e) = check_host_pattern(h) {
                        let at = if many {
                            format!("{p}.match.host[{j}]")
                        } else {
                            format!("{p}.match.host")
                        };
                        err(at, e);
                    }
                }
            }
            for (field, edits) in [
                ("request_headers", &r.request_headers),
                ("response_headers", &r.response_headers),
            ] {
                let Some(e) = edits else { continue };
                for (j, hv) in e.add.iter().chain(&e.set).enumerate() {
                    if http::HeaderName::from_bytes(hv.name.as_bytes()).is_err()
                        || http::HeaderValue::from_str(&hv.value).is_err()
                    {
                        err(
                            format!("{p}.{field}"),
                            format!(
                                "entry {j}: `{}: {}` is not a valid header",
                                hv.name, hv.value
                            ),
                        );
                    }
                }
                for (j, name) in e.remove.iter().enumerate() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        err(
                            format!("{p}.{field}.remove[{j}]"),
                            format!("`{name}` is not a header name"),
                        );
                    }
                }
            }
            if let Some(rw) = &r.rewrite {
                if rw.path_prefix.is_some() && m.path_prefix.is_none() {
                    err(
                        format!("{p}.rewrite.path_prefix"),
                        "needs the route to match a path_prefix".into(),
                    );
                }
                if rw.path_prefix.is_some() && rw.path.is_some() {
                    err(
                        format!("{p}.rewrite"),
                        "set path or path_prefix, not both".into(),
                    );
                }
                for (f, v) in [("path", &rw.path), ("path_prefix", &rw.path_prefix)] {
                    if let Some(v) = v
                        && !v.starts_with('/')
                    {
                        err(
                            format!("{p}.rewrite.{f}"),
                            format!("`{v}` must start with `/`"),
                        );
                    }
                }
                if let Some(h) = &rw.host
                    && http::uri::Authority::try_from(h.as_str()).is_err()
                {
                    err(format!("{p}.rewrite.host"), format!("`{h}` is not a host"));
                }
            }
            if let Some(rd) = &r.redirect {
                if ![301, 302, 303, 307, 308].contains(&rd.status) {
                    err(
                        format!("{p}.redirect.status"),
                        format!(
                            "{} is not a redirect status (301, 302, 303, 307, 308)",
                            rd.status
                        ),
                    );
                }
                if rd.path_prefix.is_some() && m.path_prefix.is_none() {
                    err(
                        format!("{p}.redirect.path_prefix"),
                        "needs the route to match a path_prefix".into(),
                    );
                }
                if let Some(sc) = &rd.scheme
                    && sc != "http"
                    && sc != "https"
                {
                    err(
                        format!("{p}.redirect.scheme"),
                        "must be http or https".into(),
                    );
                }
                if r.rewrite.is_some() {
                    err(
                        format!("{p}.redirect"),
                        "a route redirects or rewrites, not both".into(),
                    );
                }
            }
            for (j, h) in m.headers.iter().enumerate() {
                let hp = format!("{p}.match.headers[{j}]");
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    err(
                        format!("{hp}.name"),
                        format!("`{}` is not a valid header name", h.name),
                    );
                }
                let set = [h.exact.is_some(), h.regex.is_some(), h.present.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if set != 1 {
                    err(
                        hp.clone(),
                        "set exactly one of exact, regex and present".into(),
                    );
                }
                if let Some(re) = &h.regex
                    && let Err(e) = regex::Regex::new(re)
                {
                    err(format!("{hp}.regex"), format!("invalid regex: {e}"));
                }
            }
            for (j, meth) in m.methods.iter().enumerate() {
                if http::Method::from_bytes(meth.as_bytes()).is_err() {
                    err(
                        format!("{p}.match.methods[{j}]"),
                        format!("`{meth}` is not a method"),
                    );
                }
            }
            if r.backends.is_empty() && r.redirect.is_none() {
                err(
                    format!("{p}.backends"),
                    "needs at least one backend (or a redirect)".into(),
                );
            }
            if r.timeout.is_some_and(|t| t.0.is_zero()) {
                err(format!("{p}.timeout"), "must be greater than zero".into());
            }
            if r.total_timeout.is_some_and(|t| t.0.is_zero()) {
                err(
                    format!("{p}.total_timeout"),
                    "must be greater than zero".into(),
                );
            }
            for (j, u) in r.upgrades.iter().enumerate() {
                if u.eq_ignore_ascii_case("h2c") {
                    err(
                        format!("{p}.upgrades[{j}]"),
                        "h2c upgrades are never tunnelled: they would carry requests past every route and policy".into(),
                    );
                } else if u.is_empty()
                    || !u
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    err(
                        format!("{p}.upgrades[{j}]"),
                        format!("`{u}` is not an Upgrade protocol token"),
                    );
                }
            }
            if let Some(rt) = &r.retry {
                let rp = format!("{p}.retry");
                if rt.attempts == 0 || rt.attempts > 10 {
                    err(format!("{rp}.attempts"), "must be between 1 and 10".into());
                }
                if rt.per_try_timeout.is_some_and(|t| t.0.is_zero()) {
                    err(
                        format!("{rp}.per_try_timeout"),
                        "must be greater than zero".into(),
                    );
                }
                if rt.backoff.base.0 > rt.backoff.max.0 {
                    err(format!("{rp}.backoff"), "base must not exceed max".into());
                }
                if !(0.0..=100.0).contains(&rt.budget.percent) {
                    err(
                        format!("{rp}.budget.percent"),
                        "must be between 0 and 100".into(),
                    );
                }
                if !(rt.budget.min_per_second >= 0.0 && rt.budget.min_per_second.is_finite()) {
                    err(
                        format!("{rp}.budget.min_per_second"),
                        "must be zero or more".into(),
                    );
                }
                if rt.on.contains(&RetryOn::RetriableStatusCodes)
                    && rt.retriable_status_codes.is_empty()
                {
                    err(
                        format!("{rp}.retriable_status_codes"),
                        "is empty but `retry_on` lists retriable-status-codes".into(),
                    );
                }
                for (j, c) in rt.retriable_status_codes.iter().enumerate() {
                    if !(100..=599).contains(c) {
                        err(
                            format!("{rp}.retriable_status_codes[{j}]"),
                            format!("{c} is not an HTTP status"),
                        );
                    }
                }
            }
            if let Some(rl) = &r.rate_limit {
                check_rate_limit(&mut err, &format!("{p}.rate_limit"), rl);
            }
            if let Some(f) = &r.fault {
                let fp = format!("{p}.fault");
                if let Some(a) = &f.abort {
                    if !(0.0..=100.0).contains(&a.percent) {
                        err(
                            format!("{fp}.abort.percent"),
                            "must be between 0 and 100".into(),
                        );
                    }
                    if !(200..=599).contains(&a.status) {
                        err(
                            format!("{fp}.abort.status"),
                            format!("{} is not an HTTP status", a.status),
                        );
                    }
                }
                if let Some(d) = &f.delay
                    && !(0.0..=100.0).contains(&d.percent)
                {
                    err(
                        format!("{fp}.delay.percent"),
                        "must be between 0 and 100".into(),
                    );
                }
            }
            let mut total = 0u64;
            for (j, b) in r.backends.iter().enumerate() {
                if !cluster_names.contains(b.cluster.as_str()) {
                    err(
                        format!("{p}.backends[{j}].cluster"),
                        format!("no cluster named `{}`", b.cluster),
                    );
                }
                total += u64::from(b.weight);
            }
            if !r.backends.is_empty() && total == 0 {
                err(format!("{p}.backends"), "weights add up to zero".into());
            }
        }

        let mut seen = HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let p = format!("clusters[{i}]");
            if c.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !seen.insert(c.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate cluster name `{}`", c.name),
                );
            }
            match (&c.lb, &c.hash_on) {
                (LbPolicy::RingHash, None) => err(
                    format!("{p}.hash_on"),
                    "ring-hash needs hash_on: { header: NAME } or { cookie: NAME }".into(),
                ),
                (LbPolicy::RingHash, Some(h)) => match (&h.header, &h.cookie) {
                    (Some(name), None) => {
                        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                            err(
                                format!("{p}.hash_on.header"),
                                format!("`{name}` is not a header name"),
                            );
                        }
                    }
                    (None, Some(_)) => {}
                    _ => err(
                        format!("{p}.hash_on"),
                        "set exactly one of header and cookie".into(),
                    ),
                },
                (_, Some(_)) => err(
                    format!("{p}.hash_on"),
                    "only used with lb: ring-hash".into(),
                ),
                _ => {}
            }
            if c.connect_timeout.0.is_zero() {
                err(
                    format!("{p}.connect_timeout"),
                    "must be greater than zero".into(),
                );
            }
            if c.idle_timeout.0.is_zero() {
                err(
                    format!("{p}.idle_timeout"),
                    "must be greater than zero".into(),
                );
            }
            let cb = &c.circuit_breaker;
            for (field, v) in [
                ("max_connections", cb.max_connections),
                ("max_requests", cb.max_requests),
            ] {
                if v == 0 {
                    err(
                        format!("{p}.circuit_breaker.{field}"),
                        "must be at least 1".into(),
                    );
                }
            }
            if let Some(o) = &c.outlier_detection {
                let op = format!("{p}.outlier_detection");
                if o.max_ejection_percent > 100 {
                    err(
                        format!("{op}.max_ejection_percent"),
                        "must be at most 100".into(),
                    );
                }
                if o.panic_threshold > 100 {
                    err(
                        format!("{op}.panic_threshold"),
                        "must be at most 100".into(),
                    );
                }
                if o.interval.0.is_zero() || o.base_ejection.0.is_zero() {
                    err(
                        op.clone(),
                        "interval and base_ejection must be greater than zero".into(),
                    );
                }
                if o.base_ejection.0 > o.max_ejection.0 {
                    err(
                        format!("{op}.max_ejection"),
                        "must not be less than base_ejection".into(),
                    );
                }
            }
            if let Some(h) = &c.health_check {
                let hp = format!("{p}.health_check");
                if !h.path.starts_with('/') {
                    err(format!("{hp}.path"), "must start with `/`".into());
                }
                if h.interval.0.is_zero() || h.timeout.0.is_zero() {
                    err(
                        hp.clone(),
                        "interval and timeout must be greater than zero".into(),
                    );
                }
                if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                    err(hp, "thresholds must be at least 1".into());
                }
            }
            if c.dns_refresh.0 < std::time::Duration::from_millis(100) {
                err(format!("{p}.dns_refresh"), "must be at least 100ms".into());
            }
            let mut eps = HashSet::new();
            for (j, e) in c.endpoints.iter().enumerate() {
                if !eps.insert(e.address.clone()) {
                    err(
                        format!("{p}.endpoints[{j}].address"),
                        format!("{} is listed twice", e.address),
                    );
                }
            }
        }

        security::validate_security(self, &mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

fn check_rate_limit(err: &mut impl FnMut(String, String), p: &str, rl: &RateLimit) {
    if !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite()) {
        err(
            format!("{p}.requests_per_second"),
            "must be greater than zero".into(),
        );
    }
    if rl.burst == Some(0) {
        err(format!("{p}.burst"), "must be at least 1".into());
    }
}

pub(crate) fn check_host_pattern(h: &str) -> Result<(), String> {
    if h == "*" {
        return Ok(());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.contains('*') {
        return Err(format!("`{h}`: use an exact host, `*.suffix` or `*`"));
    }
    if name.contains(':') {
        return Err(format!(
            "`{h}`: leave the port out, hosts match on any port"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("`{h}` is not a host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - { name: out, role: outbound, address: 127.0.0.1:15001 }
routes:
  - name: r
    match: { host: "*.svc", path_prefix: /api, methods: [GET] }
    backends: [ { cluster: c, weight: 3 } ]
clusters:
  - { name: c, lb: ring-hash, hash_on: { header: x-user }, endpoints: [ { address: 127.0.0.1:8080 } ] }
"#;

    #[test]
    fn good_config_loads_with_defaults() {
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!(c.clusters[0].connect_timeout, Dur::secs(1));
        assert_eq!(c.listeners[0].max_header_bytes, 65536);
        assert_eq!(c.admin.address.port(), 15000);
    }

    #[test]
    fn unknown_field_is_rejected_with_path_and_line() {
        let bad = GOOD.replace("lb: ring-hash", "lb: ring-hash, colour: red");
        let e = Config::from_yaml(&bad).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("clusters[0]"), "{s}");
        assert!(s.contains("colour"), "{s}");
        assert!(s.contains("line"), "{s}");
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_path() {
        let bad = r#"
listeners:
  - { name: a, role: outbound, address: 127.0.0.1:1, forward_to: 127.0.0.1:2 }
  - { name: a, role: outbound, address: 127.0.0.1:1 }
routes:
  - name: r
    match: { path: nope, path_regex: "(" }
    backends: [ { cluster: missing } ]
clusters:
  - { name: c, lb: ring-hash, connect_timeout: 0s }
"#;
        let e = Config::from_yaml(bad).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|f| f.path.as_str()).collect();
        for want in [
            "listeners[0].forward_to",
            "listeners[1].name",
            "listeners[1].address",
            "routes[0].match",
            "routes[0].match.path",
            "routes[0].match.path_regex",
            "routes[0].backends[0].cluster",
            "clusters[0].hash_on",
            "clusters[0].connect_timeout",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn bad_duration_names_the_field() {
        let bad = GOOD.replace(
            "hash_on: { header: x-user }",
            "hash_on: { header: x-user }, connect_timeout: 5",
        );
        let s = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(s.contains("clusters[0].connect_timeout"), "{s}");
    }

    /// Many mistakes of every kind, one per line (the line is the number
    /// after `#`): one pass reports them all, each on its own line.
    const MANY_MISTAKES: &str = r#"node: { id: web-1, servce: web }                   #1
listeners:
  - name: out
    role: outbound
    address: 127.0.0.1:15001
    idle_timeout: 500 ms                                #6
    header_read_timout: 10s                             #7
    max_connections: lots                               #8
  - name: in
    role: sideways                                      #10
    address: 0.0.0.0:15006
    forward_to: 127.0.0.1:8080
routes:
  - name: r1
    match: { host: orders, path_prefx: /api }           #15
    backends: [ { cluster: orders, weight: heavy } ]    #16
    timeout: 2                                          #17
    retry:
      attempts: 3
      retry_on: [gateway-error]
      per_try_timeout: 1h30                             #21
      backof: { base: 1ms }                             #22
  - name: r2
    backends: [ { cluster: nope } ]                     #24
clusters:
  - name: orders
    lb: round-robbin                                    #27
    connect_timeout: 1m30s
    colour: red                                         #29
    endpoints: [ { address: 10.0.0.1:80 }, { address: not-an-address } ]   #30
    outlier_detection: { consecutive_5xx: -1 }          #31
    health_check: { path: /healthz, interval: 5 s }     #32
"#;

    #[test]
    fn every_mistake_is_reported_in_one_pass_with_its_line() {
        let errs = Config::from_yaml(MANY_MISTAKES).unwrap_err().0;
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let want: &[(&str, &str, usize)] = &[
            ("node", "unknown field `servce`: did you mean `service`?", 1),
            (
                "listeners[0].idle_timeout",
                "no spaces inside a duration (write `500ms`)",
                6,
            ),
            (
                "listeners[0]",
                "unknown field `header_read_timout`: did you mean `header_read_timeout`?",
                7,
            ),
            (
                "listeners[0].max_connections",
                "invalid type: string \"lots\"",
                8,
            ),
            ("listeners[1].role", "unknown variant `sideways`", 10),
            (
                "routes[0].match",
                "unknown field `path_prefx`: did you mean `path_prefix`?",
                15,
            ),
            (
                "routes[0].backends[0].weight",
                "invalid type: string \"heavy\"",
                16,
            ),
            ("routes[0].timeout", "`2` has no unit", 17),
            (
                "routes[0].retry.per_try_timeout",
                "`1h30`: `30` at the end has no unit",
                21,
            ),
            (
                "routes[0].retry",
                "unknown field `backof`: did you mean `backoff`?",
                22,
            ),
            (
                "routes[1].backends[0].cluster",
                "no cluster named `nope`",
                24,
            ),
            (
                "clusters[0].lb",
                "unknown variant `round-robbin`: did you mean `round-robin`?",
                27,
            ),
            ("clusters[0]", "unknown field `colour`, expected one of", 29),
            (
                "clusters[0].endpoints[1].address",
                "`not-an-address` has no port",
                30,
            ),
            (
                "clusters[0].outlier_detection.consecutive_5xx",
                "invalid type: integer `-1`, expected u32",
                31,
            ),
            (
                "clusters[0].health_check.interval",
                "no spaces inside a duration",
                32,
            ),
        ];
        for (path, msg, line) in want {
            let found = errs
                .iter()
                .find(|e| e.path == *path && e.message.contains(msg));
            let Some(e) = found else {
                panic!("no `{path}: {msg}` in\n{}", shown.join("\n"))
            };
            assert_eq!(e.at.map(|a| a.line), Some(*line), "{e}");
            assert!(
                e.to_string().contains(&format!("at line {line} column ")),
                "{e}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{}", shown.join("\n"));
        // In document order.
        let lines: Vec<usize> = errs.iter().filter_map(|e| e.at.map(|a| a.line)).collect();
        assert!(lines.is_sorted(), "{lines:?}");
    }

    #[test]
    fn a_repaired_item_does_not_echo_its_stand_in() {
        // Listener `in` has a bad role: the stand-in role must not bring
        // errors of its own; the semantic check of the rest still runs.
        let bad = GOOD.replace("role: outbound", "role: sideways")
            + "  - { name: d, endpoints: [ { address: 127.0.0.1:8080 } ], connect_timeout: 0s }\n";
        let errs = Config::from_yaml(&bad).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["listeners[0].role", "clusters[1].connect_timeout"],
            "{errs:?}"
        );
    }

    #[test]
    fn syntax_errors_keep_their_line() {
        let e = Config::from_yaml("listeners:\n  - { name: a\nroutes: []\n")
            .unwrap_err()
            .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.starts_with("not valid YAML"), "{}", e[0]);
        assert!(e[0].at.is_some(), "{}", e[0]);
    }

    #[test]
    fn warnings_for_shadowed_routes_empty_clusters_and_on() {
        let text = r#"
listeners:
  - { name: out, role: outbound, address: 127.0.0.1:15001 }
  - { name: in, role: inbound, address: 127.0.0.1:15006, forward_to: 127.0.0.1:8080 }
routes:
  - name: first
    match: { host: [b.svc, A.svc], methods: [get] }
    backends: [ { cluster: c } ]
  - name: second
    listeners: [out]
    match: { host: [a.svc, b.svc], methods: [GET] }
    backends: [ { cluster: c } ]
    retry: { on: [5xx] }
  - name: on-inbound
    listeners: [in]
    match: { host: [a.svc, b.svc], methods: [GET] }
    backends: [ { cluster: c } ]
clusters:
  - { name: c, endpoints: [ { address: 127.0.0.1:8080 } ] }
  - { name: empty }
"#;
        let checked = Config::check_yaml(text);
        assert!(checked.errors.is_empty(), "{:?}", checked.errors);
        let c = checked.config.expect("valid");
        assert_eq!(
            c.routes[1].retry.as_ref().unwrap().on,
            vec![RetryOn::FiveXx]
        );
        let w: Vec<String> = checked.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].starts_with("routes[1]: route `second` is never used: route `first`")
                && w[0].ends_with("at line 9 column 5"),
            "{w:#?}"
        );
        assert!(
            w[1].starts_with("routes[1].retry.on: `on` is deprecated, write `retry_on`")
                && w[1].contains("line 13"),
            "{w:#?}"
        );
        assert!(
            w[2].starts_with("clusters[1]: cluster `empty` has no endpoints")
                && w[2].contains("line 20"),
            "{w:#?}"
        );
        // `retry_on` is what is written back.
        assert!(c.to_yaml().contains("retry_on:"), "{}", c.to_yaml());
    }

    #[test]
    fn host_patterns() {
        assert!(check_host_pattern("*").is_ok());
        assert!(check_host_pattern("*.example.com").is_ok());
        assert!(check_host_pattern("a.b").is_ok());
        assert!(check_host_pattern("a*.b").is_err());
        assert!(check_host_pattern("a.b:80").is_err());
    }

    #[test]
    fn yaml_round_trips() {
        let c = Config::from_yaml(GOOD).unwrap();
        let again = Config::from_yaml(&c.to_yaml()).unwrap();
        assert_eq!(c, again);
    }
}
