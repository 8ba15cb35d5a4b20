//! Authorization on inbound listeners: rules allow by the caller's verified
//! identity (exact, or `*` for a path segment), path (exact or prefix),
//! and method. When any policy names a listener, what no rule allows is
//! denied (403, gRPC status 7), counted in
//! `outrigger_authz_denied_total{listener,policy,mode="enforce"}`. A
//! `dry_run` policy denies nothing: it logs and counts what it would deny
//! (`mode="dry-run"`), for rolling a policy out.
//!
//! Outermost layer of the listener's route stacks: a denied request costs
//! no rate-limit token, retry budget or upstream work.

use super::PolicyFuture;
use crate::config::{AllowRule, AuthorizationPolicy};
use crate::error::ProxyError;
use crate::tls::spiffe::{IdPattern, SpiffeId};
use http::{Method, Request};
use prometheus::IntCounter;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The verified identity of the peer a request came from (mTLS), put in
/// the request's extensions by the listener.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Arc<SpiffeId>);

enum PathMatch {
    Exact(String),
    Prefix(String),
}

struct Rule {
    from: Option<Vec<IdPattern>>,
    paths: Vec<PathMatch>,
    methods: Vec<Method>,
}

impl Rule {
    fn compile(r: &AllowRule) -> Rule {
        Rule {
            from: r
                .from
                .as_ref()
                .map(|f| f.iter().filter_map(|p| IdPattern::parse(p).ok()).collect()),
            paths: r
                .paths
                .iter()
                .map(|p| match p.strip_suffix('*') {
                    Some(prefix) => PathMatch::Prefix(prefix.to_string()),
                    None => PathMatch::Exact(p.clone()),
                })
                .collect(),
            methods: r
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
        }
    }

    fn allows(&self, peer: Option<&SpiffeId>, method: &Method, path: &str) -> bool {
        let from = match (&self.from, peer) {
            (None, _) => true,
            (Some(pats), Some(id)) => pats.iter().any(|p| p.matches(id)),
            (Some(_), None) => false,
        };
        from && (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty()
                || self.paths.iter().any(|p| match p {
                    PathMatch::Exact(e) => path == e,
                    PathMatch::Prefix(pre) => path.starts_with(pre.as_str()),
                }))
    }
}

/// The compiled policies of one listener.
pub struct Authz {
    listener: String,
    enforced: Vec<Rule>,
    dry: Vec<Rule>,
    /// Names for the metric label: the first enforcing and the first
    /// dry-run policy (one policy per listener is the common case).
    enforce_name: Option<String>,
    dry_name: Option<String>,
    denied: Option<IntCounter>,
    would_deny: Option<IntCounter>,
}

impl Authz {
    /// The policies that name `listener`, or `None` when none does (then
    /// everything is allowed, as before authorization existed).
    pub fn for_listener(policies: &[AuthorizationPolicy], listener: &str) -> Option<Arc<Authz>> {
        let mine: Vec<&AuthorizationPolicy> =
            policies.iter().filter(|p| p.listener == listener).collect();
        if mine.is_empty() {
            return None;
        }
        let name = |p: &AuthorizationPolicy| {
            if p.name.is_empty() {
                "unnamed".to_string()
            } else {
                p.name.clone()
            }
        };
        let enforce_name = mine.iter().find(|p| !p.dry_run).map(|p| name(p));
        let dry_name = mine.iter().find(|p| p.dry_run).map(|p| name(p));
        let m = crate::telemetry::metrics();
        Some(Arc::new(Authz {
            listener: listener.to_string(),
            enforced: mine
                .iter()
                .filter(|p| !p.dry_run)
                .flat_map(|p| p.allow.iter().map(Rule::compile))
                .collect(),
            dry: mine
                .iter()
                .filter(|p| p.dry_run)
                .flat_map(|p| p.allow.iter().map(Rule::compile))
                .collect(),
            denied: enforce_name
                .as_ref()
                .map(|n| m.authz_denied.with_label_values(&[listener, n, "enforce"])),
            would_deny: dry_name
                .as_ref()
                .map(|n| m.authz_denied.with_label_values(&[listener, n, "dry-run"])),
            enforce_name,
            dry_name,
        }))
    }

