//! Endpoint names (`host:port`), resolved at start and again every
//! `dns_refresh`, as Envoy's strict DNS does: each address a name
//! resolves to is an endpoint with its own balancing and outlier state.
//! A lookup that fails keeps the addresses last known (a DNS outage must
//! not empty a cluster that still works) and is counted.

use crate::config::{self, Config, EndpointAddr};
use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A name and the port its endpoints listen on.
pub type Key = (Arc<str>, u16);

/// What every name resolved to, as a snapshot is built from it.
pub type Resolved = Arc<HashMap<Key, Arc<[SocketAddr]>>>;

type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
/// How a name is looked up: the system's resolver (getaddrinfo: the
/// pod's `/etc/resolv.conf` and search domains), or a test's.
pub type Lookup = Arc<dyn Fn(Key) -> LookupFuture + Send + Sync>;

/// A lookup that takes longer fails (and keeps the last addresses).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

struct Entry {
    addrs: Arc<[SocketAddr]>,
    due: Instant,
    every: Duration,
    failing: bool,
}

pub struct Dns {
    lookup: Lookup,
    names: Mutex<HashMap<Key, Entry>>,
    /// Names with a lookup still running (past its timeout, getaddrinfo
    /// may go on in a blocking thread): never a second one beside it.
    busy: Arc<Mutex<std::collections::HashSet<Key>>>,
    /// Addresses changed and the snapshot in force was not yet rebuilt
    /// with them (a rebuild that failed is tried again).
    stale: std::sync::atomic::AtomicBool,
}

impl Default for Dns {
    fn default() -> Self {
        Dns::system()
    }
}

impl Dns {
    pub fn system() -> Dns {
        Dns::with_lookup(Arc::new(|(host, port): Key| {
            Box::pin(async move {
                let addrs = tokio::net::lookup_host((&*host, port)).await?;
                Ok(addrs.collect())
            })
        }))
    }

