//! A fake Kubernetes API server on loopback speaking the documented
//! list/watch JSON, for the control plane's Kubernetes source (no API
//! server can run here): lists carry the collection's resourceVersion,
//! watches stream ADDED/MODIFIED/DELETED events from the requested
//! version, BOOKMARK events on demand, and an ERROR event with code 410
//! (`Expired`) for a version too old, which forces the client to re-list.
//! Also answers TokenReviews from a table of tokens.

use bytes::Bytes;
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

type Body = BoxBody<Bytes, Infallible>;

/// The collections the control plane watches, by (apiVersion, kind).
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("v1", "Service", "/api/v1/services"),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ),
    (
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ),
    (
        "outrigger.io/v1alpha1",
        "TrafficPolicy",
        "/apis/outrigger.io/v1alpha1/trafficpolicies",
    ),
    (
        "outrigger.io/v1alpha1",
        "AuthorizationPolicy",
        "/apis/outrigger.io/v1alpha1/authorizationpolicies",
    ),
];

fn collection_of(kind: &str) -> &'static str {
    COLLECTIONS
        .iter()
        .find(|c| c.1 == kind)
        .map(|c| c.2)
        .unwrap_or_else(|| panic!("no collection for {kind}"))
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (collection, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Every event so far: (rv, collection, line).
    log: Vec<(u64, &'static str, String)>,
    /// Watches from a version below this get `410 Gone`.
    expired_below: u64,
    watchers: Vec<(&'static str, Sender<Bytes, Infallible>)>,
    lists: HashMap<&'static str, usize>,
    /// (collection, resourceVersion) of every watch request.
    watches: Vec<(&'static str, String)>,
    reviews: usize,
}

#[derive(Clone)]
pub struct FakeKubeApi {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// TokenReview: token → username (`system:serviceaccount:ns:sa`).
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

impl FakeKubeApi {
    pub async fn start() -> FakeKubeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = FakeKubeApi {
            addr: listener.local_addr().unwrap(),
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                ..Default::default()
            })),
            tokens: Arc::default(),
        };
        let a = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let a = a.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let a = a.clone();
                        async move { Ok::<_, Infallible>(a.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [ {{ name: fake, cluster: {{ server: \"http://{}\" }} }} ]\nusers: [ {{ name: cp, user: {{ token: control-plane-token }} }} ]\ncontexts: [ {{ name: fake, context: {{ cluster: fake, user: cp, namespace: outrigger }} }} ]\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
        p
    }

    pub fn allow_token(&self, token: &str, username: &str) {
        self.tokens
            .lock()
            .unwrap()
            .insert(token.into(), username.into());
    }

    /// Creates or replaces an object (YAML or JSON text): ADDED or MODIFIED.
    pub fn apply(&self, text: &str) {
        let mut obj: Value = serde_yaml::from_str(text).unwrap();
        let kind = obj["kind"].as_str().unwrap().to_string();
        let coll = collection_of(&kind);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut g = self.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ty = if g.objects.contains_key(&(coll, ns.clone(), name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        g.objects.insert((coll, ns, name), obj.clone());
        Self::emit(&mut g, coll, json!({ "type": ty, "object": obj }));
    }

    /// Deletes an object: DELETED with its last state.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let coll = collection_of(kind);
        let mut g = self.inner.lock().unwrap();
        let mut obj = g
            .objects
            .remove(&(coll, ns.to_string(), name.to_string()))
            .unwrap();
        g.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        Self::emit(&mut g, coll, json!({ "type": "DELETED", "object": obj }));
    }

    fn emit(g: &mut Inner, coll: &'static str, ev: Value) {
        let line = format!("{ev}\n");
        let rv = g.rv;
        g.log.push((rv, coll, line.clone()));
        g.watchers.retain_mut(|(c, tx)| {
            *c != coll
                || tx
                    .try_send(hyper::body::Frame::data(Bytes::from(line.clone())))
                    .is_ok()
        });
    }

    /// Sends a BOOKMARK at the current version to every open watch.
    pub fn bookmark(&self) -> u64 {
        let mut g = self.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        g.watchers.retain_mut(|(c, tx)| {
            let (api_version, kind, _) = COLLECTIONS.iter().find(|x| x.2 == *c).unwrap();
            let ev = json!({ "type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind,
                "metadata": { "resourceVersion": rv.to_string() } } });
            tx.try_send(hyper::body::Frame::data(Bytes::from(format!("{ev}\n"))))
                .is_ok()
        });
        rv
    }

    /// Ends every open watch cleanly (as the API server does at its timeout).
    pub fn close_watches(&self) {
        self.inner.lock().unwrap().watchers.clear();
    }

    /// Compacts history: every open watch gets `410 Gone`, as does any
    /// watch from a version up to now, so clients must re-list.
    pub fn expire(&self) {
        let mut g = self.inner.lock().unwrap();
        g.expired_below = g.rv + 1;
        for (_, mut tx) in std::mem::take(&mut g.watchers) {
            let _ = tx.try_send(hyper::body::Frame::data(gone()));
        }
    }

    pub fn lists(&self, kind: &str) -> usize {
        let g = self.inner.lock().unwrap();
        g.lists.get(collection_of(kind)).copied().unwrap_or(0)
    }

    /// The resourceVersions watches of `kind` were started from.
    pub fn watches(&self, kind: &str) -> Vec<String> {
        let coll = collection_of(kind);
        let g = self.inner.lock().unwrap();
        g.watches
            .iter()
            .filter(|w| w.0 == coll)
            .map(|w| w.1.clone())
            .collect()
    }

    pub fn open_watches(&self, kind: &str) -> usize {
        let coll = collection_of(kind);
        let g = self.inner.lock().unwrap();
        g.watchers.iter().filter(|w| w.0 == coll).count()
    }

    pub fn reviews(&self) -> usize {
        self.inner.lock().unwrap().reviews
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let q: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let review: Value = serde_json::from_slice(&body).unwrap();
            self.inner.lock().unwrap().reviews += 1;
            let token = review["spec"]["token"].as_str().unwrap_or("");
            let user = self.tokens.lock().unwrap().get(token).cloned();
            let status = match user {
                Some(u) => json!({ "authenticated": true, "user": { "username": u },
                                   "audiences": review["spec"]["audiences"] }),
                None => json!({ "authenticated": false, "error": "invalid bearer token" }),
            };
            let mut out = review;
            out["status"] = status;
            return json_response(201, &out);
        }
        let Some(&(api_version, kind, coll)) = COLLECTIONS.iter().find(|c| c.2 == path) else {
            return json_response(
                404,
                &json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404, "message": path }),
            );
        };
        let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
        let mut g = self.inner.lock().unwrap();
        if !watch {
            *g.lists.entry(coll).or_default() += 1;
            let items: Vec<Value> = g
                .objects
                .iter()
                .filter(|(k, _)| k.0 == coll)
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({ "apiVersion": api_version, "kind": format!("{kind}List"),
                               "metadata": { "resourceVersion": g.rv.to_string() },
                               "items": items });
            return json_response(200, &list);
        }
        let from = q.get("resourceVersion").cloned().unwrap_or_default();
        g.watches.push((coll, from.clone()));
        let from_rv: u64 = from.parse().unwrap_or(0);
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(1024);
        if from_rv < g.expired_below {
            let _ = tx.try_send(hyper::body::Frame::data(gone()));
            drop(tx);
        } else {
            for (rv, c, line) in &g.log {
                if *c == coll && *rv > from_rv {
                    let _ = tx.try_send(hyper::body::Frame::data(Bytes::from(line.clone())));
                }
            }
            g.watchers.push((coll, tx));
        }
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }
}

fn gone() -> Bytes {
    let ev = json!({ "type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410 } });
    Bytes::from(format!("{ev}\n"))
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
