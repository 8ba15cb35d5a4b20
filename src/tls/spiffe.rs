//! SPIFFE IDs (`spiffe://<trust domain>/<path>`, mesh workloads as
//! `spiffe://<td>/ns/<namespace>/sa/<service account>`), patterns over
//! them (`*` for one path segment, as authorization rules use), and
//! reading the one SPIFFE ID of a certificate (its URI SAN).

use std::fmt;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("`{0}` is not a SPIFFE ID (spiffe://<trust domain>/<path>)")]
    Syntax(String),
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
    #[error("the certificate has no SPIFFE ID (a spiffe:// URI SAN)")]
    Missing,
    #[error("the certificate has more than one SPIFFE ID")]
    Several,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeError> {
        let bad = || SpiffeError::Syntax(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = !path.is_empty()
            && path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            });
        if td_ok && path_ok {
            Ok(SpiffeId(s.to_string()))
        } else {
            Err(bad())
        }
    }

    /// The workload ID of a Kubernetes service account.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeError> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or("")
    }

    /// The SPIFFE ID of a DER certificate: exactly one `spiffe://` URI SAN.
    pub fn of_certificate(der: &[u8]) -> Result<SpiffeId, SpiffeError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SpiffeError::Certificate(e.to_string()))?;
        let mut found = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    if found.is_some() {
                        return Err(SpiffeError::Several);
                    }
                    found = Some(SpiffeId::parse(uri)?);
                }
            }
        }
        found.ok_or(SpiffeError::Missing)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pattern over SPIFFE IDs: exact, `*` for one whole path segment
/// (`spiffe://td/ns/*/sa/web`), or `*` alone for any authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdPattern(String);

impl IdPattern {
    pub fn parse(s: &str) -> Result<IdPattern, SpiffeError> {
        if s == "*" {
            return Ok(IdPattern(s.into()));
        }
        // Valid once each `*` stands for a segment.
        let probe = s.replace("/*", "/x");
        SpiffeId::parse(&probe)?;
        if s.split('/').any(|seg| seg.contains('*') && seg != "*") {
            return Err(SpiffeError::Syntax(s.to_string()));
        }
        Ok(IdPattern(s.into()))
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        if self.0 == "*" {
            return true;
        }
        let mut p = self.0.split('/');
        let mut i = id.0.split('/');
        loop {
            match (p.next(), i.next()) {
                (None, None) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                _ => return false,
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        for bad in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster/ns/x",
            "http://cluster.local/ns/x",
            "spiffe://td/ns//sa/x",
            "spiffe://td/ns/../sa/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_match_whole_segments() {
        let id = SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap();
        for (p, want) in [
            ("spiffe://td/ns/shop/sa/web", true),
            ("spiffe://td/ns/*/sa/web", true),
            ("spiffe://td/ns/*/sa/*", true),
            ("*", true),
            ("spiffe://td/ns/*/sa/api", false),
            ("spiffe://td/ns/*", false),
            ("spiffe://other/ns/shop/sa/web", false),
        ] {
            assert_eq!(IdPattern::parse(p).unwrap().matches(&id), want, "{p}");
        }
        assert!(IdPattern::parse("spiffe://td/ns/sh*p/sa/web").is_err());
    }
}
