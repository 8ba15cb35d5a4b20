//! A developer CA (`outrigger ca init DIR`, `outrigger ca issue`): a local
//! root and workload certificates with a SPIFFE ID in the URI SAN, for
//! the demo, the tests and trying mTLS on one machine. The control plane's
//! mesh CA signs with the same code.

use super::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path} already exists; not overwriting a CA")]
    Exists { path: String },
    #[error("the CSR is for {found}, not for {expected}")]
    CsrIdentity { found: String, expected: String },
    #[error("the CSR's key is not acceptable: {0}")]
    CsrKey(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A CA: its certificate (PEM) and the key that signs with it.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<(Ca, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Outrigger");
        dn.push(DnType::CommonName, format!("Outrigger CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((
            Ca {
                cert_pem,
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { cert_pem, issuer })
    }

    fn leaf_params(
        id: &SpiffeId,
        valid: Duration,
        dns: &[String],
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::new(dns.to_vec())?;
        params
            .subject_alt_names
            .push(SanType::URI(id.as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Outrigger");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        // A little back-dating covers clocks a few seconds apart.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(valid.as_secs() as i64);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &fastrand::u64(..).to_be_bytes(),
        ));
        Ok(params)
    }

    /// A new key and a certificate for `id` valid between the two times
    /// (tests: expired or not yet valid certificates): (cert PEM, key PEM).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = Self::leaf_params(id, Duration::from_secs(1), &[])?;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A new key and certificate for `id`: (cert PEM, key PEM).
    pub fn issue(
        &self,
        id: &SpiffeId,
        valid: Duration,
        dns: &[String],
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let cert = Self::leaf_params(id, valid, dns)?.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a CSR for `id` (the identity the caller proved, whatever the
    /// CSR asks for): the caller's key never leaves it.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        valid: Duration,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        if asked.iter().any(|u| u != id.as_str()) {
            return Err(CaError::CsrIdentity {
                found: asked.join(", "),
                expected: id.to_string(),
            });
        }
        let alg = csr.public_key.algorithm();
        if !(alg == &rcgen::PKCS_ECDSA_P256_SHA256
            || alg == &rcgen::PKCS_ECDSA_P384_SHA384
            || alg == &rcgen::PKCS_ED25519)
        {
            return Err(CaError::CsrKey(
                "use an ECDSA P-256/P-384 or Ed25519 key".into(),
            ));
        }
        let params = Self::leaf_params(id, valid, &[])?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// Writes a private key readable by its owner only. The old file (or a
/// symlink someone planted there) is removed first and the new one created
/// exclusively, so the mode always applies and no link is followed.
pub fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// Creates `dir` for key material (mode 0700), refusing one that is a
/// symlink.
pub fn private_dir(dir: &Path) -> Result<(), CaError> {
    if let Ok(m) = std::fs::symlink_metadata(dir)
        && !m.is_dir()
    {
        return Err(io(dir)(std::io::Error::other(
            "exists and is not a directory (a symlink?)",
        )));
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io(dir))
}

/// `outrigger ca init DIR`: a new CA in DIR (`ca.pem`, `ca-key.pem`).
pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, CaError> {
    private_dir(dir)?;
    let cert_path = dir.join("ca.pem");
    for existing in [&cert_path, &dir.join("ca-key.pem")] {
        if existing.exists() {
            return Err(CaError::Exists {
                path: existing.display().to_string(),
            });
        }
    }
    let (ca, key_pem) = Ca::generate(trust_domain)?;
    write_private(&dir.join("ca-key.pem"), &key_pem)?;
    std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// `outrigger ca issue`: `cert.pem`, `key.pem` and `roots.pem` for `id` in `out`.
pub fn issue_to(
    ca_dir: &Path,
    id: &SpiffeId,
    out: &Path,
    valid: Duration,
    dns: &[String],
) -> Result<(), CaError> {
    let ca = Ca::load(ca_dir)?;
    let (cert, key) = ca.issue(id, valid, dns)?;
    private_dir(out)?;
    write_private(&out.join("key.pem"), &key)?;
    let c = out.join("cert.pem");
    std::fs::write(&c, cert).map_err(io(&c))?;
    let r = out.join("roots.pem");
    std::fs::write(&r, &ca.cert_pem).map_err(io(&r))?;
    Ok(())
}
