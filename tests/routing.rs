//! Routing by host, path, header, method and weight, and each load
//! balancing policy's distribution, through a real proxy.

mod support;

/// method, host, path, headers, expected upstream (None → 404)
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    Option<&'a str>,
);

use bytes::Bytes;
use std::collections::HashMap;
use support::*;

async fn upstreams(names: &[&str]) -> Vec<Upstream> {
    let mut v = Vec::new();
    for n in names {
        v.push(Upstream::start(n).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_header_and_method() {
    let u = upstreams(&[
        "exact", "wild", "prefix", "regex", "header", "post", "default",
    ])
    .await;
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes:
  - {{ name: exact, match: {{ host: api.svc, path: /v1/ping }}, backends: [ {{ cluster: exact }} ] }}
  - {{ name: header, match: {{ host: api.svc, headers: [ {{ name: x-canary, exact: "yes" }} ] }}, backends: [ {{ cluster: header }} ] }}
  - {{ name: regex, match: {{ host: api.svc, path_regex: "/users/[0-9]+" }}, backends: [ {{ cluster: regex }} ] }}
  - {{ name: post, match: {{ host: api.svc, methods: [POST] }}, backends: [ {{ cluster: post }} ] }}
  - {{ name: prefix, match: {{ host: api.svc, path_prefix: /v1/ }}, backends: [ {{ cluster: prefix }} ] }}
  - {{ name: wild, match: {{ host: "*.example.com" }}, backends: [ {{ cluster: wild }} ] }}
  - {{ name: default, match: {{ path_prefix: /public }}, backends: [ {{ cluster: default }} ] }}
clusters:
  - {{ name: exact, endpoints: [ {{ address: {} }} ] }}
  - {{ name: wild, endpoints: [ {{ address: {} }} ] }}
  - {{ name: prefix, endpoints: [ {{ address: {} }} ] }}
  - {{ name: regex, endpoints: [ {{ address: {} }} ] }}
  - {{ name: header, endpoints: [ {{ address: {} }} ] }}
  - {{ name: post, endpoints: [ {{ address: {} }} ] }}
  - {{ name: default, endpoints: [ {{ address: {} }} ] }}
"#,
        u[0].addr, u[1].addr, u[2].addr, u[3].addr, u[4].addr, u[5].addr, u[6].addr
    );
    let p = ProxyProc::start(&yaml);
    for c in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        let cases: &[Case] = &[
            ("GET", "api.svc", "/v1/ping", &[], Some("exact")),
            ("GET", "api.svc:8080", "/v1/ping", &[], Some("exact")),
            ("GET", "API.SVC", "/v1/other", &[], Some("prefix")),
            (
                "GET",
                "api.svc",
                "/v1/ping",
                &[("x-canary", "yes")],
                Some("exact"),
            ),
            (
                "GET",
                "api.svc",
                "/v1/other",
                &[("x-canary", "yes")],
                Some("header"),
            ),
            ("GET", "api.svc", "/users/42", &[], Some("regex")),
            ("GET", "api.svc", "/users/42/x", &[], None),
            ("POST", "api.svc", "/anything", &[], Some("post")),
            ("GET", "shop.example.com", "/", &[], Some("wild")),
            ("GET", "a.b.example.com", "/", &[], Some("wild")),
            ("GET", "example.com", "/", &[], None),
            ("GET", "example.com", "/public/x", &[], Some("default")),
            ("GET", "api.svc", "/public/x", &[], Some("default")),
        ];
        for (method, host, path, headers, want) in cases {
            let r = send(&c, method, host, path, headers, Bytes::new()).await;
            match want {
                Some(name) => {
                    assert_eq!(r.status, 200, "{method} {host}{path}");
                    assert_eq!(r.text(), *name, "{method} {host}{path} {headers:?}");
                }
                None => {
                    assert_eq!(r.status, 404, "{method} {host}{path}");
                    assert_eq!(r.header("x-outrigger-reason"), Some("no-route"));
                }
            }
        }
    }
}

async fn distribution(
    p: &ProxyProc,
    host: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    let c = TestClient::h1(p.addr("out"));
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = send(&c, "GET", host, "/", headers, Bytes::new()).await;
        assert_eq!(r.status, 200);
        *counts.entry(r.text()).or_insert(0) += 1;
    }
    counts
}

