//! `outrigger check`: a running proxy checked from its admin port, each
//! finding said in plain words on one line, as `linkerd check` does.
//!
//! Everything comes from what the admin port already serves: `/config`
//! (the running document, its version and certificate), `/clusters`
//! (endpoint states), `/metrics` (refused updates), plus a connection to
//! each listener and a `/ready` on the probe port. Blocking std I/O with
//! short timeouts: it runs once and exits.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but worth a look.
    Warn,
    Fail,
    /// Could not be checked from here; neither good nor bad.
    Skip,
}

impl Status {
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Ok => "✔",
            Status::Warn => "‼",
            Status::Fail => "✖",
            Status::Skip => "·",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    pub text: String,
}

fn finding(status: Status, text: impl Into<String>) -> Finding {
    Finding {
        status,
        text: text.into(),
    }
}

const TIMEOUT: Duration = Duration::from_secs(3);

struct Response {
    status: u16,
    body: String,
}

/// A plain HTTP/1.1 GET, `connection: close`.
fn get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.set_write_timeout(Some(TIMEOUT));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: outrigger-check\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Where to connect to reach an address the proxy bound: a wildcard
/// address is reached on loopback.
fn reachable(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
        }
        _ => a,
    }
}

/// The admin address: `127.0.0.1:15000`, `localhost:15000` or
/// `http://127.0.0.1:15000`.
pub(crate) fn admin_addr(admin: &str) -> Result<SocketAddr, String> {
    let a = admin.trim_start_matches("http://").trim_end_matches('/');
    a.to_socket_addrs()
        .map_err(|e| format!("`{admin}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{admin}` resolves to no address"))
}

/// The `# name: value` comment lines `/config` starts with.
fn header<'a>(config: &'a str, name: &str) -> Option<&'a str> {
    config
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix("# ")?.strip_prefix(name)?.strip_prefix(": "))
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// `3d 4h`, `5h 12m`, `12m`.
fn human(secs: i64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{}m", m.max(1)),
        (0, h) => format!("{h}h {m}m"),
        (d, h) => format!("{d}d {h}h"),
    }
}

