//! An endpoint that failed and came back gets its share of traffic back:
//! killed and restarted, hung, resetting. Sequential requests (nothing in
//! flight), the default balancer (p2c over peak-EWMA), retries hiding the
//! failures from the client.

mod support;

use std::time::Duration;
use support::upstream::Faults;
use support::*;

fn mesh(ups: &[&Upstream], retry: &str) -> String {
    let eps = ups
        .iter()
        .map(|u| format!("{{ address: {} }}", u.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: c }} ], retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }}, budget: {{ percent: 100, min_per_second: 1000 }}{retry} }} }} ]\nclusters: [ {{ name: c, endpoints: [ {eps} ] }} ]\n"
    )
}

/// Sends sequential requests, every one of which must succeed, until
/// `until` holds (or the safety deadline passes).
async fn drive_until(c: &TestClient, what: &str, until: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !until() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        let r = get(c, "svc", "/").await;
        assert_eq!(r.status, 200, "a client saw a failure: {}", r.text());
    }
}

/// Of `n` requests from 8 concurrent clients (so the balancer sees
/// requests in flight, as with real traffic), how many `up` served.
async fn share(proxy: std::net::SocketAddr, up: &Upstream, n: usize) -> usize {
    let before = up.hits();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let c = TestClient::h1(proxy);
                for _ in 0..n / 8 {
                    assert_eq!(get(&c, "svc", "/").await.status, 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    up.hits() - before
}

async fn three() -> [Upstream; 3] {
    [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ]
}

/// Fails `ups[2]` with `fail`, drives traffic past the failure, heals it
/// with `heal`, and checks it is probed and gets a fair share again.
async fn fails_and_recovers(
    retry: &str,
    fail: impl AsyncFnOnce(&Upstream),
    heal: impl AsyncFnOnce(&Upstream),
) {
    let ups = three().await;
    let p = ProxyProc::start(&mesh(&[&ups[0], &ups[1], &ups[2]], retry));
    let c = TestClient::h1(p.addr("out"));
    drive_until(&c, "the third endpoint never got traffic", || {
        ups[2].hits() > 0
    })
    .await;

    fail(&ups[2]).await;
    // Traffic until the failing endpoint was tried (and retried past).
    let failures = || {
        p.metric("outrigger_retries_total", &["route=\"r\""])
            .unwrap_or(0.0)
    };
    drive_until(&c, "the failure was never hit", || failures() >= 1.0).await;
    heal(&ups[2]).await;

    let before = ups[2].hits();
    drive_until(&c, "a healed endpoint never got traffic back", || {
        ups[2].hits() > before
    })
    .await;
    // Back to a share near its fair third (p2c over latency estimates is
    // noisy in a short window): not a trickle, not a herd.
    let got = share(p.addr("out"), &ups[2], 800).await;
    assert!(
        (80..=480).contains(&got),
        "healed endpoint served {got} of 800 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_endpoint_gets_its_share_back() {
    fails_and_recovers("", async |u| u.kill(), async |u| u.restart().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hung_gets_its_share_back() {
    fails_and_recovers(
        ", per_try_timeout: 100ms",
        async |u| {
            u.set_faults(Faults {
                hang: true,
                ..Default::default()
            })
        },
        async |u| u.set_faults(Faults::default()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_reset_connections_gets_its_share_back() {
    fails_and_recovers(
        "",
        async |u| {
            u.set_faults(Faults {
                reset: true,
                ..Default::default()
            })
        },
        async |u| u.set_faults(Faults::default()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_spell_is_forgotten_once_the_endpoint_is_fast_again() {
    let ups = three().await;
    let p = ProxyProc::start(&mesh(&[&ups[0], &ups[1], &ups[2]], ""));
    let c = TestClient::h1(p.addr("out"));
    drive_until(&c, "the third endpoint never got traffic", || {
        ups[2].hits() > 0
    })
    .await;
    ups[2].set_faults(Faults {
        delay: Some(Duration::from_millis(3)),
        ..Default::default()
    });
    let before = ups[2].hits();
    drive_until(&c, "the slow spell was never seen", || {
        ups[2].hits() > before
    })
    .await;
    ups[2].set_faults(Faults::default());
    let before = ups[2].hits();
    drive_until(
        &c,
        "a slightly slower endpoint never got traffic back",
        || ups[2].hits() > before,
    )
    .await;
}