    /// Whether the request may proceed; counts and logs denials.
    pub fn check(
        &self,
        peer: Option<&SpiffeId>,
        method: &Method,
        path: &str,
    ) -> Result<(), ProxyError> {
        let allowed_by = |rules: &[Rule]| rules.iter().any(|r| r.allows(peer, method, path));
        let enforced_ok = allowed_by(&self.enforced);
        if let (Some(name), Some(c)) = (&self.dry_name, &self.would_deny)
            && !enforced_ok
            && !allowed_by(&self.dry)
        {
            c.inc();
            tracing::info!(listener = %self.listener, policy = %name, peer = peer.map(SpiffeId::as_str).unwrap_or("-"), %method, path, "authorization would deny (dry run)");
        }
        match (&self.enforce_name, &self.denied) {
            (Some(name), Some(c)) if !enforced_ok => {
                c.inc();
                tracing::info!(listener = %self.listener, policy = %name, peer = peer.map(SpiffeId::as_str).unwrap_or("-"), %method, path, "authorization denied");
                Err(ProxyError::Unauthorized)
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone)]
pub struct AuthzLayer {
    authz: Option<Arc<Authz>>,
}

impl AuthzLayer {
    pub fn new(authz: Option<Arc<Authz>>) -> Self {
        AuthzLayer { authz }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> AuthzService<S> {
        AuthzService {
            inner,
            authz: self.authz.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    authz: Option<Arc<Authz>>,
}

impl<S> AuthzService<S> {
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The same check for what does not go through the stack (a CONNECT tunnel).
    pub fn check(
        &self,
        peer: Option<&SpiffeId>,
        method: &Method,
        path: &str,
    ) -> Result<(), ProxyError> {
        match &self.authz {
            Some(a) => a.check(peer, method, path),
            None => Ok(()),
        }
    }
}

impl<S, B, R> tower::Service<Request<B>> for AuthzService<S>
where
    S: tower::Service<Request<B>, Response = R, Error = ProxyError>,
{
    type Response = R;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future, Result<R, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(a) = &self.authz {
            let peer = req.extensions().get::<PeerIdentity>().map(|p| &*p.0);
            if let Err(e) = a.check(peer, req.method(), req.uri().path()) {
                return PolicyFuture::ready(Err(e));
            }
        }
        PolicyFuture::direct(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Vec<AuthorizationPolicy> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn the_matrix_allows_only_what_a_rule_names() {
        let p = policy(
            r#"
- name: orders
  listener: in
  allow:
    - { from: ["spiffe://td/ns/shop/sa/web"], paths: ["/api/*"], methods: [GET, POST] }
    - { from: ["spiffe://td/ns/*/sa/admin"], paths: ["/admin"] }
    - { paths: ["/healthz"] }
"#,
        );
        let a = Authz::for_listener(&p, "in").unwrap();
        assert!(Authz::for_listener(&p, "other").is_none());
        let web = id("spiffe://td/ns/shop/sa/web");
        let admin = id("spiffe://td/ns/ops/sa/admin");
        let get = Method::GET;
        let delete = Method::DELETE;
        for (peer, method, path, ok) in [
            (Some(&web), &get, "/api/orders", true),
            (Some(&web), &delete, "/api/orders", false),
            (Some(&web), &get, "/other", false),
            (Some(&web), &get, "/admin", false),
            (Some(&admin), &delete, "/admin", true),
            (Some(&admin), &get, "/admin/x", false),
            (None, &get, "/api/orders", false),
            (None, &get, "/healthz", true),
            (Some(&admin), &get, "/healthz", true),
        ] {
            assert_eq!(
                a.check(peer, method, path).is_ok(),
                ok,
                "{peer:?} {method} {path}"
            );
        }
    }

    #[test]
    fn dry_run_counts_and_denies_nothing() {
        let p = policy(
            "- { name: trial, listener: in2, dry_run: true, allow: [ { from: [\"spiffe://td/ns/a/sa/b\"] } ] }",
        );
        let a = Authz::for_listener(&p, "in2").unwrap();
        assert!(a.check(None, &Method::GET, "/").is_ok());
        let c = crate::telemetry::metrics()
            .authz_denied
            .with_label_values(&["in2", "trial", "dry-run"])
            .get();
        assert_eq!(c, 1);
    }
}