/// Every check, in order. A proxy whose admin port does not answer gets
/// that one failure: nothing else can be asked.
pub fn checks(admin: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let addr = match admin_addr(admin) {
        Ok(a) => a,
        Err(e) => return vec![finding(Status::Fail, format!("admin address {e}"))],
    };
    let config = match get(addr, "/config") {
        Err(e) => {
            out.push(finding(
                Status::Fail,
                format!(
                    "the admin port {addr} does not answer ({e}): is the proxy running, and is --admin its admin address?"
                ),
            ));
            return out;
        }
        Ok(r) if r.status == 503 => {
            out.push(finding(
                Status::Ok,
                format!("the admin port {addr} answers"),
            ));
            out.push(finding(
                Status::Fail,
                "the proxy has no config yet (a fed proxy waits for its control plane: see its log)",
            ));
            None
        }
        Ok(r) if r.status != 200 => {
            out.push(finding(
                Status::Fail,
                format!(
                    "the admin port {addr} answered /config with {}: {}",
                    r.status,
                    r.body.trim()
                ),
            ));
            return out;
        }
        Ok(r) => {
            out.push(finding(
                Status::Ok,
                format!("the admin port {addr} answers"),
            ));
            Some(r.body)
        }
    };
    let doc: Option<serde_yaml::Value> =
        config.as_deref().and_then(|c| serde_yaml::from_str(c).ok());

    // Version.
    if let Some(c) = &config {
        match header(c, "version") {
            Some(v) => out.push(finding(
                Status::Ok,
                format!("config version {v} is in force"),
            )),
            None => out.push(finding(Status::Warn, "/config names no config version")),
        }
    }

    // Ready, on the probe port (the admin port answers it too when the
    // probe port is not known).
    let probes = doc
        .as_ref()
        .and_then(|d| {
            d.get("admin")?
                .get("probes")?
                .as_str()?
                .parse::<SocketAddr>()
                .ok()
        })
        .filter(|p| p.port() != 0)
        .map(reachable)
        .unwrap_or(addr);
    match get(probes, "/ready") {
        Ok(r) if r.status == 200 => {
            out.push(finding(Status::Ok, format!("ready (/ready on {probes})")))
        }
        Ok(r) => out.push(finding(
            Status::Fail,
            format!(
                "not ready: /ready on {probes} answered {} (draining, no config yet, or no listener serving)",
                r.status
            ),
        )),
        Err(e) => out.push(finding(
            Status::Fail,
            format!("the probe port {probes} does not answer /ready ({e}): the kubelet will not send traffic"),
        )),
    }

    // Listeners.
    let listeners = doc
        .as_ref()
        .and_then(|d| d.get("listeners")?.as_sequence().cloned())
        .unwrap_or_default();
    if doc.is_some() && listeners.is_empty() {
        out.push(finding(Status::Fail, "the config has no listener"));
    }
    for l in &listeners {
        let name = l.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        let Some(a) = l
            .get("address")
            .and_then(|v| v.as_str())
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            out.push(finding(
                Status::Skip,
                format!(
                    "listener `{name}`: its address is not an IP address and port, not checked"
                ),
            ));
            continue;
        };
        if a.port() == 0 {
            out.push(finding(
                Status::Skip,
                format!("listener `{name}` binds port 0 (chosen at start): not checked"),
            ));
            continue;
        }
        let to = reachable(a);
        match TcpStream::connect_timeout(&to, TIMEOUT) {
            Ok(_) => out.push(finding(
                Status::Ok,
                format!("listener `{name}` accepts connections on {a}"),
            )),
            Err(e) => out.push(finding(
                Status::Fail,
                format!("listener `{name}` is not accepting connections on {a} ({e})"),
            )),
        }
    }

    // Clusters.
    if config.is_some() {
        cluster_checks(addr, &mut out);
    }

    // Refused updates.
    match get(addr, "/metrics") {
        Ok(r) if r.status == 200 => {
            let nacks = metric(&r.body, "outrigger_feed_updates_total", "result=\"nack\"");
            if nacks > 0.0 {
                let n = nacks as u64;
                let what = if n == 1 {
                    "1 config update was".to_string()
                } else {
                    format!("{n} config updates were")
                };
                out.push(finding(
                    Status::Warn,
                    format!(
                        "{what} refused since start (nack): the config in force may not be the latest one written; the proxy's log says why"
                    ),
                ));
            } else {
                out.push(finding(Status::Ok, "no config update refused"));
            }
        }
        Ok(r) => out.push(finding(
            Status::Warn,
            format!(
                "/metrics answered {}: refused updates not checked",
                r.status
            ),
        )),
        Err(e) => out.push(finding(
            Status::Warn,
            format!("/metrics did not answer ({e}): refused updates not checked"),
        )),
    }

    // Certificate.
    if let Some(c) = &config {
        out.push(certificate(c, unix_now()));
    }
    out
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificate line of `/config`: expired fails, under a day warns.
fn certificate(config: &str, now: i64) -> Finding {
    let Some(line) = header(config, "certificate") else {
        return finding(
            Status::Ok,
            "no workload certificate to expire (no mTLS identity: plaintext only)",
        );
    };
    let id = header(config, "identity").unwrap_or("the proxy");
    let expires = line
        .rsplit_once("(unix ")
        .and_then(|(_, t)| t.trim_end_matches(')').parse::<i64>().ok());
    let when = line
        .split_once("expires ")
        .map_or("", |(_, w)| w.split(" (").next().unwrap_or(w));
    match expires {
        None => finding(
            Status::Warn,
            format!("cannot read the certificate's expiry: `{line}`"),
        ),
        Some(t) if t <= now => finding(
            Status::Fail,
            format!("the certificate of {id} expired at {when}: peers refuse its mTLS connections"),
        ),
        Some(t) if t - now < 24 * 3600 => finding(
            Status::Warn,
            format!(
                "the certificate of {id} expires in {} ({when}): is renewal working?",
                human(t - now)
            ),
        ),
        Some(t) => finding(
            Status::Ok,
            format!(
                "the certificate of {id} is valid for {} (until {when})",
                human(t - now)
            ),
        ),
    }
}

/// The value of the first sample of `name` whose labels contain `label`;
/// 0 when there is none.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

