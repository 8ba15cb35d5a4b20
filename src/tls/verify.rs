//! Certificate verification between sidecars: the chain to the current
//! trust bundle (read from the identity store at each handshake, so a
//! rotated bundle applies at once), then the SPIFFE ID. A server must
//! present exactly the identity the caller expects of that endpoint — a
//! chain to the roots is not enough; a client must present an identity of
//! the proxy's trust domain (what it may do is authorization's business).

use super::identity::IdentityStore;
use super::spiffe::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// webpki's verdict as rustls' certificate error, keeping the cases the
/// handshake metrics tell apart (expired, untrusted).
fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::CertExpired { .. } | W::InvalidCertValidity => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertRevoked => CertificateError::Revoked,
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        _ => CertificateError::ApplicationVerificationFailure,
    })
}

/// Where a verifier takes its trust anchors: the identity store (rotated
/// with it), or a fixed bundle (a proxy's bootstrap, before it has an
/// identity of its own).
#[derive(Debug)]
pub enum Roots {
    Store(Arc<IdentityStore>),
    Fixed(Vec<rustls::pki_types::TrustAnchor<'static>>),
}

/// The identity a verified chain names.
fn verify_chain(
    roots: &Roots,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let creds;
    let anchors: &[rustls::pki_types::TrustAnchor<'static>] = match roots {
        Roots::Store(s) => {
            creds = s.current();
            &creds.roots
        }
        Roots::Fixed(r) => r,
    };
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    SpiffeId::of_certificate(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::NotValidForName))
}

/// Checks an upstream sidecar's certificate: chain, then exactly `expected`.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    roots: Roots,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    pub fn new(store: Arc<IdentityStore>, expected: SpiffeId) -> Self {
        Self::with_roots(Roots::Store(store), expected)
    }

    pub fn with_roots(roots: Roots, expected: SpiffeId) -> Self {
        ServerIdentityVerifier {
            roots,
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_chain(
            &self.roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if id != self.expected {
            tracing::debug!(expected = %self.expected, presented = %id, "upstream identity mismatch");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Checks a downstream sidecar's certificate: chain, and an identity of the
/// proxy's trust domain. Mandatory: a TLS client without a certificate is
/// refused (plaintext, where allowed, is told apart before TLS starts).
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    store: Arc<IdentityStore>,
    algs: WebPkiSupportedAlgorithms,
    hints: Vec<DistinguishedName>,
}

impl ClientIdentityVerifier {
    pub fn new(store: Arc<IdentityStore>) -> Self {
        ClientIdentityVerifier {
            store,
            algs: algorithms(),
            // Hints are advisory; sidecars ignore them. Kept empty rather
            // than stale after a bundle rotation.
            hints: Vec::new(),
        }
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = verify_chain(
            &Roots::Store(self.store.clone()),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if id.trust_domain() != self.store.trust_domain {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// How a handshake ended, as a bounded metric label.
pub fn classify(e: &std::io::Error) -> &'static str {
    let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "malformed",
        };
    };
    match rustls_err {
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet) => {
            "expired"
        }
        Error::InvalidCertificate(CertificateError::NotValidForName) => "identity-mismatch",
        Error::InvalidCertificate(_) | Error::NoCertificatesPresented => "untrusted",
        Error::AlertReceived(a) => match a {
            rustls::AlertDescription::CertificateExpired => "expired",
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::CertificateUnknown => "untrusted",
            _ => "malformed",
        },
        _ => "malformed",
    }
}