    pub fn with_lookup(lookup: Lookup) -> Dns {
        Dns {
            lookup,
            names: Mutex::new(HashMap::new()),
            busy: Arc::default(),
            stale: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Looks up the names `cfg` has that are not known yet (the first
    /// config, a name new in a reload); the result is what the snapshot
    /// is built with. Names are forgotten only once a config without them
    /// is in force (`retain`): a config that fails to apply loses nothing.
    pub async fn prime(&self, cfg: &Config) -> Resolved {
        let wanted = names(cfg);
        let now = Instant::now();
        let new: Vec<(Key, Duration)> = {
            let mut known = self.names.lock();
            for (k, every) in &wanted {
                if let Some(e) = known.get_mut(k) {
                    // A shorter refresh applies from now, not after the
                    // longer one ends.
                    e.every = *every;
                    e.due = e.due.min(now + *every);
                }
            }
            wanted
                .iter()
                .filter(|(k, _)| !known.contains_key(*k))
                .map(|(k, e)| (k.clone(), *e))
                .collect()
        };
        if !new.is_empty() {
            let results = self.look_up(new.iter().map(|(k, _)| k.clone())).await;
            let mut known = self.names.lock();
            for ((key, every), result) in new.into_iter().zip(results) {
                let entry = known.entry(key.clone()).or_insert(Entry {
                    addrs: Arc::from(Vec::new()),
                    due: Instant::now(),
                    every,
                    failing: false,
                });
                record(&key, entry, result);
            }
        }
        self.resolved()
    }

    /// `cfg` is in force: forgets the names it does not have (and their
    /// series), and the snapshot is current with what the names resolve to.
    pub fn retain(&self, cfg: &Config) {
        let wanted = names(cfg);
        let lookups = &crate::telemetry::metrics().dns_lookups;
        self.names.lock().retain(|k, _| {
            let keep = wanted.contains_key(k);
            if !keep {
                let name = format!("{}:{}", k.0, k.1);
                for result in ["ok", "failure"] {
                    let _ = lookups.remove_label_values(&[&name, result]);
                }
            }
            keep
        });
        self.stale
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Looks up the names whose refresh is due; whether the snapshot must
    /// be rebuilt (addresses changed, now or in a rebuild that failed).
    pub async fn refresh(&self) -> bool {
        let now = Instant::now();
        let due: Vec<Key> = self
            .names
            .lock()
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if !due.is_empty() {
            let results = self.look_up(due.iter().cloned()).await;
            let mut known = self.names.lock();
            for (key, result) in due.into_iter().zip(results) {
                // Gone in a reload meanwhile: nothing to keep.
                if let Some(entry) = known.get_mut(&key)
                    && record(&key, entry, result)
                {
                    self.stale.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the next name is due; none while there are no names.
    pub fn next_due(&self) -> Option<Instant> {
        self.names.lock().values().map(|e| e.due).min()
    }

    pub fn resolved(&self) -> Resolved {
        Arc::new(
            self.names
                .lock()
                .iter()
                .map(|(k, e)| (k.clone(), e.addrs.clone()))
                .collect(),
        )
    }

    /// Looks up `keys` side by side, each within the lookup timeout.
    async fn look_up(
        &self,
        keys: impl Iterator<Item = Key>,
    ) -> Vec<Result<Vec<SocketAddr>, String>> {
        let lookups = keys.map(|k| {
            // The lookup runs to its end on a task of its own, holding the
            // name busy, even after the wait for it has timed out.
            let started = self.busy.lock().insert(k.clone());
            let task = started.then(|| {
                let f = (self.lookup)(k.clone());
                let busy = self.busy.clone();
                tokio::spawn(async move {
                    let r = f.await;
                    busy.lock().remove(&k);
                    r
                })
            });
            async move {
                let Some(task) = task else {
                    return Err("the previous lookup is still running".to_string());
                };
                match tokio::time::timeout(LOOKUP_TIMEOUT, task).await {
                    Ok(Ok(Ok(a))) => Ok(a),
                    Ok(Ok(Err(e))) => Err(e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
                }
            }
        });
        futures_util::future::join_all(lookups).await
    }
}

/// Records one lookup's result; whether the addresses changed.
fn record(key: &Key, entry: &mut Entry, result: Result<Vec<SocketAddr>, String>) -> bool {
    let name = format!("{}:{}", key.0, key.1);
    entry.due = Instant::now() + entry.every;
    let lookups = &crate::telemetry::metrics().dns_lookups;
    match result {
        // An empty answer is a failure too: keep what worked.
        Ok(addrs) if !addrs.is_empty() => {
            lookups.with_label_values(&[&name, "ok"]).inc();
            let mut addrs = addrs;
            addrs.sort();
            addrs.dedup();
            if entry.failing {
                tracing::info!(%name, "dns: the name resolves again");
                entry.failing = false;
            }
            if *entry.addrs == *addrs {
                return false;
            }
            tracing::info!(
                %name,
                addresses = ?addrs,
                before = ?entry.addrs,
                "dns: the name's addresses changed"
            );
            entry.addrs = addrs.into();
            true
        }
        result => {
            lookups.with_label_values(&[&name, "failure"]).inc();
            let error = match result {
                Err(e) => e,
                Ok(_) => "no addresses".to_string(),
            };
            if !entry.failing {
                tracing::warn!(
                    %name,
                    %error,
                    kept = entry.addrs.len(),
                    "dns: lookup failed; the last addresses stay"
                );
            }
            entry.failing = true;
            false
        }
    }
}

/// The names `cfg`'s endpoints use, each with its shortest refresh.
fn names(cfg: &Config) -> HashMap<Key, Duration> {
    let mut out: HashMap<Key, Duration> = HashMap::new();
    for c in &cfg.clusters {
        for e in &c.endpoints {
            if let EndpointAddr::Name { host, port } = &e.address {
                let every = out.entry((host.clone(), *port)).or_insert(c.dns_refresh.0);
                *every = (*every).min(c.dns_refresh.0);
            }
        }
    }
    out
}

/// `c` with each name replaced by an endpoint per address it resolves to
/// (an address listed twice is kept once); `c` itself when it names none.
pub fn expand<'a>(c: &'a config::Cluster, resolved: &Resolved) -> Cow<'a, config::Cluster> {
    if !c.endpoints.iter().any(|e| e.address.is_name()) {
        return Cow::Borrowed(c);
    }
    let mut out = c.clone();
    out.endpoints.clear();
    for e in &c.endpoints {
        let addrs: Vec<SocketAddr> = match &e.address {
            EndpointAddr::Ip(a) => vec![*a],
            EndpointAddr::Name { host, port } => resolved
                .get(&(host.clone(), *port))
                .map(|a| a.to_vec())
                .unwrap_or_default(),
        };
        for a in addrs {
            if !out.endpoints.iter().any(|x| x.address.ip() == Some(a)) {
                out.endpoints.push(config::Endpoint {
                    address: a.into(),
                    identity: e.identity.clone(),
                });
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers each lookup with the next of `script` (then the last again).
    fn scripted(
        script: Vec<Result<Vec<&'static str>, &'static str>>,
    ) -> (Lookup, Arc<Mutex<usize>>) {
        let calls = Arc::new(Mutex::new(0));
        let script: Arc<Mutex<VecDeque<_>>> = Arc::new(Mutex::new(script.into()));
        let c = calls.clone();
        let f: Lookup = Arc::new(move |_| {
            *c.lock() += 1;
            let mut s = script.lock();
            let next = if s.len() > 1 {
                s.pop_front()
            } else {
                s.front().cloned()
            };
            let r = match next {
                Some(Ok(addrs)) => Ok(addrs.iter().map(|a| a.parse().unwrap()).collect()),
                Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
                None => Ok(vec![]),
            };
            Box::pin(async move { r })
        });
        (f, calls)
    }

    fn config(refresh: &str) -> Config {
        Config::from_yaml(&format!(
            "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ] }} ]\nclusters: [ {{ name: c, dns_refresh: {refresh}, endpoints: [ {{ address: 'svc.test:8080' }}, {{ address: 127.0.0.9:8080 }} ] }} ]\n"
        ))
        .unwrap()
    }

    fn endpoints(cfg: &Config, r: &Resolved) -> Vec<String> {
        expand(&cfg.clusters[0], r)
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn names_become_endpoints_refresh_on_time_and_keep_the_last_addresses_on_failure() {
        let (lookup, calls) = scripted(vec![
            Ok(vec!["127.0.0.2:8080", "127.0.0.1:8080"]),
            Ok(vec!["127.0.0.1:8080", "127.0.0.2:8080"]),
            Ok(vec!["127.0.0.3:8080", "127.0.0.9:8080"]),
            Err("SERVFAIL"),
            Ok(vec![]),
            Ok(vec!["127.0.0.4:8080"]),
        ]);
        let dns = Dns::with_lookup(lookup);
        let cfg = config("2s");
        let r = dns.prime(&cfg).await;
        // Sorted, and each address an endpoint; the literal one stays.
        assert_eq!(
            endpoints(&cfg, &r),
            ["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.9:8080"]
        );
        // A second prime (a reload with the same name) looks up nothing.
        dns.prime(&cfg).await;
        assert_eq!(*calls.lock(), 1);
        // Not due yet.
        assert!(!dns.refresh().await);
        assert_eq!(*calls.lock(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        // The same set in another order is no change.
        assert!(!dns.refresh().await);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(dns.refresh().await);
        // The proxy rebuilt its snapshot with it.
        dns.retain(&cfg);
        // An address the literal endpoint has too is listed once.
        assert_eq!(
            endpoints(&cfg, &dns.resolved()),
            ["127.0.0.3:8080", "127.0.0.9:8080"]
        );
        // A failure, then an empty answer: the last addresses stay.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(!dns.refresh().await);
            assert_eq!(
                endpoints(&cfg, &dns.resolved()),
                ["127.0.0.3:8080", "127.0.0.9:8080"]
            );
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(dns.refresh().await);
        assert_eq!(
            endpoints(&cfg, &dns.resolved()),
            ["127.0.0.4:8080", "127.0.0.9:8080"]
        );
        assert_eq!(*calls.lock(), 6);
        // A reload without the name forgets it: nothing more to refresh.
        let plain = Config::from_yaml(
            "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]\nroutes: [ { name: r, backends: [ { cluster: c } ] } ]\nclusters: [ { name: c, endpoints: [ { address: 127.0.0.9:8080 } ] } ]\n",
        )
        .unwrap();
        dns.prime(&plain).await;
        // Not before that config is in force (it could still fail).
        assert!(dns.next_due().is_some());
        dns.retain(&plain);
        assert_eq!(dns.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_hangs_fails_after_the_timeout_and_is_not_repeated_beside_itself() {
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let dns = Dns::with_lookup(Arc::new(move |_| {
            *c.lock() += 1;
            Box::pin(std::future::pending())
        }));
        let cfg = config("5s");
        let r = dns.prime(&cfg).await;
        assert_eq!(endpoints(&cfg, &r), ["127.0.0.9:8080"]);
        // Due again, but the first lookup still runs: none beside it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!dns.refresh().await);
        assert_eq!(*calls.lock(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_stays_pending_until_a_snapshot_is_built_with_it() {
        let (lookup, _) = scripted(vec![Ok(vec!["127.0.0.1:8080"]), Ok(vec!["127.0.0.2:8080"])]);
        let dns = Dns::with_lookup(lookup);
        let cfg = config("1s");
        dns.prime(&cfg).await;
        dns.retain(&cfg);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(dns.refresh().await);
        // The rebuild failed: the next round asks for it again, though
        // the answer did not change since.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(dns.refresh().await);
        dns.retain(&cfg);
        assert!(!dns.refresh().await);
    }
}
