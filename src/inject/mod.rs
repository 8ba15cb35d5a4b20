//! Sidecar injection: `outrigger inject` (Kubernetes YAML in, YAML out) and
//! the control plane's admission webhook (`webhook`) share this code.
//!
//! A pod gets `outrigger-init` (redirect rules, `outrigger init`) and the
//! proxy, as a native sidecar (an init container with `restartPolicy:
//! Always`: it starts, and is ready, before the app, and a Job still
//! completes) or, for clusters before 1.29, a classic first container. The
//! proxy's bootstrap is an environment variable whose `$(POD_NAME)`-style
//! references the kubelet fills from the downward API. Injecting twice is
//! injecting once; documents that hold no pod come out byte for byte.

pub mod webhook;

use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;

pub const PROXY: &str = "outrigger-proxy";
pub const INIT: &str = "outrigger-init";
pub const INJECT_ANNOTATION: &str = "outrigger.io/inject";
pub const INJECTED_ANNOTATION: &str = "outrigger.io/injected";
const TOKEN_DIR: &str = "/var/run/secrets/outrigger";

/// The sidecar's ports.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub probes: u16,
    pub admin: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound: 15006,
            probes: 15020,
            admin: 15000,
        }
    }
}

/// What injection puts into a pod (`inject.yaml`, camelCase as the chart
/// writes it).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Settings {
    pub image: String,
    /// The init container's image: it runs `outrigger init`, which needs
    /// `iptables` (the proxy's own image is `scratch`).
    pub init_image: String,
    pub image_pull_policy: String,
    pub control_plane: String,
    /// The mesh CA certificate the proxies trust the control plane by;
    /// read by the injector and embedded in the pod.
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(skip)]
    pub ca_pem: String,
    pub trust_domain: String,
    /// Native sidecar (Kubernetes 1.29+); false: a classic first container.
    pub native: bool,
    pub resources: Value,
    #[serde(rename = "proxyUID")]
    pub proxy_uid: u32,
    pub ports: Ports,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(rename = "excludeOutboundCIDRs")]
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: format!("outrigger:{}", env!("CARGO_PKG_VERSION")),
            init_image: format!("outrigger-init:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            control_plane: "https://outrigger-control-plane.outrigger.svc:15010".into(),
            ca_file: None,
            ca_pem: String::new(),
            trust_domain: "cluster.local".into(),
            native: true,
            // The chart's sizing (benches/load.py) for 1,000 req/s.
            resources: json!({
                "requests": { "cpu": "18m", "memory": "17Mi" },
                "limits": { "cpu": "36m", "memory": "34Mi" }
            }),
            proxy_uid: 1337,
            ports: Ports::default(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl Settings {
    /// Reads `inject.yaml` (absent: the defaults), then the CA it names.
    pub fn load(path: Option<&Path>) -> Result<Settings, SettingsError> {
        let mut s = match path {
            None => Settings::default(),
            Some(p) => {
                let bad = |message: String| SettingsError::File {
                    path: p.display().to_string(),
                    message,
                };
                let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
                let de = serde_yaml::Deserializer::from_str(&text);
                serde_path_to_error::deserialize(de)
                    .map_err(|e| bad(format!("{}: {}", e.path(), e.inner())))?
            }
        };
        if let Some(ca) = &s.ca_file {
            s.ca_pem = std::fs::read_to_string(ca).map_err(|e| SettingsError::File {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
        }
        Ok(s)
    }
}

/// Why one document could not be injected: which document (1-based), the
/// field, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("document {document}: {field}: {message}")]
pub struct InjectError {
    pub document: usize,
    pub field: String,
    pub message: String,
}

/// A problem inside one pod spec: (field, message).
type PodError = (String, String);

/// What happened to one pod.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    /// `outrigger.io/inject: disabled`.
    Disabled,
}

/// Injects every pod template in a multi-document YAML stream. Documents
/// without a pod (a Service, a ConfigMap) and comments between documents
/// are kept as they were, byte for byte. All or nothing: on any error
/// nothing is returned.
pub fn inject_yaml(text: &str, s: &Settings) -> Result<String, InjectError> {
    let mut out = String::with_capacity(text.len() * 2);
    for (i, (sep, doc)) in split_documents(text).into_iter().enumerate() {
        let n = i + 1;
        out.push_str(sep);
        let value: serde_yaml::Value = match serde_yaml::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                return Err(InjectError {
                    document: n,
                    field: String::new(),
                    message: format!("not YAML: {e}"),
                });
            }
        };
        if value.is_null() {
            out.push_str(doc);
            continue;
        }
        let mut v: Value = serde_json::to_value(&value).map_err(|e| InjectError {
            document: n,
            field: String::new(),
            message: format!("not a Kubernetes document: {e}"),
        })?;
        let changed = inject_object(&mut v, s).map_err(|(field, message)| InjectError {
            document: n,
            field,
            message,
        })?;
        if changed {
            let yaml = serde_yaml::to_string(&v).map_err(|e| InjectError {
                document: n,
                field: String::new(),
                message: e.to_string(),
            })?;
            out.push_str(&yaml);
        } else {
            out.push_str(doc);
        }
    }
    Ok(out)
}

/// Splits at `---` lines: (the separator line(s) before, the document).
fn split_documents(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut sep_start = 0;
    let mut doc_start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") || t.starts_with("---#") {
            out.push((&text[sep_start..doc_start], &text[doc_start..pos]));
            sep_start = pos;
            doc_start = pos + line.len();
        }
        pos += line.len();
    }
    out.push((&text[sep_start..doc_start], &text[doc_start..]));
    // A stream that starts with `---` has an empty first document.
    if out.len() > 1 && out[0].1.trim().is_empty() && out[0].0.is_empty() {
        let (_, first) = out.remove(0);
        let (sep, doc) = out[0];
        // Keep the leading text (comments) in front of the separator.
        let start = first.as_ptr() as usize - text.as_ptr() as usize;
        let end = sep.as_ptr() as usize - text.as_ptr() as usize + sep.len();
        out[0] = (&text[start..end], doc);
    }
    out
}

