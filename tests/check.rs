//! `outrigger check` against real proxies: a healthy one passes every
//! check; one with a cluster whose only endpoint is dead fails, naming it.

mod support;

use std::process::Command;
use support::pki::Pki;
use support::*;

/// Runs `outrigger check --admin ADDR`: (exit 0, stdout).
async fn check(admin: std::net::SocketAddr) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["check", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A config on fixed loopback ports (the check connects to what the
/// config says), with `extra` clusters.
fn yaml(ups: &[Upstream; 2], identity: &str, extra: &str) -> (String, u16) {
    let out = dead_addr().port();
    (
        format!(
            "admin: {{ address: 127.0.0.1:{}, probes: 127.0.0.1:{} }}\n{identity}listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:{out} }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ] }} ]\nclusters:\n  - {{ name: app, endpoints: [ {{ address: {} }}, {{ address: {} }} ] }}\n{extra}",
            dead_addr().port(),
            dead_addr().port(),
            ups[0].addr,
            ups[1].addr
        ),
        out,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_proxy_passes_every_check() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let pki = Pki::new();
    let files = pki.write("web", "web", std::time::Duration::from_secs(3 * 86400));
    let (config, out) = yaml(&ups, &files.identity_yaml(), "");
    let p = ProxyProc::start(&config);
    let (ok, stdout) = check(p.admin).await;
    assert!(ok, "{stdout}");
    let lines: Vec<&str> = stdout.lines().take_while(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    for l in &lines {
        assert!(l.starts_with("✔ "), "not ✔: {l}\n{stdout}");
    }
    for want in [
        format!("✔ the admin port {} answers", p.admin),
        "✔ config version 1 is in force".to_string(),
        format!("✔ ready (/ready on {})", p.probes),
        format!("✔ listener `out` accepts connections on 127.0.0.1:{out}"),
        "✔ cluster `app`: all 2 endpoints are healthy".to_string(),
        "✔ no config update refused".to_string(),
        "✔ the certificate of spiffe://mesh.test/ns/default/sa/web is valid for ".to_string(),
    ] {
        assert!(stdout.contains(&want), "no `{want}` in\n{stdout}");
    }
    assert!(stdout.ends_with("\nall checks passed\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_only_endpoint_is_dead_fails_the_check() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let pki = Pki::new();
    // Two hours left: a warning, not a failure.
    let files = pki.write("web", "web", std::time::Duration::from_secs(2 * 3600));
    let dead = dead_addr();
    let (config, _) = yaml(
        &ups,
        &files.identity_yaml(),
        &format!(
            "  - {{ name: stock, endpoints: [ {{ address: {dead} }} ], health_check: {{ path: /healthz, interval: 100ms, unhealthy_threshold: 1 }} }}\n"
        ),
    );
    let p = ProxyProc::start(&config);
    // The active check takes the dead endpoint out.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !http_get_raw(p.admin, "/clusters")
        .1
        .contains("\"unhealthy\"")
    {
        assert!(std::time::Instant::now() < deadline, "never unhealthy");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A refused edit on top: a warning.
    assert!(!p.reload("listeners: [ { name: out, role: sideways } ]\n"));

    let (ok, stdout) = check(p.admin).await;
    assert!(!ok, "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("✖ ")).collect();
    assert_eq!(
        failed,
        [format!(
            "✖ cluster `stock` has no healthy endpoint ({dead} unhealthy): requests routed to it fail"
        )],
        "{stdout}"
    );
    assert!(
        stdout.contains("✔ cluster `app`: all 2 endpoints are healthy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("‼ 1 config update was refused since start (nack)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("‼ the certificate of spiffe://mesh.test/ns/default/sa/web expires in ")
            && stdout.contains("is renewal working?"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("\n1 check failed, 2 warnings\n"),
        "{stdout}"
    );
}

#[test]
fn a_proxy_that_is_not_there_fails_in_plain_words() {
    let addr = dead_addr();
    let out = Command::new(bin())
        .args(["check", "--admin", &addr.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with(&format!("✖ the admin port {addr} does not answer (")),
        "{stdout}"
    );
    assert!(stdout.contains("is the proxy running"), "{stdout}");
}

/// `outrigger wait-ready` (a classic sidecar's postStart hook) returns 0
/// once `/ready` answers 200, and 1 with the reason when it never does.
#[test]
fn wait_ready_returns_when_the_proxy_is_ready_and_fails_when_it_never_is() {
    let p =
        ProxyProc::start("listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]\n");
    let ok = std::process::Command::new(bin())
        .args([
            "wait-ready",
            "--probes",
            &p.probes.to_string(),
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let closed = dead_addr();
    let never = std::process::Command::new(bin())
        .args([
            "wait-ready",
            "--probes",
            &closed.to_string(),
            "--timeout",
            "300ms",
        ])
        .output()
        .unwrap();
    assert_eq!(never.status.code(), Some(1));
    let err = String::from_utf8_lossy(&never.stderr);
    assert!(
        err.contains(&format!("the proxy on {closed} was not ready")),
        "{err}"
    );
    // As the injected hook runs it: a warning, and the app starts.
    let going_on = std::process::Command::new(bin())
        .args([
            "wait-ready",
            "--probes",
            &closed.to_string(),
            "--timeout",
            "300ms",
        ])
        .arg("--continue-on-timeout")
        .output()
        .unwrap();
    assert!(going_on.status.success(), "{going_on:?}");
    assert!(String::from_utf8_lossy(&going_on.stderr).contains("warning:"));
}
