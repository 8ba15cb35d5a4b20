//! Peak-EWMA latency estimate of one endpoint (as in Finagle and
//! `tower::load::PeakEwma`): a slower sample raises the estimate at once, a
//! faster one lowers it with exponential decay, and the estimate also
//! decays toward zero with the time since its last update **when it is
//! read**. Without that read-side decay an endpoint that is never picked
//! keeps its last, bad estimate forever and never gets traffic back.
//!
//! Two additions, both about endpoints the balancer stopped picking:
//! - A failure is not a latency: it sets a penalty (1 s) that steers p2c
//!   away, and the next real sample replaces it outright.
//! - An endpoint with no sample for `PROBE_INTERVAL` (penalised, or just
//!   out of favour because of an old peak) is offered one probe request
//!   per interval, and the probe's sample replaces its estimate. So an
//!   endpoint that failed, hung or was slow and came back is measured again
//!   within a second or two of traffic and competes on what it does now,
//!   one request at a time, never a herd. A slow endpoint costs one slow
//!   request per interval.
//!
//! Lock-free: a few atomics; a racing update loses one sample.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Decay time constant: a spike is mostly forgotten after ~3 of these.
const DECAY_NS: f64 = 10e9;
/// What a failed or abandoned request counts as.
pub const PENALTY: Duration = Duration::from_secs(1);
/// An endpoint with no sample for this long gets one probe request.
pub const PROBE_INTERVAL_NS: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct PeakEwma {
    rtt_ns: AtomicU64,
    stamp_ns: AtomicU64,
    /// The next sample replaces the estimate: it follows a failure (the
    /// estimate is a penalty, not a measurement) or is a probe's.
    replace: AtomicBool,
    /// When the last probe was handed out (0: never).
    probe_ns: AtomicU64,
    /// The estimate of the endpoint a probe was chosen over: the probe's
    /// sample counts no lower, so an endpoint that comes back rejoins at
    /// par with its peers rather than winning every pick (a herd) until
    /// its own peaks catch up.
    floor_ns: AtomicU64,
}