/// Injects the pod template(s) of one object; whether anything changed.
pub fn inject_object(v: &mut Value, s: &Settings) -> Result<bool, PodError> {
    let Some(kind) = v.get("kind").and_then(Value::as_str).map(str::to_string) else {
        return Err(("kind".into(), "missing: not a Kubernetes object".into()));
    };
    let template = |v: &mut Value, path: &[&str]| -> Result<bool, PodError> {
        let mut at: &mut Value = v;
        for p in path {
            at = at
                .get_mut(*p)
                .ok_or_else(|| (path.join("."), "missing".to_string()))?;
        }
        inject_pod(at, s)
            .map(|o| o == Outcome::Injected)
            .map_err(|(f, m)| (format!("{}.{f}", path.join(".")), m))
    };
    match kind.as_str() {
        "Pod" => inject_pod(v, s).map(|o| o == Outcome::Injected),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => template(v, &["spec", "template"]),
        "CronJob" => template(v, &["spec", "jobTemplate", "spec", "template"]),
        "List" => {
            let mut any = false;
            if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
                for (i, item) in items.iter_mut().enumerate() {
                    any |=
                        inject_object(item, s).map_err(|(f, m)| (format!("items[{i}].{f}"), m))?;
                }
            }
            Ok(any)
        }
        "PodTemplate" => template(v, &["template"]),
        _ => Ok(false),
    }
}

fn annotation<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

fn label<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod.pointer("/metadata/labels")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

