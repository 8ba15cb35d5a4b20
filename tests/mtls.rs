//! Mutual TLS between sidecars, workload identities and authorization,
//! end to end: a caller's sidecar (outbound) and a callee's sidecar
//! (inbound, in front of an app), each its own process with its own
//! certificate from a CA the test makes.

mod support;

use bytes::Bytes;
use outrigger::tls::identity::{Credentials, FileSource, IdentityStore};
use outrigger::tls::spiffe::SpiffeId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::pki::{Files, Pki, TD, spiffe};
use support::*;

/// The callee: an inbound listener in front of `app`.
fn callee_yaml(files: &Files, app: &Upstream, tls: &str, extra: &str) -> String {
    format!(
        "{}listeners: [ {{ name: in, role: inbound, address: 127.0.0.1:0, forward_to: {}, tls: {tls}, access_log: true }} ]\n{extra}",
        files.identity_yaml(),
        app.addr
    )
}

/// The caller: an outbound listener routing to the callee, which must be `expect`.
fn caller_yaml(files: &Files, callee: std::net::SocketAddr, expect: &str, extra: &str) -> String {
    format!(
        "{}listeners: [ {{ name: out, role: outbound, address: 127.0.0.1:0, access_log: true }} ]\nroutes: [ {{ name: r, backends: [ {{ cluster: callee }} ]{extra} }} ]\nclusters: [ {{ name: callee, endpoints: [ {{ address: {callee}, identity: \"{expect}\" }} ] }} ]\n",
        files.identity_yaml()
    )
}

struct Mesh {
    pki: Pki,
    app: Upstream,
    callee: ProxyProc,
    caller: ProxyProc,
    callee_files: Files,
    caller_files: Files,
}

async fn mesh(tls: &str, callee_extra: &str) -> Mesh {
    let pki = Pki::new();
    let app = Upstream::start("orders-app").await;
    let callee_files = pki.workload("orders");
    let caller_files = pki.workload("web");
    let callee = ProxyProc::start(&callee_yaml(&callee_files, &app, tls, callee_extra));
    let caller = ProxyProc::start(&caller_yaml(
        &caller_files,
        callee.addr("in"),
        &spiffe("orders"),
        "",
    ));
    Mesh {
        pki,
        app,
        callee,
        caller,
        callee_files,
        caller_files,
    }
}

