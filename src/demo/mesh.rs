//! The demo's mesh half: a control plane on a folder of mesh documents
//! and three sidecars it feeds (web → reviews-v1 / reviews-v2 over mTLS),
//! each a real `outrigger` process, so that editing a route file in the
//! folder changes live traffic.

use super::DemoError;
use crate::tls::ca::{private_dir, write_private};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const DIR: &str = "/tmp/outrigger-demo";
pub const CONTROL_PLANE: &str = "127.0.0.1:15010";
pub const WEB_OUTBOUND: u16 = 16001;
pub const ROUTE_FILE: &str = "/tmp/outrigger-demo/mesh/reviews-route.yaml";
const TRUST_DOMAIN: &str = "mesh.demo";
const NS: &str = "demo";

/// (service account = service, app port, inbound, outbound, admin, probes)
const SIDECARS: [(&str, u16, u16, u16, u16, u16); 3] = [
    ("web", 0, 0, WEB_OUTBOUND, 16000, 16020),
    ("reviews-v1", 18086, 16106, 0, 16100, 16120),
    ("reviews-v2", 18087, 16206, 0, 16200, 16220),
];

pub const APPS: [(&str, u16); 2] = [("reviews-v1", 18086), ("reviews-v2", 18087)];

const SERVICES: &str = "\
# The demo's Services (as Kubernetes writes them). Their endpoints are the
# sidecars that register with the control plane.
apiVersion: v1
kind: Service
metadata: { name: reviews, namespace: demo }
spec: { ports: [ { name: http, port: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: reviews-v1, namespace: demo }
spec: { ports: [ { name: http, port: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: reviews-v2, namespace: demo }
spec: { ports: [ { name: http, port: 8080 } ] }
";

const ROUTE: &str = "\
# A Gateway API HTTPRoute attached to the reviews Service (GAMMA): edit the
# weights and save; every sidecar follows within a second.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: demo }
spec:
  parentRefs: [ { group: \"\", kind: Service, name: reviews } ]
  rules:
    - backendRefs:
        - name: reviews-v1
          port: 8080
          weight: 100
        - name: reviews-v2
          port: 8080
          weight: 0
      retry: { attempts: 2, codes: [503] }
";

/// The children, killed with the demo (and ending by themselves when their
/// stdin closes, if the demo itself is killed).
pub struct Mesh(Vec<Child>);

impl Drop for Mesh {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn token() -> Result<String, DemoError> {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| DemoError::Mesh("no secure random source".into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|e| DemoError::Mesh(format!("{}: {e}", path.display())))
}

fn spawn(args: &[&str], log_level: &str) -> Result<Child, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::Mesh(e.to_string()))?;
    let mut cmd = Command::new(exe);
    // The child holds the read end of a pipe whose write end only the demo
    // holds: when the demo ends, however it ends, the child does too.
    cmd.args(args)
        .args(["--log-level", log_level, "--exit-with-stdin"])
        .stdin(Stdio::piped());
    cmd.spawn()
        .map_err(|e| DemoError::Mesh(format!("cannot start {args:?}: {e}")))
}

/// Writes the mesh folder, CA and tokens, and starts the control plane and
/// the sidecars.
pub fn start(log_level: &str) -> Result<Mesh, DemoError> {
    let dir = PathBuf::from(DIR);
    let state = dir.join("mesh-state");
    let ca = state.join("ca");
    let docs = dir.join("mesh");
    // A fresh mesh every start: a previous demo's CA and edits are gone.
    let _ = std::fs::remove_dir_all(&state);
    private_dir(&state)?;
    crate::tls::ca::init(&ca, TRUST_DOMAIN)?;
    std::fs::create_dir_all(&docs).map_err(|e| DemoError::Mesh(format!("{DIR}/mesh: {e}")))?;
    write(&docs.join("services.yaml"), SERVICES)?;
    write(Path::new(ROUTE_FILE), ROUTE)?;
    let mut tokens = String::new();
    for (sa, ..) in SIDECARS {
        let t = token()?;
        tokens.push_str(&format!(
            "- {{ token: {t}, identity: \"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/{sa}\" }}\n"
        ));
        write_private(&state.join(format!("{sa}.token")), &t)?;
    }
    write_private(&state.join("tokens.yaml"), &tokens)?;
    let mut mesh = Mesh(Vec::new());
    let (ca_s, docs_s, tokens_s) = (
        ca.display().to_string(),
        docs.display().to_string(),
        state.join("tokens.yaml").display().to_string(),
    );
    mesh.0.push(spawn(
        &[
            "control-plane",
            "--listen",
            CONTROL_PLANE,
            "--mesh-dir",
            &docs_s,
            "--ca-dir",
            &ca_s,
            "--tokens",
            &tokens_s,
            "--trust-domain",
            TRUST_DOMAIN,
            "--grace",
            "1s",
            "--watch-interval",
            "300ms",
        ],
        log_level,
    )?);
    for (sa, app, inbound, outbound, admin, probes) in SIDECARS {
        let bootstrap = format!(
            "# The {sa} sidecar's bootstrap: everything else comes from the control plane.\n\
             admin: {{ address: \"127.0.0.1:{admin}\", probes: \"127.0.0.1:{probes}\" }}\n\
             node: {{ id: {sa}, service: {sa}, namespace: {NS} }}\n\
             identity: {{ trust_domain: {TRUST_DOMAIN}, source: {{ control_plane: true }} }}\n\
             feed:\n  control_plane: [\"https://{CONTROL_PLANE}\"]\n  ca: {ca_s}/ca.pem\n  \
             token_file: {}\n  service_account: {sa}\n  address: 127.0.0.1\n  \
             inbound_port: {inbound}\n  outbound_port: {outbound}\n  app_port: {app}\n",
            state.join(format!("{sa}.token")).display()
        );
        let path = state.join(format!("{sa}.yaml"));
        write(&path, &bootstrap)?;
        let p = path.display().to_string();
        mesh.0.push(spawn(
            &["run", "--config", &p, "--threads", "1"],
            log_level,
        )?);
    }
    Ok(mesh)
}
