//! Load-balancing policies: pick an endpoint index for one request.
//!
//! Written here rather than with `tower::balance::p2c`: that balancer owns
//! its endpoints behind `&mut self` and needs a `Buffer` (a channel and a
//! task hop per request) to be shared by every connection, while this one
//! is shared read-only by all workers and picks with two random numbers and
//! a few atomic loads.

use super::Endpoint;
use crate::clock::now_ns;
use crate::config::{HashOn, LbPolicy};
use http::HeaderMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[derive(Debug)]
pub enum Lb {
    P2cEwma,
    LeastRequest,
    RoundRobin(AtomicUsize),
    Random,
    RingHash { ring: Vec<(u64, u32)>, on: HashKey },
}

#[derive(Debug)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
}

impl Lb {
    pub fn new(policy: LbPolicy, hash_on: Option<&HashOn>, endpoints: &[Arc<Endpoint>]) -> Lb {
        match (policy, hash_on) {
            (LbPolicy::P2cEwma, _) => Lb::P2cEwma,
            (LbPolicy::LeastRequest, _) => Lb::LeastRequest,
            (LbPolicy::RoundRobin, _) => Lb::RoundRobin(AtomicUsize::new(fastrand::usize(..))),
            (LbPolicy::Random, _) => Lb::Random,
            (LbPolicy::RingHash, Some(on)) => {
                let key = match (&on.header, &on.cookie) {
                    (Some(h), _) => http::HeaderName::from_bytes(h.as_bytes())
                        .ok()
                        .map(HashKey::Header),
                    (None, Some(c)) => Some(HashKey::Cookie(c.clone())),
                    (None, None) => None,
                };
                match key {
                    Some(on) => Lb::RingHash {
                        ring: build_ring(endpoints),
                        on,
                    },
                    None => Lb::Random,
                }
            }
            // validation guarantees hash_on; without it there is nothing to hash → random.
            (LbPolicy::RingHash, None) => Lb::Random,
        }
    }

    /// The request's hash key, for ring-hash only.
    pub fn hash_key(&self, headers: &HeaderMap) -> Option<u64> {
        let Lb::RingHash { on, .. } = self else {
            return None;
        };
        match on {
            HashKey::Header(name) => headers.get(name).map(|v| hash_bytes(v.as_bytes())),
            HashKey::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_bytes(v.as_bytes())),
        }
    }

    /// Picks among `eps` (non-empty), using `key` for ring-hash.
    pub fn pick(&self, eps: &[Arc<Endpoint>], key: Option<u64>) -> usize {
        let n = eps.len();
        if n <= 1 {
            return 0;
        }
        match self {
            Lb::RoundRobin(next) => next.fetch_add(1, Relaxed) % n,
            Lb::Random => fastrand::usize(..n),
            Lb::P2cEwma => {
                let (a, b) = two_distinct(n);
                p2c_ewma(eps, a, b)
            }
            Lb::LeastRequest => {
                let (a, b) = two_distinct(n);
                if eps[a].in_flight() <= eps[b].in_flight() {
                    a
                } else {
                    b
                }
            }
            Lb::RingHash { ring, .. } => match key {
                Some(k) if !ring.is_empty() => {
                    let i = ring.partition_point(|(h, _)| *h < k);
                    ring[if i == ring.len() { 0 } else { i }].1 as usize
                }
                _ => fastrand::usize(..n),
            },
        }
    }
}

impl Lb {
    /// Like `pick`, among the endpoints `allowed` accepts (at least one must).
    pub fn pick_filtered(
        &self,
        eps: &[Arc<Endpoint>],
        key: Option<u64>,
        allowed: &dyn Fn(usize) -> bool,
    ) -> usize {
        if let Lb::RingHash { ring, .. } = self {
            // Walk the ring from the key's point to the next allowed endpoint,
            // so keys of a healthy endpoint never move.
            if let (Some(k), false) = (key, ring.is_empty()) {
                let start = ring.partition_point(|(h, _)| *h < k);
                for j in 0..ring.len() {
                    let i = ring[(start + j) % ring.len()].1 as usize;
                    if allowed(i) {
                        return i;
                    }
                }
            }
        }
        let first = self.pick(eps, key);
        if allowed(first) {
            return first;
        }
        // Degraded path (some endpoints out): choose among the allowed ones.
        let ok: Vec<usize> = (0..eps.len()).filter(|&i| allowed(i)).collect();
        match ok.len() {
            0 => first,
            1 => ok[0],
            n => match self {
                Lb::RoundRobin(next) => ok[next.fetch_add(1, Relaxed) % n],
                Lb::P2cEwma => {
                    let (a, b) = two_distinct(n);
                    p2c_ewma(eps, ok[a], ok[b])
                }
                Lb::LeastRequest => {
                    let (a, b) = two_distinct(n);
                    if eps[ok[a]].in_flight() <= eps[ok[b]].in_flight() {
                        ok[a]
                    } else {
                        ok[b]
                    }
                }
                _ => ok[fastrand::usize(..n)],
            },
        }
    }
}

