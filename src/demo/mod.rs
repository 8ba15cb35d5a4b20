//! `outrigger demo`: a small local mesh on loopback on the embedded config
//! (`config/demo.yaml`): demo apps and one proxy with an outbound, an
//! inbound and a gateway listener in front of them; and (`mesh`) a control
//! plane on a folder of mesh documents feeding three more sidecars.

mod mesh;

use crate::config::Config;
use crate::run::{self, Options};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::fmt::Write;
use std::net::SocketAddr;
use tokio::net::TcpListener;

pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded demo config is invalid: {0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("demo app {name} cannot bind {addr}: {source} (is another demo running?)")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error("demo certificates: {0}")]
    Ca(#[from] crate::tls::ca::CaError),
    #[error("demo mesh: {0}")]
    Mesh(String),
}

/// A fresh CA and the demo proxy's certificate where the config says.
fn make_identity(config: &Config) -> Result<(), DemoError> {
    let Some(files) = config
        .identity
        .as_ref()
        .and_then(|i| i.source.files.as_ref())
    else {
        return Ok(());
    };
    let id = crate::tls::spiffe::SpiffeId::parse(DEMO_IDENTITY)
        .map_err(|e| crate::tls::ca::CaError::CsrKey(e.to_string()))?;
    let (ca, _) = crate::tls::ca::Ca::generate("outrigger.demo")?;
    let (cert, key) = ca.issue(&id, std::time::Duration::from_secs(86400), &[])?;
    let dir = files.cert.parent().unwrap_or(std::path::Path::new("."));
    crate::tls::ca::private_dir(dir)?;
    // Every file created anew, owner-only: nothing planted in /tmp is followed.
    crate::tls::ca::write_private(&files.key, &key)?;
    crate::tls::ca::write_private(&files.cert, &cert)?;
    crate::tls::ca::write_private(&files.roots, &ca.cert_pem)?;
    Ok(())
}

const DEMO_IDENTITY: &str = "spiffe://outrigger.demo/ns/default/sa/demo";

const APPS: [(&str, u16); 5] = [
    ("hello-1", 18081),
    ("hello-2", 18082),
    ("echo", 18083),
    ("flaky", 18084),
    ("slow", 18085),
];

pub async fn run(opts: &Options, log_level: &str) -> Result<(), DemoError> {
    let config = Config::from_yaml(DEMO_CONFIG)?;
    make_identity(&config)?;
    for (name, port) in APPS.into_iter().chain(mesh::APPS) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| DemoError::Bind { name, addr, source })?;
        tokio::spawn(serve_app(l, name));
    }
    // Not println!: a closed stdout (a pipe to `head`) must not kill the demo.
    let _mesh = mesh::start(log_level)?;
    let _ = std::io::Write::write_all(&mut std::io::stdout(), banner().as_bytes());
    run::serve(config, None, opts).await?;
    Ok(())
}

