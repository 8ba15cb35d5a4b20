//! Metrics registry and names, and log setup.
//!
//! All metric families live in one `Metrics` value created at start-up.
//! Per-route label sets are resolved once per config snapshot
//! (`RouteStats`), never per request, so recording a request is a few
//! atomic adds.

#[cfg(target_os = "linux")]
mod process;
pub mod tap;
pub mod trace;

use parking_lot::RwLock;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};

/// Every metric family Outrigger exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub connections: IntGaugeVec,
    pub connections_total: IntCounterVec,
    pub bad_requests: IntCounterVec,
    pub config_version: IntGauge,
    pub feed_updates: IntCounterVec,
    pub upstream_connect_failures: IntCounterVec,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub cb_rejections: IntCounterVec,
    pub outlier_ejections: IntCounterVec,
    pub endpoints: IntGaugeVec,
    pub rate_limited: IntCounterVec,
    pub faults: IntCounterVec,
    pub tunnels: IntGaugeVec,
    pub limit_rejections: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_handshake_duration: HistogramVec,
    pub upstream_tls_handshakes: IntCounterVec,
    pub cert_expiry: GaugeVec,
    pub cert_rotations: IntCounterVec,
    pub authz_denied: IntCounterVec,
    pub peer_requests: IntCounterVec,
    pub feed_connected: IntGauge,
    pub worker_threads: IntGauge,
    pub cp_connected: IntGauge,
    pub cp_pushes: IntCounterVec,
    pub cp_acks: IntCounterVec,
    pub cp_push_latency: prometheus::Histogram,
    pub cp_certificates: IntCounterVec,
    pub cp_refused: IntCounterVec,
    pub cp_injections: IntCounterVec,
    pub tcp_passthrough: IntCounterVec,
    pub trace_spans_dropped: IntCounterVec,
    pub trace_spans_exported: IntCounter,
    pub trace_context_invalid: IntCounter,
    pub tcp_bytes: IntCounterVec,
    pub cp_model_updates: IntCounterVec,
    pub cp_model_version: IntGauge,
    pub dns_lookups: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "outrigger_requests_total",
            "Requests answered, by route, cluster and status code.",
        ),
        &["listener", "route", "cluster", "code"],
    )?;
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "outrigger_request_duration_seconds",
            "Time from request head received to response head sent.",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["listener", "route", "cluster"],
    )?;
    let connections = IntGaugeVec::new(
        Opts::new("outrigger_connections", "Open downstream connections."),
        &["listener"],
    )?;
    let connections_total = IntCounterVec::new(
        Opts::new(
            "outrigger_connections_total",
            "Downstream connections accepted.",
        ),
        &["listener"],
    )?;
    let bad_requests = IntCounterVec::new(
        Opts::new(
            "outrigger_bad_requests_total",
            "Malformed requests answered with a 4xx by the proxy itself.",
        ),
        &["listener", "reason"],
    )?;
    let config_version = IntGauge::new(
        "outrigger_config_version",
        "Version of the config snapshot in force.",
    )?;
    let feed_updates = IntCounterVec::new(
        Opts::new(
            "outrigger_feed_updates_total",
            "Config updates seen, by result (ack, nack).",
        ),
        &["result"],
    )?;
    let upstream_connect_failures = IntCounterVec::new(
        Opts::new(
            "outrigger_upstream_connect_failures_total",
            "Failed connection attempts to upstream endpoints.",
        ),
        &["cluster"],
    )?;
    let counter =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
    let dns_lookups = counter(
        "outrigger_dns_lookups_total",
        "Lookups of endpoint names, by name (host:port) and result (ok, failure: the last addresses stay).",
        &["name", "result"],
    )?;
    let trace_spans_dropped = counter(
        "outrigger_trace_spans_dropped_total",
        "Spans not exported, by reason (queue-full, export-failed): never a slower request.",
        &["reason"],
    )?;
    let trace_spans_exported = IntCounter::new(
        "outrigger_trace_spans_exported_total",
        "Spans the OTLP collector accepted.",
    )?;
    registry.register(Box::new(trace_spans_exported.clone()))?;
    let trace_context_invalid = IntCounter::new(
        "outrigger_trace_context_invalid_total",
        "Requests with a malformed traceparent or B3 header (a new trace was started).",
    )?;
    registry.register(Box::new(trace_context_invalid.clone()))?;
    let retries = counter(
        "outrigger_retries_total",
        "Retries sent, by route and what was retried.",
        &["route", "reason"],
    )?;
    let retry_budget_exhausted = counter(
        "outrigger_retry_budget_exhausted_total",
        "Retries not sent because the route's retry budget was spent.",
        &["route"],
    )?;
    let timeouts = counter(
        "outrigger_timeouts_total",
        "Timeouts fired, by route and kind (route, per-try).",
        &["route", "kind"],
    )?;
    let cb_rejections = counter(
        "outrigger_circuit_breaker_rejections_total",
        "Requests refused at once by a cluster's circuit breaker, by limit.",
        &["cluster", "limit"],
    )?;
    let outlier_ejections = counter(
        "outrigger_outlier_ejections_total",
        "Endpoints ejected by outlier detection, by reason.",
        &["cluster", "reason"],
    )?;
    let rate_limited = counter(
        "outrigger_rate_limited_total",
        "Requests answered 429 by a local rate limit.",
        &["scope", "name"],
    )?;
    let faults = counter(
        "outrigger_faults_injected_total",
        "Faults injected, by route and kind (abort, delay).",
        &["route", "kind"],
    )?;
    let limit_rejections = counter(
        "outrigger_limit_rejections_total",
        "Connections and requests refused by a listener limit (connections, tunnels, headers).",
        &["listener", "limit"],
    )?;
    let tls_handshakes = counter(
        "outrigger_tls_handshakes_total",
        "TLS handshakes on listeners, by result (ok, untrusted, expired, identity-mismatch, plaintext-refused, timeout, malformed).",
        &["listener", "result"],
    )?;
    let upstream_tls_handshakes = counter(
        "outrigger_upstream_tls_handshakes_total",
        "mTLS handshakes to upstream endpoints, by result.",
        &["cluster", "result"],
    )?;
    let cert_rotations = counter(
        "outrigger_certificate_rotations_total",
        "Certificates installed (ok) or refused (error) after the first.",
        &["result"],
    )?;
    let authz_denied = counter(
        "outrigger_authz_denied_total",
        "Requests authorization denied (or would have, in dry-run), by listener and policy.",
        &["listener", "policy", "mode"],
    )?;
    let peer_requests = counter(
        "outrigger_peer_requests_total",
        "Requests on inbound listeners by verified peer identity.",
        &["listener", "peer"],
    )?;
    let cp_pushes = counter(
        "outrigger_cp_pushes_total",
        "Messages the control plane pushed to proxies, by kind (snapshot, endpoints).",
        &["kind"],
    )?;
    let cp_acks = counter(
        "outrigger_cp_acks_total",
        "Proxies' answers to pushes, by result (ack, nack).",
        &["result"],
    )?;
    let cp_certificates = counter(
        "outrigger_cp_certificates_total",
        "Certificate requests, by result (issued, refused).",
        &["result"],
    )?;
    let cp_refused = counter(
        "outrigger_cp_refused_total",
        "Control-plane API requests refused, by reason (unauthenticated, forbidden, bad-request).",
        &["reason"],
    )?;
    let cp_injections = counter(
        "outrigger_cp_injections_total",
        "Admission reviews the injection webhook answered, by result (injected, skipped, refused, malformed).",
        &["result"],
    )?;
    let tcp_passthrough = counter(
        "outrigger_tcp_passthrough_total",
        "Intercepted connections passed through opaque to their original destination, by reason (tls, server-first, http-unrouted, unknown, closed), or refused as a loop (loop).",
        &["listener", "reason"],
    )?;
    let tcp_bytes = counter(
        "outrigger_tcp_bytes_total",
        "Bytes relayed by opaque passthrough, by direction (sent upstream, received from upstream).",
        &["listener", "direction"],
    )?;
    let cp_model_updates = counter(
        "outrigger_cp_model_updates_total",
        "Mesh model updates, by result (applied, invalid).",
        &["result"],
    )?;
    let cp_push_latency = prometheus::Histogram::with_opts(
        HistogramOpts::new(
            "outrigger_cp_push_latency_seconds",
            "From a model change to a proxy's ack of the config it made.",
        )
        .buckets(vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
    )?;
    registry.register(Box::new(cp_push_latency.clone()))?;
    let feed_connected = IntGauge::new(
        "outrigger_feed_connected",
        "1 while the proxy's feed from the control plane is connected.",
    )?;
    registry.register(Box::new(feed_connected.clone()))?;
    // As Envoy's `server.concurrency`: shows that a CPU limit was honoured.
    let worker_threads = IntGauge::new(
        "outrigger_worker_threads",
        "Worker threads serving traffic (from --threads, else the CPUs the cgroup quota and affinity allow).",
    )?;
    registry.register(Box::new(worker_threads.clone()))?;
    let cp_connected = IntGauge::new(
        "outrigger_cp_connected_proxies",
        "Proxies connected to this control plane's feed.",
    )?;
    registry.register(Box::new(cp_connected.clone()))?;
    let cp_model_version = IntGauge::new(
        "outrigger_cp_model_version",
        "Version of the control plane's model (mesh and registrations).",
    )?;
    registry.register(Box::new(cp_model_version.clone()))?;
    let tls_handshake_duration = HistogramVec::new(
        HistogramOpts::new(
            "outrigger_tls_handshake_duration_seconds",
            "Time from accept to a completed TLS handshake.",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["listener"],
    )?;
    registry.register(Box::new(tls_handshake_duration.clone()))?;
    let cert_expiry = GaugeVec::new(
        Opts::new(
            "outrigger_certificate_expiry_timestamp_seconds",
            "When the proxy's certificate expires (Unix time), by identity.",
        ),
        &["identity"],
    )?;
    registry.register(Box::new(cert_expiry.clone()))?;
    let tunnels = IntGaugeVec::new(
        Opts::new(
            "outrigger_tunnels",
            "Open tunnels (upgraded connections and CONNECT).",
        ),
        &["listener"],
    )?;
    registry.register(Box::new(tunnels.clone()))?;
    let endpoints = IntGaugeVec::new(
        Opts::new(
            "outrigger_endpoints",
            "Endpoints per cluster by state (healthy, ejected, unhealthy).",
        ),
        &["cluster", "state"],
    )?;
    registry.register(Box::new(endpoints.clone()))?;
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(duration.clone()))?;
    registry.register(Box::new(connections.clone()))?;
    registry.register(Box::new(connections_total.clone()))?;
    registry.register(Box::new(bad_requests.clone()))?;
    registry.register(Box::new(config_version.clone()))?;
    registry.register(Box::new(feed_updates.clone()))?;
    registry.register(Box::new(upstream_connect_failures.clone()))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(process::Process::new()?))?;
    Ok(Metrics {
        registry,
        requests,
        duration,
        connections,
        connections_total,
        bad_requests,
        config_version,
        feed_updates,
        upstream_connect_failures,
        retries,
        retry_budget_exhausted,
        timeouts,
        cb_rejections,
        outlier_ejections,
        endpoints,
        rate_limited,
        faults,
        tunnels,
        limit_rejections,
        tls_handshakes,
        tls_handshake_duration,
        upstream_tls_handshakes,
        cert_expiry,
        cert_rotations,
        authz_denied,
        peer_requests,
        feed_connected,
        worker_threads,
        cp_connected,
        cp_pushes,
        cp_acks,
        cp_push_latency,
        cp_certificates,
        cp_refused,
        cp_injections,
        tcp_passthrough,
        trace_spans_dropped,
        trace_spans_exported,
        trace_context_invalid,
        tcp_bytes,
        cp_model_updates,
        cp_model_version,
        dns_lookups,
    })
}

