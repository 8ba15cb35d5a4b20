//! Active HTTP health checks: every `interval`, GET `path` on each endpoint
//! over a fresh connection; `unhealthy_threshold` failures in a row take it
//! out of the balancer, `healthy_threshold` successes in a row bring it back.

use super::Cluster;
use crate::config::HealthCheck;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header("user-agent", "outrigger-health-check")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

pub async fn run(cluster: Weak<Cluster>, hc: HealthCheck) {
    let n = cluster.upgrade().map_or(0, |c| c.endpoints.len());
    let mut streaks: Vec<(u32, u32)> = vec![(0, 0); n];
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let eps = c.endpoints.clone();
        let name = c.name.clone();
        drop(c);
        let results = futures_util::future::join_all(
            eps.iter().map(|e| probe(e.addr, &hc.path, hc.timeout.0)),
        )
        .await;
        for ((e, ok), streak) in eps.iter().zip(results).zip(streaks.iter_mut()) {
            let healthy = e.health.checked_healthy.load(Relaxed);
            if ok {
                *streak = (streak.0 + 1, 0);
                if !healthy && streak.0 >= hc.healthy_threshold {
                    tracing::info!(cluster = %name, endpoint = %e.addr, "health check passing; endpoint back");
                    e.health.checked_healthy.store(true, Relaxed);
                }
            } else {
                *streak = (0, streak.1 + 1);
                if healthy && streak.1 >= hc.unhealthy_threshold {
                    tracing::warn!(cluster = %name, endpoint = %e.addr, "health check failing; endpoint out");
                    e.health.checked_healthy.store(false, Relaxed);
                }
            }
        }
        if let Some(c) = cluster.upgrade() {
            let down = c
                .endpoints
                .iter()
                .filter(|e| !e.health.checked_healthy.load(Relaxed))
                .count();
            c.set_unhealthy(down as u32);
            crate::policy::outlier::refresh_gauges(
                &crate::policy::outlier::state_gauges(&c.name),
                &c.endpoints,
                super::health,
            );
        }
        tokio::time::sleep(hc.interval.0).await;
    }
}
