//! Passive health (outlier detection) and the health state of endpoints.
//!
//! Each endpoint counts consecutive 5xx responses, gateway errors (502,
//! 503, 504, resets, connect failures) and local connect failures; at a
//! threshold it is ejected for `base_ejection × times ejected` (capped at
//! `max_ejection`), unless that would eject more than
//! `max_ejection_percent` of the cluster. When too few endpoints are left
//! (below `panic_threshold` %), the balancer ignores health altogether, as
//! Envoy's panic mode does, rather than pile everything on the survivors.
//!
//! This is not a tower layer: it decides which endpoints a request may be
//! sent to, so the balancer consults it before the pick and reports the
//! outcome after. Ejections end lazily (checked at the pick, no timer per
//! endpoint); a sweep every `interval` refreshes the gauges.

use crate::clock::now_ns;
use crate::config;
use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Health state of one endpoint.
#[derive(Debug)]
pub struct EndpointHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// 0 → not ejected.
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
    /// Active health checks; true when none are configured.
    pub checked_healthy: AtomicBool,
    /// For the logs: which endpoint this is.
    pub addr: Option<std::net::SocketAddr>,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        EndpointHealth {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            checked_healthy: AtomicBool::new(true),
            addr: None,
        }
    }
}

impl EndpointHealth {
    pub fn of(addr: std::net::SocketAddr) -> Self {
        EndpointHealth {
            addr: Some(addr),
            ..Self::default()
        }
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && now < until
    }

    /// May receive traffic (not ejected, not failing active checks).
    pub fn available(&self, now: u64) -> bool {
        !self.is_ejected(now) && self.checked_healthy.load(Relaxed)
    }

    pub fn state(&self, now: u64) -> &'static str {
        if self.is_ejected(now) {
            "ejected"
        } else if !self.checked_healthy.load(Relaxed) {
            "unhealthy"
        } else {
            "healthy"
        }
    }
}

/// What one request to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
    Reset,
}

pub struct Detector {
    cfg: config::OutlierDetection,
    ejections: [IntCounter; 3],
    gauges: [IntGauge; 3],
    /// Endpoints ejected and not yet swept back: while 0, the balancer
    /// skips health filtering altogether.
    ejected: AtomicU32,
    cluster: Box<str>,
}

impl Detector {
    pub fn new(cfg: &config::OutlierDetection, cluster: &str) -> Self {
        let m = crate::telemetry::metrics();
        Detector {
            cfg: cfg.clone(),
            ejections: ["5xx", "gateway-error", "local-failure"]
                .map(|r| m.outlier_ejections.with_label_values(&[cluster, r])),
            gauges: state_gauges(cluster),
            ejected: AtomicU32::new(0),
            cluster: cluster.into(),
        }
    }

    pub fn interval(&self) -> std::time::Duration {
        self.cfg.interval.0
    }

    /// Records an outcome of `all[idx]`; ejects it when a threshold is reached.
    pub fn observe<T>(
        &self,
        all: &[T],
        health: fn(&T) -> &EndpointHealth,
        idx: usize,
        outcome: Outcome,
    ) {
        let h = health(&all[idx]);
        let (fivexx, gateway, local) = match outcome {
            Outcome::Status(s) if s >= 500 => (true, matches!(s, 502..=504), false),
            Outcome::Status(_) => (false, false, false),
            Outcome::ConnectFailure => (true, true, true),
            Outcome::Reset => (true, true, false),
        };
        let bump = |c: &AtomicU32, hit: bool| {
            if hit {
                c.fetch_add(1, Relaxed) + 1
            } else {
                c.store(0, Relaxed);
                0
            }
        };
        let n5 = bump(&h.consecutive_5xx, fivexx);
        let ngw = bump(&h.consecutive_gateway, gateway);
        let nl = bump(&h.consecutive_local, local);
        let c = &self.cfg;
        let reason = if c.consecutive_5xx > 0 && n5 >= c.consecutive_5xx {
            0
        } else if c.consecutive_gateway_errors > 0 && ngw >= c.consecutive_gateway_errors {
            1
        } else if c.consecutive_local_failures > 0 && nl >= c.consecutive_local_failures {
            2
        } else {
            return;
        };
        self.eject(all, health, idx, reason);
    }

    fn eject<T>(&self, all: &[T], health: fn(&T) -> &EndpointHealth, idx: usize, reason: usize) {
        let now = now_ns();
        let h = health(&all[idx]);
        for c in [
            &h.consecutive_5xx,
            &h.consecutive_gateway,
            &h.consecutive_local,
        ] {
            c.store(0, Relaxed);
        }
        if h.is_ejected(now) {
            return;
        }
        let ejected = all.iter().filter(|e| health(e).is_ejected(now)).count();
        if (ejected + 1) * 100 > self.cfg.max_ejection_percent as usize * all.len() {
            return;
        }
        let times = h.times_ejected.fetch_add(1, Relaxed) + 1;
        let d = self
            .cfg
            .base_ejection
            .0
            .saturating_mul(times)
            .min(self.cfg.max_ejection.0);
        h.ejected_until.store(now + d.as_nanos() as u64, Relaxed);
        self.ejected.fetch_add(1, Relaxed);
        self.ejections[reason].inc();
        tracing::info!(
            cluster = %self.cluster,
            endpoint = %h.addr.map(|a| a.to_string()).unwrap_or_else(|| format!("#{idx}")),
            reason = ["5xx", "gateway-error", "local-failure"][reason],
            ejected_for = ?d,
            "endpoint ejected"
        );
        self.refresh(all, health);
    }

