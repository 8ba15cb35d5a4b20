//! Clusters: endpoint sets, the balancer that picks among them, and the
//! per-endpoint connection pools.

mod ewma;
mod lb;
mod pool;

pub use lb::{Lb, hash_bytes};
pub use pool::{Endpoint, PoolSettings, PooledBody, Proto, UpstreamError};

use crate::config;
use http::HeaderMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub config: config::Cluster,
    pub endpoints: Vec<Arc<Endpoint>>,
    lb: Lb,
}

impl Cluster {
    pub fn new(c: &config::Cluster) -> Arc<Cluster> {
        let settings = PoolSettings {
            connect_timeout: c.connect_timeout.0,
            idle_timeout: c.idle_timeout.0,
            max_idle: c.max_idle_per_endpoint,
        };
        let endpoints: Vec<_> = c
            .endpoints
            .iter()
            .map(|e| Endpoint::new(e.address, &c.name, settings))
            .collect();
        let lb = Lb::new(c.lb, c.hash_on.as_ref(), &endpoints);
        let cluster = Arc::new(Cluster {
            name: c.name.clone(),
            config: c.clone(),
            endpoints,
            lb,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep_idle(Arc::downgrade(&cluster), c.idle_timeout.0));
        }
        cluster
    }

    /// Picks an endpoint for a request; `None` when the cluster has none.
    pub fn pick(&self, headers: &HeaderMap) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let key = self.lb.hash_key(headers);
        Some(&self.endpoints[self.lb.pick(&self.endpoints, key)])
    }

    /// The upstream protocol for a request that arrived as `downstream`.
    pub fn proto(&self, downstream: Proto) -> Proto {
        match self.config.protocol {
            config::Protocol::Http1 => Proto::Http1,
            config::Protocol::Http2 => Proto::Http2,
            config::Protocol::Auto => downstream,
        }
    }
}

/// Closes idle upstream connections past their timeout; ends with the cluster.
async fn sweep_idle(cluster: Weak<Cluster>, idle: Duration) {
    let period = (idle / 2).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(period).await;
        let Some(c) = cluster.upgrade() else { return };
        for e in &c.endpoints {
            e.sweep();
        }
    }
}