/// Injects one pod (or pod template: `metadata` + `spec`).
pub fn inject_pod(pod: &mut Value, s: &Settings) -> Result<Outcome, PodError> {
    if annotation(pod, INJECT_ANNOTATION) == Some("disabled") {
        return Ok(Outcome::Disabled);
    }
    if annotation(pod, INJECTED_ANNOTATION) == Some("true") {
        return Ok(Outcome::AlreadyInjected);
    }
    if !pod.is_object() {
        return Err((String::new(), "a pod must be a mapping".into()));
    }
    let owned = per_pod(pod, s)?;
    let s = &owned;
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| ("spec".to_string(), "missing".to_string()))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err((
            "spec.hostNetwork".into(),
            "a pod on the host network cannot get a sidecar (its redirect rules would catch the node's traffic)".into(),
        ));
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            (
                "spec.containers".to_string(),
                "missing or empty".to_string(),
            )
        })?;
    let ours = [
        s.ports.outbound,
        s.ports.inbound,
        s.ports.probes,
        s.ports.admin,
    ];
    let mut app_port: u16 = 0;
    for list in ["containers", "initContainers"] {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if name == PROXY || name == INIT {
                return Err((
                    format!("spec.{list}[{i}].name"),
                    format!("`{name}` is taken: the sidecar's container has that name"),
                ));
            }
            for (j, p) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let port = p.get("containerPort").and_then(Value::as_u64).unwrap_or(0);
                if let Some(o) = ours.iter().find(|o| u64::from(**o) == port) {
                    return Err((
                        format!("spec.{list}[{i}].ports[{j}].containerPort"),
                        format!("{o} is the sidecar's port"),
                    ));
                }
                let tcp = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP";
                if list == "containers" && app_port == 0 && tcp {
                    app_port = u16::try_from(port).unwrap_or(0);
                }
            }
        }
    }
    let app_name = containers[0]
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("app")
        .to_string();
    let sa = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let service = label(pod, "app.kubernetes.io/name")
        .or_else(|| label(pod, "app"))
        .unwrap_or(&sa)
        .to_string();
    // With inbound traffic redirected, the kubelet's plaintext HTTP probes
    // would meet the proxy's strict mTLS: they go to the probe port, which
    // asks the app on loopback.
    let mut app_probes = serde_json::Map::new();
    if app_port > 0
        && let Some(cs) = pod
            .pointer_mut("/spec/containers")
            .and_then(Value::as_array_mut)
    {
        for c in cs.iter_mut() {
            rewrite_probes(c, s, &mut app_probes);
        }
    }
    let (proxy, init, volume) = (
        proxy_container(s, &service, &sa, app_port, &app_probes),
        init_container(s, app_port),
        json!({
            "name": "outrigger-token",
            "projected": { "sources": [ { "serviceAccountToken": {
                "audience": crate::control_plane::server::TOKEN_AUDIENCE,
                "expirationSeconds": 3600,
                "path": "token"
            } } ] }
        }),
    );
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ("spec".to_string(), "missing".to_string()))?;
    let list = |spec: &mut serde_json::Map<String, Value>, key: &str| -> Vec<Value> {
        spec.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut inits = list(spec, "initContainers");
    let mut apps = list(spec, "containers");
    let mut volumes = list(spec, "volumes");
    if s.native {
        let mut proxy = proxy;
        proxy["restartPolicy"] = json!("Always");
        // The app's containers start once the proxy is ready.
        proxy["startupProbe"] = probe(s, "/ready", 1, 120);
        inits.splice(0..0, [init, proxy]);
    } else {
        let mut proxy = proxy;
        // The kubelet starts the next container only once this hook
        // returns: the app starts after the proxy is ready.
        proxy["lifecycle"] = json!({ "postStart": { "exec": { "command": [
            "/outrigger", "wait-ready", "--probes",
            format!("127.0.0.1:{}", s.ports.probes), "--timeout", "120s",
            // A failed hook gets the proxy killed: after the wait, the app
            // starts anyway and readiness tells the rest.
            "--continue-on-timeout"
        ] } } });
        inits.insert(0, init);
        apps.insert(0, proxy);
    }
    volumes.push(volume);
    spec.insert("initContainers".into(), Value::Array(inits));
    spec.insert("containers".into(), Value::Array(apps));
    spec.insert("volumes".into(), Value::Array(volumes));
    let meta = pod
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
        .ok_or_else(|| ("metadata".to_string(), "not a mapping".to_string()))?;
    let ann = meta
        .as_object_mut()
        .map(|m| m.entry("annotations").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
            (
                "metadata.annotations".to_string(),
                "not a mapping".to_string(),
            )
        })?;
    ann.insert(INJECTED_ANNOTATION.into(), json!("true"));
    ann.entry("kubectl.kubernetes.io/default-container")
        .or_insert(json!(app_name));
    Ok(Outcome::Injected)
}

