//! The proxy's own identity: its certificate chain and key, the trust
//! bundle it verifies peers with, and the SPIFFE ID its certificate names.
//!
//! Everything that uses the identity (listeners terminating mTLS, upstream
//! connections originating it) reads the `IdentityStore` at handshake
//! time; a source writes new credentials into it. So a rotation is one
//! atomic swap: new handshakes use the new certificate, established
//! connections finish on the old one, and nothing is rebuilt. The `files`
//! source (cert-manager, SPIRE's helper, a mounted Secret) lives here; a
//! second source (a CSR to the control plane's CA) only has to call
//! `IdentityStore::install`.

use super::spiffe::{SpiffeError, SpiffeId};
use crate::telemetry::metrics;
use arc_swap::ArcSwap;
use rustls::DistinguishedName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why credentials could not be loaded; names the file where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key in it ({detail})")]
    NoKey { path: String, detail: String },
    #[error("{path}: unsupported private key: {detail}")]
    BadKey { path: String, detail: String },
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("{path}: {source}")]
    Spiffe { path: String, source: SpiffeError },
    #[error("{path}: the certificate is for trust domain `{found}`, the proxy's is `{want}`")]
    TrustDomain {
        path: String,
        found: String,
        want: String,
    },
    #[error("{path}: a root cannot be used as a trust anchor: {detail}")]
    BadRoot { path: String, detail: String },
}

/// One set of credentials, as one rotation installs them.
#[derive(Debug)]
pub struct Credentials {
    pub id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub roots: Vec<TrustAnchor<'static>>,
    /// The roots' subjects, sent as hints in a CertificateRequest.
    pub root_names: Vec<DistinguishedName>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl Credentials {
    /// Parses PEM text; `names` say which file each came from, for errors.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
        trust_domain: &str,
        names: [&str; 3],
    ) -> Result<Credentials, IdentityError> {
        let [cert_name, key_name, roots_name] = names.map(str::to_string);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .filter_map(Result::ok)
            .collect();
        let Some(leaf) = chain.first() else {
            return Err(IdentityError::NoCertificate { path: cert_name });
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::NoKey {
            path: key_name.clone(),
            detail: e.to_string(),
        })?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
            IdentityError::BadKey {
                path: key_name.clone(),
                detail: e.to_string(),
            }
        })?;
        let id = SpiffeId::of_certificate(leaf).map_err(|source| IdentityError::Spiffe {
            path: cert_name.clone(),
            source,
        })?;
        if id.trust_domain() != trust_domain {
            return Err(IdentityError::TrustDomain {
                path: cert_name,
                found: id.trust_domain().to_string(),
                want: trust_domain.to_string(),
            });
        }
        let (serial, not_after) = serial_and_expiry(leaf).unwrap_or_default();
        let not_before = X509Certificate::from_der(leaf)
            .map(|(_, c)| c.validity().not_before.timestamp())
            .unwrap_or(0);
        let certified = CertifiedKey::new(chain, signing);
        if certified.keys_match().is_err() {
            return Err(IdentityError::KeyMismatch {
                cert: cert_name,
                key: key_name,
            });
        }
        let mut roots = Vec::new();
        let mut root_names = Vec::new();
        for der in CertificateDer::pem_slice_iter(roots_pem).filter_map(Result::ok) {
            let anchor =
                webpki::anchor_from_trusted_cert(&der).map_err(|e| IdentityError::BadRoot {
                    path: roots_name.clone(),
                    detail: e.to_string(),
                })?;
            root_names.push(DistinguishedName::from(anchor.subject.to_vec()));
            roots.push(anchor.to_owned());
        }
        if roots.is_empty() {
            return Err(IdentityError::NoCertificate { path: roots_name });
        }
        Ok(Credentials {
            id,
            certified: Arc::new(certified),
            roots,
            root_names,
            serial,
            not_before,
            not_after,
        })
    }

    /// Reads the three files.
    pub fn from_files(
        files: &FileSource,
        trust_domain: &str,
    ) -> Result<Credentials, IdentityError> {
        let [cert, key, roots] = files.read()?;
        Credentials::from_pem(&cert, &key, &roots, trust_domain, files.names())
    }
}

/// Serial (hex) and notAfter (Unix seconds) of a DER certificate.
pub fn serial_and_expiry(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.raw_serial_as_string(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Where the proxy's credentials are right now.
#[derive(Debug)]
pub struct IdentityStore {
    pub trust_domain: String,
    current: ArcSwap<Credentials>,
    /// Bumped by every install: session tickets issued before it are void.
    generation: std::sync::atomic::AtomicU64,
}

impl IdentityStore {
    pub fn new(trust_domain: &str, first: Credentials) -> Arc<IdentityStore> {
        let store = Arc::new(IdentityStore {
            trust_domain: trust_domain.to_string(),
            current: ArcSwap::from_pointee(first),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        store.publish();
        store
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// How many installs so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Installs rotated credentials: new handshakes use them at once.
    pub fn install(&self, creds: Credentials) {
        tracing::info!(id = %creds.id, serial = %creds.serial, not_after = creds.not_after, "certificate rotated");
        self.current.store(Arc::new(creds));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        metrics().cert_rotations.with_label_values(&["ok"]).inc();
        self.publish();
    }

    fn publish(&self) {
        let c = self.current.load();
        metrics()
            .cert_expiry
            .with_label_values(&[c.id.as_str()])
            .set(c.not_after as f64);
    }
}

/// The `files` certificate source: a chain, its key and the trust bundle.
#[derive(Clone, Debug)]
pub struct FileSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

impl FileSource {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.roots]
    }

    fn names(&self) -> [&str; 3] {
        self.paths().map(|p| p.to_str().unwrap_or("?"))
    }

    fn read(&self) -> Result<[Vec<u8>; 3], IdentityError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| IdentityError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok([read(&self.cert)?, read(&self.key)?, read(&self.roots)?])
    }

    /// Polls the files (as the config file is, for the same reason: a
    /// Kubernetes Secret is updated by swapping a symlink) and installs what
    /// changed once it has stayed the same for one interval, so a half-
    /// written pair of files is never installed. A bad set is logged and
    /// counted; the running credentials stay.
    pub async fn watch(self, store: Arc<IdentityStore>, interval: Duration) {
        let mut last = self.read().ok();
        let mut pending: Option<[Vec<u8>; 3]> = None;
        loop {
            tokio::time::sleep(interval).await;
            let Ok(now) = self.read() else {
                continue;
            };
            if last.as_ref() == Some(&now) {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
            pending = None;
            match Credentials::from_pem(
                &now[0],
                &now[1],
                &now[2],
                &store.trust_domain,
                self.names(),
            ) {
                Ok(creds) => store.install(creds),
                Err(e) => {
                    metrics().cert_rotations.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "new certificate refused; the current one keeps serving");
                }
            }
            last = Some(now);
        }
    }
}
