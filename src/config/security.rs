//! Config of identity, listener TLS and authorization. Defaults sit next
//! to each field; `validate_security` checks what serde cannot.

use super::{Dur, FieldError, Role};
use crate::tls::spiffe::{IdPattern, SpiffeId};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The proxy's own workload identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub trust_domain: String,
    pub source: CertSource,
}

/// Where the certificate comes from: `files` (watched), or the control
/// plane's CA (a CSR with a key made here, renewed at two thirds of its
/// lifetime).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<CertFiles>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control_plane: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// mTLS required: plaintext is refused.
    Strict,
    /// mTLS or plaintext on the same port (migrating a namespace).
    Permissive,
    /// Plaintext only.
    #[default]
    Disabled,
    /// TLS from outside clients, certificates by SNI (gateways).
    Terminate,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Strict => "strict",
            TlsMode::Permissive => "permissive",
            TlsMode::Disabled => "disabled",
            TlsMode::Terminate => "terminate",
        }
    }
}

/// `tls: strict` or `tls: { mode: terminate, certificates: [...] }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListenerTlsField {
    Mode(TlsMode),
    Full(ListenerTls),
}

impl ListenerTlsField {
    pub fn resolved(&self) -> ListenerTls {
        match self {
            ListenerTlsField::Mode(m) => ListenerTls {
                mode: *m,
                ..ListenerTls::default()
            },
            ListenerTlsField::Full(t) => t.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    #[serde(default)]
    pub mode: TlsMode,
    /// `terminate`: a certificate per host (chosen by SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<HostCert>,
    /// `terminate`: also accept TLS 1.2 (outside clients); sidecars speak 1.3 only.
    #[serde(default = "default_min_version")]
    pub min_version: String,
    /// `terminate`: a `strict-transport-security` value for every response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<String>,
    /// A handshake not done this long after accept is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

fn default_min_version() -> String {
    "1.2".into()
}
fn default_handshake_timeout() -> Dur {
    Dur::secs(5)
}

impl Default for ListenerTls {
    fn default() -> Self {
        ListenerTls {
            mode: TlsMode::Disabled,
            certificates: Vec::new(),
            min_version: default_min_version(),
            hsts: None,
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCert {
    /// Exact names or `*.suffix`; the default certificate may have none.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Served to clients whose SNI matches no host (else they are refused).
    #[serde(default)]
    pub default: bool,
}

/// Who may call an inbound listener. When any policy names a listener,
/// what no rule allows there is denied (403).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub name: String,
    pub listener: String,
    /// Log and count would-be denials, deny nothing.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Peer identities (`*` for one path segment, or `*` for any
    /// authenticated peer); absent: any caller, plaintext included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    /// Exact paths, or prefixes ending in `*` (`/api/*`); absent: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Absent: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// The checks of the security sections, appended to `errs`.
pub(super) fn validate_security(c: &super::Config, errs: &mut Vec<FieldError>) {
    let mut err = |path: String, message: String| errs.push(FieldError::new(path, message));
    if let Some(f) = &c.feed {
        if f.control_plane.is_empty() {
            err(
                "feed.control_plane".into(),
                "name at least one control plane (https://host:port)".into(),
            );
        }
        for (i, u) in f.control_plane.iter().enumerate() {
            if !u.starts_with("https://")
                || u.parse::<http::Uri>()
                    .map(|u| u.authority().is_none())
                    .unwrap_or(true)
            {
                err(
                    format!("feed.control_plane[{i}]"),
                    format!("`{u}` is not an https:// URL"),
                );
            }
        }
        if c.identity.is_none() {
            err(
                "identity".into(),
                "a proxy fed by a control plane needs an identity (source: { control_plane: true })".into(),
            );
        }
        if let Some(id) = &f.control_plane_identity
            && SpiffeId::parse(id).is_err()
        {
            err(
                "feed.control_plane_identity".into(),
                format!("`{id}` is not a SPIFFE ID"),
            );
        }
        if f.ca.is_some() == f.ca_pem.is_some() {
            err(
                "feed.ca".into(),
                "name the control plane's CA: ca (a file) or ca_pem (the PEM), one of them".into(),
            );
        }
        if f.inbound_port > 0 && f.app_port == 0 {
            err(
                "feed.app_port".into(),
                "an inbound listener forwards to the app's port".into(),
            );
        }
    } else if c.identity.as_ref().is_some_and(|i| i.source.control_plane) {
        err(
            "identity.source.control_plane".into(),
            "certificates from the control plane need a `feed` section".into(),
        );
    }
    if let Some(id) = &c.identity {
        if SpiffeId::parse(&format!("spiffe://{}/x", id.trust_domain)).is_err() {
            err(
                "identity.trust_domain".into(),
                format!(
                    "`{}` is not a trust domain (lowercase letters, digits, `-._`)",
                    id.trust_domain
                ),
            );
        }
        if id.source.files.is_some() == id.source.control_plane {
            err(
                "identity.source".into(),
                "name one certificate source: files: { cert, key, roots } or control_plane: true"
                    .into(),
            );
        }
    }
    for (i, l) in c.listeners.iter().enumerate() {
        let Some(t) = &l.tls else { continue };
        let t = t.resolved();
        let p = format!("listeners[{i}].tls");
        match t.mode {
            TlsMode::Strict | TlsMode::Permissive if c.identity.is_none() => err(
                format!("{p}.mode"),
                format!(
                    "`{}` needs the proxy's own identity: add an `identity` section",
                    t.mode.as_str()
                ),
            ),
            TlsMode::Terminate if t.certificates.is_empty() => err(
                format!("{p}.certificates"),
                "`terminate` needs at least one certificate".into(),
            ),
            _ => {}
        }
        if t.mode != TlsMode::Terminate && !t.certificates.is_empty() {
            err(
                format!("{p}.certificates"),
                "only `terminate` serves host certificates (sidecars use the identity)".into(),
            );
        }
        if !matches!(t.min_version.as_str(), "1.2" | "1.3") {
            err(
                format!("{p}.min_version"),
                "must be \"1.2\" or \"1.3\"".into(),
            );
        }
        if t.handshake_timeout.0.is_zero() {
            err(
                format!("{p}.handshake_timeout"),
                "must be greater than zero".into(),
            );
        }
        if t.certificates.iter().filter(|c| c.default).count() > 1 {
            err(
                format!("{p}.certificates"),
                "at most one default certificate".into(),
            );
        }
        for (j, hc) in t.certificates.iter().enumerate() {
            if hc.hosts.is_empty() && !hc.default {
                err(
                    format!("{p}.certificates[{j}].hosts"),
                    "name the hosts, or make it the default".into(),
                );
            }
            for (k, h) in hc.hosts.iter().enumerate() {
                if let Err(e) = super::check_host_pattern(h) {
                    err(format!("{p}.certificates[{j}].hosts[{k}]"), e);
                }
            }
        }
        if l.redirect_https.is_some() && t.mode != TlsMode::Disabled {
            err(
                format!("listeners[{i}].redirect_https"),
                "a redirecting listener is the plain-HTTP one".into(),
            );
        }
    }
    for (i, cl) in c.clusters.iter().enumerate() {
        for (j, e) in cl.endpoints.iter().enumerate() {
            let Some(id) = &e.identity else { continue };
            let p = format!("clusters[{i}].endpoints[{j}].identity");
            match SpiffeId::parse(id) {
                Err(e) => err(p, e.to_string()),
                Ok(_) if c.identity.is_none() => err(
                    p,
                    "an endpoint with an identity is reached over mTLS, which needs the proxy's own identity: add an `identity` section".into(),
                ),
                Ok(_) => {}
            }
        }
    }
    for (i, a) in c.authorization.iter().enumerate() {
        let p = format!("authorization[{i}]");
        match c.listeners.iter().find(|l| l.name == a.listener) {
            None => err(
                format!("{p}.listener"),
                format!("no listener named `{}`", a.listener),
            ),
            Some(l) if l.role != Role::Inbound => err(
                format!("{p}.listener"),
                format!("`{}` is not an inbound listener", a.listener),
            ),
            _ => {}
        }
        for (j, r) in a.allow.iter().enumerate() {
            let rp = format!("{p}.allow[{j}]");
            for (k, f) in r.from.iter().flatten().enumerate() {
                if let Err(e) = IdPattern::parse(f) {
                    err(format!("{rp}.from[{k}]"), e.to_string());
                }
            }
            for (k, path) in r.paths.iter().enumerate() {
                let body = path.strip_suffix('*').unwrap_or(path);
                if !path.starts_with('/') || body.contains('*') {
                    err(
                        format!("{rp}.paths[{k}]"),
                        format!("`{path}`: an exact path, or a prefix ending in `*`"),
                    );
                }
            }
            for (k, m) in r.methods.iter().enumerate() {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    err(
                        format!("{rp}.methods[{k}]"),
                        format!("`{m}` is not a method"),
                    );
                }
            }
        }
    }
}

/// Where a proxy gets its config when a control plane serves it: the
/// small bootstrap config names this, and listeners, routes and clusters
/// come from the feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feed {
    /// One or more control-plane replicas (`https://host:15010`); a proxy
    /// whose control plane dies moves to the next.
    pub control_plane: Vec<String>,
    /// The trust bundle the control plane's certificate must chain to: a
    /// file, or the PEM itself (what injection writes into a pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The control plane's SPIFFE ID (default: spiffe://<trust domain>/ns/outrigger/sa/control-plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_identity: Option<String>,
    /// A bearer token proving who this proxy is until it has a
    /// certificate (a bootstrap token, or a projected ServiceAccount token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The service account the proxy runs as (its SPIFFE ID's last part).
    pub service_account: String,
    /// Where callers reach this proxy's inbound listener (self-registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// 0: no inbound listener (a client-only workload or a gateway).
    #[serde(default)]
    pub inbound_port: u16,
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// The local app the inbound listener forwards to.
    #[serde(default)]
    pub app_port: u16,
    /// Keep the last good snapshot (and certificate) here, to serve from at
    /// start while the control plane is away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
}

fn default_outbound_port() -> u16 {
    15001
}
