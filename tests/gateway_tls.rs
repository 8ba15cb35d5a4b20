//! TLS at the gateway: certificates by SNI for several hosts, unknown
//! names refused (or given the default), a plain-HTTP listener that
//! redirects, HSTS, and mTLS from the gateway into the mesh.

mod support;

use bytes::Bytes;
use outrigger::tls::spiffe::SpiffeId;
use std::sync::Arc;
use std::time::Duration;
use support::pki::{Pki, spiffe};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes a certificate for `hosts` (DNS SANs) and returns (cert, key) paths.
fn host_cert(pki: &Pki, name: &str, hosts: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let id = SpiffeId::parse(&spiffe(name)).unwrap();
    let dns: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let (cert, key) = pki.ca.issue(&id, Duration::from_secs(3600), &dns).unwrap();
    let dir = pki.dir.join(format!("host-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// An HTTPS request to `addr` with SNI `host`, trusting the test CA:
/// (status line, head, the DNS names of the certificate served).
async fn https_get(
    pki: &Pki,
    addr: std::net::SocketAddr,
    host: &str,
    tls12: bool,
) -> std::io::Result<(String, String, Vec<String>)> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = rustls::ClientConfig::builder_with_provider(outrigger::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| dns_names(c))
        .unwrap_or_default();
    tls.write_all(
        format!("GET /x HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    Ok((head.lines().next().unwrap_or("").to_string(), head, served))
}

fn dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push(d.to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_each_host_its_certificate_and_originates_mtls() {
    let pki = Pki::new();
    let (shop_c, shop_k) = host_cert(&pki, "shop", &["shop.example"]);
    let (api_c, api_k) = host_cert(&pki, "api", &["api.example", "*.api.example"]);
    // The service behind the gateway, behind its own sidecar (mTLS).
    let app = Upstream::start("app").await;
    let app_files = pki.workload("shop");
    let sidecar = ProxyProc::start(&format!(
        "{}listeners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {}, tls: strict }} ]\n",
        app_files.identity_yaml(),
        app.addr
    ));
    let gw_files = pki.workload("gateway");
    let yaml = format!(
        "{id}listeners:\n  - name: https\n    role: gateway\n    address: 127.0.0.1:0\n    tls:\n      mode: terminate\n      hsts: max-age=31536000\n      certificates:\n        - {{ hosts: [shop.example], cert: {sc}, key: {sk} }}\n        - {{ hosts: [api.example, \"*.api.example\"], cert: {ac}, key: {ak} }}\n  - {{ name: http, role: gateway, address: 127.0.0.1:0, redirect_https: 8443 }}\nroutes: [ {{ name: shop, backends: [ {{ cluster: shop }} ] }} ]\nclusters: [ {{ name: shop, endpoints: [ {{ address: {side}, identity: \"{sid}\" }} ] }} ]\n",
        id = gw_files.identity_yaml(),
        sc = shop_c.display(),
        sk = shop_k.display(),
        ac = api_c.display(),
        ak = api_k.display(),
        side = sidecar.addr("in"),
        sid = spiffe("shop"),
    );
    let gw = ProxyProc::start(&yaml);
    let https = gw.addr("https");
    let (status, head, served) = https_get(&pki, https, "shop.example", false).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{head}");
    assert_eq!(served, ["shop.example"]);
    assert!(
        head.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    let seen = app.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(
        seen["x-outrigger-peer-identity"],
        spiffe("gateway").as_str(),
        "gateway → mesh is mTLS"
    );

    let (_, _, served) = https_get(&pki, https, "v2.api.example", false)
        .await
        .unwrap();
    assert_eq!(served, ["api.example", "*.api.example"]);
    // TLS 1.2 for outside clients.
    let (status, _, served) = https_get(&pki, https, "api.example", true).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(served[0], "api.example");
    // A name no certificate covers, with no default: refused.
    assert!(
        https_get(&pki, https, "unknown.example", false)
            .await
            .is_err()
    );
    // Plain HTTP → a redirect to HTTPS.
    let c = TestClient::h1(gw.addr("http"));
    let r = send(
        &c,
        "GET",
        "shop.example:8080",
        "/cart?id=1",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example:8443/cart?id=1")
    );
}
