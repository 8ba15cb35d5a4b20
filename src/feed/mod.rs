//! Where config comes from. Today: a file, watched and re-applied on change.
//!
//! A change is applied once the file has stayed the same for one watch
//! interval, so a half-written file is never applied; an empty or
//! listener-less document is refused like any invalid one.
//!
//! The file is polled (read and compared) rather than watched with inotify:
//! Kubernetes updates a mounted ConfigMap by swapping a symlink, which an
//! inotify watch on the file itself misses, and reading a small file once a
//! second costs nothing measurable. A change that does not parse, validate
//! or apply is logged and counted (`outrigger_feed_updates_total{result="nack"}`)
//! and the running config stays in force.

pub mod control_plane;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::telemetry::metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub async fn watch_file(path: PathBuf, proxy: Arc<Proxy>, interval: Duration, mut last: Vec<u8>) {
    let mut read_failed = false;
    // A changed file is applied only once it reads the same twice in a row,
    // one interval apart: an editor or `cp` writing it in place is never
    // caught half-way.
    let mut pending: Option<Vec<u8>> = None;
    loop {
        tokio::time::sleep(interval).await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => {
                read_failed = false;
                b
            }
            Err(e) => {
                if !read_failed {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read config; keeping the running one");
                    read_failed = true;
                }
                continue;
            }
        };
        if bytes == last {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&bytes) {
            pending = Some(bytes);
            continue;
        }
        pending = None;
        last = bytes;
        apply_text(&proxy, &String::from_utf8_lossy(&last)).await;
    }
}

/// Validates and applies one document; counts and logs the result.
pub async fn apply_text(proxy: &Proxy, text: &str) -> bool {
    let m = metrics();
    match Config::load_text(text) {
        Ok(config) => {
            let before = proxy.snapshot().config.clone();
            match proxy.apply(config.clone()).await {
                Ok(version) => {
                    m.feed_updates.with_label_values(&["ack"]).inc();
                    let changes = crate::config::diff(&before, &config);
                    crate::telemetry::log_json(
                        "INFO",
                        "outrigger::feed",
                        "config applied",
                        serde_json::json!({ "version": version, "changes": changes }),
                    );
                    true
                }
                Err(e) => {
                    m.feed_updates.with_label_values(&["nack"]).inc();
                    tracing::warn!(error = %e, "config rejected; keeping the running one");
                    false
                }
            }
        }
        Err(errors) => {
            m.feed_updates.with_label_values(&["nack"]).inc();
            let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
            crate::telemetry::log_json(
                "WARN",
                "outrigger::feed",
                "invalid config; keeping the running one",
                serde_json::json!({ "errors": list }),
            );
            false
        }
    }
}
