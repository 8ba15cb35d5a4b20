//! `outrigger init`: the pod's redirect rules, as istio-init installs
//! them, for IPv4 and IPv6, through `iptables-restore` with the nftables
//! backend (`iptables-nft-restore` when present). One `*nat` transaction
//! per family: the rules are in place whole or not at all.
//!
//! - inbound TCP (PREROUTING) → the inbound port, but the excluded ports
//!   (the probe port, and any the pod asks for);
//! - outbound TCP (OUTPUT) → the outbound port, but the proxy's own
//!   traffic (its UID), loopback, and the excluded ports and CIDRs.
//!
//! `--remove` takes them out again; `--dry-run` prints them.

use std::net::IpAddr;
use std::process::{Command, Stdio};

#[derive(Clone, Debug)]
pub struct Rules {
    pub proxy_uid: u32,
    pub outbound_port: u16,
    /// 0: inbound traffic is not redirected (no inbound listener).
    pub inbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<(IpAddr, u8)>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--exclude-outbound-cidrs: `{0}` is not an address/prefix")]
    Cidr(String),
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Family {
    V4,
    V6,
}

const CHAINS: [&str; 4] = [
    "OUTRIGGER_INBOUND",
    "OUTRIGGER_IN_REDIRECT",
    "OUTRIGGER_OUTPUT",
    "OUTRIGGER_REDIRECT",
];

pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), InitError> {
    let bad = || InitError::Cidr(s.to_string());
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else {
        len.parse().map_err(|_| bad())?
    };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}

