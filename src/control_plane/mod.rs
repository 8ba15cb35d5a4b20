//! The control plane (`outrigger control-plane`): holds the mesh-wide view
//! and streams to every proxy exactly the config it needs, as the same
//! document a proxy reads from a file.
//!
//! - `model`: the mesh model (Kubernetes and Gateway API types, and the
//!   own kinds of `kinds`), validation that names file, document and field.
//! - `source`: where the model comes from (a watched directory of YAML,
//!   or the Kubernetes API), behind one trait.
//! - `render`: model → one proxy's config.
//! - `server`: the feed, acks, the node list, the CA endpoint.
//! - `report`: what proxies report of their traffic (`POST /v1/report`),
//!   made from their Prometheus registry; `traffic`: the control plane's
//!   store of reports and the mesh view from it (`GET /v1/mesh`);
//!   `dashboard`: the page at `/`; `stat`: `outrigger stat`.
//!
//! It shares only `config/` and `tls/` with the data plane.

pub mod dashboard;
pub mod kinds;
pub mod model;
pub mod persist;
pub mod render;
pub mod report;
pub mod server;
pub mod source;
pub mod stat;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What `outrigger control-plane` runs with.
pub struct Options {
    pub listen: SocketAddr,
    pub mesh_dir: Option<PathBuf>,
    pub kubernetes: bool,
    pub ca_dir: PathBuf,
    pub tokens: Option<PathBuf>,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub namespace: String,
    pub dns: Vec<String>,
    pub cert_ttl: Duration,
    pub grace: Duration,
    /// Keep the registrations here across restarts.
    pub state_dir: Option<PathBuf>,
    pub reregister_window: Duration,
    pub mtls: bool,
    pub watch_interval: Duration,
    pub webhook: Option<Webhook>,
}

/// The injection webhook's listener and certificate.
pub struct Webhook {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub inject_config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("CA: {0}")]
    Ca(#[from] crate::tls::ca::CaError),
    #[error("{path}: {message}")]
    Tokens { path: String, message: String },
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("name a model source: --mesh-dir DIR or --kubernetes")]
    NoSource,
    #[error("kubernetes: {0}")]
    Kube(String),
    #[error("webhook: {0}")]
    Webhook(String),
}

#[derive(serde::Deserialize)]
struct TokenEntry {
    token: String,
    identity: String,
}

/// The bootstrap tokens file: `- { token: ..., identity: spiffe://... }`.
pub fn load_tokens(
    path: &std::path::Path,
) -> Result<std::collections::HashMap<String, crate::tls::spiffe::SpiffeId>, RunError> {
    let bad = |message: String| RunError::Tokens {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let entries: Vec<TokenEntry> = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = std::collections::HashMap::new();
    for (i, e) in entries.into_iter().enumerate() {
        let id = crate::tls::spiffe::SpiffeId::parse(&e.identity)
            .map_err(|err| bad(format!("[{i}].identity: {err}")))?;
        if e.token.len() < 16 {
            return Err(bad(format!("[{i}].token: at least 16 characters")));
        }
        out.insert(e.token, id);
    }
    Ok(out)
}

/// Runs the control plane until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> Result<(), RunError> {
    let ca = crate::tls::ca::Ca::load(&opts.ca_dir)?;
    let mut tokens = server::Tokens::default();
    if let Some(p) = &opts.tokens {
        tokens.static_tokens = load_tokens(p)?;
    }
    let kube_client = if opts.kubernetes {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|e| RunError::Kube(e.to_string()))?,
        )
    } else {
        None
    };
    tokens.review = kube_client.clone();
    let settings = render::Settings {
        trust_domain: opts.trust_domain.clone(),
        cluster_domain: opts.cluster_domain.clone(),
        mtls: opts.mtls,
    };
    let my_id = crate::tls::spiffe::SpiffeId::workload(
        &opts.trust_domain,
        &opts.namespace,
        "control-plane",
    )
    .map_err(|e| RunError::Kube(e.to_string()))?;
    let tls = server::server_tls(&ca, &my_id, &opts.dns)?;
    if opts.state_dir.is_some() && opts.reregister_window < opts.grace {
        tracing::warn!(window = ?opts.reregister_window, grace = ?opts.grace, "--reregister-window is shorter than --grace: restored registrations go before the first push");
    }
    let cp = server::ControlPlane::new(
        settings,
        ca,
        tokens,
        opts.cert_ttl,
        opts.grace,
        opts.state_dir.as_deref().map(persist::Store::new),
        opts.reregister_window,
    );
    cp.restore();
    let source: Box<dyn source::Source> = match (&opts.mesh_dir, kube_client) {
        (Some(dir), _) => Box::new(source::DirSource {
            dir: dir.clone(),
            interval: opts.watch_interval,
        }),
        (None, Some(client)) => Box::new(kube_source::KubeSource { client }),
        (None, None) => return Err(RunError::NoSource),
    };
    let publisher = cp.clone();
    tokio::spawn(source.run(Box::new(move |mesh, origin| {
        publisher.set_mesh(mesh, origin)
    })));
    server::serve(cp, opts.listen, tls).await?;
    if let Some(w) = &opts.webhook {
        let settings = crate::inject::Settings::load(w.inject_config.as_deref())
            .map_err(|e| RunError::Webhook(e.to_string()))?;
        crate::inject::webhook::serve(w.listen, &w.cert, &w.key, Arc::new(settings))
            .await
            .map_err(RunError::Webhook)?;
    }
    wait_for_signal().await;
    tracing::info!("control plane stopping");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Shared by callers that need the pieces (tests, the demo).
pub type Shared = Arc<server::ControlPlane>;
pub mod kube_source;
