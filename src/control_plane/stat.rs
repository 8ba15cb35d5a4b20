//! `outrigger stat`: the mesh's services and routes (rate, success, p50,
//! p99) from the control plane's `/v1/mesh`, or one proxy's routes from
//! two scrapes of its admin port's `/metrics`; plain text, aligned
//! columns; `--watch` redraws every 2 s.

use super::report::Report;
use super::traffic::{self, Figures, MeshView, NodeStats, RouteRow};
use crate::tls::spiffe::SpiffeId;
use crate::tls::verify::{Roots, ServerIdentityVerifier};
use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Options {
    /// `https://HOST:PORT` of a control plane.
    pub control_plane: Option<String>,
    pub token_file: Option<PathBuf>,
    /// What the control plane's certificate chains to.
    pub ca: Option<PathBuf>,
    pub trust_domain: String,
    /// The identity the control plane must present (default
    /// `spiffe://<trust domain>/ns/outrigger/sa/control-plane`).
    pub control_plane_identity: Option<String>,
    /// A proxy's admin address (`127.0.0.1:15000`).
    pub admin: Option<String>,
    pub watch: bool,
}

const REDRAW: Duration = Duration::from_secs(2);
const SCRAPE_GAP: Duration = Duration::from_secs(1);

pub async fn run(opts: Options) -> Result<(), String> {
    match (&opts.control_plane, &opts.admin) {
        (Some(url), None) => mesh(&opts, url).await,
        (None, Some(admin)) => proxy(admin, opts.watch).await,
        _ => Err("name one of --control-plane URL or --admin ADDRESS".into()),
    }
}

