//! A mesh of pods on one machine: network namespaces as pods (each with its
//! own address on a bridge the test makes, the redirect rules installed by
//! `outrigger init`, an app and a sidecar running as the proxy's UID), and
//! a control plane. App A calls app B by plain HTTP at B's Service address;
//! the call crosses both sidecars over mTLS (B's app sees A's SPIFFE ID);
//! with one of B's two replicas killed, A's calls keep succeeding. Needs
//! root, iproute2 and iptables (CI has them); everything it creates it
//! removes, and it talks only to addresses inside its own namespaces.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use support::pki::TD;
use support::*;

const UID: &str = "1337";
const VIP: &str = "10.96.0.10";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, removed on drop (their veths, bridge and rules go too).
struct Net {
    names: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn root_with_tools() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return false;
    }
    for tool in ["ip", "iptables-restore", "setpriv", "curl", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is needed (CI installs it)");
    }
    true
}

/// A small app: answers with its name and the caller identity its sidecar
/// passed on.
const APP: &str = r#"
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (name + " peer=" + str(self.headers.get("x-outrigger-peer-identity")) + "\n").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"#;

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn app_a_calls_app_b_across_two_sidecars_over_mtls() {
    if !root_with_tools() {
        return;
    }
    let id = std::process::id();
    let node = format!("or-node-{id}");
    let pods: Vec<(String, &str, &str)> = vec![
        (format!("or-a-{id}"), "a", "10.250.0.11"),
        (format!("or-b1-{id}"), "b", "10.250.0.21"),
        (format!("or-b2-{id}"), "b", "10.250.0.22"),
    ];
    let mut net = Net {
        names: vec![node.clone()],
    };
    sh(&["ip", "netns", "add", &node]);
    sh(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
    sh(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        "10.250.0.1/24",
        "dev",
        "br0",
    ]);
    sh(&["ip", "-n", &node, "link", "set", "br0", "up"]);
    sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
    for (i, (ns, _, ip)) in pods.iter().enumerate() {
        net.names.push(ns.clone());
        sh(&["ip", "netns", "add", ns]);
        let v = format!("veth{i}");
        sh(&[
            "ip", "-n", &node, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        sh(&["ip", "-n", &node, "link", "set", &v, "master", "br0", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            "10.250.0.1",
        ]);
        // The init container's job.
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            bin(),
            "init",
            "--proxy-uid",
            UID,
            "--exclude-inbound-ports",
            "15020",
        ]);
    }
    // The mesh: CA, tokens, documents (B's Service has a ClusterIP).
    let dir = temp_dir();
    sh(&["chmod", "755", &dir.display().to_string()]);
    let ca = dir.join("ca");
    outrigger::tls::ca::init(&ca, TD).unwrap();
    // The trust bundle the proxies (another UID) read; the key stays private.
    std::fs::copy(ca.join("ca.pem"), dir.join("ca.pem")).unwrap();
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(
        mesh.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: b, namespace: shop }}\nspec: {{ clusterIP: {VIP}, ports: [ {{ name: http, port: 80, targetPort: 8080 }} ] }}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: b, namespace: shop }}\nspec:\n  parentRefs: [ {{ group: \"\", kind: Service, name: b }} ]\n  rules: [ {{ backendRefs: [ {{ name: b, port: 80 }} ], retry: {{ attempts: 3, codes: [503] }} }} ]\n"
        ),
    )
    .unwrap();
    let mut tokens = String::new();
    for sa in ["a", "b"] {
        tokens.push_str(&format!(
            "- {{ token: netns-token-for-{sa}-0123456789, identity: \"spiffe://{TD}/ns/shop/sa/{sa}\" }}\n"
        ));
        let t = dir.join(format!("{sa}.token"));
        std::fs::write(&t, format!("netns-token-for-{sa}-0123456789")).unwrap();
    }
    std::fs::write(dir.join("tokens.yaml"), tokens).unwrap();
    let cp = {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &node, bin(), "control-plane"])
            .args([
                "--listen",
                "10.250.0.1:15010",
                "--trust-domain",
                TD,
                "--grace",
                "500ms",
            ])
            .args(["--watch-interval", "100ms", "--mesh-dir"])
            .arg(&mesh)
            .arg("--ca-dir")
            .arg(&ca)
            .arg("--tokens")
            .arg(dir.join("tokens.yaml"));
        ProxyProc::spawn(
            c,
            dir.join("none"),
            "\"message\":\"control plane listening\"",
        )
    };
    // Each pod: its app, and its sidecar as the proxy's UID.
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    for (i, (ns, sa, ip)) in pods.iter().enumerate() {
        let app_port = if *sa == "b" {
            apps.push(Killed(
                Command::new("ip")
                    .args(["netns", "exec", ns, "python3", "-c", APP, &format!("b{i}")])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            ));
            8080
        } else {
            0
        };
        let inbound = if app_port > 0 { 15006 } else { 0 };
        let boot = dir.join(format!("pod{i}.yaml"));
        std::fs::write(
            &boot,
            format!(
                "admin: {{ address: \"127.0.0.1:15000\", probes: \"0.0.0.0:15020\" }}\nnode: {{ id: {sa}-{i}, service: {sa}, namespace: shop }}\nidentity: {{ trust_domain: {TD}, source: {{ control_plane: true }} }}\nfeed: {{ control_plane: [\"https://10.250.0.1:15010\"], ca: {}, token_file: {}, service_account: {sa}, address: {ip}, inbound_port: {inbound}, outbound_port: 15001, app_port: {app_port} }}\n",
                dir.join("ca.pem").display(),
                dir.join(format!("{sa}.token")).display()
            ),
        )
        .unwrap();
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            ns,
            "setpriv",
            "--reuid",
            UID,
            "--regid",
            UID,
            "--clear-groups",
        ])
        .arg(bin())
        .args(["run", "--threads", "1", "--config"])
        .arg(&boot);
        sidecars.push(Some(ProxyProc::spawn(
            c,
            boot.clone(),
            "\"message\":\"ready\"",
        )));
    }
    let _ = &cp;
    // A's app calls B's Service address by plain HTTP.
    let call = || -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &pods[0].0, "curl", "-s", "-m", "5"])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("http://{VIP}/hello"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let r = call();
        if r.ends_with("\n200") {
            assert!(
                r.contains(&format!("peer=spiffe://{TD}/ns/shop/sa/a")),
                "B's app did not see A's identity: {r}"
            );
            seen.insert(r.split_whitespace().next().unwrap_or("").to_string());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached both replicas of B: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Plaintext straight to B's pod address is caught by B's sidecar and
    // refused (strict mTLS): the app is not reachable around the mesh.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pods[0].0,
            "setpriv",
            "--reuid",
            UID,
            "--regid",
            UID,
            "--clear-groups",
        ])
        .args([
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}:8080/", pods[1].2))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "plaintext reached B's app"
    );
    // One replica of B dies (sidecar and app): calls keep succeeding.
    sidecars[1] = None;
    apps.remove(0);
    for _ in 0..30 {
        let r = call();
        assert!(
            r.ends_with("\n200"),
            "a call failed with one replica of B gone: {r}"
        );
        assert!(r.starts_with("b2 "), "{r}");
    }
    drop(sidecars);
    drop(net);
    assert!(!Path::new(&format!("/var/run/netns/or-a-{id}")).exists());
}
