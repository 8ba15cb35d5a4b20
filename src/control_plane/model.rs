//! The mesh model: Kubernetes Services and EndpointSlices, Gateway API
//! HTTPRoutes and GRPCRoutes (the upstream Rust types, so the schema is
//! exactly upstream's), and Outrigger's own policies. Both sources (a
//! directory of YAML, the Kubernetes API) fill the same model.
//!
//! A document that does not parse, or that refers to what is not there,
//! is refused with its file (or object), document number and field; the
//! last good model keeps serving.

use super::kinds::{AuthorizationPolicy, TrafficPolicy};
use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;
use std::fmt;

/// (namespace, name)
pub type Key = (String, String);

#[derive(Clone, Debug, Default)]
pub struct Mesh {
    pub services: BTreeMap<Key, Service>,
    pub slices: BTreeMap<Key, EndpointSlice>,
    pub http_routes: BTreeMap<Key, HttpRoute>,
    pub grpc_routes: BTreeMap<Key, GrpcRoute>,
    pub traffic: BTreeMap<Key, TrafficPolicy>,
    pub authz: BTreeMap<Key, AuthorizationPolicy>,
}

/// One thing wrong with the mesh documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelError {
    /// The file (directory source) or `kind ns/name` (Kubernetes source).
    pub origin: String,
    /// The document's number in its file (1-based), when from a file.
    pub document: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(d) = self.document {
            write!(f, " (document {d})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ModelErrors(pub Vec<ModelError>);

impl fmt::Display for ModelErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A parsed mesh object.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    HttpRoute(Box<HttpRoute>),
    GrpcRoute(Box<GrpcRoute>),
    TrafficPolicy(Box<TrafficPolicy>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::TrafficPolicy(_) => "TrafficPolicy",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
        }
    }

    pub fn key(&self) -> Key {
        match self {
            Object::Service(o) => key_of(&o.metadata),
            Object::EndpointSlice(o) => key_of(&o.metadata),
            Object::HttpRoute(o) => key_of(&o.metadata),
            Object::GrpcRoute(o) => key_of(&o.metadata),
            Object::TrafficPolicy(o) => key_of(&o.metadata),
            Object::AuthorizationPolicy(o) => key_of(&o.metadata),
        }
    }

    /// Parses one YAML document by its `apiVersion` and `kind`; `None` for
    /// an empty document. Errors name the field.
    pub fn from_value(v: serde_yaml::Value) -> Result<Option<Object>, (String, String)> {
        if v.is_null() {
            return Ok(None);
        }
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let api = v
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        fn parse<T: serde::de::DeserializeOwned>(
            v: serde_yaml::Value,
        ) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                (field, e.into_inner().to_string())
            })
        }
        Ok(Some(match (api.as_str(), kind.as_str()) {
            ("v1", "Service") => Object::Service(Box::new(parse(v)?)),
            ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(Box::new(parse(v)?)),
            (a, "HTTPRoute") if a.starts_with("gateway.networking.k8s.io/") => {
                Object::HttpRoute(Box::new(parse(v)?))
            }
            (a, "GRPCRoute") if a.starts_with("gateway.networking.k8s.io/") => {
                Object::GrpcRoute(Box::new(parse(v)?))
            }
            ("outrigger.io/v1alpha1", "TrafficPolicy") => {
                Object::TrafficPolicy(Box::new(parse(v)?))
            }
            ("outrigger.io/v1alpha1", "AuthorizationPolicy") => {
                Object::AuthorizationPolicy(Box::new(parse(v)?))
            }
            ("", _) | (_, "") => {
                return Err((
                    String::new(),
                    "a mesh document needs apiVersion and kind".into(),
                ));
            }
            (a, k) => {
                return Err((
                    "kind".into(),
                    format!(
                        "`{a}` `{k}` is not a mesh kind (Service, EndpointSlice, HTTPRoute, GRPCRoute, TrafficPolicy, AuthorizationPolicy)"
                    ),
                ));
            }
        }))
    }
}

impl Mesh {
    pub fn insert(&mut self, o: Object) {
        let key = o.key();
        match o {
            Object::Service(x) => {
                self.services.insert(key, *x);
            }
            Object::EndpointSlice(x) => {
                self.slices.insert(key, *x);
            }
            Object::HttpRoute(x) => {
                self.http_routes.insert(key, *x);
            }
            Object::GrpcRoute(x) => {
                self.grpc_routes.insert(key, *x);
            }
            Object::TrafficPolicy(x) => {
                self.traffic.insert(key, *x);
            }
            Object::AuthorizationPolicy(x) => {
                self.authz.insert(key, *x);
            }
        }
    }