/// Points one container's HTTP probes at the probe port, recording where
/// each really goes.
fn rewrite_probes(c: &mut Value, s: &Settings, out: &mut serde_json::Map<String, Value>) {
    let name = c
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let named_port = |c: &Value, n: &str| -> Option<u64> {
        c.get("ports")?
            .as_array()?
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(n))?
            .get("containerPort")?
            .as_u64()
    };
    for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let Some(get) = c.get(kind).and_then(|p| p.get("httpGet")) else {
            continue;
        };
        if get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP") != "HTTP" {
            continue;
        }
        let port = match get.get("port") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(p)) => p.parse().ok().or_else(|| named_port(c, p)),
            _ => None,
        };
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        if s.exclude_inbound_ports.contains(&port) {
            continue;
        }
        let path = get
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_string();
        let ours = format!("/app-health/{name}/{kind}");
        out.insert(ours.clone(), json!({ "port": port, "path": path }));
        if let Some(g) = c.get_mut(kind).and_then(|p| p.get_mut("httpGet")) {
            g["path"] = json!(ours);
            g["port"] = json!(s.ports.probes);
            if let Some(o) = g.as_object_mut() {
                o.remove("host");
                o.remove("scheme");
            }
        }
    }
}

/// The pod's own annotations over the settings: excluded ports and CIDRs,
/// and the proxy's resources.
fn per_pod(pod: &Value, s: &Settings) -> Result<Settings, PodError> {
    let mut s = s.clone();
    let field = |k: &str| format!("metadata.annotations.{k}");
    let ports = |k: &str, v: &str| -> Result<Vec<u16>, PodError> {
        v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| (field(k), format!("`{p}` is not a port")))
            })
            .collect()
    };
    let k = "outrigger.io/exclude-inbound-ports";
    if let Some(v) = annotation(pod, k) {
        s.exclude_inbound_ports.extend(ports(k, v)?);
    }
    let k = "outrigger.io/exclude-outbound-ports";
    if let Some(v) = annotation(pod, k) {
        s.exclude_outbound_ports.extend(ports(k, v)?);
    }
    let k = "outrigger.io/exclude-outbound-cidrs";
    if let Some(v) = annotation(pod, k) {
        for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            crate::intercept::rules::parse_cidr(c)
                .map_err(|_| (field(k), format!("`{c}` is not an address/prefix")))?;
            s.exclude_outbound_cidrs.push(c.to_string());
        }
    }
    for (k, kind, res) in [
        ("outrigger.io/proxy-cpu-request", "requests", "cpu"),
        ("outrigger.io/proxy-memory-request", "requests", "memory"),
        ("outrigger.io/proxy-cpu-limit", "limits", "cpu"),
        ("outrigger.io/proxy-memory-limit", "limits", "memory"),
    ] {
        if let Some(v) = annotation(pod, k) {
            // A Kubernetes quantity: digits, an optional fraction and suffix.
            let ok = !v.is_empty()
                && v.chars().next().is_some_and(|c| c.is_ascii_digit())
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
            if !ok {
                return Err((field(k), format!("`{v}` is not a quantity")));
            }
            if !s.resources.is_object() {
                s.resources = json!({});
            }
            s.resources[kind][res] = json!(v);
        }
    }
    Ok(s)
}

