//! Certificates for the mTLS tests: a CA per test, workload identities
//! written as the `files` source expects them.

use outrigger::tls::ca::Ca;
use outrigger::tls::spiffe::SpiffeId;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TD: &str = "mesh.test";

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

pub struct Pki {
    pub ca: Ca,
    pub dir: PathBuf,
}

/// Where one workload's files are.
#[derive(Clone, Debug)]
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    pub fn roots(&self) -> PathBuf {
        self.dir.join("roots.pem")
    }
    /// The `identity:` section of a proxy config.
    pub fn identity_yaml(&self) -> String {
        format!(
            "identity: {{ trust_domain: {TD}, source: {{ files: {{ cert: {}, key: {}, roots: {} }} }} }}\n",
            self.cert().display(),
            self.key().display(),
            self.roots().display()
        )
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = super::temp_dir();
        let (ca, _key) = Ca::generate(TD).unwrap();
        Pki { ca, dir }
    }

    /// Cert, key and roots for `sa`, valid for a day.
    pub fn workload(&self, sa: &str) -> Files {
        self.write(
            sa,
            &format!("{sa}-{}", fastrand_suffix()),
            Duration::from_secs(86400),
        )
    }

    pub fn write(&self, sa: &str, dirname: &str, valid: Duration) -> Files {
        let id = SpiffeId::parse(&spiffe(sa)).unwrap();
        let (cert, key) = self.ca.issue(&id, valid, &[]).unwrap();
        let dir = self.dir.join(dirname);
        write_files(&dir, &cert, &key, &self.ca.cert_pem);
        Files { dir }
    }

    /// Rewrites `files` with a freshly issued certificate and key (a rotation).
    pub fn rotate(&self, files: &Files, sa: &str) {
        let id = SpiffeId::parse(&spiffe(sa)).unwrap();
        let (cert, key) = self.ca.issue(&id, Duration::from_secs(86400), &[]).unwrap();
        write_files(&files.dir, &cert, &key, &self.ca.cert_pem);
    }
}

pub fn write_files(dir: &Path, cert: &str, key: &str, roots: &str) {
    std::fs::create_dir_all(dir).unwrap();
    // Key first, then the certificate: a watcher that sees the pair half
    // written refuses it (the key does not match) and takes the next look.
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("roots.pem"), roots).unwrap();
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}