pub fn banner() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nOutrigger demo: apps hello-1 :18081, hello-2 :18082, echo :18083, flaky :18084 and slow :18085 behind one proxy\n(outbound 127.0.0.1:15001, inbound 127.0.0.1:15006 with mTLS, gateway 127.0.0.1:18080),\nidentity {DEMO_IDENTITY} (CA and certificate in /tmp/outrigger-demo).\n"
    );
    let _ = writeln!(s, "Try:");
    for (what, cmd) in [
        (
            "outbound, balanced over two replicas",
            "curl -s -H 'host: hello.demo' http://127.0.0.1:15001/",
        ),
        (
            "outbound, HTTP/2 (prior knowledge)",
            "curl -s --http2-prior-knowledge -H 'host: hello.demo' http://127.0.0.1:15001/",
        ),
        (
            "outbound, 90/10 split",
            "for i in $(seq 20); do curl -s -H 'host: echo.demo' http://127.0.0.1:15001/ | head -1; done | sort | uniq -c",
        ),
        (
            "outbound, header route (canary)",
            "curl -s -H 'host: echo.demo' -H 'x-canary: 1' http://127.0.0.1:15001/",
        ),
        (
            "mTLS: outbound → the echo app's sidecar (inbound, strict mTLS); the app sees the caller's SPIFFE ID",
            "curl -s -H 'host: secure.demo' http://127.0.0.1:15001/public/hello | grep -i -e echo: -e x-outrigger-peer-identity",
        ),
        (
            "mTLS + authorization: a path no rule allows → 403, reason `unauthorized`",
            "curl -si -H 'host: secure.demo' http://127.0.0.1:15001/private | grep -i -e '^HTTP' -e x-outrigger-reason",
        ),
        (
            "the inbound listener refuses plaintext",
            "curl -s http://127.0.0.1:15006/ || echo 'refused: plaintext on an mTLS listener'",
        ),
        (
            "gateway, path routing + x-forwarded-for",
            "curl -s http://127.0.0.1:18080/echo/path",
        ),
        (
            "gateway, the other path",
            "curl -s http://127.0.0.1:18080/hello",
        ),
        (
            "retries hide the flaky app (1 request in 3 fails): every answer 200, see x-outrigger-attempts",
            "for i in $(seq 6); do curl -s -o /dev/null -w '%{http_code} ' -H 'host: flaky.demo' http://127.0.0.1:15001/; done; echo",
        ),
        (
            "a 2 s app behind a 500 ms route timeout → 504, reason header `timeout`",
            "curl -si -H 'host: slow.demo' http://127.0.0.1:15001/",
        ),
        (
            "a dead endpoint beside a live one: retried elsewhere, then ejected (see /clusters)",
            "for i in $(seq 6); do curl -s -H 'host: mixed.demo' http://127.0.0.1:15001/ | head -1; done",
        ),
        (
            "fault injection: half the requests aborted with 503",
            "for i in $(seq 10); do curl -s -o /dev/null -w '%{http_code} ' -H 'host: chaos.demo' http://127.0.0.1:15001/; done; echo",
        ),
        (
            "fault injection asked for by a header",
            "curl -si -H 'host: chaos.demo' -H 'x-outrigger-fault-abort: 418' http://127.0.0.1:15001/",
        ),
        (
            "no route → 404 with a reason header",
            "curl -si -H 'host: nowhere' http://127.0.0.1:15001/",
        ),
    ] {
        let _ = writeln!(s, "  # {what}\n  {cmd}\n");
    }
    let _ = writeln!(
        s,
        "The mesh half: a control plane ({cp}) on the documents in {dir}/mesh feeds three sidecars;\nthe web sidecar's outbound ({out}) reaches reviews-v1 / reviews-v2 through their sidecars over mTLS.\n",
        cp = mesh::CONTROL_PLANE,
        dir = mesh::DIR,
        out = mesh::WEB_OUTBOUND,
    );
    let token = format!("{}/mesh-state/web.token", mesh::DIR);
    for (what, cmd) in [
        (
            "the route sends everything to reviews-v1",
            format!(
                "curl -s -H 'host: reviews' http://127.0.0.1:{}/",
                mesh::WEB_OUTBOUND
            ),
        ),
        (
            "edit the route live: swap the weights (or open the file in an editor and save)",
            format!(
                "sed -i -e 's/weight: 100/weight: 0/' -e t -e 's/weight: 0/weight: 100/' {}",
                mesh::ROUTE_FILE
            ),
        ),
        (
            "within a second, reviews-v2 answers",
            format!(
                "for i in $(seq 4); do curl -s -H 'host: reviews' http://127.0.0.1:{}/; done",
                mesh::WEB_OUTBOUND
            ),
        ),
        (
            "every proxy the control plane feeds, with the version each acked",
            format!(
                "curl -sk -H \"authorization: Bearer $(cat {token})\" https://{}/v1/nodes",
                mesh::CONTROL_PLANE
            ),
        ),
    ] {
        let _ = writeln!(s, "  # {what}\n  {cmd}\n");
    }
    let _ = writeln!(s, "Look at:");
    let _ = writeln!(
        s,
        "  curl -s http://127.0.0.1:15020/metrics | grep outrigger_requests_total"
    );
    let _ = writeln!(s, "  curl -s http://127.0.0.1:15000/clusters");
    let _ = writeln!(s, "  curl -s http://127.0.0.1:15000/config");
    let _ = writeln!(s, "  curl -s http://127.0.0.1:15020/ready");
    let _ = writeln!(
        s,
        "\nStop with Ctrl-C (or: curl -X POST http://127.0.0.1:15000/shutdown)."
    );
    s
}

async fn serve_app(l: TcpListener, name: &'static str) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, std::convert::Infallible>(app(name, req).await)
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn app(name: &'static str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    static FLAKY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    match name {
        "flaky"
            if FLAKY
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(3) =>
        {
            let mut r = Response::new(Full::new(Bytes::from_static(b"flaky: failed\n")));
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return r;
        }
        "slow" => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
        _ => {}
    }
    let mut body = format!(
        "{name}: {} {} {:?}\n",
        req.method(),
        req.uri(),
        req.version()
    );
    if name == "echo" {
        for (k, v) in req.headers() {
            let _ = writeln!(body, "  {k}: {}", String::from_utf8_lossy(v.as_bytes()));
        }
    }
    Response::new(Full::new(Bytes::from(body)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_config_is_valid() {
        super::Config::from_yaml(super::DEMO_CONFIG).unwrap();
    }

    #[test]
    fn the_banner_shows_every_route_of_the_demo() {
        let config = super::Config::from_yaml(super::DEMO_CONFIG).unwrap();
        let banner = super::banner();
        for r in &config.routes {
            let shown = match &r.matches.host {
                Some(h) => h
                    .list()
                    .iter()
                    .any(|h| banner.contains(&format!("host: {h}"))),
                None => r
                    .matches
                    .path_prefix
                    .as_ref()
                    .is_some_and(|p| banner.contains(&format!("18080{p}"))),
            };
            assert!(shown, "route {} is not in the banner", r.name);
        }
    }
}
