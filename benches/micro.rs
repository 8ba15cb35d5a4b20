//! Microbenchmarks of the hot paths: `cargo bench --bench micro`.
//!
//! Route lookup over 10, 1,000 and 10,000 routes; a balancer pick over 10
//! and 1,000 endpoints; recording a request in the metrics; compiling a
//! 1,000-route config; the header handling of one request.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Request};
use outrigger::balance::Cluster;
use outrigger::config::Config;
use outrigger::proxy::headers;
use outrigger::route::RouteTable;
use outrigger::snapshot::Snapshot;
use outrigger::telemetry::RouteStats;
use std::hint::black_box;

/// `n` routes over `n` hosts, a few path prefixes each, and clusters.
fn config(n: usize) -> Config {
    let mut y =
        String::from("listeners: [ { name: l, role: outbound, address: 127.0.0.1:0 } ]\nroutes:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - {{ name: r{i}, match: {{ host: svc{i}.ns.svc.cluster.local, path_prefix: /api/v{} }}, backends: [ {{ cluster: c{} }} ] }}\n",
            i % 3,
            i % 10
        ));
    }
    y.push_str("  - { name: fallback, match: { path_prefix: / }, backends: [ { cluster: c0 } ] }\nclusters:\n");
    for c in 0..10 {
        y.push_str(&format!(
            "  - {{ name: c{c}, endpoints: [ {{ address: 127.0.0.1:{} }} ] }}\n",
            20000 + c
        ));
    }
    Config::from_yaml(&y).expect("bench config is valid")
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    let headers = HeaderMap::new();
    for n in [10, 1_000, 10_000] {
        let cfg = config(n);
        let table = RouteTable::compile(&cfg.routes).expect("compiles");
        let host = format!("svc{}.ns.svc.cluster.local:8080", n / 2);
        let path = format!("/api/v{}/orders/42", (n / 2) % 3);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| table.lookup(black_box(&host), &Method::GET, black_box(&path), &headers))
        });
    }
    g.finish();
}

fn balancer_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("user-1234"));
    for lb in ["p2c-ewma", "round-robin", "ring-hash", "p2c-ewma+outlier"] {
        for n in [10, 1_000] {
            let mut y = format!(
                "listeners: [ {{ name: l, role: outbound, address: 127.0.0.1:0 }} ]\nclusters:\n  - name: c\n    lb: {}\n",
                lb.trim_end_matches("+outlier")
            );
            if lb.ends_with("+outlier") {
                // Outlier detection on, nothing ejected: the pick must stay O(1).
                y.push_str("    outlier_detection: { consecutive_5xx: 5 }\n");
            }
            if lb == "ring-hash" {
                y.push_str("    hash_on: { header: x-user }\n");
            }
            y.push_str("    endpoints:\n");
            for i in 0..n {
                y.push_str(&format!(
                    "      - {{ address: 127.0.{}.{}:8080 }}\n",
                    i / 250,
                    i % 250 + 1
                ));
            }
            let cfg = Config::from_yaml(&y).expect("valid");
            let cluster = Cluster::new(&cfg.clusters[0]);
            g.bench_with_input(BenchmarkId::new(lb, n), &n, |b, _| {
                b.iter(|| cluster.pick(black_box(&h), None))
            });
        }
    }
    g.finish();
}

fn metrics_record(c: &mut Criterion) {
    let stats = RouteStats::new("bench", "route", "cluster");
    c.bench_function("metrics_record", |b| {
        b.iter(|| stats.record(black_box(200), black_box(0.00042)))
    });
}

fn compile_config(c: &mut Criterion) {
    let cfg = config(1_000);
    c.bench_function("compile_1000_routes", |b| {
        b.iter(|| Snapshot::build(black_box(cfg.clone()), 1, None).expect("builds"))
    });
}

fn header_handling(c: &mut Criterion) {
    let mut req = Request::builder()
        .method("GET")
        .uri("/api/v1/orders/42?x=1")
        .header("host", "orders.default.svc:8080")
        .header("user-agent", "curl/8.0")
        .header("accept", "*/*")
        .header("connection", "keep-alive")
        .body(())
        .expect("request");
    let template = req.headers().clone();
    c.bench_function("request_headers", |b| {
        b.iter(|| {
            *req.headers_mut() = template.clone();
            headers::strip_hop_by_hop(req.headers_mut(), false);
            headers::ensure_request_id(req.headers_mut());
            outrigger::http_util::to_http1(&mut req);
            black_box(req.headers().len())
        })
    });
}

criterion_group!(
    benches,
    route_lookup,
    balancer_pick,
    metrics_record,
    compile_config,
    header_handling
);
criterion_main!(benches);
