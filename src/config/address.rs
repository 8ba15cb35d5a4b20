//! Addresses as they appear in YAML: an endpoint is `ip:port` or
//! `host:port` (a DNS name, resolved and re-resolved by the proxy); a
//! listener binds an IP address, or `localhost:PORT`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// Where an endpoint is: an address, or a name resolved to addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointAddr {
    Ip(SocketAddr),
    Name { host: Arc<str>, port: u16 },
}

impl EndpointAddr {
    /// The address, when it is one (a name is resolved first).
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            EndpointAddr::Ip(a) => Some(*a),
            EndpointAddr::Name { .. } => None,
        }
    }

    pub fn is_name(&self) -> bool {
        matches!(self, EndpointAddr::Name { .. })
    }
}

impl From<SocketAddr> for EndpointAddr {
    fn from(a: SocketAddr) -> Self {
        EndpointAddr::Ip(a)
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Ip(a) => a.fmt(f),
            EndpointAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

const FORMS: &str = "`ip:port` or `host:port`, e.g. 10.0.0.5:8080, [fd00::5]:8080 or inventory.shop.svc.cluster.local:8080";

/// A DNS name as RFC 1123 allows it (`_` accepted too, as resolvers do).
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl FromStr for EndpointAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(EndpointAddr::Ip(a));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("`{s}` has no port: expected {FORMS}"));
        };
        let Ok(port) = port.parse::<u16>() else {
            return Err(format!("`{s}`: the port is not a number from 0 to 65535"));
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "`{s}` is not a valid address (an IPv6 address goes in brackets: [fd00::5]:8080)"
            ));
        }
        if host.parse::<std::net::IpAddr>().is_err()
            && host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(format!("`{s}` is not a valid IPv4 address"));
        }
        if !valid_host(host) {
            return Err(format!(
                "`{host}` is not a valid DNS name: expected {FORMS}"
            ));
        }
        Ok(EndpointAddr::Name {
            host: host.to_ascii_lowercase().into(),
            port,
        })
    }
}

impl Serialize for EndpointAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EndpointAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A listener's address: an IP address, or `localhost:PORT` (loopback,
/// 127.0.0.1). Other names are refused: which interface a name would
/// bind could change under a running proxy.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.rsplit_once(':') {
        Some((h, port)) if h.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
            .map_err(|_| format!("`{s}`: the port is not a number from 0 to 65535")),
        Some(_) => Err(format!(
            "`{s}`: a listener binds an IP address (`0.0.0.0:15006`, `127.0.0.1:15001`, `[::]:15006`) or `localhost:PORT`, not a DNS name"
        )),
        None => Err(format!("`{s}` has no port (e.g. 127.0.0.1:15001)")),
    }
}

/// `deserialize_with` for listener addresses.
pub fn bind<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_bind(&s).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional local address (`forward_to`).
pub fn bind_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_bind(&s).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_addresses_or_names() {
        assert_eq!(
            "10.0.0.5:8080".parse::<EndpointAddr>(),
            Ok(EndpointAddr::Ip("10.0.0.5:8080".parse().unwrap()))
        );
        assert_eq!(
            "[fd00::5]:80".parse::<EndpointAddr>().unwrap().to_string(),
            "[fd00::5]:80"
        );
        let n: EndpointAddr = "Inventory.shop.svc.cluster.local:8080".parse().unwrap();
        assert_eq!(n.to_string(), "inventory.shop.svc.cluster.local:8080");
        assert!(n.is_name() && n.ip().is_none());
        assert!("payments:80".parse::<EndpointAddr>().unwrap().is_name());
        for (bad, says) in [
            ("inventory", "has no port"),
            ("inventory:http", "port is not a number"),
            ("inventory:70000", "port is not a number"),
            ("10.0.0.300:80", "not a valid IPv4"),
            ("fd00::5:80", "in brackets"),
            ("in ventory:80", "not a valid DNS name"),
            ("-bad.example:80", "not a valid DNS name"),
        ] {
            let e = bad.parse::<EndpointAddr>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn listeners_bind_addresses_or_localhost() {
        assert_eq!(
            parse_bind("localhost:15001"),
            Ok("127.0.0.1:15001".parse().unwrap())
        );
        assert_eq!(
            parse_bind("0.0.0.0:15006"),
            Ok("0.0.0.0:15006".parse().unwrap())
        );
        assert!(
            parse_bind("example.com:80")
                .unwrap_err()
                .contains("not a DNS name")
        );
        assert!(parse_bind("localhost").unwrap_err().contains("no port"));
    }
}
