//! Resilience policies against real misbehaving upstreams: flaky, slow,
//! dead, refusing; and against slow clients.

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::*;

fn opts(f: impl FnOnce(&mut UpstreamOpts)) -> UpstreamOpts {
    let mut o = UpstreamOpts::default();
    f(&mut o);
    o
}

fn eps(ups: &[&Upstream]) -> String {
    ups.iter()
        .map(|u| format!("{{ address: {} }}", u.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_route(route_extra: &str, cluster_extra: &str, ups: &[&Upstream]) -> String {
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ]{route_extra} }} ]\nclusters: [ {{ name: c, lb: round-robin, endpoints: [ {} ]{cluster_extra} }} ]\n",
        eps(ups)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_upstream_failing_one_request_in_three() {
    let flaky = Upstream::with("flaky", opts(|o| o.fail_every = Some((3, 503)))).await;
    let p = ProxyProc::start(&one_route(
        ", retry: { attempts: 3, retry_on: [gateway-error], backoff: { base: 1ms, max: 5ms }, budget: { percent: 50, min_per_second: 10 } }",
        "",
        &[&flaky],
    ));
    let c = TestClient::h1(p.addr("out"));
    let mut attempts = 0;
    let n = 90;
    for _ in 0..n {
        let r = get(&c, "svc", "/").await;
        assert_eq!(r.status, 200, "a client saw the failure");
        // Absent: one attempt.
        attempts += r
            .header("x-outrigger-attempts")
            .unwrap_or("1")
            .parse::<usize>()
            .unwrap();
    }
    // Every attempt reached the upstream, and the attempt counts add up.
    assert_eq!(flaky.hits(), attempts);
    assert_eq!(
        attempts,
        n + n / 2,
        "one failure per three upstream requests"
    );
    let retried = p
        .metric(
            "outrigger_retries_total",
            &["route=\"r\"", "reason=\"gateway-error\""],
        )
        .unwrap();
    assert_eq!(retried as usize, n / 2);
    p.wait_log(|l| l.contains("\"attempts\":2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_unless_the_route_allows_it_and_large_bodies_never_are() {
    let down = Upstream::with("down", opts(|o| o.status = Some(503))).await;
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n  - {{ name: safe, match: {{ host: safe }}, backends: [ {{ cluster: c }} ], retry: {{ attempts: 3, retry_on: [5xx], backoff: {{ base: 1ms, max: 2ms }} }} }}\n  - {{ name: posts, match: {{ host: posts }}, backends: [ {{ cluster: c }} ], retry: {{ attempts: 3, retry_on: [5xx], non_idempotent: true, backoff: {{ base: 1ms, max: 2ms }} }} }}\nclusters: [ {{ name: c, endpoints: [ {} ] }} ]\n",
        eps(&[&down])
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));

    let r = send(&c, "POST", "safe", "/sink", &[], "small").await;
    assert_eq!((r.status, r.header("x-outrigger-attempts")), (503, None));
    assert_eq!(down.hits(), 1, "POST retried without opt-in");

    let r = send(&c, "POST", "posts", "/sink", &[], "small").await;
    assert_eq!(
        (r.status, r.header("x-outrigger-attempts")),
        (503, Some("3"))
    );
    assert_eq!(r.header("x-received"), Some("5"), "replayed body intact");
    assert_eq!(down.hits(), 4);

    // 1 MiB: over the replay bound → sent once, whole.
    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| i as u8).collect();
    for (method, host) in [("POST", "posts"), ("PUT", "safe")] {
        let before = down.hits();
        let r = send(&c, method, host, "/sink", &[], big.clone()).await;
        assert_eq!(r.header("x-outrigger-attempts"), None, "{method}");
        assert_eq!(
            r.header("x-received"),
            Some("1048576"),
            "{method}: body truncated"
        );
        assert_eq!(down.hits() - before, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_keeps_a_dead_cluster_from_a_retry_storm() {
    let dead = Upstream::with("dead", opts(|o| o.status = Some(503))).await;
    let p = ProxyProc::start(&one_route(
        ", retry: { attempts: 5, retry_on: [5xx], backoff: { base: 1ms, max: 2ms }, budget: { percent: 20, min_per_second: 0 } }",
        "",
        &[&dead],
    ));
    let addr = p.addr("out");
    let per_client = 100;
    let clients = 8;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let c = TestClient::h1(addr);
            for _ in 0..per_client {
                assert_eq!(get(&c, "svc", "/").await.status, 503);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let requests = per_client * clients;
    let attempts = dead.hits();
    assert!(
        attempts <= requests * 12 / 10 + 1,
        "{attempts} upstream attempts for {requests} requests"
    );
    assert!(attempts > requests, "the budget allowed no retry at all");
    assert!(
        p.metric("outrigger_retry_budget_exhausted_total", &["route=\"r\""])
            .unwrap()
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_spans_retries_and_per_try_timeout_moves_on() {
    let slow = Upstream::with("slow", opts(|o| o.delay = Some(Duration::from_secs(5)))).await;
    let fast = Upstream::start("fast").await;
    let yaml = format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n  - {{ name: stuck, match: {{ host: stuck }}, backends: [ {{ cluster: slow }} ], timeout: 300ms, retry: {{ attempts: 5, retry_on: [5xx], per_try_timeout: 100ms, backoff: {{ base: 1ms, max: 1ms }}, budget: {{ percent: 100 }} }} }}\n  - {{ name: mixed, match: {{ host: mixed }}, backends: [ {{ cluster: mixed }} ], timeout: 10s, retry: {{ attempts: 2, retry_on: [gateway-error], per_try_timeout: 100ms }} }}\nclusters:\n  - {{ name: slow, endpoints: [ {} ] }}\n  - {{ name: mixed, lb: round-robin, endpoints: [ {} ] }}\n",
        eps(&[&slow]),
        eps(&[&slow, &fast])
    );
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));

    // Per-try timeouts of 100 ms are retried until the 300 ms route timeout ends it all.
    let r = get(&c, "stuck", "/").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-outrigger-reason"), Some("timeout"));
    assert_eq!(
        p.metric(
            "outrigger_timeouts_total",
            &["route=\"stuck\"", "kind=\"route\""]
        ),
        Some(1.0)
    );
    assert!(
        p.metric(
            "outrigger_timeouts_total",
            &["route=\"stuck\"", "kind=\"per-try\""]
        )
        .unwrap()
            >= 1.0
    );

    // First attempts that land on the slow endpoint time out after 100 ms
    // and move to the fast one; every request succeeds.
    let slow_before = slow.hits();
    let mut moved = 0;
    for _ in 0..6 {
        let r = get(&c, "mixed", "/").await;
        assert_eq!((r.status, r.text().as_str()), (200, "fast"));
        if r.header("x-outrigger-attempts") == Some("2") {
            moved += 1;
        }
    }
    assert!(moved >= 1, "no request was moved");
    assert_eq!(
        slow.hits() - slow_before,
        moved,
        "each move is one per-try timeout at the slow endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_rejects_the_next_request_at_once_on_http1_and_http2() {
    let slow = Upstream::with("slow", opts(|o| o.delay = Some(Duration::from_secs(2)))).await;
    let p = ProxyProc::start(&one_route(
        "",
        ", circuit_breaker: { max_requests: 4 }",
        &[&slow],
    ));
    let addr = p.addr("out");
    for h2 in [false, true] {
        let before = slow.hits();
        let client = std::sync::Arc::new(if h2 {
            TestClient::h2(addr)
        } else {
            TestClient::h1(addr)
        });
        let mut held = Vec::new();
        for _ in 0..4 {
            let c = if h2 {
                client.clone()
            } else {
                std::sync::Arc::new(TestClient::h1(addr))
            };
            held.push(tokio::spawn(
                async move { get(&c, "svc", "/").await.status },
            ));
        }
        while slow.hits() < before + 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = get(&client, "svc", "/").await;
        assert_eq!(r.status, 503, "h2={h2}");
        assert_eq!(r.header("x-outrigger-overloaded"), Some("true"));
        assert_eq!(r.header("x-outrigger-reason"), Some("overloaded"));
        assert_eq!(
            slow.hits(),
            before + 4,
            "the rejected request reached the upstream"
        );
        for h in held {
            assert_eq!(h.await.unwrap(), 200);
        }
    }
    assert_eq!(
        p.metric(
            "outrigger_circuit_breaker_rejections_total",
            &["cluster=\"c\"", "limit=\"requests\""]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_comes_back() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let bad = Upstream::with("bad", opts(|o| o.status = Some(503))).await;
    let p = ProxyProc::start(&one_route(
        "",
        ", outlier_detection: { consecutive_5xx: 3, interval: 100ms, base_ejection: 2s, max_ejection_percent: 50 }",
        &[&a, &b, &bad],
    ));
    let c = TestClient::h1(p.addr("out"));
    // Round robin: the bad endpoint gets every third request until its third 503.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(get(&c, "svc", "/").await.status);
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 consecutive 5xx");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 3);
    assert_eq!(
        p.metric(
            "outrigger_outlier_ejections_total",
            &["cluster=\"c\"", "reason=\"5xx\""]
        ),
        Some(1.0)
    );
    let clusters = http_get_raw(p.admin, "/clusters").1;
    assert!(clusters.contains("\"ejected\""), "{clusters}");
    // After its ejection time it receives requests again.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while bad.hits() == 3 {
        assert!(std::time::Instant::now() < deadline, "never came back");
        get(&c, "svc", "/").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_ejected_panic_mode_still_tries() {
    let ups = [
        Upstream::with("x", opts(|o| o.status = Some(503))).await,
        Upstream::with("y", opts(|o| o.status = Some(503))).await,
        Upstream::with("z", opts(|o| o.status = Some(503))).await,
    ];
    let p = ProxyProc::start(&one_route(
        "",
        ", outlier_detection: { consecutive_5xx: 2, base_ejection: 30s, max_ejection_percent: 100 }",
        &[&ups[0], &ups[1], &ups[2]],
    ));
    let c = TestClient::h1(p.addr("out"));
    for _ in 0..30 {
        let r = get(&c, "svc", "/").await;
        assert_eq!(r.status, 503);
        assert!(
            r.header("x-upstream").is_some(),
            "answered by an upstream, not refused by the proxy"
        );
    }
    assert_eq!(ups.iter().map(|u| u.hits()).sum::<usize>(), 30);
    assert!(
        p.metric("outrigger_outlier_ejections_total", &["cluster=\"c\""])
            .unwrap()
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_gets_408_and_others_are_served() {
    use std::io::{Read, Write};
    let up = Upstream::start("app").await;
    let yaml = one_route("", "", &[&up]).replace("access_log: true", "header_read_timeout: 300ms");
    let p = ProxyProc::start(&yaml);
    let addr = p.addr("out");
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    // Meanwhile, another client is served.
    let c = TestClient::h1(addr);
    assert_eq!(get(&c, "svc", "/").await.status, 200);
    let out = slow.await.unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert_eq!(
        up.hits(),
        1,
        "the partial request never reached the upstream"
    );
    assert_eq!(
        p.metric(
            "outrigger_bad_requests_total",
            &["reason=\"header-timeout\""]
        ),
        Some(1.0)
    );
    assert_eq!(get(&c, "svc", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let up = Upstream::start("app").await;
    let yaml = format!(
        "listeners:\n  - {{ name: out, role: outbound, address: 127.0.0.1:0 }}\n  - {{ name: capped, role: outbound, address: 127.0.0.1:0, rate_limit: {{ requests_per_second: 1, burst: 3 }} }}\nroutes:\n  - {{ name: r, listeners: [ out ], backends: [ {{ cluster: c }} ], rate_limit: {{ requests_per_second: 2, burst: 5 }} }}\n  - {{ name: r2, listeners: [ capped ], backends: [ {{ cluster: c }} ] }}\nclusters: [ {{ name: c, endpoints: [ {} ] }} ]\n",
        eps(&[&up])
    );
    let p = ProxyProc::start(&yaml);
    for (listener, burst) in [("out", 5), ("capped", 3)] {
        let c = TestClient::h1(p.addr(listener));
        let mut ok = 0;
        for _ in 0..20 {
            let r = get(&c, "svc", "/").await;
            match r.status {
                200 => ok += 1,
                429 => {
                    assert!(r.header("retry-after").is_some());
                    assert_eq!(r.header("x-outrigger-reason"), Some("rate-limited"));
                }
                s => panic!("status {s}"),
            }
        }
        // The burst, plus at most one refilled token while the loop ran.
        assert!(
            (burst..=burst + 1).contains(&ok),
            "{listener}: {ok} allowed"
        );
    }
    assert!(
        p.metric(
            "outrigger_rate_limited_total",
            &["scope=\"listener\"", "name=\"capped\""]
        )
        .unwrap()
            >= 16.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_about_half_and_delays_on_request() {
    let up = Upstream::start("app").await;
    let p = ProxyProc::start(&one_route(
        ", fault: { abort: { percent: 50, status: 503 }, headers: true }",
        "",
        &[&up],
    ));
    let c = TestClient::h1(p.addr("out"));
    let n = 400;
    let mut aborted = 0;
    for _ in 0..n {
        let r = get(&c, "svc", "/").await;
        if r.header("x-outrigger-reason") == Some("fault-injected") {
            assert_eq!(r.status, 503);
            aborted += 1;
        }
    }
    assert!((140..=260).contains(&aborted), "{aborted} of {n} aborted");
    assert_eq!(
        up.hits(),
        n - aborted,
        "aborted requests never reach the upstream"
    );
    let r = send(
        &c,
        "GET",
        "svc",
        "/",
        &[("x-outrigger-fault-abort", "418")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 418);
    assert_eq!(
        p.metric("outrigger_faults_injected_total", &["kind=\"abort\""])
            .map(|v| v as usize),
        Some(aborted + 1)
    );
}

/// Polls the admin `/clusters` document until `pred` holds.
async fn until_clusters(p: &ProxyProc, pred: impl Fn(&serde_json::Value) -> bool) {
    let admin = p.admin;
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let body = tokio::task::spawn_blocking(move || http_get_raw(admin, "/clusters").1)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if pred(&v) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "state never reached: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_failing_endpoint_out() {
    let good = Upstream::start("good").await;
    let sick = Upstream::with("sick", opts(|o| o.status = Some(503))).await;
    let p = ProxyProc::start(&one_route(
        "",
        ", health_check: { path: /healthz, interval: 50ms, unhealthy_threshold: 2, healthy_threshold: 1 }",
        &[&good, &sick],
    ));
    until_clusters(&p, |v| {
        v["clusters"][0]["endpoints"][1]["state"] == "unhealthy"
    })
    .await;
    assert_eq!(sick.last().path, "/healthz");
    let c = TestClient::h1(p.addr("out"));
    for _ in 0..20 {
        assert_eq!(get(&c, "svc", "/").await.text(), "good");
    }
    assert_eq!(
        p.metric(
            "outrigger_endpoints",
            &["cluster=\"c\"", "state=\"unhealthy\""]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_pending_limits_queue_one_and_refuse_the_next() {
    let slow = Upstream::with("slow", opts(|o| o.delay = Some(Duration::from_millis(500)))).await;
    let p = ProxyProc::start(&one_route(
        "",
        ", protocol: http1, circuit_breaker: { max_connections: 1, max_pending: 1 }",
        &[&slow],
    ));
    let addr = p.addr("out");
    let call =
        move || tokio::spawn(async move { get(&TestClient::h1(addr), "svc", "/").await.status });
    let first = call();
    until_clusters(&p, |v| {
        v["clusters"][0]["open"]["connections"] == 1 && v["clusters"][0]["open"]["requests"] == 1
    })
    .await;
    let second = call();
    until_clusters(&p, |v| v["clusters"][0]["open"]["pending"] == 1).await;
    // One connection busy, one request waiting for it: the next is refused at once.
    let r = get(&TestClient::h1(addr), "svc", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-outrigger-overloaded"), Some("true"));
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        second.await.unwrap(),
        200,
        "the pending request got the connection when it came back"
    );
    assert_eq!(
        p.metric(
            "outrigger_circuit_breaker_rejections_total",
            &["limit=\"pending\""]
        ),
        Some(1.0)
    );
    assert_eq!(slow.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_stream_is_reset_after_the_idle_timeout() {
    use http_body_util::BodyExt;
    let up = Upstream::start("app").await;
    let yaml = one_route("", "", &[&up]).replace("access_log: true", "stream_idle_timeout: 200ms");
    let p = ProxyProc::start(&yaml);
    for c in [TestClient::h2(p.addr("out")), TestClient::h1(p.addr("out"))] {
        let req = http::Request::builder()
            .uri("/stall")
            .header("host", "svc")
            .body(Default::default())
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(READY_TIMEOUT, resp.into_body().collect())
            .await
            .expect("stream hung");
        assert!(
            body.is_err(),
            "a stalled stream must end in an error, not complete"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_move_to_another_endpoint() {
    let bad = Upstream::with("bad", opts(|o| o.status = Some(503))).await;
    let good = Upstream::start("good").await;
    // Random balancing: without avoidance a quarter of the requests would
    // draw the bad endpoint twice.
    let yaml = one_route(
        ", retry: { attempts: 2, retry_on: [5xx], backoff: { base: 1ms, max: 1ms }, budget: { percent: 100 } }",
        "",
        &[&bad, &good],
    )
    .replace("lb: round-robin", "lb: random");
    let p = ProxyProc::start(&yaml);
    let c = TestClient::h1(p.addr("out"));
    for _ in 0..60 {
        let r = get(&c, "svc", "/").await;
        assert_eq!((r.status, r.text().as_str()), (200, "good"));
    }
    assert!(
        bad.hits() > 5,
        "the bad endpoint was drawn {} times",
        bad.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_its_request_body_is_cut_off() {
    use std::io::{Read, Write};
    let up = Upstream::start("app").await;
    let yaml = one_route("", "", &[&up]).replace("access_log: true", "stream_idle_timeout: 200ms");
    let p = ProxyProc::start(&yaml);
    let addr = p.addr("out");
    let out = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        // Promise 100 bytes, send 5, then go quiet.
        s.write_all(b"POST /sink HTTP/1.1\r\nhost: svc\r\ncontent-length: 100\r\n\r\nhello")
            .unwrap();
        let mut buf = Vec::new();
        // Ok means the proxy ended the connection; a read timeout would be an Err.
        s.read_to_end(&mut buf)
            .map(|_| String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .unwrap()
    .expect("the stalled request hung instead of being cut off");
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(
        out.contains("x-outrigger-reason: client-stalled"),
        "{out:?}"
    );
    assert_eq!(
        get(&TestClient::h1(addr), "svc", "/").await.status,
        200,
        "others are still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_a_connection_when_one_closes_instead_of_coming_back() {
    // Every answer closes its connection: nothing returns to the pool, so
    // a waiting request must be woken by the freed connection permit.
    let closing = support::upstream::RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    )
    .await;
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ], timeout: 20s }} ]\nclusters: [ {{ name: c, protocol: http1, endpoints: [ {{ address: {} }} ], circuit_breaker: {{ max_connections: 1 }} }} ]\n",
        closing.addr
    ));
    let addr = p.addr("out");
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let c = TestClient::h1(addr);
                get(&c, "svc", "/").await.status
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}
