//! Endpoint names (`host:port`) resolved by the system resolver, and
//! listener addresses written `localhost:PORT`.
//!
//! The second test gives the proxy its own `/etc/hosts` (a mount
//! namespace with the test's file bound over it, which needs root, as CI
//! runs) so that what a name resolves to can change under a running
//! proxy: real getaddrinfo, real files, nothing faked.

mod support;

use std::process::Command;
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn cluster_endpoints(p: &ProxyProc, cluster: &str) -> Vec<String> {
    let (status, body, _) = http_get_raw(p.admin, "/clusters");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = doc["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {body}"));
    let mut eps: Vec<String> = c["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    eps.sort();
    eps
}

/// `localhost:PORT` works as an endpoint and as a listener address; each
/// address the name resolves to is an endpoint of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_names_endpoints_and_listeners() {
    use std::net::ToSocketAddrs;
    let app = Upstream::start("app").await;
    let port = app.addr.port();
    // Where the system resolves `localhost` (127.0.0.1, and ::1 on many
    // machines): the app answers on each, so every endpoint works.
    let mut expected: Vec<String> = ("localhost", port)
        .to_socket_addrs()
        .unwrap()
        .map(|a| a.to_string())
        .collect();
    expected.sort();
    expected.dedup();
    let mut others = Vec::new();
    for a in &expected {
        let a: std::net::SocketAddr = a.parse().unwrap();
        if a != app.addr {
            let l = tokio::net::TcpListener::bind(a).await.unwrap();
            others.push(Upstream::on(l, "app6", UpstreamOpts::default()));
        }
    }
    let p = ProxyProc::start(&format!(
        "listeners: [ {{ name: out, role: outbound, address: 'localhost:0' }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: app }} ] }} ]\nclusters: [ {{ name: app, endpoints: [ {{ address: 'localhost:{port}' }} ] }} ]\n"
    ));
    assert!(p.addr("out").ip().is_loopback(), "{}", p.addr("out"));
    assert_eq!(cluster_endpoints(&p, "app"), expected);
    let c = TestClient::h1(p.addr("out"));
    for _ in 0..4 {
        assert_eq!(get(&c, "app", "/").await.status, 200);
    }
    assert_eq!(
        app.hits() + others.iter().map(Upstream::hits).sum::<usize>(),
        4
    );
    // `/config` shows the name as written, not what it resolved to.
    let (_, config, _) = http_get_raw(p.admin, "/config");
    assert!(config.contains(&format!("localhost:{port}")), "{config}");
}

fn root() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!(
            "skipped: a private /etc/hosts needs a mount namespace, and root (CI runs as root)"
        );
    }
    root
}

/// What a name resolves to changes: traffic follows within the refresh,
/// the old address gets nothing more. The name then stops resolving:
/// the last addresses stay, traffic goes on, and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_what_the_name_resolves_to_and_survive_a_dns_outage() {
    if !root() {
        return;
    }
    let first = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let second = tokio::net::TcpListener::bind(("127.0.0.3", port))
        .await
        .unwrap();
    let a = Upstream::on(first, "a", UpstreamOpts::default());
    let b = Upstream::on(second, "b", UpstreamOpts::default());

    let dir = temp_dir();
    let hosts = dir.join("hosts");
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.2 inventory.shop.test\n",
    )
    .unwrap();
    // Names not in the file fail at once: no DNS server to wait for.
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ address: 127.0.0.1:0, probes: 127.0.0.1:0 }}\nlisteners: [ {{ name: out, role: outbound, address: 127.0.0.1:0 }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: inventory }} ] }} ]\nclusters: [ {{ name: inventory, dns_refresh: 100ms, endpoints: [ {{ address: 'inventory.shop.test:{port}' }} ] }} ]\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {h} /etc/hosts && mount --bind {r} /etc/resolv.conf && exec {bin} run --config {c} --threads 2 --log-level info",
            h = hosts.display(),
            r = resolv.display(),
            bin = bin(),
            c = config.display()
        ));
    let p = ProxyProc::spawn(cmd, config, "\"message\":\"ready\"");
    let c = TestClient::h1(p.addr("out"));
    assert_eq!(get(&c, "inventory", "/").await.status, 200);
    assert_eq!((a.hits(), b.hits()), (1, 0));
    assert_eq!(
        cluster_endpoints(&p, "inventory"),
        [format!("127.0.0.2:{port}")]
    );

    // The name moves (rewritten in place: the bind mount holds the inode).
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.3 inventory.shop.test\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while b.hits() == 0 {
        assert!(std::time::Instant::now() < deadline, "traffic never moved");
        assert_eq!(get(&c, "inventory", "/").await.status, 200);
    }
    p.wait_log(|l| l.contains("dns: the name's addresses changed"));
    let before = a.hits();
    for _ in 0..5 {
        assert_eq!(get(&c, "inventory", "/").await.status, 200);
    }
    assert_eq!(a.hits(), before, "the old address still got requests");
    assert_eq!(
        cluster_endpoints(&p, "inventory"),
        [format!("127.0.0.3:{port}")]
    );

    // The name is gone: lookups fail, the last address stays.
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let name = format!("name=\"inventory.shop.test:{port}\"");
    let deadline = std::time::Instant::now() + WAIT;
    while p
        .metric(
            "outrigger_dns_lookups_total",
            &[&name, "result=\"failure\""],
        )
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed lookup counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.wait_log(|l| l.contains("dns: lookup failed; the last addresses stay"));
    let before = b.hits();
    for _ in 0..3 {
        assert_eq!(get(&c, "inventory", "/").await.status, 200);
    }
    assert_eq!(b.hits(), before + 3);
    assert_eq!(
        cluster_endpoints(&p, "inventory"),
        [format!("127.0.0.3:{port}")]
    );
}
