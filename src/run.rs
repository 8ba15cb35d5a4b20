//! The process lifecycle of `outrigger run`: runtime, admin servers, the
//! proxy, the config watcher, signals and draining.

use crate::admin::{self, Kind};
use crate::config::Config;
use crate::proxy::Proxy;
use crate::telemetry::metrics;
use crate::tls::identity::{Credentials, FileSource, IdentityStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Options {
    pub threads: usize,
    pub drain_timeout: Duration,
    pub watch_interval: Duration,
}

/// Worker threads: the CPUs this process may use. `available_parallelism`
/// honours the cgroup CPU quota (cgroup v1 and v2) and the affinity mask,
/// so a container limited to 1.5 CPUs gets 1 worker, not the host's count.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One worker → a current-thread runtime: no work stealing, no cross-thread wake-ups.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Apply(#[from] crate::proxy::ApplyError),
    #[error("identity: {0}")]
    Identity(#[from] crate::tls::identity::IdentityError),
    #[error("feed: {0}")]
    Feed(String),
}

/// The proxy's identity from its config (the `files` source), and the
/// task that watches the files for rotation.
pub fn start_identity(
    config: &Config,
    watch_interval: Duration,
) -> Result<Option<Arc<IdentityStore>>, RunError> {
    let Some(id) = &config.identity else {
        return Ok(None);
    };
    let Some(files) = &id.source.files else {
        return Ok(None);
    };
    let source = FileSource {
        cert: files.cert.clone(),
        key: files.key.clone(),
        roots: files.roots.clone(),
    };
    let creds = Credentials::from_files(&source, &id.trust_domain)?;
    tracing::info!(id = %creds.id, serial = %creds.serial, not_after = creds.not_after, "identity loaded");
    let store = IdentityStore::new(&id.trust_domain, creds);
    tokio::spawn(source.watch(store.clone(), watch_interval));
    Ok(Some(store))
}

/// Runs the proxy until SIGTERM, SIGINT or `POST /shutdown`, then drains.
/// `watch` is the file to re-read for config changes.
pub async fn serve(
    config: Config,
    watch: Option<(PathBuf, Vec<u8>)>,
    opts: &Options,
) -> Result<(), RunError> {
    // `--threads 0` runs one, as `runtime` does.
    let workers = opts.threads.max(1);
    metrics()
        .worker_threads
        .set(i64::try_from(workers).unwrap_or(i64::MAX));
    let state = admin::State::new();
    for (addr, kind) in [
        (config.admin.address, Kind::Admin),
        (config.admin.probes, Kind::Probes),
    ] {
        admin::serve(addr, kind, state.clone())
            .await
            .map_err(|source| RunError::Admin { addr, source })?;
    }
    if config.feed.is_some() {
        return serve_from_control_plane(config, state, opts).await;
    }
    let identity = start_identity(&config, opts.watch_interval)?;
    let proxy = Proxy::start(config, identity).await?;
    metrics().feed_updates.with_label_values(&["ack"]).inc();
    state.set_proxy(proxy.clone());
    tracing::info!(version = proxy.version(), workers, "ready");
    if let Some((path, bytes)) = watch {
        tokio::spawn(crate::feed::watch_file(
            path,
            proxy.clone(),
            opts.watch_interval,
            bytes,
        ));
    }
    wait_for_shutdown(&state).await;
    drain(&proxy, opts.drain_timeout).await;
    Ok(())
}

/// A proxy whose config comes from a control plane: the bootstrap config
/// holds no listeners; `/ready` waits for the first snapshot.
async fn serve_from_control_plane(
    bootstrap: Config,
    state: Arc<admin::State>,
    opts: &Options,
) -> Result<(), RunError> {
    let client = crate::feed::control_plane::FeedClient::new(&bootstrap)
        .map_err(|e| RunError::Feed(e.to_string()))?;
    let identity = match bootstrap.identity.as_ref().map(|i| i.source.control_plane) {
        Some(true) => Some(client.identity_store().await),
        _ => start_identity(&bootstrap, opts.watch_interval)?,
    };
    let proxy = Proxy::start(bootstrap, identity).await?;
    state.set_proxy(proxy.clone());
    client.apply_cached(&proxy).await;
    tokio::spawn(client.clone().run(proxy.clone()));
    wait_for_shutdown(&state).await;
    // Callers stop getting this proxy before its listeners close.
    client.drain().await;
    drain(&proxy, opts.drain_timeout).await;
    Ok(())
}

pub async fn drain(proxy: &Arc<Proxy>, deadline: Duration) {
    proxy.begin_drain();
    if proxy.wait_idle(deadline).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            open = proxy.active_connections(),
            "drain deadline passed; exiting"
        );
    }
}

async fn wait_for_shutdown(state: &admin::State) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        if let (Ok(mut term), Ok(mut int)) = (term, int) {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
                _ = state.shutdown_requested() => tracing::info!("shutdown requested"),
            }
            return;
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = state.shutdown_requested() => {},
    }
}
