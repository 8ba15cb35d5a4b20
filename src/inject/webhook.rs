//! The mutating admission webhook (`POST /inject`, AdmissionReview v1 over
//! HTTPS), served by the control plane on its own port and certificate:
//! the API server trusts the certificate the chart made for the webhook,
//! not the mesh CA. Same injection code as `outrigger inject`; the answer
//! is a JSONPatch. A pod that cannot be injected is admitted unchanged
//! with a warning (injection must not stop a team's rollout); a malformed
//! review gets an error review, never a crash.

use super::{Outcome, Settings, inject_pod};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Kubernetes objects are at most 1.5 MiB; a review wraps one (twice on
/// updates).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Answers one AdmissionReview body: (HTTP status, review).
pub fn review(body: &[u8], s: &Settings) -> (StatusCode, Value) {
    let m = crate::telemetry::metrics();
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            m.cp_injections.with_label_values(&["malformed"]).inc();
            return (
                StatusCode::BAD_REQUEST,
                error_review("", &format!("not JSON: {e}")),
            );
        }
    };
    let uid = v
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if v.get("kind").and_then(Value::as_str) != Some("AdmissionReview") || uid.is_empty() {
        m.cp_injections.with_label_values(&["malformed"]).inc();
        return (
            StatusCode::BAD_REQUEST,
            error_review(&uid, "not an AdmissionReview with request.uid"),
        );
    }
    let Some(pod) = v.pointer("/request/object").filter(|o| o.is_object()) else {
        m.cp_injections.with_label_values(&["malformed"]).inc();
        return (
            StatusCode::BAD_REQUEST,
            error_review(&uid, "request.object: missing"),
        );
    };
    let kind = v.pointer("/request/kind/kind").and_then(Value::as_str);
    if kind.is_some_and(|k| k != "Pod") {
        return (StatusCode::OK, allowed(&uid, None, None));
    }
    let mut injected = pod.clone();
    match inject_pod(&mut injected, s) {
        Ok(Outcome::Injected) => {
            m.cp_injections.with_label_values(&["injected"]).inc();
            let patch = patch(pod, &injected);
            (StatusCode::OK, allowed(&uid, Some(&patch), None))
        }
        Ok(_) => {
            m.cp_injections.with_label_values(&["skipped"]).inc();
            (StatusCode::OK, allowed(&uid, None, None))
        }
        Err((field, message)) => {
            m.cp_injections.with_label_values(&["refused"]).inc();
            let warning = format!("outrigger: sidecar not injected: {field}: {message}");
            tracing::warn!(%warning, "injection refused");
            (StatusCode::OK, allowed(&uid, None, Some(&warning)))
        }
    }
}

fn allowed(uid: &str, patch: Option<&Value>, warning: Option<&str>) -> Value {
    let mut r = json!({ "uid": uid, "allowed": true });
    if let Some(p) = patch {
        use base64::Engine;
        r["patchType"] = json!("JSONPatch");
        r["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(p.to_string()));
    }
    if let Some(w) = warning {
        r["warnings"] = json!([w]);
    }
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r })
}

fn error_review(uid: &str, message: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": { "uid": uid, "allowed": false,
                      "status": { "code": 400, "message": message } }
    })
}

/// A JSONPatch (RFC 6902) from `before` to `after` for what injection
/// touches: the pod's container lists, volumes and annotations.
pub fn patch(before: &Value, after: &Value) -> Value {
    let mut ops = Vec::new();
    for path in [
        "/spec/initContainers",
        "/spec/containers",
        "/spec/volumes",
        "/metadata/annotations",
    ] {
        let (old, new) = (before.pointer(path), after.pointer(path));
        match (old, new) {
            (_, None) => {}
            (Some(o), Some(n)) if o == n => {}
            (Some(_), Some(n)) => ops.push(json!({ "op": "replace", "path": path, "value": n })),
            (None, Some(n)) => {
                if path.starts_with("/metadata") && before.get("metadata").is_none() {
                    ops.push(json!({ "op": "add", "path": "/metadata", "value": {} }));
                }
                ops.push(json!({ "op": "add", "path": path, "value": n }));
            }
        }
    }
    Value::Array(ops)
}

/// Serves `/inject` (and `/healthz`) on `addr` with the webhook's own
/// certificate and key (PEM files).
pub async fn serve(
    addr: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
    settings: Arc<Settings>,
) -> Result<SocketAddr, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("webhook certificate: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(
            TokioExecutor::new(),
        ));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, builder, settings) =
                (acceptor.clone(), builder.clone(), settings.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let settings = settings.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &settings).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    tracing::info!(address = %bound, "injection webhook listening");
    Ok(bound)
}

async fn handle(req: Request<Incoming>, s: &Settings) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, v: &Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/healthz") => respond(StatusCode::OK, &json!({ "ok": true })),
        (Method::POST, "/inject") => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return respond(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &error_review("", "a review over 4 MiB"),
                    );
                }
            };
            let (status, v) = review(&body, s);
            respond(status, &v)
        }
        _ => respond(StatusCode::NOT_FOUND, &json!({ "error": "POST /inject" })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_of(pod: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "operation": "CREATE",
                "object": pod
            }
        })
        .to_string()
        .into_bytes()
    }

    fn pod() -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "p", "namespace": "shop" },
                "spec": { "containers": [ { "name": "app", "image": "app:1",
                          "ports": [ { "containerPort": 8080 } ] } ] } })
    }

    #[test]
    fn a_pod_gets_a_patch_that_injects_it() {
        let (status, v) = review(&review_of(pod()), &Settings::default());
        assert_eq!(status, StatusCode::OK);
        let r = &v["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        use base64::Engine;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let ops: Value = serde_json::from_slice(&patch).unwrap();
        let paths: Vec<&str> = ops
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers",
                "/spec/volumes",
                "/metadata/annotations"
            ]
        );
    }

    #[test]
    fn malformed_reviews_get_an_error_review() {
        for body in [&b"{ not json"[..], b"{}", b"{\"kind\":\"AdmissionReview\"}"] {
            let (status, v) = review(body, &Settings::default());
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(v["response"]["allowed"], false);
            assert_eq!(v["response"]["status"]["code"], 400);
        }
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_admitted_with_a_warning() {
        let mut p = pod();
        p["spec"]["containers"][0]["name"] = json!("outrigger-proxy");
        let (status, v) = review(&review_of(p), &Settings::default());
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none());
        assert!(
            v["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("spec.containers[0].name")
        );
    }
}
