//! The registrations a control plane outlives itself with.
//!
//! In a mesh of files, a service's endpoints are the proxies that
//! registered for it, and a control plane knows them only from their feed
//! sessions. A restarted one would push endpoint sets without every proxy
//! whose reconnect backoff (up to 30 s) is longer than its startup grace,
//! and their callers would answer 503 `no-endpoints`. With `--state-dir`
//! it writes the registrations down after each change and, at start, takes
//! them back as disconnected proxies that go if they have not re-registered
//! within the re-registration window. The control plane stays the one
//! authority over endpoint sets: drains and removals work as before.

use super::render::Node;
use crate::tls::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Garbled { path: String, message: String },
    #[error("registrations: {0}")]
    Encode(String),
}

/// One registration as written down.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Saved {
    id: String,
    namespace: String,
    service: String,
    identity: String,
    address: IpAddr,
    inbound_port: u16,
    outbound_port: u16,
    app_port: u16,
}

/// The registrations file in a state directory: one directory per
/// control plane (replicas do not share their registrations).
pub struct Store {
    path: PathBuf,
    /// What was last written: an unchanged list is not written again.
    last: parking_lot::Mutex<Vec<u8>>,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            path: dir.join("registrations.json"),
            last: Default::default(),
        }
    }

    /// Writes `nodes` whole: a temporary file, synced, renamed over the
    /// old one, so that a crash or power loss leaves one list or the other.
    pub fn save<'a>(&self, nodes: impl Iterator<Item = &'a Node>) -> Result<(), PersistError> {
        let list: Vec<Saved> = nodes
            .map(|n| Saved {
                id: n.id.clone(),
                namespace: n.namespace.clone(),
                service: n.service.clone(),
                identity: n.identity.to_string(),
                address: n.address,
                inbound_port: n.inbound_port,
                outbound_port: n.outbound_port,
                app_port: n.app_port,
            })
            .collect();
        let text = serde_json::to_vec(&list).map_err(|e| PersistError::Encode(e.to_string()))?;
        let mut last = self.last.lock();
        if *last == text {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PersistError::Io { path, source }
        };
        let dir = self.dir();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // One writer per directory: a fixed name leaves no litter.
        let tmp = dir.join(".registrations.json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&text).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        *last = text;
        Ok(())
    }

    /// The directory the file is in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The registrations last written; none when there is no file yet.
    pub fn load(&self) -> Result<Vec<Node>, PersistError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => {
                // The same list is not written again at start.
                *self.last.lock() = t.clone();
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PersistError::Io {
                    path: self.path.display().to_string(),
                    source,
                });
            }
        };
        let garbled = |message: String| PersistError::Garbled {
            path: self.path.display().to_string(),
            message,
        };
        let list: Vec<Saved> = serde_json::from_slice(&text).map_err(|e| garbled(e.to_string()))?;
        list.into_iter()
            .map(|s| {
                let identity = SpiffeId::parse(&s.identity)
                    .map_err(|e| garbled(format!("{}: identity: {e}", s.id)))?;
                Ok(Node {
                    id: s.id,
                    namespace: s.namespace,
                    service: s.service,
                    identity,
                    address: s.address,
                    inbound_port: s.inbound_port,
                    outbound_port: s.outbound_port,
                    app_port: s.app_port,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, port: u16) -> Node {
        Node {
            id: id.into(),
            namespace: "shop".into(),
            service: "orders".into(),
            identity: SpiffeId::parse("spiffe://mesh.test/ns/shop/sa/orders").unwrap(),
            address: IpAddr::from([10, 1, 0, 7]),
            inbound_port: port,
            outbound_port: 15001,
            app_port: 8080,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("outrigger-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn what_is_saved_comes_back_and_a_new_save_replaces_it() {
        let d = dir("roundtrip");
        let s = Store::new(&d);
        assert!(s.load().unwrap().is_empty(), "no file: nothing");
        let (a, b) = (node("orders-1", 15006), node("orders-2", 15007));
        s.save([&a, &b].into_iter()).unwrap();
        assert_eq!(s.load().unwrap(), vec![a.clone(), b]);
        s.save([&a].into_iter()).unwrap();
        assert_eq!(s.load().unwrap(), vec![a]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_garbled_file_is_an_error_that_names_it() {
        let d = dir("garbled");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("registrations.json"), "[{\"id\": 1}]").unwrap();
        let e = Store::new(&d).load().unwrap_err().to_string();
        assert!(e.contains("registrations.json"), "{e}");
        std::fs::write(
            d.join("registrations.json"),
            serde_json::to_string(&[Saved {
                identity: "not a spiffe id".into(),
                ..serde_json::from_str::<Saved>(
                    "{\"id\":\"x\",\"namespace\":\"n\",\"service\":\"s\",\"identity\":\"\",\"address\":\"10.0.0.1\",\"inbound_port\":1,\"outbound_port\":2,\"app_port\":3}",
                )
                .unwrap()
            }])
            .unwrap(),
        )
        .unwrap();
        let e = Store::new(&d).load().unwrap_err().to_string();
        assert!(e.contains("x: identity"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
