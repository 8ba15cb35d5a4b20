//! Sidecar injection from a user's side: `outrigger inject` on a team's
//! manifests, and the control plane's admission webhook answering real
//! AdmissionReview documents over HTTPS (with a certificate made as Helm
//! makes it: RSA, PKCS#1). What comes out is written to
//! `target/inject-out/` for CI to check with kubernetes-validate.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::*;

const FIXTURE: &str = "tests/fixtures/k8s-app.yaml";

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/inject-out");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn inject(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut i = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The bootstrap a kubelet would hand the proxy, `$(VAR)`s filled in.
fn bootstrap_of(proxy: &Value) -> String {
    let env = proxy["env"].as_array().unwrap();
    let boot = env
        .iter()
        .find(|e| e["name"] == "OUTRIGGER_CONFIG_YAML")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    boot.replace("$(POD_NAME)", "web-7d9f-x2k")
        .replace("$(POD_NAMESPACE)", "shop")
        .replace("$(POD_IP)", "10.1.2.3")
}

#[test]
fn inject_adds_the_sidecar_to_every_pod_and_nothing_else() {
    let dir = temp_dir();
    let ca = dir.join("ca");
    outrigger::tls::ca::init(&ca, "cluster.local").unwrap();
    let settings = dir.join("inject.yaml");
    std::fs::write(
        &settings,
        format!(
            "image: outrigger:test\ncontrolPlane: https://outrigger-control-plane.outrigger.svc:15010\ncaFile: {}\ntrustDomain: cluster.local\nexcludeOutboundCIDRs: [169.254.169.254/32]\n",
            ca.join("ca.pem").display()
        ),
    )
    .unwrap();
    let s = settings.display().to_string();
    let (code, out, err) = inject(&["-f", FIXTURE, "--inject-config", &s], None);
    assert_eq!(code, 0, "{err}");
    std::fs::write(out_dir().join("native.yaml"), &out).unwrap();
    let d = docs(&out);
    assert_eq!(d.len(), 6);
    let kinds: Vec<&str> = d.iter().map(|x| x["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Service",
            "Deployment",
            "StatefulSet",
            "CronJob",
            "DaemonSet",
            "ConfigMap"
        ]
    );
    let pod_spec = |i: usize, path: &str| d[i].pointer(path).unwrap().clone();
    for (i, path) in [
        (1, "/spec/template/spec"),
        (2, "/spec/template/spec"),
        (3, "/spec/jobTemplate/spec/template/spec"),
    ] {
        let spec = pod_spec(i, path);
        let inits = spec["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], "outrigger-init", "{kinds:?}[{i}]");
        assert_eq!(inits[1]["name"], "outrigger-proxy");
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(inits[1]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(inits[1]["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            inits[0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        // The bootstrap the kubelet fills in is a config the proxy takes.
        let boot = dir.join(format!("boot-{i}.yaml"));
        std::fs::write(&boot, bootstrap_of(&inits[1])).unwrap();
        let v = Command::new(bin())
            .arg("validate")
            .arg(&boot)
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    let web = pod_spec(1, "/spec/template/spec");
    // The app's probe now goes to the probe port, which asks the app.
    assert_eq!(
        web["containers"][0]["readinessProbe"]["httpGet"],
        json!({ "path": "/app-health/web/readinessProbe", "port": 15020 })
    );
    assert!(
        bootstrap_of(&web["initContainers"][1]).contains(
            r#"app_probes: {"/app-health/web/readinessProbe":{"path":"/healthz","port":8080}}"#
        ),
        "{}",
        bootstrap_of(&web["initContainers"][1])
    );
    let args = web["initContainers"][0]["args"].to_string();
    assert!(args.contains("\"--inbound-port\",\"15006\""), "{args}");
    assert!(args.contains("169.254.169.254/32"), "{args}");
    assert!(bootstrap_of(&web["initContainers"][1]).contains("app_port: 8080"));
    // The disabled DaemonSet, the Service and the ConfigMap: byte for byte.
    let original = std::fs::read_to_string(FIXTURE).unwrap();
    for part in original.split("\n---\n").filter(|p| {
        p.contains("kind: Service") || p.contains("kind: ConfigMap") || p.contains("DaemonSet")
    }) {
        assert!(out.contains(part.trim_start_matches('\n')), "{part}");
    }
    // Twice is once.
    let (code, again, _) = inject(&["--inject-config", &s], Some(&out));
    assert_eq!(code, 0);
    assert_eq!(again, out);
    // Classic sidecars for older clusters.
    let (code, classic, _) = inject(&["-f", FIXTURE, "--classic"], None);
    assert_eq!(code, 0);
    std::fs::write(out_dir().join("classic.yaml"), &classic).unwrap();
    let d = docs(&classic);
    assert_eq!(
        d[1].pointer("/spec/template/spec/containers/0/name"),
        Some(&json!("outrigger-proxy"))
    );
}

#[test]
fn inject_refuses_bad_input_whole_naming_document_and_field() {
    let fixture = std::fs::read_to_string(FIXTURE).unwrap();
    for (input, want) in [
        (
            fixture.replace("- name: web\n", "- name: outrigger-proxy\n"),
            "document 2: spec.template.spec.containers[0].name",
        ),
        (
            fixture.replace("containerPort: 5432", "containerPort: 15020"),
            "document 3: spec.template.spec.containers[0].ports[0].containerPort",
        ),
        (format!("{fixture}---\n: : not yaml [\n"), "document 7"),
        ("just text\n".to_string(), "document 1: kind"),
    ] {
        let (code, out, err) = inject(&[], Some(&input));
        assert_eq!(code, 1, "{want}: {err}");
        assert!(out.is_empty(), "nothing written half-way: {out}");
        assert!(err.contains(want), "{want}: {err}");
    }
    let (code, _, err) = inject(&["-f", "/nonexistent.yaml"], None);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.yaml"), "{err}");
}

/// Applies the add/replace operations our webhook emits (RFC 6902).
fn apply_patch(doc: &mut Value, ops: &Value) {
    for op in ops.as_array().unwrap() {
        let path = op["path"].as_str().unwrap();
        let (parent, key) = path.rsplit_once('/').unwrap();
        let target = if parent.is_empty() {
            &mut *doc
        } else {
            doc.pointer_mut(parent).unwrap()
        };
        match op["op"].as_str().unwrap() {
            "add" | "replace" => {
                target[key] = op["value"].clone();
            }
            other => panic!("unexpected op {other}"),
        }
    }
}

#[test]
fn the_webhook_answers_admission_reviews_over_https() {
    let dir = temp_dir();
    let ca = dir.join("ca");
    outrigger::tls::ca::init(&ca, "cluster.local").unwrap();
    // A serving certificate as Helm's genSignedCert makes it.
    let (key, cert) = (dir.join("tls.key"), dir.join("tls.crt"));
    let ok = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "1",
            "-subj",
            "/CN=outrigger-control-plane",
            "-key",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    let (ca_s, mesh_s, cert_s, key_s) = (
        ca.display().to_string(),
        mesh.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let cp = ProxyProc::control_plane(&[
        "--listen",
        "127.0.0.1:0",
        "--mesh-dir",
        &mesh_s,
        "--ca-dir",
        &ca_s,
        "--webhook-listen",
        "127.0.0.1:0",
        "--webhook-cert",
        &cert_s,
        "--webhook-key",
        &key_s,
    ]);
    let line = cp.wait_log(|l| l.contains("injection webhook listening"));
    let v: Value = serde_json::from_str(&line).unwrap();
    let port = v["fields"]["address"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let post = |body: &str| -> (u16, Value) {
        let file = dir.join("review.json");
        std::fs::write(&file, body).unwrap();
        let out = Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &cert_s,
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
            ])
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg(format!("https://localhost:{port}/inject"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web-1", "namespace": "shop", "labels": { "app": "web" } },
        "spec": { "serviceAccountName": "web",
                  "containers": [ { "name": "web", "image": "web:1",
                                    "ports": [ { "containerPort": 8080 } ] } ] }
    });
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": { "uid": "b5d5a4a4-3c3c-4e4e-9f9f-0a0a0a0a0a0a",
                     "kind": { "group": "", "version": "v1", "kind": "Pod" },
                     "resource": { "group": "", "version": "v1", "resource": "pods" },
                     "namespace": "shop", "operation": "CREATE", "object": pod }
    });
    let (code, answer) = post(&review.to_string());
    assert_eq!(code, 200, "{answer}");
    let r = &answer["response"];
    assert_eq!(r["uid"], "b5d5a4a4-3c3c-4e4e-9f9f-0a0a0a0a0a0a");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    use base64::Engine;
    let patch: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);
    assert_eq!(
        patched["spec"]["initContainers"][1]["name"],
        "outrigger-proxy"
    );
    assert_eq!(
        patched["metadata"]["annotations"]["outrigger.io/injected"],
        "true"
    );
    std::fs::write(
        out_dir().join("webhook-pod.yaml"),
        serde_yaml::to_string(&patched).unwrap(),
    )
    .unwrap();
    // The patched pod reviewed again: nothing more to do.
    let mut again = review.clone();
    again["request"]["object"] = patched;
    let (code, answer) = post(&again.to_string());
    assert_eq!(code, 200);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // Malformed reviews: an error review, and the webhook serves on.
    for bad in [
        "{ not json",
        "{}",
        "{\"kind\":\"AdmissionReview\",\"request\":{}}",
    ] {
        let (code, answer) = post(bad);
        assert_eq!(code, 400, "{bad}");
        assert_eq!(answer["response"]["allowed"], false, "{bad}");
    }
    let (code, _) = post(&review.to_string());
    assert_eq!(code, 200);
    assert!(
        metric_value(
            &String::from_utf8_lossy(
                &Command::new("curl")
                    .args(["-sk", "--http2"])
                    .arg(format!("https://{}/metrics", cp.addr("cp")))
                    .output()
                    .unwrap()
                    .stdout
            ),
            "outrigger_cp_injections_total",
            &["result=\"malformed\""]
        ) == Some(3.0)
    );
}

/// The probe port answers the app's own probes by asking the app on
/// loopback: only the listed paths, with the kubelet's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_probes_are_answered_by_asking_the_app() {
    let app = Upstream::start("app").await;
    let port = app.addr.port();
    let p = ProxyProc::start(&format!(
        "admin: {{ address: 127.0.0.1:0, probes: 127.0.0.1:0, app_probes: {{ /app-health/web/readinessProbe: {{ port: {port}, path: /healthz }} }} }}\nlisteners: [ {{ name: outbound, role: outbound, address: 127.0.0.1:0 }} ]\n"
    ));
    let get = |path: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "x-probe: kubelet",
            ])
            .arg(format!("http://{}{path}", p.probes))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get("/app-health/web/readinessProbe"), "200");
    {
        let seen = app.seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(last.path, "/healthz");
        assert_eq!(last.headers.get("x-probe").unwrap(), "kubelet");
    }
    // Not a listed path: no relay to the app.
    assert_eq!(get("/app-health/web/other"), "404");
    assert_eq!(app.hits(), 1);
    // The app is down: the probe fails.
    app.stop();
    assert_eq!(get("/app-health/web/readinessProbe"), "503");
}