impl PeakEwma {
    pub fn new(initial: Duration) -> Self {
        PeakEwma {
            rtt_ns: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(crate::clock::now_ns()),
            replace: AtomicBool::new(false),
            probe_ns: AtomicU64::new(0),
            floor_ns: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// The estimate at `now`, decayed toward zero since its last update.
    fn decayed(&self, now: u64) -> f64 {
        let e = f64::from_bits(self.rtt_ns.load(Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ns.load(Relaxed)) as f64;
        if elapsed <= 0.0 {
            e
        } else {
            e * (-elapsed / DECAY_NS).exp()
        }
    }

    pub fn observe(&self, rtt: Duration) {
        let now = crate::clock::now_ns();
        let sample = rtt.as_nanos() as f64;
        let next = if self.replace.swap(false, Relaxed) {
            sample.max(f64::from_bits(self.floor_ns.swap(0f64.to_bits(), Relaxed)))
        } else {
            let prev = self.decayed(now);
            if sample > prev {
                sample
            } else {
                let elapsed = now.saturating_sub(self.stamp_ns.load(Relaxed)) as f64;
                let w = (-elapsed / DECAY_NS).exp();
                // `prev` already carries the decay weight: this is e·w + s·(1 − w).
                prev + sample * (1.0 - w)
            }
        };
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.stamp_ns.store(now, Relaxed);
    }

    /// A failed or abandoned request: steer away until a real sample says otherwise.
    pub fn penalize(&self) {
        let now = crate::clock::now_ns();
        let next = self.decayed(now).max(PENALTY.as_nanos() as f64);
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.stamp_ns.store(now, Relaxed);
        self.replace.store(true, Relaxed);
    }

    /// Whether this endpoint has gone unmeasured for a probe interval and
    /// is due a probe at `now`; at most one caller per interval gets `true`.
    /// `peer` is the endpoint it is chosen over. Costs one atomic load
    /// while the endpoint is being picked.
    pub fn claim_probe(&self, now: u64, peer: &PeakEwma) -> bool {
        let stamp = self.stamp_ns.load(Relaxed);
        if now < stamp + PROBE_INTERVAL_NS {
            return false;
        }
        let last = self.probe_ns.load(Relaxed);
        let claimed = now >= last + PROBE_INTERVAL_NS
            && self
                .probe_ns
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok();
        if claimed {
            // A peer that is itself unmeasured or failed says nothing.
            let peer_fresh = now < peer.stamp_ns.load(Relaxed) + PROBE_INTERVAL_NS
                && !peer.replace.load(Relaxed);
            let floor = if peer_fresh { peer.decayed(now) } else { 0.0 };
            self.floor_ns.store(floor.to_bits(), Relaxed);
            self.replace.store(true, Relaxed);
        }
        claimed
    }

    /// Current estimate in nanoseconds.
    pub fn get_ns(&self) -> f64 {
        self.decayed(crate::clock::now_ns())
    }

    /// Cost of sending one more request at `now`: latency × (in flight + 1).
    pub fn cost(&self, now: u64, in_flight: u32) -> f64 {
        self.decayed(now) * f64::from(in_flight + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_ns;

    #[tokio::test(start_paused = true)]
    async fn peaks_at_once_and_decays_slowly() {
        let e = PeakEwma::new(Duration::from_millis(1));
        e.observe(Duration::from_millis(100));
        assert_eq!(e.get_ns(), 100e6);
        tokio::time::advance(Duration::from_millis(900)).await;
        e.observe(Duration::from_millis(1));
        // 0.9 s later: ~ 100·w + 1·(1 − w) ms with w = e^(−0.09)
        let ms = e.get_ns() / 1e6;
        assert!((91.0..92.0).contains(&ms), "{ms}");
        assert!(e.cost(now_ns(), 3) > e.cost(now_ns(), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_estimate_decays_while_nobody_picks_it() {
        let e = PeakEwma::new(Duration::ZERO);
        e.observe(Duration::from_millis(100));
        tokio::time::advance(Duration::from_secs(10)).await;
        let ms = e.get_ns() / 1e6;
        assert!((36.0..37.5).contains(&ms), "decayed to 100·e⁻¹, got {ms}");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(e.get_ns() < 0.1e6, "a minute later it is nearly free");
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_is_replaced_by_the_next_real_sample() {
        let e = PeakEwma::new(Duration::ZERO);
        e.observe(Duration::from_micros(300));
        e.penalize();
        assert!(e.get_ns() >= 0.99e9);
        tokio::time::advance(Duration::from_millis(10)).await;
        e.observe(Duration::from_micros(400));
        assert_eq!(e.get_ns(), 400e3, "the measurement replaces the penalty");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_rejoins_at_par_with_its_peer() {
        let e = PeakEwma::new(Duration::ZERO);
        e.penalize();
        tokio::time::advance(Duration::from_millis(1001)).await;
        let peer = PeakEwma::new(Duration::ZERO);
        peer.observe(Duration::from_millis(2));
        assert!(e.claim_probe(now_ns(), &peer));
        e.observe(Duration::from_micros(100));
        assert_eq!(e.get_ns(), 2e6, "no lower than the peer it was chosen over");
    }

    #[tokio::test(start_paused = true)]
    async fn unmeasured_endpoints_get_one_probe_per_interval() {
        let peer = PeakEwma::new(Duration::ZERO);
        let e = PeakEwma::new(Duration::ZERO);
        e.observe(Duration::from_micros(300));
        assert!(!e.claim_probe(now_ns(), &peer), "just measured: no probe");
        e.penalize();
        assert!(
            !e.claim_probe(now_ns(), &peer),
            "not at once after the failure"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        let now = now_ns();
        assert!(e.claim_probe(now, &peer));
        assert!(
            !e.claim_probe(now, &peer),
            "one probe per interval, not a herd"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(
            e.claim_probe(now_ns(), &peer),
            "still unmeasured: probed again"
        );
        // An old peak, out of favour: the probe's sample replaces it.
        e.observe(Duration::from_millis(50));
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(e.claim_probe(now_ns(), &peer));
        e.observe(Duration::from_micros(400));
        assert_eq!(e.get_ns(), 400e3);
        assert!(!e.claim_probe(now_ns(), &peer), "measured: no probe");
    }
}