fn probe(s: &Settings, path: &str, period: u32, failures: u32) -> Value {
    json!({
        "httpGet": { "path": path, "port": s.ports.probes },
        "periodSeconds": period,
        "failureThreshold": failures
    })
}

/// The proxy's bootstrap: who it is comes from the downward API (the
/// kubelet expands `$(VAR)` from the variables defined before it).
fn bootstrap(
    s: &Settings,
    service: &str,
    sa: &str,
    app_port: u16,
    app_probes: &serde_json::Map<String, Value>,
) -> String {
    let inbound = if app_port > 0 { s.ports.inbound } else { 0 };
    let ca = if s.ca_pem.is_empty() {
        String::new()
    } else {
        format!("  ca_pem: {}\n", json!(s.ca_pem))
    };
    let app_probes = if app_probes.is_empty() {
        String::new()
    } else {
        format!(", app_probes: {}", Value::Object(app_probes.clone()))
    };
    format!(
        "admin: {{ address: \"127.0.0.1:{admin}\", probes: \"0.0.0.0:{probes}\"{app_probes} }}\n\
         node: {{ id: \"$(POD_NAME)\", service: {service}, namespace: \"$(POD_NAMESPACE)\" }}\n\
         identity: {{ trust_domain: {td}, source: {{ control_plane: true }} }}\n\
         feed:\n  control_plane: [{cp}]\n{ca}  token_file: {TOKEN_DIR}/token\n  \
         service_account: {sa}\n  address: \"$(POD_IP)\"\n  inbound_port: {inbound}\n  \
         outbound_port: {outbound}\n  app_port: {app_port}\n",
        admin = s.ports.admin,
        probes = s.ports.probes,
        service = json!(service),
        td = json!(s.trust_domain),
        cp = json!(s.control_plane),
        sa = json!(sa),
        outbound = s.ports.outbound,
    )
}

fn proxy_container(
    s: &Settings,
    service: &str,
    sa: &str,
    app_port: u16,
    app_probes: &serde_json::Map<String, Value>,
) -> Value {
    let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
    json!({
        "name": PROXY,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "args": ["run"],
        "env": [
            { "name": "POD_NAME", "valueFrom": field("metadata.name") },
            { "name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace") },
            { "name": "POD_IP", "valueFrom": field("status.podIP") },
            { "name": "OUTRIGGER_CONFIG_YAML", "value": bootstrap(s, service, sa, app_port, app_probes) }
        ],
        "ports": [ { "name": "outrigger-probe", "containerPort": s.ports.probes, "protocol": "TCP" } ],
        "readinessProbe": probe(s, "/ready", 2, 3),
        "livenessProbe": probe(s, "/live", 10, 3),
        "resources": s.resources,
        "securityContext": {
            "runAsUser": s.proxy_uid,
            "runAsGroup": s.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] }
        },
        "volumeMounts": [ { "name": "outrigger-token", "mountPath": TOKEN_DIR, "readOnly": true } ]
    })
}

