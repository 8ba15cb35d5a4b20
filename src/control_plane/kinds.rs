//! Outrigger's own kinds (`outrigger.io/v1alpha1`), for what Gateway API
//! lacks: a traffic policy per service (load balancing, circuit breaking,
//! outlier detection, retry budget, rate limit) and an authorization
//! policy (who may call which paths of a service). CustomResourceDefinitions
//! are generated from these types (`outrigger control-plane --print-crds`),
//! so the schema in the chart is the one the code reads.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Service a policy applies to (GAMMA style).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// `Service` (the only kind today).
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
}

fn service_kind() -> String {
    "Service".into()
}

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "outrigger.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: TargetRef,
    /// `p2c-ewma` (default), `least-request`, `round-robin`, `random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    /// A duration such as `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Retries may add this share (%) of the route's requests.
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "outrigger.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub target_ref: TargetRef,
    /// Log and count would-be denials, deny nothing.
    #[serde(default)]
    pub dry_run: bool,
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// SPIFFE IDs (`*` for one path segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<String>>,
    /// `namespace/serviceaccount`, shorthand for their SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<Vec<String>>,
    /// Exact paths or prefixes ending in `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
}

/// The CustomResourceDefinitions of the own kinds, as YAML documents.
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [TrafficPolicy::crd(), AuthorizationPolicy::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_charts_crds_are_the_generated_ones() {
        assert_eq!(
            super::crds_yaml(),
            include_str!("../../charts/outrigger/crds/outrigger.io.yaml"),
            "regenerate: outrigger control-plane --print-crds > charts/outrigger/crds/outrigger.io.yaml"
        );
    }
}