    /// Ends expired ejections, lets the ejection multiplier decay for
    /// endpoints that stayed in, and refreshes the gauges.
    pub fn sweep<T>(&self, all: &[T], health: fn(&T) -> &EndpointHealth) {
        let now = now_ns();
        let mut still = 0;
        for h in all.iter().map(health) {
            let until = h.ejected_until.load(Relaxed);
            if until != 0 && now >= until {
                h.ejected_until.store(0, Relaxed);
            } else if until != 0 {
                still += 1;
            } else {
                let t = h.times_ejected.load(Relaxed);
                if t > 0 {
                    h.times_ejected.store(t - 1, Relaxed);
                }
            }
        }
        self.ejected.store(still, Relaxed);
        self.refresh(all, health);
    }

    /// Counts the endpoints ejected now (a cluster made with endpoints
    /// kept from the one before) and refreshes the gauges.
    pub fn recount<T>(&self, all: &[T], health: fn(&T) -> &EndpointHealth) {
        let now = now_ns();
        let n = all
            .iter()
            .map(health)
            .filter(|h| {
                let until = h.ejected_until.load(Relaxed);
                until != 0 && now < until
            })
            .count();
        self.ejected.store(n as u32, Relaxed);
        self.refresh(all, health);
    }

    /// Whether any endpoint may currently be out (an upper bound: an
    /// ejection that expired counts until the next sweep).
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Relaxed) > 0
    }

    pub fn refresh<T>(&self, all: &[T], health: fn(&T) -> &EndpointHealth) {
        refresh_gauges(&self.gauges, all, health);
    }

    /// Panic mode: too few endpoints available to honour health.
    pub fn panic(&self, available: usize, total: usize) -> bool {
        available * 100 < self.cfg.panic_threshold as usize * total
    }
}

/// `outrigger_endpoints{cluster, state}` for the three states.
pub fn state_gauges(cluster: &str) -> [IntGauge; 3] {
    let m = crate::telemetry::metrics();
    ["healthy", "ejected", "unhealthy"].map(|s| m.endpoints.with_label_values(&[cluster, s]))
}

pub fn refresh_gauges<T>(gauges: &[IntGauge; 3], all: &[T], health: fn(&T) -> &EndpointHealth) {
    let now = now_ns();
    let mut n = [0i64; 3];
    for h in all.iter().map(health) {
        n[match h.state(now) {
            "healthy" => 0,
            "ejected" => 1,
            _ => 2,
        }] += 1;
    }
    for (g, v) in gauges.iter().zip(n) {
        g.set(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(h: &EndpointHealth) -> &EndpointHealth {
        h
    }
    use std::time::Duration;

    fn cfg() -> config::OutlierDetection {
        config::OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 0,
            consecutive_local_failures: 2,
            base_ejection: config::Dur::secs(10),
            max_ejection: config::Dur::secs(25),
            max_ejection_percent: 50,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_and_returns_in_time() {
        let all: Vec<EndpointHealth> = (0..3).map(|_| EndpointHealth::default()).collect();
        let d = Detector::new(&cfg(), "od-1");
        d.observe(&all, id, 0, Outcome::Status(500));
        d.observe(&all, id, 0, Outcome::Status(200)); // resets the streak
        d.observe(&all, id, 0, Outcome::Status(500));
        d.observe(&all, id, 0, Outcome::Status(503));
        assert!(all[0].available(now_ns()));
        d.observe(&all, id, 0, Outcome::Status(500));
        assert!(!all[0].available(now_ns()), "3 consecutive 5xx eject");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!all[0].available(now_ns()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(all[0].available(now_ns()), "back after base_ejection");
        // second ejection lasts twice as long, third is capped at max_ejection
        for _ in 0..2 {
            d.observe(&all, id, 0, Outcome::ConnectFailure);
        }
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(!all[0].available(now_ns()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(all[0].available(now_ns()));
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_max_percent() {
        let all: Vec<EndpointHealth> = (0..3).map(|_| EndpointHealth::default()).collect();
        let d = Detector::new(&cfg(), "od-2");
        for i in 0..3 {
            for _ in 0..3 {
                d.observe(&all, id, i, Outcome::Status(502));
            }
        }
        let ejected = all.iter().filter(|e| !e.available(now_ns())).count();
        assert_eq!(ejected, 1, "50 % of 3 allows one ejection");
        assert!(
            d.panic(1, 3),
            "1 of 3 available is below the 50 % panic threshold"
        );
        assert!(!d.panic(2, 3));
    }
}