impl Rules {
    /// The `iptables-restore` input that installs the rules for `family`.
    pub fn install_script(&self, family: Family) -> String {
        let loopback = match family {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        };
        let mut s = String::from("*nat\n");
        for c in CHAINS {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        s.push_str(&format!(
            "-A OUTRIGGER_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        ));
        if self.inbound_port > 0 {
            s.push_str(&format!(
                "-A OUTRIGGER_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
                self.inbound_port
            ));
            s.push_str("-A PREROUTING -p tcp -j OUTRIGGER_INBOUND\n");
            for p in &self.exclude_inbound_ports {
                s.push_str(&format!(
                    "-A OUTRIGGER_INBOUND -p tcp --dport {p} -j RETURN\n"
                ));
            }
            s.push_str("-A OUTRIGGER_INBOUND -p tcp -j OUTRIGGER_IN_REDIRECT\n");
        }
        s.push_str("-A OUTPUT -p tcp -j OUTRIGGER_OUTPUT\n");
        // The app calling its own pod address goes over loopback straight
        // to itself (as istio-init lets it).
        s.push_str(&format!(
            "-A OUTRIGGER_OUTPUT -o lo -m owner ! --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        // The proxy's own connections go where they were sent.
        s.push_str(&format!(
            "-A OUTRIGGER_OUTPUT -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        s.push_str(&format!("-A OUTRIGGER_OUTPUT -d {loopback} -j RETURN\n"));
        for p in &self.exclude_outbound_ports {
            s.push_str(&format!(
                "-A OUTRIGGER_OUTPUT -p tcp --dport {p} -j RETURN\n"
            ));
        }
        for (ip, len) in &self.exclude_outbound_cidrs {
            if ip.is_ipv4() == (family == Family::V4) {
                s.push_str(&format!("-A OUTRIGGER_OUTPUT -d {ip}/{len} -j RETURN\n"));
            }
        }
        s.push_str("-A OUTRIGGER_OUTPUT -j OUTRIGGER_REDIRECT\nCOMMIT\n");
        s
    }
}

/// The `iptables-restore --noflush` input that removes the rules: the
/// jumps from the built-in chains, then the chains.
pub fn remove_script(present: &str) -> String {
    let mut s = String::from("*nat\n");
    for line in present.lines() {
        if let Some(rule) = line.strip_prefix("-A ")
            && (rule.starts_with("PREROUTING ") || rule.starts_with("OUTPUT "))
            && rule.contains("-j OUTRIGGER_")
        {
            s.push_str(&format!("-D {rule}\n"));
        }
    }
    for c in CHAINS {
        if present.contains(&format!(":{c} ")) {
            s.push_str(&format!("-F {c}\n"));
        }
    }
    for c in CHAINS {
        if present.contains(&format!(":{c} ")) {
            s.push_str(&format!("-X {c}\n"));
        }
    }
    s.push_str("COMMIT\n");
    s
}

fn tool(family: Family, what: &str) -> String {
    let (nft, legacy) = match family {
        Family::V4 => (format!("iptables-nft-{what}"), format!("iptables-{what}")),
        Family::V6 => (format!("ip6tables-nft-{what}"), format!("ip6tables-{what}")),
    };
    let found = |name: &str| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(name).exists())
    };
    if found(&nft) { nft } else { legacy }
}

fn run(tool: &str, args: &[&str], input: Option<&str>) -> Result<String, InitError> {
    use std::io::Write;
    let fail = |message: String| InitError::Tool {
        tool: tool.to_string(),
        message,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{e} (is iptables installed?)")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this machine has IPv6 at all (a pod without it: v4 rules only).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Installs the rules, replacing any from an earlier run.
pub fn install(rules: &Rules) -> Result<(), InitError> {
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !ipv6_enabled() {
            continue;
        }
        remove_family(family)?;
        let t = tool(family, "restore");
        run(&t, &["--noflush"], Some(&rules.install_script(family)))?;
    }
    Ok(())
}

fn remove_family(family: Family) -> Result<(), InitError> {
    let present = run(&tool(family, "save"), &["-t", "nat"], None)?;
    if !present.contains(":OUTRIGGER_") {
        return Ok(());
    }
    run(
        &tool(family, "restore"),
        &["--noflush"],
        Some(&remove_script(&present)),
    )?;
    Ok(())
}

/// `outrigger init --remove`.
pub fn remove() -> Result<(), InitError> {
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !ipv6_enabled() {
            continue;
        }
        remove_family(family)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![15020],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                parse_cidr("169.254.169.254/32").unwrap(),
                parse_cidr("fd00::/8").unwrap(),
            ],
        }
    }

    #[test]
    fn the_rules_exclude_the_proxy_loopback_and_what_was_asked() {
        let v4 = rules().install_script(Family::V4);
        assert!(v4.contains("-A OUTRIGGER_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(v4.contains("-A OUTRIGGER_OUTPUT -d 127.0.0.1/32 -j RETURN"));
        assert!(v4.contains("--dport 5432 -j RETURN"));
        assert!(v4.contains("-d 169.254.169.254/32 -j RETURN"));
        assert!(!v4.contains("fd00::"), "v6 CIDRs stay out of v4 rules");
        assert!(v4.contains("-A OUTRIGGER_INBOUND -p tcp --dport 15020 -j RETURN"));
        assert!(v4.contains("REDIRECT --to-ports 15006"));
        assert!(v4.ends_with("-A OUTRIGGER_OUTPUT -j OUTRIGGER_REDIRECT\nCOMMIT\n"));
        let v6 = rules().install_script(Family::V6);
        assert!(v6.contains("-d ::1/128 -j RETURN"));
        assert!(v6.contains("-d fd00::/8 -j RETURN"));
    }

    #[test]
    fn no_inbound_port_no_inbound_redirect() {
        let r = Rules {
            inbound_port: 0,
            ..rules()
        };
        let v4 = r.install_script(Family::V4);
        assert!(!v4.contains("PREROUTING"));
        assert!(!v4.contains("--to-ports 0"));
    }

    #[test]
    fn removal_deletes_the_jumps_then_the_chains() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:OUTRIGGER_INBOUND - [0:0]\n:OUTRIGGER_OUTPUT - [0:0]\n-A PREROUTING -p tcp -j OUTRIGGER_INBOUND\n-A OUTPUT -p tcp -j OUTRIGGER_OUTPUT\n-A OUTPUT -p tcp -j KEEP_ME\nCOMMIT\n";
        let s = remove_script(saved);
        assert!(s.contains("-D PREROUTING -p tcp -j OUTRIGGER_INBOUND\n"));
        assert!(s.contains("-D OUTPUT -p tcp -j OUTRIGGER_OUTPUT\n"));
        assert!(!s.contains("KEEP_ME"));
        assert!(s.find("-F OUTRIGGER_INBOUND").unwrap() < s.find("-X OUTRIGGER_INBOUND").unwrap());
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("10.0.0.1").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }
}