/// The cheaper of two candidates by peak-EWMA cost, unless one of them has
/// gone unmeasured for a probe interval: then that one, once per interval.
fn p2c_ewma(eps: &[Arc<Endpoint>], a: usize, b: usize) -> usize {
    let now = now_ns();
    if eps[a].ewma.claim_probe(now, &eps[b].ewma) {
        return a;
    }
    if eps[b].ewma.claim_probe(now, &eps[a].ewma) {
        return b;
    }
    if eps[a].load_cost(now) <= eps[b].load_cost(now) {
        a
    } else {
        b
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Ketama-style ring: each endpoint at many points, so that adding or
/// removing one moves only its share of keys.
fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, u32)> {
    let n = endpoints.len().max(1);
    let per = (1024 / n).clamp(64, 1024);
    let mut ring = Vec::with_capacity(per * endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let base = hash_bytes(e.addr.to_string().as_bytes());
        for v in 0..per as u64 {
            ring.push((mix(base ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15)), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// FNV-1a, finished with a 64-bit mixer: stable across runs and builds,
/// which a ring that must agree between proxies needs.
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Endpoint;
    use crate::balance::PoolSettings;
    use std::time::Duration;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Endpoint::new(
                    format!("127.0.0.1:{}", 10000 + i).parse().unwrap(),
                    "c",
                    PoolSettings::default(),
                    crate::policy::circuit_breaker::Limits::new(&Default::default(), "c"),
                )
            })
            .collect()
    }

    #[test]
    fn round_robin_is_even() {
        let e = eps(3);
        let lb = Lb::new(LbPolicy::RoundRobin, None, &e);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[lb.pick(&e, None)] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let e = eps(2);
        e[0].add_in_flight(10);
        let lb = Lb::new(LbPolicy::LeastRequest, None, &e);
        assert!((0..100).all(|_| lb.pick(&e, None) == 1));
    }

    #[test]
    fn p2c_ewma_prefers_the_fast_endpoint() {
        let e = eps(2);
        e[0].ewma.observe(Duration::from_millis(200));
        e[1].ewma.observe(Duration::from_millis(1));
        let lb = Lb::new(LbPolicy::P2cEwma, None, &e);
        assert!((0..100).all(|_| lb.pick(&e, None) == 1));
    }

    #[tokio::test(start_paused = true)]
    async fn sequential_picks_come_back_to_an_endpoint_that_was_a_little_slower() {
        // Nothing in flight, as with sequential requests: the pick is by
        // estimate alone. The slower endpoint's estimate decays while nobody
        // picks it, the busy one's is refreshed by its samples.
        let e = eps(2);
        e[0].ewma.observe(Duration::from_micros(1200));
        e[1].ewma.observe(Duration::from_micros(1000));
        let lb = Lb::new(LbPolicy::P2cEwma, None, &e);
        let mut picked_slow = false;
        for _ in 0..5000 {
            let i = lb.pick(&e, None);
            if i == 0 {
                picked_slow = true;
                break;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            e[1].ewma.observe(Duration::from_micros(1000));
        }
        assert!(
            picked_slow,
            "never came back to the slightly slower endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_probed_once_and_then_gets_its_share() {
        let e = eps(3);
        for ep in &e {
            ep.ewma.observe(Duration::from_micros(500));
        }
        e[2].ewma.penalize();
        let lb = Lb::new(LbPolicy::P2cEwma, None, &e);
        let count = |n: usize| (0..n).filter(|_| lb.pick(&e, None) == 2).count();
        assert_eq!(
            count(300),
            0,
            "penalised: no traffic before its probe is due"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(count(300), 1, "one probe, not a herd");
        for ep in &e {
            ep.ewma.observe(Duration::from_micros(500));
        }
        let share = count(3000);
        assert!(
            share > 600,
            "the probe succeeded: back to its share, got {share}/3000"
        );
    }

    #[test]
    fn ring_hash_is_sticky_and_spread() {
        let e = eps(4);
        let lb = Lb::new(
            LbPolicy::RingHash,
            Some(&HashOn {
                header: Some("x-user".into()),
                cookie: None,
            }),
            &e,
        );
        let mut counts = [0; 4];
        for u in 0..4000 {
            let k = hash_bytes(format!("user-{u}").as_bytes());
            let first = lb.pick(&e, Some(k));
            assert_eq!(first, lb.pick(&e, Some(k)));
            counts[first] += 1;
        }
        for c in counts {
            assert!((600..1400).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn filtered_picks_skip_what_is_not_allowed() {
        let e = eps(4);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::P2cEwma,
            LbPolicy::LeastRequest,
        ] {
            let lb = Lb::new(policy, None, &e);
            for _ in 0..200 {
                let i = lb.pick_filtered(&e, None, &|i| i != 1 && i != 2);
                assert!(i == 0 || i == 3, "{policy:?} picked {i}");
            }
        }
        let lb = Lb::new(
            LbPolicy::RingHash,
            Some(&HashOn {
                header: Some("x".into()),
                cookie: None,
            }),
            &e,
        );
        for k in 0..200u64 {
            let key = Some(hash_bytes(&k.to_le_bytes()));
            let normal = lb.pick(&e, key);
            let filtered = lb.pick_filtered(&e, key, &|i| i != 1);
            if normal != 1 {
                assert_eq!(normal, filtered, "keys of healthy endpoints stay put");
            } else {
                assert_ne!(filtered, 1);
            }
        }
    }

    #[test]
    fn ring_hash_reads_header_and_cookie() {
        let e = eps(2);
        let lb = Lb::new(
            LbPolicy::RingHash,
            Some(&HashOn {
                header: None,
                cookie: Some("sid".into()),
            }),
            &e,
        );
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; sid=abc; b=2".parse().unwrap());
        assert_eq!(lb.hash_key(&h), Some(hash_bytes(b"abc")));
        h.insert("cookie", "a=1".parse().unwrap());
        assert_eq!(lb.hash_key(&h), None);
    }
}
