//! A mesh on one machine for the end-to-end tests of the control plane
//! and the dashboard: a CA, service-account tokens, a directory of mesh
//! documents, control planes on it and proxies fed by them.

use super::kube_api::FakeKubeApi;
use super::pki::TD;
use super::upstream::Upstream;
use super::{ProxyProc, free_port, temp_dir};
use std::path::{Path, PathBuf};

/// A mesh on one machine: CA, tokens, mesh documents, control plane(s).
pub struct Mesh {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub mesh_dir: PathBuf,
    pub tokens: PathBuf,
}

pub const NS: &str = "shop";

pub fn token_for(sa: &str) -> String {
    format!("token-for-{sa}-0123456789")
}

impl Mesh {
    pub fn new(accounts: &[&str]) -> Mesh {
        let dir = temp_dir();
        let ca_dir = dir.join("ca");
        outrigger::tls::ca::init(&ca_dir, TD).unwrap();
        let mesh_dir = dir.join("mesh");
        std::fs::create_dir_all(&mesh_dir).unwrap();
        let tokens = dir.join("tokens.yaml");
        let mut t = String::new();
        for sa in accounts {
            t.push_str(&format!(
                "- {{ token: {}, identity: \"spiffe://{TD}/ns/{NS}/sa/{sa}\" }}\n",
                token_for(sa)
            ));
        }
        std::fs::write(&tokens, t).unwrap();
        Mesh {
            dir,
            ca_dir,
            mesh_dir,
            tokens,
        }
    }

    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.mesh_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.mesh_dir.join(file)).unwrap();
    }

    pub fn control_plane(&self, extra: &[&str]) -> ProxyProc {
        self.control_plane_at("127.0.0.1:0", extra)
    }

    pub fn control_plane_at(&self, listen: &str, extra: &[&str]) -> ProxyProc {
        let mut args = vec![
            "--listen",
            listen,
            "--trust-domain",
            TD,
            "--grace",
            "300ms",
            "--watch-interval",
            "100ms",
        ];
        // One state directory per control plane; a restart on the same
        // address finds the one its predecessor wrote.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let key = match listen.strip_suffix(":0") {
            Some(_) => format!(
                "cp-state-{}",
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
            None => format!("cp-state-{}", listen.replace([':', '.'], "_")),
        };
        let state = self.dir.join(key).display().to_string();
        args.extend(["--state-dir", state.as_str()]);
        args.extend_from_slice(extra);
        let (md, ca, tok) = (
            self.mesh_dir.display().to_string(),
            self.ca_dir.display().to_string(),
            self.tokens.display().to_string(),
        );
        let mut all: Vec<&str> = args.clone();
        all.extend(["--mesh-dir", &md, "--ca-dir", &ca, "--tokens", &tok]);
        ProxyProc::control_plane(&all)
    }

    /// A control plane on the Kubernetes API at `api` (TokenReview for the
    /// proxies' tokens: no tokens file).
    pub fn control_plane_kube(&self, api: &FakeKubeApi) -> ProxyProc {
        let kubeconfig = api.kubeconfig(&self.dir);
        let ca = self.ca_dir.display().to_string();
        ProxyProc::control_plane_env(
            &[
                "--listen",
                "127.0.0.1:0",
                "--trust-domain",
                TD,
                "--grace",
                "300ms",
                "--kubernetes",
                "--ca-dir",
                &ca,
            ],
            &[("KUBECONFIG", &kubeconfig)],
        )
    }

    /// A proxy fed by `cps`, for `service` run as `sa`; with `app`, an
    /// inbound listener in front of it (registered as an endpoint).
    pub fn proxy(
        &self,
        cps: &[&ProxyProc],
        sa: &str,
        service: &str,
        app: Option<&Upstream>,
        extra: &str,
    ) -> ProxyProc {
        self.proxy_node(cps, sa, service, app, extra).0
    }

    /// `proxy`, and its node id.
    pub fn proxy_node(
        &self,
        cps: &[&ProxyProc],
        sa: &str,
        service: &str,
        app: Option<&Upstream>,
        extra: &str,
    ) -> (ProxyProc, String) {
        let addrs: Vec<std::net::SocketAddr> = cps.iter().map(|c| c.addr("cp")).collect();
        self.proxy_node_at(&addrs, sa, service, app, extra)
    }

    /// `proxy_node`, fed by the control planes at `cps` (a relay, say).
    pub fn proxy_node_at(
        &self,
        cps: &[std::net::SocketAddr],
        sa: &str,
        service: &str,
        app: Option<&Upstream>,
        extra: &str,
    ) -> (ProxyProc, String) {
        let (yaml, node) = self.proxy_yaml(cps, sa, service, app, extra, free_port());
        (ProxyProc::start(&yaml), node)
    }

    /// A fed proxy's bootstrap config with its outbound listener on
    /// `outbound`, and its node id.
    pub fn proxy_yaml(
        &self,
        cps: &[std::net::SocketAddr],
        sa: &str,
        service: &str,
        app: Option<&Upstream>,
        extra: &str,
        outbound: u16,
    ) -> (String, String) {
        let token = self.token_file(sa);
        let urls: Vec<String> = cps.iter().map(|a| format!("\"https://{a}\"")).collect();
        let (inbound, app_port) = match app {
            Some(a) => (free_port(), a.addr.port()),
            None => (0, 0),
        };
        let node = format!("{service}-{}", free_port());
        let yaml = format!(
            "node: {{ id: {node}, service: {service}, namespace: {NS} }}\nidentity: {{ trust_domain: {TD}, source: {{ control_plane: true }} }}\nfeed: {{ control_plane: [{}], ca: {}, token_file: {}, service_account: {sa}, inbound_port: {inbound}, outbound_port: {}, app_port: {app_port}{extra} }}\n",
            urls.join(", "),
            self.ca_dir.join("ca.pem").display(),
            token.display(),
            outbound,
        );
        (yaml, node)
    }

    /// A file holding `sa`'s token, as a pod's projected token.
    pub fn token_file(&self, sa: &str) -> PathBuf {
        let token = self.dir.join(format!("{sa}-{}.token", free_port()));
        std::fs::write(&token, token_for(sa)).unwrap();
        token
    }
}

/// A `Service` document in the mesh's namespace.
pub fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {NS} }}\nspec: {{ ports: [ {{ name: http, port: 8080 }} ] }}\n"
    )
}

/// `curl` against the control plane: (status, body).
pub fn cp_curl(
    cp: &ProxyProc,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Path>,
) -> (u16, String) {
    let mut c = std::process::Command::new("curl");
    c.args([
        "-sk",
        "--http2",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ]);
    if let Some(t) = token {
        c.arg("-H").arg(format!("authorization: Bearer {t}"));
    }
    if let Some(b) = body {
        c.arg("--data-binary").arg(format!("@{}", b.display()));
    }
    let out = c
        .arg(format!("https://{}{path}", cp.addr("cp")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