fn cluster_yaml(name: &str, lb: &str, extra: &str, ups: &[Upstream]) -> String {
    let eps: Vec<String> = ups
        .iter()
        .map(|u| format!("{{ address: {} }}", u.addr))
        .collect();
    format!(
        "  - {{ name: {name}, lb: {lb}{extra}, endpoints: [ {} ] }}\n",
        eps.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_traffic_within_tolerance() {
    let u = upstreams(&["v1", "v2"]).await;
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n  - {{ name: split, backends: [ {{ cluster: v1, weight: 80 }}, {{ cluster: v2, weight: 20 }} ] }}\nclusters:\n{}{}",
        cluster_yaml("v1", "round-robin", "", &u[..1]),
        cluster_yaml("v2", "round-robin", "", &u[1..]),
    );
    let p = ProxyProc::start(&yaml);
    let n = 2000;
    let d = distribution(&p, "svc", n, &[]).await;
    let v2 = d.get("v2").copied().unwrap_or(0) as f64 / n as f64;
    // 20 % ± 4 points: about 4.5 standard deviations at n = 2000.
    assert!((0.16..=0.24).contains(&v2), "v2 share {v2} of {d:?}");
    assert_eq!(d.values().sum::<usize>(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lb_policy_distributes_as_it_should() {
    let u = upstreams(&["a", "b", "c"]).await;
    let mut clusters = String::new();
    let mut routes = String::new();
    for lb in ["round-robin", "random", "least-request", "p2c-ewma"] {
        clusters.push_str(&cluster_yaml(lb, lb, "", &u));
        routes.push_str(&format!(
            "  - {{ name: {lb}, match: {{ host: {lb} }}, backends: [ {{ cluster: {lb} }} ] }}\n"
        ));
    }
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n{routes}clusters:\n{clusters}"
    );
    let p = ProxyProc::start(&yaml);

    let rr = distribution(&p, "round-robin", 300, &[]).await;
    assert!(rr.values().all(|&c| c == 100), "round-robin: {rr:?}");

    let random = distribution(&p, "random", 900, &[]).await;
    assert_eq!(random.len(), 3, "{random:?}");
    assert!(
        random.values().all(|&c| (200..=400).contains(&c)),
        "random: {random:?}"
    );

    // Sequential requests leave every endpoint at 0 in flight: least-request
    // spreads them like random.
    let lr = distribution(&p, "least-request", 600, &[]).await;
    assert_eq!(lr.len(), 3, "{lr:?}");
    assert!(lr.values().all(|&c| c >= 120), "least-request: {lr:?}");
    // p2c-ewma prefers whichever measured fastest, but an unmeasured endpoint
    // is tried first, so none is starved before it was measured.
    let ewma = distribution(&p, "p2c-ewma", 600, &[]).await;
    assert_eq!(ewma.len(), 3, "p2c-ewma: {ewma:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_and_least_request_steer_away_from_a_slow_endpoint() {
    let fast1 = Upstream::start("fast1").await;
    let fast2 = Upstream::start("fast2").await;
    let slow = Upstream::with(
        "slow",
        UpstreamOpts {
            delay: Some(std::time::Duration::from_millis(50)),
            status: None,
            ..Default::default()
        },
    )
    .await;
    let ups = [fast1, fast2, slow];
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n  - {{ name: e, match: {{ host: ewma }}, backends: [ {{ cluster: ewma }} ] }}\n  - {{ name: l, match: {{ host: lr }}, backends: [ {{ cluster: lr }} ] }}\nclusters:\n{}{}",
        cluster_yaml("ewma", "p2c-ewma", "", &ups),
        cluster_yaml("lr", "least-request", "", &ups),
    );
    let p = ProxyProc::start(&yaml);
    for host in ["ewma", "lr"] {
        // 8 concurrent callers: the slow endpoint holds requests in flight
        // longer (least-request) and measures slower (ewma).
        let before = ups[2].hits();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let addr = p.addr("out");
            tasks.push(tokio::spawn(async move {
                let c = TestClient::h1(addr);
                for _ in 0..25 {
                    assert_eq!(get(&c, host, "/").await.status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let slow_share = (ups[2].hits() - before) as f64 / 200.0;
        // Even spreading would give the slow endpoint a third.
        assert!(slow_share < 0.2, "{host}: slow endpoint got {slow_share}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_is_sticky_per_key_and_spreads_keys() {
    let u = upstreams(&["a", "b", "c"]).await;
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n  - {{ name: h, match: {{ host: h }}, backends: [ {{ cluster: h }} ] }}\n  - {{ name: k, match: {{ host: k }}, backends: [ {{ cluster: k }} ] }}\nclusters:\n{}{}",
        cluster_yaml("h", "ring-hash", ", hash_on: { header: x-user }", &u),
        cluster_yaml("k", "ring-hash", ", hash_on: { cookie: session }", &u),
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));
    let mut owners: HashMap<String, usize> = HashMap::new();
    for user in 0..60 {
        let key = format!("user-{user}");
        let first = send(&c, "GET", "h", "/", &[("x-user", &key)], Bytes::new())
            .await
            .text();
        for _ in 0..5 {
            assert_eq!(
                send(&c, "GET", "h", "/", &[("x-user", &key)], Bytes::new())
                    .await
                    .text(),
                first,
                "{key} moved"
            );
        }
        let cookie = format!("theme=dark; session={key}");
        let by_cookie = send(&c, "GET", "k", "/", &[("cookie", &cookie)], Bytes::new())
            .await
            .text();
        for _ in 0..3 {
            assert_eq!(
                send(&c, "GET", "k", "/", &[("cookie", &cookie)], Bytes::new())
                    .await
                    .text(),
                by_cookie
            );
        }
        *owners.entry(first).or_default() += 1;
    }
    assert_eq!(
        owners.len(),
        3,
        "60 keys should land on all 3 endpoints: {owners:?}"
    );
}

/// A route that sets `x-request-id` itself: the access log names the id
/// the upstream got, not the one the proxy made before the edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_set_by_a_route_is_the_one_logged() {
    let ups = upstreams(&["app"]).await;
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ], request_headers: {{ set: [ {{ name: x-request-id, value: route-made-id }} ] }} }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: {} }} ] }} ]\n",
        ups[0].addr
    ));
    let r = get(&TestClient::h1(p.addr("out")), "app", "/id").await;
    assert_eq!(r.status, 200);
    assert_eq!(ups[0].last().headers["x-request-id"], "route-made-id");
    let line = p.wait_log(|l| l.contains("\"message\":\"access\"") && l.contains("/id"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["request_id"], "route-made-id", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_lists_header_edits_rewrites_and_redirects() {
    let ups = upstreams(&["orders"]).await;
    let yaml = format!(
        r#"
listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]
routes:
  - name: old
    match: {{ host: [orders, orders.shop, orders.shop.svc.cluster.local], path_prefix: /v1/ }}
    redirect: {{ scheme: https, path_prefix: /v2/, status: 301 }}
  - name: api
    match: {{ host: [orders, orders.shop, orders.shop.svc.cluster.local], path_prefix: /api/ }}
    backends: [ {{ cluster: orders }} ]
    rewrite: {{ path_prefix: /internal/, host: orders-backend }}
    request_headers: {{ set: [ {{ name: x-tenant, value: shop }} ], add: [ {{ name: x-via, value: outrigger }} ], remove: [ x-debug ] }}
    response_headers: {{ set: [ {{ name: cache-control, value: no-store }} ], remove: [ x-upstream ] }}
clusters: [ {{ name: orders, endpoints: [ {{ address: {} }} ] }} ]
"#,
        ups[0].addr
    );
    let p = ProxyProc::start(&yaml);
    for client in [TestClient::h1(p.addr("out")), TestClient::h2(p.addr("out"))] {
        // Every name of the service, short and long, reaches the route.
        for host in ["orders", "orders.shop", "orders.shop.svc.cluster.local"] {
            let r = send(
                &client,
                "GET",
                host,
                "/api/items?x=1",
                &[("x-tenant", "spoofed"), ("x-debug", "1")],
                Bytes::new(),
            )
            .await;
            assert_eq!(r.status, 200, "{host}");
            assert_eq!(r.header("cache-control"), Some("no-store"));
            assert_eq!(r.header("x-upstream"), None);
            let seen = ups[0].last();
            assert_eq!(seen.path, "/internal/items");
            assert_eq!(seen.headers["x-tenant"], "shop");
            assert_eq!(seen.headers["x-via"], "outrigger");
            assert!(seen.headers.get("x-debug").is_none());
            if seen.version == http::Version::HTTP_11 {
                assert_eq!(seen.headers["host"], "orders-backend");
            }
        }
        let r = get(&client, "orders.shop", "/v1/items?page=2").await;
        assert_eq!(r.status, 301);
        assert_eq!(
            r.header("location"),
            Some("https://orders.shop/v2/items?page=2")
        );
    }
    assert_eq!(ups[0].hits(), 6, "a redirect reached the upstream");
}
