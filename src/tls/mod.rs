//! TLS: mutual TLS between sidecars with SPIFFE identities, and TLS
//! termination at the gateway. rustls with the *ring* provider (see the
//! README for why).
//!
//! - `spiffe`: SPIFFE IDs, patterns, the ID in a certificate.
//! - `identity`: the proxy's credentials, their store and the `files` source.
//! - `verify`: peer verification (chain, then the exact identity expected).
//! - `ca`: the developer CA, also the control plane's signer.
//!
//! Here: the rustls configs. Listeners and upstream connections take a
//! config once; the certificate and the trust bundle are read from the
//! identity store at every handshake, so rotation never rebuilds them.

pub mod ca;
pub mod identity;
pub mod spiffe;
pub mod verify;

use identity::IdentityStore;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use spiffe::SpiffeId;
use std::collections::HashMap;
use std::sync::Arc;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The proxy's current certificate, for every handshake either way.
#[derive(Debug)]
struct CurrentCert(Arc<IdentityStore>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// How long a mesh session ticket may be used to resume.
pub const MESH_TICKET_LIFETIME: u32 = 600;

/// Session tickets for mesh listeners. A resumed session skips certificate
/// verification, so a ticket must not outlive what the full handshake
/// checked: each carries the identity store's generation and its issue
/// time, and is refused after any rotation (of the certificate or the trust
/// bundle) or `MESH_TICKET_LIFETIME` seconds, whatever the client claims.
#[derive(Debug)]
struct MeshTickets {
    store: Arc<IdentityStore>,
    inner: Arc<dyn rustls::server::ProducesTickets>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl rustls::server::ProducesTickets for MeshTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        MESH_TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut buf = Vec::with_capacity(16 + plain.len());
        buf.extend_from_slice(&self.store.generation().to_be_bytes());
        buf.extend_from_slice(&unix_now().to_be_bytes());
        buf.extend_from_slice(plain);
        self.inner.encrypt(&buf)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher)?;
        let (head, rest) = plain.split_at_checked(16)?;
        let generation = u64::from_be_bytes(head[..8].try_into().ok()?);
        let issued = u64::from_be_bytes(head[8..].try_into().ok()?);
        let fresh = unix_now().saturating_sub(issued) <= u64::from(MESH_TICKET_LIFETIME);
        (generation == self.store.generation() && fresh).then(|| rest.to_vec())
    }
}

/// A listener terminating mTLS between sidecars: TLS 1.3 only, a client
/// certificate of the trust domain required, ALPN `h2` and `http/1.1`,
/// resumption by short-lived session tickets void after any rotation.
pub fn mesh_server(store: &Arc<IdentityStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verify::ClientIdentityVerifier::new(store.clone())))
        .with_cert_resolver(Arc::new(CurrentCert(store.clone())));
    c.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    c.ticketer = Arc::new(MeshTickets {
        store: store.clone(),
        inner: rustls::crypto::ring::Ticketer::new()?,
    });
    // Stateless tickets only: the stateful cache has no such checks.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(c))
}

/// Connecting to one upstream identity: for HTTP/1.1 and for HTTP/2 (ALPN
/// says which the endpoint agreed to).
pub struct MeshClient {
    pub http1: tokio_rustls::TlsConnector,
    pub http2: tokio_rustls::TlsConnector,
    pub expected: SpiffeId,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshClient({})", self.expected)
    }
}

/// Originating mTLS to an endpoint that must present exactly `expected`.
pub fn mesh_client(store: &Arc<IdentityStore>, expected: SpiffeId) -> MeshClient {
    let config = |alpn: Vec<Vec<u8>>| -> Arc<ClientConfig> {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            // A static choice, not input: *ring* always has TLS 1.3 suites.
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::ServerIdentityVerifier::new(
                store.clone(),
                expected.clone(),
            )))
            .with_client_cert_resolver(Arc::new(CurrentCert(store.clone())));
        c.alpn_protocols = alpn;
        Arc::new(c)
    };
    MeshClient {
        http1: config(vec![ALPN_HTTP1.to_vec()]).into(),
        http2: config(vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]).into(),
        expected,
    }
}

/// Gateway certificates by SNI: exact host names, then `*.suffix`, then
/// the default (or, without one, the handshake is refused).
#[derive(Debug, Default)]
pub struct SniCerts {
    pub exact: HashMap<String, Arc<CertifiedKey>>,
    pub wildcard: Vec<(String, Arc<CertifiedKey>)>,
    pub default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix.as_str()) && name.len() > suffix.len())
            .map(|(_, c)| c.clone())
            .or_else(|| self.default.clone())
    }
}

/// A gateway listener terminating TLS from outside clients: by SNI, TLS
/// 1.2 allowed when asked (browsers and old clients), no client
/// certificate.
pub fn gateway_server(certs: SniCerts, allow_tls12: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    c.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    c.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(c))
}

/// A certificate and key from PEM files, for a gateway host.
pub fn load_certified(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", cert.display()));
    }
    let k = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&k)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| {
        format!(
            "{}: the key does not match the certificate in {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn store() -> (Arc<IdentityStore>, ca::Ca) {
        let (ca, _) = ca::Ca::generate("t.test").unwrap();
        let id = SpiffeId::parse("spiffe://t.test/ns/a/sa/b").unwrap();
        let (cert, key) = ca
            .issue(&id, std::time::Duration::from_secs(3600), &[])
            .unwrap();
        let creds = identity::Credentials::from_pem(
            cert.as_bytes(),
            key.as_bytes(),
            ca.cert_pem.as_bytes(),
            "t.test",
            ["c", "k", "r"],
        )
        .unwrap();
        (IdentityStore::new("t.test", creds), ca)
    }

    #[test]
    fn mesh_tickets_die_with_a_rotation() {
        let (store, ca) = store();
        let t = MeshTickets {
            store: store.clone(),
            inner: rustls::crypto::ring::Ticketer::new().unwrap(),
        };
        let ticket = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        let id = SpiffeId::parse("spiffe://t.test/ns/a/sa/b").unwrap();
        let (cert, key) = ca
            .issue(&id, std::time::Duration::from_secs(3600), &[])
            .unwrap();
        store.install(
            identity::Credentials::from_pem(
                cert.as_bytes(),
                key.as_bytes(),
                ca.cert_pem.as_bytes(),
                "t.test",
                ["c", "k", "r"],
            )
            .unwrap(),
        );
        assert_eq!(
            t.decrypt(&ticket),
            None,
            "a ticket from before the rotation resumed"
        );
        assert!(t.decrypt(&t.encrypt(b"x").unwrap()).is_some());
    }
}