const ACCESS_DIRECTIVE: &str = "outrigger::access=info";

/// One log line in the shape of the others, for events whose fields are
/// structured (a list of errors as a JSON array, not a string inside a
/// string, which `tracing`'s JSON output cannot nest).
pub fn log_json(level: &str, target: &str, message: &str, fields: serde_json::Value) {
    let enabled = match level {
        "WARN" => tracing::enabled!(target: "outrigger", tracing::Level::WARN),
        "ERROR" => tracing::enabled!(target: "outrigger", tracing::Level::ERROR),
        _ => tracing::enabled!(target: "outrigger", tracing::Level::INFO),
    };
    if !enabled {
        return;
    }
    let mut f = match fields {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    f.insert("message".into(), message.into());
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let line =
        serde_json::json!({ "timestamp": ts, "level": level, "fields": f, "target": target });
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// The log levels `--log-level` takes; anything else is refused (an
/// unknown word must not silence every log).
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `--log-level` value: a level, or `RUST_LOG`-style directives
/// (`info,outrigger::proxy=debug`) whose levels are all known.
pub fn check_log_level(level: &str) -> Result<String, String> {
    for part in level.split(',') {
        let lvl = part.rsplit_once('=').map_or(part, |(_, l)| l).trim();
        if !LOG_LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{lvl}` is not a log level: {}",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    Ok(level.to_string())
}

/// The process-wide metrics. Registration of fixed, distinct names cannot fail.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| match build() {
        Ok(m) => m,
        Err(e) => panic!("metric registration is static and cannot conflict: {e}"),
    })
}

/// Renders the registry in the Prometheus text format.
pub fn render() -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    let families = metrics().registry.gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

/// Label set of one (listener, route, cluster), resolved once per snapshot.
pub struct RouteStats {
    listener: String,
    route: String,
    cluster: String,
    pub duration: prometheus::Histogram,
    // Status codes seen so far; a handful per route, so a short scan wins.
    codes: RwLock<Vec<(u16, IntCounter)>>,
}

impl std::fmt::Debug for RouteStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteStats({}, {})", self.route, self.cluster)
    }
}

impl RouteStats {
    pub fn new(listener: &str, route: &str, cluster: &str) -> Arc<Self> {
        let m = metrics();
        Arc::new(RouteStats {
            listener: listener.to_string(),
            route: route.to_string(),
            cluster: cluster.to_string(),
            duration: m.duration.with_label_values(&[listener, route, cluster]),
            codes: RwLock::new(Vec::new()),
        })
    }

    pub fn route(&self) -> &str {
        &self.route
    }
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn record(&self, status: u16, seconds: f64) {
        self.duration.observe(seconds);
        if let Some((_, c)) = self.codes.read().iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let mut codes = self.codes.write();
        if let Some((_, c)) = codes.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let buf = itoa_buf(status);
        let code = std::str::from_utf8(&buf).unwrap_or("000");
        let c = metrics().requests.with_label_values(&[
            &self.listener,
            &self.route,
            &self.cluster,
            code,
        ]);
        c.inc();
        codes.push((status, c));
    }
}

fn itoa_buf(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

/// Installs the JSON log subscriber. `RUST_LOG` wins over `level`.
pub fn init_logs(level: &str) {
    // The access log is its own output: on whatever the diagnostic level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(ACCESS_DIRECTIVE.parse().expect("a fixed, valid directive"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked() {
        assert!(check_log_level("warn").is_ok());
        assert!(check_log_level("info,outrigger::proxy=debug").is_ok());
        let e = check_log_level("verbose").unwrap_err();
        assert!(e.contains("`verbose` is not a log level"), "{e}");
        assert!(check_log_level("info,x=loud").is_err());
    }

    #[test]
    fn route_stats_count_by_code() {
        let s = RouteStats::new("l-test", "r-test", "c-test");
        s.record(200, 0.001);
        s.record(200, 0.002);
        s.record(503, 0.003);
        let c = metrics()
            .requests
            .with_label_values(&["l-test", "r-test", "c-test", "200"])
            .get();
        assert_eq!(c, 2);
        let text = String::from_utf8(render()).unwrap();
        assert!(text.contains(
            "outrigger_requests_total{cluster=\"c-test\",code=\"503\",listener=\"l-test\",route=\"r-test\"} 1"
        ));
        assert!(text.contains("outrigger_request_duration_seconds_bucket"));
    }
}
