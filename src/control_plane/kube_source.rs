//! The Kubernetes API as a model source: kube-runtime watchers on
//! Services, EndpointSlices, HTTPRoutes, GRPCRoutes and the own kinds,
//! across namespaces. Each kind's watcher keeps its objects (initial list,
//! ADDED/MODIFIED/DELETED events, a re-list after `410 Gone`, bookmarks —
//! all handled by kube-runtime); every change publishes the whole model,
//! once every kind has been listed (a half-listed mesh would route to
//! services that merely have not arrived yet). An object that does not
//! validate is left out with its error logged; the rest is published.

use super::kinds::{AuthorizationPolicy, TrafficPolicy};
use super::model::{Mesh, Object};
use super::source::{BoxFuture, Publish, Source};
use futures_util::StreamExt;
use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use std::sync::Arc;
use tokio::sync::mpsc;

/// How many kinds are watched (each must be listed before publishing).
const KINDS: usize = 6;

pub struct KubeSource {
    pub client: Client,
}

/// One change from one watcher.
enum Change {
    Apply(Object),
    Delete(&'static str, (String, String)),
    /// A watcher (re)listed: everything of the kind is replaced.
    Replace(&'static str, Vec<Object>),
}

fn key<K: Resource>(o: &K) -> (String, String) {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// Runs one kind's watcher, sending its changes.
fn watch<K>(
    client: Client,
    kind: &'static str,
    wrap: fn(K) -> Object,
    tx: mpsc::UnboundedSender<Change>,
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let api: Api<K> = Api::all(client);
        // kube-runtime's default backoff between failed lists and watches,
        // so a down API server is not hammered.
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listing: Vec<Object> = Vec::new();
        while let Some(ev) = stream.next().await {
            let change = match ev {
                Ok(Event::Apply(o)) => Some(Change::Apply(wrap(o))),
                Ok(Event::Delete(o)) => Some(Change::Delete(kind, key(&o))),
                Ok(Event::Init) => {
                    listing.clear();
                    None
                }
                Ok(Event::InitApply(o)) => {
                    listing.push(wrap(o));
                    None
                }
                Ok(Event::InitDone) => Some(Change::Replace(kind, std::mem::take(&mut listing))),
                Err(e) => {
                    // kube-runtime retries (with a re-list after 410 Gone).
                    tracing::warn!(kind, error = %e, "kubernetes watch error");
                    None
                }
            };
            if let Some(c) = change
                && tx.send(c).is_err()
            {
                return;
            }
        }
    });
}

impl Source for KubeSource {
    fn run(self: Box<Self>, publish: Publish) -> BoxFuture {
        Box::pin(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let c = self.client.clone();
            watch::<Service>(
                c.clone(),
                "Service",
                |o| Object::Service(Box::new(o)),
                tx.clone(),
            );
            watch::<EndpointSlice>(
                c.clone(),
                "EndpointSlice",
                |o| Object::EndpointSlice(Box::new(o)),
                tx.clone(),
            );
            watch::<HttpRoute>(
                c.clone(),
                "HTTPRoute",
                |o| Object::HttpRoute(Box::new(o)),
                tx.clone(),
            );
            watch::<GrpcRoute>(
                c.clone(),
                "GRPCRoute",
                |o| Object::GrpcRoute(Box::new(o)),
                tx.clone(),
            );
            watch::<TrafficPolicy>(
                c.clone(),
                "TrafficPolicy",
                |o| Object::TrafficPolicy(Box::new(o)),
                tx.clone(),
            );
            watch::<AuthorizationPolicy>(
                c,
                "AuthorizationPolicy",
                |o| Object::AuthorizationPolicy(Box::new(o)),
                tx,
            );
            let mut mesh = Mesh::default();
            let publish = Arc::new(publish);
            let mut listed: std::collections::HashSet<&'static str> = Default::default();
            while let Some(first) = rx.recv().await {
                let apply = |c: Change, mesh: &mut Mesh| match c {
                    Change::Apply(o) => mesh.insert(o),
                    Change::Delete(kind, k) => mesh.remove(kind, &k),
                    Change::Replace(kind, objects) => {
                        let keys: Vec<(String, String)> = match kind {
                            "Service" => mesh.services.keys().cloned().collect(),
                            "EndpointSlice" => mesh.slices.keys().cloned().collect(),
                            "HTTPRoute" => mesh.http_routes.keys().cloned().collect(),
                            "GRPCRoute" => mesh.grpc_routes.keys().cloned().collect(),
                            "TrafficPolicy" => mesh.traffic.keys().cloned().collect(),
                            _ => mesh.authz.keys().cloned().collect(),
                        };
                        for k in keys {
                            mesh.remove(kind, &k);
                        }
                        for o in objects {
                            mesh.insert(o);
                        }
                    }
                };
                let mut note = |c: &Change| {
                    if let Change::Replace(kind, _) = c {
                        listed.insert(kind);
                    }
                };
                note(&first);
                apply(first, &mut mesh);
                // Take whatever else is queued before publishing once.
                while let Ok(c) = rx.try_recv() {
                    note(&c);
                    apply(c, &mut mesh);
                }
                if listed.len() < KINDS {
                    continue;
                }
                let mut candidate = mesh.clone();
                for e in candidate.prune_invalid() {
                    crate::telemetry::metrics()
                        .cp_model_updates
                        .with_label_values(&["invalid"])
                        .inc();
                    tracing::warn!(error = %e, "kubernetes object left out of the mesh model");
                }
                publish(candidate, "kubernetes");
            }
        })
    }
}