    pub fn remove(&mut self, kind: &str, key: &Key) {
        match kind {
            "Service" => drop(self.services.remove(key)),
            "EndpointSlice" => drop(self.slices.remove(key)),
            "HTTPRoute" => drop(self.http_routes.remove(key)),
            "GRPCRoute" => drop(self.grpc_routes.remove(key)),
            "TrafficPolicy" => drop(self.traffic.remove(key)),
            "AuthorizationPolicy" => drop(self.authz.remove(key)),
            _ => {}
        }
    }

    /// Parses every document of one file into `self`, collecting errors.
    pub fn load_text(&mut self, origin: &str, text: &str, errors: &mut Vec<ModelError>) {
        use serde::Deserialize;
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let err = |field: String, message: String| ModelError {
                origin: origin.to_string(),
                document: Some(i + 1),
                field,
                message,
            };
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(err(String::new(), e.to_string()));
                    // A syntax error leaves the rest of the stream unreadable.
                    break;
                }
            };
            match Object::from_value(value) {
                Ok(Some(o)) => self.insert(o),
                Ok(None) => {}
                Err((field, message)) => errors.push(err(field, message)),
            }
        }
    }

    /// What refers to what: every route's backends and parents are
    /// Services that exist, policies target Services that exist, and no
    /// redirects go round in a cycle. Errors name the object and field.
    pub fn validate(&self) -> Result<(), ModelErrors> {
        let mut errs = Vec::new();
        let has_service = |ns: &str, name: &str| {
            self.services
                .contains_key(&(ns.to_string(), name.to_string()))
        };
        let obj = |kind: &str, k: &Key| format!("{kind} {}/{}", k.0, k.1);
        for (k, r) in &self.http_routes {
            for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
                for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
                    let ns = b.namespace.as_deref().unwrap_or(&k.0);
                    if b.kind.as_deref().unwrap_or("Service") == "Service"
                        && !has_service(ns, &b.name)
                    {
                        errs.push(ModelError {
                            origin: obj("HTTPRoute", k),
                            document: None,
                            field: format!("spec.rules[{i}].backendRefs[{j}].name"),
                            message: format!("no Service `{ns}/{}`", b.name),
                        });
                    }
                }
                for (j, f) in rule.filters.iter().flatten().enumerate() {
                    if f.request_mirror.is_some()
                        || f.cors.is_some()
                        || f.external_auth.is_some()
                        || f.extension_ref.is_some()
                    {
                        errs.push(ModelError {
                            origin: obj("HTTPRoute", k),
                            document: None,
                            field: format!("spec.rules[{i}].filters[{j}]"),
                            message: "this filter type is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect and URLRewrite are)".into(),
                        });
                    }
                }
            }
            for (j, p) in r.spec.parent_refs.iter().flatten().enumerate() {
                let ns = p.namespace.as_deref().unwrap_or(&k.0);
                if p.kind.as_deref() == Some("Service") && !has_service(ns, &p.name) {
                    errs.push(ModelError {
                        origin: obj("HTTPRoute", k),
                        document: None,
                        field: format!("spec.parentRefs[{j}].name"),
                        message: format!("no Service `{ns}/{}`", p.name),
                    });
                }
            }
        }
        for (k, r) in &self.grpc_routes {
            for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
                for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
                    let ns = b.namespace.as_deref().unwrap_or(&k.0);
                    if !has_service(ns, &b.name) {
                        errs.push(ModelError {
                            origin: obj("GRPCRoute", k),
                            document: None,
                            field: format!("spec.rules[{i}].backendRefs[{j}].name"),
                            message: format!("no Service `{ns}/{}`", b.name),
                        });
                    }
                }
            }
        }
        for (k, p) in &self.traffic {
            if !has_service(&k.0, &p.spec.target_ref.name) {
                errs.push(ModelError {
                    origin: obj("TrafficPolicy", k),
                    document: None,
                    field: "spec.targetRef.name".into(),
                    message: format!("no Service `{}/{}`", k.0, p.spec.target_ref.name),
                });
            }
            if let Some(lb) = &p.spec.load_balancer
                && !["p2c-ewma", "least-request", "round-robin", "random"].contains(&lb.as_str())
            {
                errs.push(ModelError {
                    origin: obj("TrafficPolicy", k),
                    document: None,
                    field: "spec.loadBalancer".into(),
                    message: format!("`{lb}`: p2c-ewma, least-request, round-robin or random"),
                });
            }
        }
        for (k, p) in &self.authz {
            if !has_service(&k.0, &p.spec.target_ref.name) {
                errs.push(ModelError {
                    origin: obj("AuthorizationPolicy", k),
                    document: None,
                    field: "spec.targetRef.name".into(),
                    message: format!("no Service `{}/{}`", k.0, p.spec.target_ref.name),
                });
            }
        }
        if let Some(cycle) = self.redirect_cycle() {
            errs.push(ModelError {
                origin: cycle.0,
                document: None,
                field: "spec.rules[].filters[].requestRedirect.hostname".into(),
                message: format!("redirects go round in a cycle: {}", cycle.1),
            });
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ModelErrors(errs))
        }
    }

    /// Drops every object validation names (`kind ns/name`) until the
    /// rest is valid, returning what was dropped and why. For the
    /// Kubernetes source: one bad object in one namespace must not freeze
    /// the whole mesh's config (as Envoy and Istio ignore one bad resource);
    /// the directory source refuses the whole edit instead.
    pub fn prune_invalid(&mut self) -> Vec<ModelError> {
        let mut dropped = Vec::new();
        // Each round drops at least one object, so this ends.
        while let Err(ModelErrors(errs)) = self.validate() {
            let mut progress = false;
            for e in &errs {
                if let Some((kind, key)) = e.origin.split_once(' ')
                    && let Some((ns, name)) = key.split_once('/')
                {
                    let k = (ns.to_string(), name.to_string());
                    let before = self.len();
                    self.remove(kind, &k);
                    progress |= self.len() < before;
                }
            }
            dropped.extend(errs);
            if !progress {
                break;
            }
        }
        dropped
    }

    fn len(&self) -> usize {
        self.services.len()
            + self.slices.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.traffic.len()
            + self.authz.len()
    }

    /// A cycle of host → host redirects among the HTTPRoutes, if any.
    fn redirect_cycle(&self) -> Option<(String, String)> {
        let mut edges: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (k, r) in &self.http_routes {
            let froms: Vec<String> = r
                .spec
                .hostnames
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(
                    r.spec
                        .parent_refs
                        .iter()
                        .flatten()
                        .filter(|p| p.kind.as_deref() == Some("Service"))
                        .map(|p| format!("{}.{}", p.name, p.namespace.as_deref().unwrap_or(&k.0))),
                )
                .collect();
            for rule in r.spec.rules.iter().flatten() {
                for f in rule.filters.iter().flatten() {
                    if let Some(to) = f
                        .request_redirect
                        .as_ref()
                        .and_then(|rd| rd.hostname.clone())
                    {
                        for from in &froms {
                            edges.insert(
                                from.clone(),
                                (to.clone(), format!("HTTPRoute {}/{}", k.0, k.1)),
                            );
                        }
                    }
                }
            }
        }
        for start in edges.keys() {
            let mut seen = vec![start.clone()];
            let mut at = start.clone();
            while let Some((next, origin)) = edges.get(&at) {
                if next == start {
                    seen.push(next.clone());
                    return Some((origin.clone(), seen.join(" → ")));
                }
                if seen.contains(next) {
                    break;
                }
                seen.push(next.clone());
                at = next.clone();
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: orders, namespace: shop }
spec: { ports: [ { name: http, port: 8080 } ] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: orders-split, namespace: shop }
spec:
  parentRefs: [ { group: "", kind: Service, name: orders } ]
  rules:
    - matches: [ { path: { type: PathPrefix, value: /api } } ]
      backendRefs: [ { name: orders, port: 8080, weight: 90 }, { name: orders-v2, port: 8080, weight: 10 } ]
"#;

    #[test]
    fn documents_parse_with_upstream_types_and_references_are_checked() {
        let mut m = Mesh::default();
        let mut errs = Vec::new();
        m.load_text("mesh/orders.yaml", DOCS, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.http_routes.len(), 1);
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("HTTPRoute shop/orders-split: spec.rules[0].backendRefs[1].name: no Service `shop/orders-v2`"), "{e}");
    }

    #[test]
    fn a_bad_field_names_the_file_the_document_and_the_field() {
        let bad = DOCS.replace("weight: 90", "weight: ninety");
        let mut errs = Vec::new();
        Mesh::default().load_text("mesh/orders.yaml", &bad, &mut errs);
        let e = errs[0].to_string();
        assert!(
            e.starts_with("mesh/orders.yaml (document 2): spec.rules[0].backendRefs[0].weight:"),
            "{e}"
        );
    }

    #[test]
    fn redirect_cycles_are_refused() {
        let docs = r#"
apiVersion: v1
kind: Service
metadata: { name: a, namespace: ns }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r1, namespace: ns }
spec:
  hostnames: [a.example]
  rules: [ { filters: [ { type: RequestRedirect, requestRedirect: { hostname: b.example } } ] } ]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r2, namespace: ns }
spec:
  hostnames: [b.example]
  rules: [ { filters: [ { type: RequestRedirect, requestRedirect: { hostname: a.example } } ] } ]
"#;
        let mut m = Mesh::default();
        let mut errs = Vec::new();
        m.load_text("x.yaml", docs, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("cycle"), "{e}");
    }
}
