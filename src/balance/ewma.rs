//! Peak-EWMA latency estimate of one endpoint (as in Finagle and
//! `tower::load::PeakEwma`): a slower sample raises the estimate at once, a
//! faster one lowers it with exponential decay. Lock-free: two atomics, and
//! a racing update only loses one sample.

use crate::clock::now_ns;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const DECAY_NS: f64 = 10e9;

#[derive(Debug)]
pub struct PeakEwma {
    rtt_ns: AtomicU64,
    stamp_ns: AtomicU64,
}

impl PeakEwma {
    pub fn new(initial: Duration) -> Self {
        PeakEwma {
            rtt_ns: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
        }
    }

    pub fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.rtt_ns.load(Relaxed));
        let next = if sample > prev {
            sample
        } else {
            let elapsed = now.saturating_sub(self.stamp_ns.load(Relaxed)) as f64;
            let w = (-elapsed / DECAY_NS).exp();
            prev * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.stamp_ns.store(now, Relaxed);
    }

    /// Current estimate in nanoseconds.
    pub fn get_ns(&self) -> f64 {
        f64::from_bits(self.rtt_ns.load(Relaxed))
    }

    /// Cost of sending one more request: latency × (requests in flight + 1).
    pub fn cost(&self, in_flight: u32) -> f64 {
        self.get_ns() * f64::from(in_flight + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_at_once_and_decays_slowly() {
        let e = PeakEwma::new(Duration::from_millis(1));
        e.observe(Duration::from_millis(100));
        assert_eq!(e.get_ns(), 100e6);
        tokio::time::advance(Duration::from_secs(10)).await;
        e.observe(Duration::from_millis(1));
        // one decay constant later: ~ 100·e⁻¹ + 1·(1 − e⁻¹) ms
        let ms = e.get_ns() / 1e6;
        assert!((37.0..38.5).contains(&ms), "{ms}");
        assert!(e.cost(3) > e.cost(0));
    }
}