fn init_container(s: &Settings, app_port: u16) -> Value {
    let join = |v: &[String]| v.join(",");
    let mut inbound_excluded: Vec<String> = vec![s.ports.probes.to_string()];
    inbound_excluded.extend(s.exclude_inbound_ports.iter().map(u16::to_string));
    let mut args: Vec<String> = vec![
        "init".into(),
        "--proxy-uid".into(),
        s.proxy_uid.to_string(),
        "--outbound-port".into(),
        s.ports.outbound.to_string(),
        "--inbound-port".into(),
        // No app port, no inbound listener: inbound traffic is left alone.
        if app_port > 0 {
            s.ports.inbound.to_string()
        } else {
            "0".into()
        },
        "--exclude-inbound-ports".into(),
        join(&inbound_excluded),
    ];
    if !s.exclude_outbound_ports.is_empty() {
        let v: Vec<String> = s
            .exclude_outbound_ports
            .iter()
            .map(u16::to_string)
            .collect();
        args.extend(["--exclude-outbound-ports".into(), join(&v)]);
    }
    if !s.exclude_outbound_cidrs.is_empty() {
        args.extend([
            "--exclude-outbound-cidrs".into(),
            join(&s.exclude_outbound_cidrs),
        ]);
    }
    json!({
        "name": INIT,
        "image": s.init_image,
        "imagePullPolicy": s.image_pull_policy,
        "args": args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "10Mi" },
            "limits": { "cpu": "100m", "memory": "32Mi" }
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      serviceAccountName: web-sa
      containers:
        - name: web
          image: web:1
          ports: [ { containerPort: 8080 } ]
";

    fn settings() -> Settings {
        Settings {
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ..Settings::default()
        }
    }

    #[test]
    fn a_deployment_gets_init_and_a_native_sidecar() {
        let out = inject_yaml(DEPLOY, &settings()).unwrap();
        let v: Value = serde_yaml::from_str(&out).unwrap();
        let spec = &v["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], INIT);
        assert_eq!(spec["initContainers"][1]["name"], PROXY);
        assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(spec["containers"][0]["name"], "web");
        let env = &spec["initContainers"][1]["env"][3]["value"];
        let boot = env.as_str().unwrap();
        assert!(boot.contains("app_port: 8080"), "{boot}");
        assert!(boot.contains("service_account: \"web-sa\""), "{boot}");
        assert!(boot.contains("service: \"web\""), "{boot}");
        assert!(boot.contains("BEGIN CERTIFICATE"), "{boot}");
        assert_eq!(
            v["spec"]["template"]["metadata"]["annotations"][INJECTED_ANNOTATION],
            "true"
        );
    }

    #[test]
    fn injecting_twice_is_injecting_once() {
        let once = inject_yaml(DEPLOY, &settings()).unwrap();
        let twice = inject_yaml(&once, &settings()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn unrelated_documents_and_comments_come_out_unchanged() {
        let svc = "# a comment\napiVersion: v1\nkind: Service   # odd spacing kept\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        let text = format!("{svc}---\n{DEPLOY}---\n{svc}");
        let out = inject_yaml(&text, &settings()).unwrap();
        assert!(out.starts_with(&format!("{svc}---\n")), "{out}");
        assert!(out.ends_with(&format!("---\n{svc}")), "{out}");
    }

    #[test]
    fn every_kind_with_a_pod_is_injected() {
        for (kind, path) in [
            ("Pod", "/spec"),
            ("StatefulSet", "/spec/template/spec"),
            ("DaemonSet", "/spec/template/spec"),
            ("ReplicaSet", "/spec/template/spec"),
            ("Job", "/spec/template/spec"),
            ("CronJob", "/spec/jobTemplate/spec/template/spec"),
        ] {
            let pod = "{ metadata: {}, spec: { containers: [ { name: a, image: a } ] } }";
            let doc = match kind {
                "Pod" => "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [ { name: a, image: a } ] }\n".to_string(),
                "CronJob" => format!(
                    "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{ name: c }}\nspec: {{ schedule: '* * * * *', jobTemplate: {{ spec: {{ template: {pod} }} }} }}\n"
                ),
                _ => format!(
                    "apiVersion: apps/v1\nkind: {kind}\nmetadata: {{ name: x }}\nspec: {{ template: {pod} }}\n"
                ),
            };
            let out = inject_yaml(&doc, &settings()).unwrap();
            let v: Value = serde_yaml::from_str(&out).unwrap();
            let spec = v.pointer(path).unwrap_or_else(|| panic!("{kind}: {out}"));
            assert_eq!(spec["initContainers"][1]["name"], PROXY, "{kind}");
            // No app port: no inbound redirect.
            let args = spec["initContainers"][0]["args"].to_string();
            assert!(args.contains("\"--inbound-port\",\"0\""), "{kind}: {args}");
        }
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n  - {}\n",
            serde_json::to_string(&serde_yaml::from_str::<Value>(DEPLOY).unwrap()).unwrap()
        );
        let out = inject_yaml(&list, &settings()).unwrap();
        assert!(out.contains(PROXY));
    }

    #[test]
    fn classic_sidecars_go_first_among_the_containers() {
        let s = Settings {
            native: false,
            ..settings()
        };
        let v: Value = serde_yaml::from_str(&inject_yaml(DEPLOY, &s).unwrap()).unwrap();
        let spec = &v["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["name"], PROXY);
        assert!(spec["containers"][0].get("restartPolicy").is_none());
        // The app waits for the proxy: a postStart hook holds it back.
        let hook = &spec["containers"][0]["lifecycle"]["postStart"]["exec"]["command"];
        assert_eq!(hook[1], "wait-ready", "{hook}");
        assert_eq!(hook[3], "127.0.0.1:15020", "{hook}");
        assert_eq!(hook[6], "--continue-on-timeout", "{hook}");
        assert_eq!(spec["initContainers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn conflicts_and_bad_documents_name_the_document_and_the_field() {
        let taken = DEPLOY.replace("- name: web", "- name: outrigger-proxy");
        let e = inject_yaml(&format!("kind: ConfigMap\n---\n{taken}"), &settings()).unwrap_err();
        assert_eq!(e.document, 2);
        assert_eq!(e.field, "spec.template.spec.containers[0].name");
        let port = DEPLOY.replace("containerPort: 8080", "containerPort: 15001");
        let e = inject_yaml(&port, &settings()).unwrap_err();
        assert_eq!(
            e.field,
            "spec.template.spec.containers[0].ports[0].containerPort"
        );
        let e = inject_yaml("just: [unclosed", &settings()).unwrap_err();
        assert!(e.message.starts_with("not YAML"), "{e}");
        let e = inject_yaml("- a list\n", &settings()).unwrap_err();
        assert_eq!(e.field, "kind");
        let host = DEPLOY.replace("serviceAccountName: web-sa", "hostNetwork: true");
        let e = inject_yaml(&host, &settings()).unwrap_err();
        assert_eq!(e.field, "spec.template.spec.hostNetwork");
    }

    #[test]
    fn a_pods_annotations_tune_its_sidecar() {
        let annotated = DEPLOY.replace(
            "metadata: { labels: { app: web } }",
            "metadata: { labels: { app: web }, annotations: { outrigger.io/exclude-outbound-ports: \"5432, 6379\", outrigger.io/exclude-inbound-ports: \"9090\", outrigger.io/exclude-outbound-cidrs: 10.0.0.0/8, outrigger.io/proxy-memory-limit: 64Mi } }",
        );
        let v: Value =
            serde_yaml::from_str(&inject_yaml(&annotated, &settings()).unwrap()).unwrap();
        let spec = &v["spec"]["template"]["spec"];
        let args = spec["initContainers"][0]["args"].to_string();
        assert!(args.contains("\"5432,6379\""), "{args}");
        assert!(args.contains("\"15020,9090\""), "{args}");
        assert!(args.contains("10.0.0.0/8"), "{args}");
        assert_eq!(
            spec["initContainers"][1]["resources"]["limits"]["memory"],
            "64Mi"
        );
        assert_eq!(
            spec["initContainers"][1]["resources"]["requests"]["memory"],
            "17Mi"
        );
        let bad = DEPLOY.replace(
            "metadata: { labels: { app: web } }",
            "metadata: { labels: { app: web }, annotations: { outrigger.io/exclude-outbound-ports: \"http\" } }",
        );
        let e = inject_yaml(&bad, &settings()).unwrap_err();
        assert_eq!(
            e.field,
            "spec.template.metadata.annotations.outrigger.io/exclude-outbound-ports"
        );
    }

    #[test]
    fn a_disabled_pod_is_left_alone() {
        let off = DEPLOY.replace(
            "metadata: { labels: { app: web } }",
            "metadata: { labels: { app: web }, annotations: { outrigger.io/inject: disabled } }",
        );
        assert_eq!(inject_yaml(&off, &settings()).unwrap(), off);
    }
}