fn handshakes(p: &ProxyProc, result: &str) -> f64 {
    p.metric(
        "outrigger_tls_handshakes_total",
        &[&format!("result=\"{result}\"")],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_talk_mtls_and_the_app_sees_the_callers_identity() {
    let m = mesh("strict", "").await;
    for client in [
        TestClient::h1(m.caller.addr("out")),
        TestClient::h2(m.caller.addr("out")),
    ] {
        let r = send(
            &client,
            "GET",
            "orders.svc",
            "/api/x",
            // A caller cannot claim an identity: the callee's proxy sets it.
            &[(
                "x-outrigger-peer-identity",
                "spiffe://mesh.test/ns/default/sa/admin",
            )],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = m.app.last().headers;
        assert_eq!(seen["x-outrigger-peer-identity"], spiffe("web").as_str());
        assert_eq!(seen.get_all("x-outrigger-peer-identity").iter().count(), 1);
    }
    // The callee's access log names the caller.
    let line = m
        .callee
        .wait_log(|l| l.contains("\"access\"") && l.contains("\"peer\":\"spiffe://"));
    assert!(line.contains(&spiffe("web")), "{line}");
    // HTTP/2 between the sidecars when the caller spoke it (ALPN), and the
    // handshakes were counted on both sides.
    assert_eq!(m.app.last().version, http::Version::HTTP_2);
    assert!(handshakes(&m.callee, "ok") >= 1.0);
    assert!(
        m.caller
            .metric(
                "outrigger_upstream_tls_handshakes_total",
                &["result=\"ok\""]
            )
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        m.callee
            .metric(
                "outrigger_peer_requests_total",
                &[&format!("peer=\"{}\"", spiffe("web"))]
            )
            .unwrap_or(0.0)
            >= 2.0
    );
    let expiry = m
        .callee
        .metric("outrigger_certificate_expiry_timestamp_seconds", &[])
        .unwrap();
    assert!(expiry > 1.7e9);
    // /config shows the identity and the certificate, never the key.
    let (status, config, _) = http_get_raw(m.callee.admin, "/config");
    assert_eq!(status, 200);
    assert!(
        config.contains(&format!("# identity: {}", spiffe("orders"))),
        "{config}"
    );
    assert!(config.contains("# certificate: serial "), "{config}");
    assert!(!config.contains("PRIVATE KEY"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_and_permissive_takes_both() {
    let m = mesh("strict", "").await;
    let resp = raw(
        m.callee.addr("in"),
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(resp.is_empty(), "plaintext got an answer: {resp}");
    assert_eq!(m.app.hits(), 0);
    assert_eq!(handshakes(&m.callee, "plaintext-refused"), 1.0);

    let app = Upstream::start("app").await;
    let files = m.pki.workload("orders");
    let permissive = ProxyProc::start(&callee_yaml(&files, &app, "permissive", ""));
    let (status, _, _) = http_get_raw(permissive.addr("in"), "/plain");
    assert_eq!(status, 200, "plaintext on a permissive listener");
    assert!(
        app.last()
            .headers
            .get("x-outrigger-peer-identity")
            .is_none()
    );
    let caller = ProxyProc::start(&caller_yaml(
        &m.caller_files,
        permissive.addr("in"),
        &spiffe("orders"),
        "",
    ));
    let r = get(&TestClient::h1(caller.addr("out")), "svc", "/tls").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.last().headers["x-outrigger-peer-identity"],
        spiffe("web").as_str()
    );
}

/// A TLS client with `files`' certificate, trusting `roots_of`' CA.
async fn handshake_with(
    files: &Files,
    callee: std::net::SocketAddr,
    expect: &str,
) -> Result<String, std::io::Error> {
    let creds = Credentials::from_files(
        &FileSource {
            cert: files.cert(),
            key: files.key(),
            roots: files.roots(),
        },
        TD,
    )
    .unwrap();
    let store = IdentityStore::new(TD, creds);
    let client = outrigger::tls::mesh_client(&store, SpiffeId::parse(expect).unwrap());
    let tcp = tokio::net::TcpStream::connect(callee).await?;
    let tls = client
        .http1
        .connect(
            rustls::pki_types::ServerName::IpAddress(callee.ip().into()),
            tcp,
        )
        .await?;
    // TLS 1.3: the server checks the client's certificate after the client
    // thinks it is done; a refusal arrives on the first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| outrigger::tls::identity::serial_and_expiry(c))
        .map(|(s, _)| s)
        .unwrap_or_default();
    if out.is_empty() {
        return Err(std::io::ErrorKind::ConnectionReset.into());
    }
    Ok(serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_and_expired_client_certificates_are_refused() {
    let m = mesh("strict", "").await;
    let callee = m.callee.addr("in");
    assert!(
        handshake_with(&m.caller_files, callee, &spiffe("orders"))
            .await
            .is_ok()
    );

    // A certificate from another CA, presented to a callee the client trusts.
    let other = Pki::new();
    let stranger = other.workload("web");
    std::fs::copy(m.callee_files.roots(), stranger.roots()).unwrap();
    assert!(
        handshake_with(&stranger, callee, &spiffe("orders"))
            .await
            .is_err()
    );
    // An expired one from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = m
        .pki
        .ca
        .issue_between(
            &SpiffeId::parse(&spiffe("web")).unwrap(),
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        )
        .unwrap();
    let expired = Files {
        dir: temp_dir().join("expired"),
    };
    support::pki::write_files(&expired.dir, &cert, &key, &m.pki.ca.cert_pem);
    assert!(
        handshake_with(&expired, callee, &spiffe("orders"))
            .await
            .is_err()
    );
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while handshakes(&m.callee, "untrusted") < 1.0 || handshakes(&m.callee, "expired") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            m.callee.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.app.hits(), 1, "only the trusted client reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_wrong_identity_gets_no_byte_of_the_request() {
    let m = mesh("strict", "").await;
    // The caller expects payments at the orders sidecar's address.
    let wrong = ProxyProc::start(&caller_yaml(
        &m.caller_files,
        m.callee.addr("in"),
        &spiffe("payments"),
        "",
    ));
    let r = send(
        &TestClient::h1(wrong.addr("out")),
        "POST",
        "svc",
        "/pay",
        &[],
        "secret",
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-outrigger-reason"), Some("identity-mismatch"));
    assert_eq!(m.app.hits(), 0, "the request reached the wrong service");
    assert_eq!(
        wrong.metric(
            "outrigger_upstream_tls_handshakes_total",
            &["result=\"identity-mismatch\""]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_only_what_a_rule_names() {
    let policy = format!(
        "authorization:\n  - name: orders-api\n    listener: in\n    allow:\n      - {{ from: [\"{}\"], paths: [\"/api/*\"], methods: [GET] }}\n      - {{ from: [\"spiffe://{TD}/ns/*/sa/ops\"], paths: [\"/admin\"] }}\n",
        spiffe("web")
    );
    let m = mesh("strict", &policy).await;
    let web = TestClient::h1(m.caller.addr("out"));
    let ops_files = m.pki.workload("ops");
    let ops_proxy = ProxyProc::start(&caller_yaml(
        &ops_files,
        m.callee.addr("in"),
        &spiffe("orders"),
        "",
    ));
    let ops = TestClient::h1(ops_proxy.addr("out"));
    let cases: Vec<(&TestClient, &str, &str, u16)> = vec![
        (&web, "GET", "/api/orders", 200),
        (&web, "DELETE", "/api/orders", 403),
        (&web, "GET", "/admin", 403),
        (&web, "GET", "/other", 403),
        (&ops, "POST", "/admin", 200),
        (&ops, "GET", "/api/orders", 403),
    ];
    for (client, method, path, want) in cases {
        let r = send(client, method, "orders.svc", path, &[], Bytes::new()).await;
        assert_eq!(r.status, want, "{method} {path}");
        if want == 403 {
            assert_eq!(r.header("x-outrigger-reason"), Some("unauthorized"));
        }
    }
    // A gRPC caller gets PERMISSION_DENIED.
    let r = send(
        &web,
        "POST",
        "orders.svc",
        "/orders.Orders/Delete",
        &[("content-type", "application/grpc")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.header("grpc-status"), Some("7"));
    assert_eq!(
        m.callee.metric(
            "outrigger_authz_denied_total",
            &["policy=\"orders-api\"", "mode=\"enforce\""]
        ),
        Some(5.0)
    );
    assert_eq!(m.app.hits(), 2);

    // Dry run: nothing denied, every would-be denial counted.
    let dry = policy.replace("name: orders-api", "name: trial\n    dry_run: true");
    let m = mesh("strict", &dry).await;
    let r = get(
        &TestClient::h1(m.caller.addr("out")),
        "orders.svc",
        "/admin",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        m.callee.metric(
            "outrigger_authz_denied_total",
            &["policy=\"trial\"", "mode=\"dry-run\""]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let m = mesh("strict", "").await;
    let before = handshake_with(&m.caller_files, m.callee.addr("in"), &spiffe("orders"))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        let addr = m.caller.addr("out");
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // A new connection now and then: new handshakes upstream too.
                let c = TestClient::h1(addr);
                for _ in 0..20 {
                    let r = get(&c, "svc", "/").await;
                    if r.status != 200 {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // Rotate both sides' certificates while requests flow.
    m.pki.rotate(&m.callee_files, "orders");
    m.pki.rotate(&m.caller_files, "web");
    m.callee.wait_log(|l| l.contains("certificate rotated"));
    m.caller.wait_log(|l| l.contains("certificate rotated"));
    let after_rotation = done.load(Ordering::SeqCst);
    while done.load(Ordering::SeqCst) < after_rotation + 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed across the rotation"
    );
    let after = handshake_with(&m.caller_files, m.callee.addr("in"), &spiffe("orders"))
        .await
        .unwrap();
    assert_ne!(before, after, "new handshakes present the new certificate");
    assert_eq!(
        m.callee
            .metric("outrigger_certificate_rotations_total", &["result=\"ok\""]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_stops_the_start_and_a_bad_rotation_keeps_the_old_certificate() {
    let pki = Pki::new();
    let app = Upstream::start("app").await;
    let files = pki.workload("orders");
    let other = pki.workload("orders");
    // The key of another certificate: refused at start, naming the file.
    let mismatched = Files {
        dir: temp_dir().join("mismatch"),
    };
    std::fs::create_dir_all(&mismatched.dir).unwrap();
    std::fs::copy(files.cert(), mismatched.cert()).unwrap();
    std::fs::copy(other.key(), mismatched.key()).unwrap();
    std::fs::copy(files.roots(), mismatched.roots()).unwrap();
    let dir = temp_dir();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "admin: {{ address: 127.0.0.1:0, probes: 127.0.0.1:0 }}\n{}",
            callee_yaml(&mismatched, &app, "strict", "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&mismatched.key().display().to_string()),
        "{err}"
    );

    // Running, then a rotation to a key that does not match: refused,
    // counted, and the old certificate keeps serving.
    let p = ProxyProc::start(&callee_yaml(&files, &app, "strict", ""));
    let caller_files = pki.workload("web");
    let caller = ProxyProc::start(&caller_yaml(
        &caller_files,
        p.addr("in"),
        &spiffe("orders"),
        "",
    ));
    std::fs::copy(other.key(), files.key()).unwrap();
    p.wait_log(|l| l.contains("new certificate refused"));
    assert_eq!(
        p.metric(
            "outrigger_certificate_rotations_total",
            &["result=\"error\""]
        ),
        Some(1.0)
    );
    let r = get(&TestClient::h1(caller.addr("out")), "svc", "/").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stalled_handshakes_are_counted_and_nobody_else_notices() {
    let tls = "{ mode: strict, handshake_timeout: 300ms }";
    let m = mesh(tls, "").await;
    let callee = m.callee.addr("in");
    use std::io::{Read, Write};
    // A record that claims to be a handshake and is garbage.
    let mut g = std::net::TcpStream::connect(callee).unwrap();
    g.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    // A ClientHello cut in the middle, and a client that never says a word.
    let mut cut = std::net::TcpStream::connect(callee).unwrap();
    cut.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    let silent = std::net::TcpStream::connect(callee).unwrap();
    // And a crowd opening handshakes that never finish.
    let crowd: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(callee).unwrap();
            s.write_all(&[0x16, 0x03, 0x01]).unwrap();
            s
        })
        .collect();
    // Meanwhile the mesh works.
    let r = get(&TestClient::h1(m.caller.addr("out")), "svc", "/").await;
    assert_eq!(r.status, 200);
    for s in [&mut g, &mut cut] {
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while handshakes(&m.callee, "malformed") < 1.0 || handshakes(&m.callee, "timeout") < 302.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            m.callee.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(silent);
    drop(crowd);
    let r = get(&TestClient::h1(m.caller.addr("out")), "svc", "/after").await;
    assert_eq!(r.status, 200);
}
