//! The app's own HTTP probes on the probe port (`/app-health/...`): the
//! kubelet's plaintext probe cannot pass the inbound listener's strict
//! mTLS, so injection points the pod's probes here and the proxy asks the
//! app on loopback. Only the paths the config lists are forwarded, to the
//! port and path it names: no open relay to the app.

use crate::config::AppProbe;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Longer than the kubelet's default probe timeout (1 s) waits anyway.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Headers the kubelet sends that the app should see (custom probe
/// headers included); connection-level ones are not forwarded.
fn forwarded(name: &http::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "host" | "connection" | "keep-alive" | "te" | "transfer-encoding" | "upgrade"
    )
}

/// Asks the app; its status is the probe's answer (a connection failure or
/// a timeout is 503).
pub async fn check<B>(probe: &AppProbe, req: &Request<B>) -> Response<Full<Bytes>> {
    let answer = |status: StatusCode, why: &str| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
        *r.status_mut() = status;
        r
    };
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", probe.port))
            .await
            .map_err(|e| format!("app port {}: {e}", probe.port))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut b = Request::get(probe.path.as_str())
            .header(http::header::HOST, format!("127.0.0.1:{}", probe.port));
        for (k, v) in req.headers().iter().filter(|(k, _)| forwarded(k)) {
            b = b.header(k, v);
        }
        let out = b.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = send.send_request(out).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Drain a little of the body so the app sees a complete exchange.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout(TIMEOUT, attempt).await {
        Ok(Ok(status)) => answer(status, "app probe"),
        Ok(Err(e)) => answer(StatusCode::SERVICE_UNAVAILABLE, &e),
        Err(_) => answer(StatusCode::SERVICE_UNAVAILABLE, "app probe timed out"),
    }
}