fn cluster_checks(addr: SocketAddr, out: &mut Vec<Finding>) {
    let doc = match get(addr, "/clusters") {
        Ok(r) if r.status == 200 => serde_json::from_str::<serde_json::Value>(&r.body).ok(),
        _ => None,
    };
    let Some(clusters) = doc.as_ref().and_then(|d| d["clusters"].as_array()) else {
        out.push(finding(
            Status::Warn,
            "/clusters did not answer: endpoints not checked",
        ));
        return;
    };
    for c in clusters {
        let name = c["name"].as_str().unwrap_or("?");
        let eps = c["endpoints"].as_array().cloned().unwrap_or_default();
        let state = |e: &serde_json::Value| e["state"].as_str().unwrap_or("unknown").to_string();
        let healthy = eps.iter().filter(|e| state(e) == "healthy").count();
        let down: Vec<String> = eps
            .iter()
            .filter(|e| state(e) != "healthy")
            .map(|e| format!("{} {}", e["address"].as_str().unwrap_or("?"), state(e)))
            .collect();
        if eps.is_empty() {
            out.push(finding(
                Status::Fail,
                format!("cluster `{name}` has no endpoints: requests routed to it get 503"),
            ));
        } else if healthy == 0 {
            out.push(finding(
                Status::Fail,
                format!(
                    "cluster `{name}` has no healthy endpoint ({}): requests routed to it fail",
                    down.join(", ")
                ),
            ));
        } else if !down.is_empty() {
            out.push(finding(
                Status::Warn,
                format!(
                    "cluster `{name}`: {healthy} of {} healthy ({})",
                    plural(eps.len(), "endpoint"),
                    down.join(", ")
                ),
            ));
        } else {
            let which = match eps.len() {
                1 => "its endpoint is".to_string(),
                n => format!("all {n} endpoints are"),
            };
            out.push(finding(
                Status::Ok,
                format!("cluster `{name}`: {which} healthy"),
            ));
        }
    }
}

/// Prints every check; true when none failed.
pub fn run(admin: &str) -> bool {
    let found = checks(admin);
    for f in &found {
        println!("{} {}", f.status.symbol(), f.text);
    }
    let failed = found.iter().filter(|f| f.status == Status::Fail).count();
    let warned = found.iter().filter(|f| f.status == Status::Warn).count();
    println!();
    match (failed, warned) {
        (0, 0) => println!("all checks passed"),
        (0, w) => println!("all checks passed, {}", plural(w, "warning")),
        (f, w) => println!(
            "{} failed{}",
            plural(f, "check"),
            if w > 0 {
                format!(", {}", plural(w, "warning"))
            } else {
                String::new()
            }
        ),
    }
    failed == 0
}

/// `outrigger wait-ready`: polls `/ready` on the probe port until it
/// answers 200 or `timeout` passes. A classic (non-native) sidecar's
/// `postStart` hook runs it: the kubelet starts the app's container only
/// once the hook returns, so the app's first call finds the proxy up.
pub fn wait_ready(probes: &str, timeout: Duration) -> Result<(), String> {
    // Every address the name has (`localhost` may be ::1 and 127.0.0.1).
    let addrs: Vec<SocketAddr> = probes
        .to_socket_addrs()
        .map_err(|e| format!("{probes}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{probes}: no address"));
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut last = String::new();
        for addr in &addrs {
            match get(reachable(*addr), "/ready") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("/ready answered {}", r.status),
                Err(e) => last = e,
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the proxy on {probes} was not ready within {timeout:?} ({last})"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "# version: 7\n# identity: spiffe://td/ns/a/sa/b\n# certificate: serial 01, expires 2030-01-01T00:00:00Z (unix 1893456000)\nnode: {}\n";

    #[test]
    fn reads_the_config_header() {
        assert_eq!(header(CONFIG, "version"), Some("7"));
        assert_eq!(header(CONFIG, "identity"), Some("spiffe://td/ns/a/sa/b"));
        assert_eq!(header("node: {}\n", "version"), None);
    }

    #[test]
    fn certificate_expiry() {
        let t = 1893456000;
        let ok = certificate(CONFIG, t - 3 * 86400);
        assert_eq!(ok.status, Status::Ok, "{ok:?}");
        assert!(ok.text.contains("valid for 3d 0h"), "{ok:?}");
        let soon = certificate(CONFIG, t - 3600 * 5);
        assert_eq!(soon.status, Status::Warn);
        assert!(
            soon.text
                .contains("expires in 5h 0m (2030-01-01T00:00:00Z)"),
            "{soon:?}"
        );
        let gone = certificate(CONFIG, t + 1);
        assert_eq!(gone.status, Status::Fail);
        assert!(
            gone.text.contains("expired at 2030-01-01T00:00:00Z"),
            "{gone:?}"
        );
        assert!(
            certificate("# version: 1\n", t)
                .text
                .contains("no workload certificate")
        );
    }

    #[test]
    fn nack_metric() {
        let m = "# HELP x\noutrigger_feed_updates_total{result=\"ack\"} 3\noutrigger_feed_updates_total{result=\"nack\"} 2\n";
        assert_eq!(
            metric(m, "outrigger_feed_updates_total", "result=\"nack\""),
            2.0
        );
        assert_eq!(
            metric("", "outrigger_feed_updates_total", "result=\"nack\""),
            0.0
        );
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:15006".parse().unwrap()),
            "127.0.0.1:15006".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:1".parse().unwrap()),
            "[::1]:1".parse().unwrap()
        );
    }
}