fn draw(text: &str, watch: bool) {
    let mut out = std::io::stdout().lock();
    if watch && out.is_terminal() {
        // Home and clear: a redraw in place.
        let _ = write!(out, "\x1b[H\x1b[2J");
    }
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

async fn mesh(opts: &Options, url: &str) -> Result<(), String> {
    let client = CpClient::new(opts, url)?;
    loop {
        match client.get_mesh().await {
            Ok(v) => draw(&mesh_text(&v, url), opts.watch),
            Err(e) if opts.watch => draw(&format!("{url}: {e}"), true),
            Err(e) => return Err(format!("{url}: {e}")),
        }
        if !opts.watch {
            return Ok(());
        }
        tokio::time::sleep(REDRAW).await;
    }
}

async fn proxy(admin: &str, watch: bool) -> Result<(), String> {
    let mut prev = (scrape(admin).await?, Instant::now());
    let mut wait = SCRAPE_GAP;
    loop {
        tokio::time::sleep(wait).await;
        let now = Instant::now();
        let cur = match scrape(admin).await {
            Ok(r) => r,
            Err(e) if watch => {
                draw(&format!("{admin}: {e}"), true);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut st = NodeStats::default();
        st.ingest(&prev.0, prev.1);
        st.ingest(&cur, now);
        let routes = traffic::proxy_routes(&st, now);
        let secs = now.duration_since(prev.1).as_secs_f64();
        draw(&proxy_text(admin, &routes, secs), watch);
        if !watch {
            return Ok(());
        }
        prev = (cur, now);
        wait = REDRAW;
    }
}

/// One scrape of a proxy's `/metrics`.
async fn scrape(admin: &str) -> Result<Report, String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .map_err(|_| format!("{admin}: connect timed out"))?
    .map_err(|e| format!("{admin}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, admin)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| format!("{admin}: no answer"))?
        .map_err(|e| format!("{admin}: {e}"))?;
    let body = crate::http_util::success_body(resp, &format!("{admin}/metrics")).await?;
    Ok(Report::from_prometheus_text(&String::from_utf8_lossy(
        &body,
    )))
}

/// HTTP/2 over TLS to the control plane, which must present its identity.
struct CpClient {
    url: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    token: String,
    conn: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>,
}

impl CpClient {
    fn new(opts: &Options, url: &str) -> Result<CpClient, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url}: the control plane speaks https"));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(15010);
        let token_file = opts
            .token_file
            .as_ref()
            .ok_or("--control-plane needs --token-file")?;
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| format!("{}: {e}", token_file.display()))?
            .trim()
            .to_string();
        let ca_path = opts.ca.as_ref().ok_or("--control-plane needs --ca")?;
        let ca = std::fs::read(ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
        let mut roots = Vec::new();
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&ca).filter_map(Result::ok) {
            let a = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
            roots.push(a.to_owned());
        }
        if roots.is_empty() {
            return Err(format!("{}: no PEM certificate in it", ca_path.display()));
        }
        let expected = match &opts.control_plane_identity {
            Some(id) => SpiffeId::parse(id),
            None => SpiffeId::workload(&opts.trust_domain, "outrigger", "control-plane"),
        }
        .map_err(|e| format!("control plane identity: {e}"))?;
        let verifier = ServerIdentityVerifier::with_roots(Roots::Fixed(roots), expected);
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(CpClient {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let name = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| e.to_string())?,
        };
        let tls = tokio::time::timeout(Duration::from_secs(5), self.tls.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(send)
    }

    async fn get_mesh(&self) -> Result<MeshView, String> {
        let mut slot = self.conn.lock().await;
        let mut send = match slot.take().filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => self.connect().await?,
        };
        let req = http::Request::get(format!("{}/v1/mesh", self.url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        send.ready().await.map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        *slot = Some(send);
        let body = crate::http_util::success_body(resp, "/v1/mesh").await?;
        serde_json::from_slice(&body).map_err(|e| format!("/v1/mesh: {e}"))
    }
}

pub fn rate(r: f64) -> String {
    if r == 0.0 {
        "0/s".into()
    } else if r < 10.0 {
        format!("{r:.2}/s")
    } else {
        format!("{r:.1}/s")
    }
}

pub fn success(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s >= 1.0 => "100%".into(),
        Some(s) => format!("{:.2}%", s * 100.0),
    }
}

pub fn millis(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 1.0 => format!("{v:.2}ms"),
        Some(v) if v < 100.0 => format!("{v:.1}ms"),
        Some(v) => format!("{v:.0}ms"),
    }
}

fn figures(f: &Figures) -> [String; 4] {
    [
        rate(f.rate),
        success(f.success),
        millis(f.p50_ms),
        millis(f.p99_ms),
    ]
}

/// Aligned columns: text left, numbers (a header ending in a space) right.
pub fn table(heads: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = heads.iter().map(|h| h.trim().chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = width[i];
            let pad = w.saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if heads[i].ends_with(' ') {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(heads.iter().map(|h| h.trim()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn mesh_text(v: &MeshView, url: &str) -> String {
    let up = v.proxies.iter().filter(|p| p.connected).count();
    let services: Vec<Vec<String>> = v
        .services
        .iter()
        .map(|s| {
            let mut row = vec![s.service.clone(), s.proxies.to_string()];
            row.extend(figures(&s.calls));
            row
        })
        .collect();
    let routes: Vec<Vec<String>> = v
        .routes
        .iter()
        .map(|r| {
            let mut row = vec![r.route.clone(), r.services.join(",")];
            row.extend(figures(&r.figures));
            row
        })
        .collect();
    format!(
        "{url}: model v{}, {up} of {} proxies connected, last {} s\n\n{}\n\n{}\n",
        v.version,
        v.proxies.len(),
        v.window_seconds,
        table(
            &["SERVICE", "PROXIES ", "RATE ", "SUCCESS ", "P50 ", "P99 "],
            &services
        ),
        table(
            &["ROUTE", "TO", "RATE ", "SUCCESS ", "P50 ", "P99 "],
            &routes
        ),
    )
}

pub fn proxy_text(admin: &str, routes: &[RouteRow], secs: f64) -> String {
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            let mut row = vec![r.listener.clone(), r.route.clone(), r.services.join(",")];
            row.extend(figures(&r.figures));
            row
        })
        .collect();
    format!(
        "proxy {admin}: last {secs:.1} s\n\n{}\n",
        table(
            &[
                "LISTENER", "ROUTE", "TO", "RATE ", "SUCCESS ", "P50 ", "P99 "
            ],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(
            &["NAME", "RATE "],
            &[
                vec!["a".into(), "1.00/s".into()],
                vec!["longer".into(), "12.5/s".into()],
            ],
        );
        assert_eq!(t, "NAME      RATE\na       1.00/s\nlonger  12.5/s");
        assert_eq!(success(Some(0.9)), "90.00%");
        assert_eq!(millis(Some(0.5)), "0.50ms");
    }
}
