//! Config of the resilience policies: timeouts, retries and their budget,
//! circuit breaking, outlier detection, health checks, rate limits, faults.
//! Defaults sit next to each field.

use super::Dur;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response, a reset, a connect failure or a per-try timeout.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504, a reset, a connect failure or a per-try timeout.
    GatewayError,
    /// The upstream reset or closed the connection before a response head.
    Reset,
    /// The connection to the endpoint could not be made.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the request was never processed.
    RefusedStream,
    /// A status listed in `retriable_status_codes`.
    RetriableStatusCodes,
    /// gRPC status 14 in the response head (trailers-only).
    Unavailable,
    /// gRPC status 1.
    Cancelled,
    /// gRPC status 4.
    DeadlineExceeded,
    /// gRPC status 8.
    ResourceExhausted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// What is retried. Written `retry_on`: YAML 1.1 tools (PyYAML, many
    /// linters) read a bare `on` key as the boolean `true`. `on` is still
    /// read, with a deprecation warning.
    #[serde(rename = "retry_on", alias = "on", default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Dur>,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub budget: Budget,
    /// Retry POST, PATCH and other non-idempotent methods too.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Bodies up to this size are kept for replay; a larger one is sent once.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: default_attempts(),
            on: default_retry_on(),
            retriable_status_codes: Vec::new(),
            per_try_timeout: None,
            backoff: Backoff::default(),
            budget: Budget::default(),
            non_idempotent: false,
            max_body_bytes: default_max_body(),
        }
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::GatewayError,
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::RefusedStream,
    ]
}
fn default_max_body() -> usize {
    64 * 1024
}

/// Exponential backoff with full jitter: attempt n waits uniform(0, min(max, base·2ⁿ)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_backoff_base")]
    pub base: Dur,
    #[serde(default = "default_backoff_max")]
    pub max: Dur,
}

fn default_backoff_base() -> Dur {
    Dur::millis(25)
}
fn default_backoff_max() -> Dur {
    Dur::millis(250)
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

/// Retries may add at most `percent` % to the requests of a route, plus
/// `min_per_second` retries each second so that quiet routes can still
/// retry. Always on: no config turns a failing upstream into a storm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default = "default_budget_percent")]
    pub percent: f64,
    #[serde(default = "default_budget_min")]
    pub min_per_second: f64,
}

fn default_budget_percent() -> f64 {
    20.0
}
fn default_budget_min() -> f64 {
    10.0
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            percent: default_budget_percent(),
            min_per_second: default_budget_min(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Upstream connections to the whole cluster.
    #[serde(default = "default_limit")]
    pub max_connections: u32,
    /// Requests waiting for a connection.
    #[serde(default = "default_limit")]
    pub max_pending: u32,
    /// Requests in flight to the cluster, HTTP/1 and HTTP/2 alike.
    #[serde(default = "default_limit")]
    pub max_requests: u32,
    /// Retries in flight to the cluster.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_limit() -> u32 {
    1024
}
fn default_max_retries() -> u32 {
    3
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: default_limit(),
            max_pending: default_limit(),
            max_requests: default_limit(),
            max_retries: default_max_retries(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (0 = off).
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 or connect failures that eject an endpoint.
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_errors: u32,
    /// Consecutive failures to connect that eject an endpoint.
    #[serde(default = "default_consecutive")]
    pub consecutive_local_failures: u32,
    /// How often ejections are reviewed and gauges refreshed.
    #[serde(default = "default_outlier_interval")]
    pub interval: Dur,
    /// An endpoint is ejected for base_ejection × times ejected, up to max_ejection.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    #[serde(default = "default_max_ejection")]
    pub max_ejection: Dur,
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints the cluster ignores ejections
    /// (panic mode) rather than overload the few left.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_outlier_interval() -> Dur {
    Dur::secs(10)
}
fn default_base_ejection() -> Dur {
    Dur::secs(30)
}
fn default_max_ejection() -> Dur {
    Dur::secs(300)
}
fn default_max_ejection_percent() -> u32 {
    10
}
fn default_panic_threshold() -> u32 {
    50
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: default_consecutive(),
            consecutive_gateway_errors: default_consecutive(),
            consecutive_local_failures: default_consecutive(),
            interval: default_outlier_interval(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
            panic_threshold: default_panic_threshold(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: String,
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_hc_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "default_hc_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> Dur {
    Dur::secs(5)
}
fn default_hc_timeout() -> Dur {
    Dur::secs(1)
}
fn default_hc_threshold() -> u32 {
    2
}

/// Token bucket: `requests_per_second` sustained, `burst` at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Also honour `x-outrigger-fault-abort: STATUS` and
    /// `x-outrigger-fault-delay: DURATION` request headers.
    #[serde(default)]
    pub headers: bool,
    /// A header-requested delay is capped at this (the route timeout
    /// bounds it too).
    #[serde(default = "default_max_header_delay")]
    pub max_header_delay: Dur,
}

fn default_max_header_delay() -> Dur {
    Dur::secs(10)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    #[serde(default = "default_abort_status")]
    pub status: u16,
}

fn default_abort_status() -> u16 {
    503
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    pub duration: Dur,
}
