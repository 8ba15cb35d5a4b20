//! The mesh dashboard and `outrigger stat` end to end: a control plane on
//! a directory of mesh documents, proxies fed by it reporting their
//! traffic over their feed, live requests through them; the dashboard
//! loaded in Debian's headless Chromium (DOM checked, a screenshot kept
//! in `target/dashboard/`), `outrigger stat` against the control plane and
//! against one proxy's admin port, and `/v1/report` refusing what it must.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::mesh::*;
use support::pki::TD;
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn mesh_json(cp: &ProxyProc) -> serde_json::Value {
    let (code, body) = cp_curl(cp, "GET", "/v1/mesh", Some(&token_for("dashboard")), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn row<'a>(
    v: &'a serde_json::Value,
    table: &str,
    key: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    v[table].as_array()?.iter().find(|r| r[key] == name)
}

/// Polls `/v1/mesh` until `pred` holds (reports come every 5 s).
async fn until_mesh(
    cp: &ProxyProc,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = mesh_json(cp);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// web calls orders (some slow requests), payments (one in three
/// answers 500) and stock (one of two replicas always answers 500), from
/// four clients, until stopped.
fn load(addr: std::net::SocketAddr) -> (Arc<AtomicBool>, Arc<AtomicUsize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..4usize {
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            let c = TestClient::h1(addr);
            let mut n = i;
            while !stop.load(Ordering::SeqCst) {
                let (host, path) = match n % 7 {
                    0 | 1 => ("orders", "/"),
                    2 => ("orders", "/slow"),
                    3 | 4 => ("payments", "/"),
                    5 => ("payments", "/status/500"),
                    _ => ("stock", "/"),
                };
                // Not `get`: a request cut off as the test ends is no failure.
                let req = http::Request::get(path)
                    .header("host", host)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                if let Ok(Ok(r)) = tokio::time::timeout(READY_TIMEOUT, c.request(req)).await {
                    let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                }
                done.fetch_add(1, Ordering::SeqCst);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    (stop, done)
}

/// A control plane, five proxies (web → orders, payments, stock × 2),
/// traffic, and stock's failing replica ejected by web's outlier detection.
struct Live {
    m: Mesh,
    cp: ProxyProc,
    web: ProxyProc,
    nodes: Vec<String>,
    /// The stock replica whose app answers 500.
    broken: String,
    _servers: Vec<ProxyProc>,
    _apps: Vec<Upstream>,
    stop: Arc<AtomicBool>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn live_mesh() -> Live {
    let m = Mesh::new(&["web", "orders", "payments", "stock", "dashboard"]);
    m.write(
        "services.yaml",
        &[service("orders"), service("payments"), service("stock")].join("---\n"),
    );
    m.write(
        "stock-policy.yaml",
        &format!("apiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: stock, namespace: {NS} }}\nspec: {{ targetRef: {{ kind: Service, name: stock }}, outlierDetection: {{ consecutive5xx: 3, baseEjection: 60s, maxEjectionPercent: 50 }} }}\n"),
    );
    let cp = m.control_plane(&[]);
    let orders_app = Upstream::with(
        "orders",
        UpstreamOpts {
            delay: Some(Duration::from_millis(30)),
            ..Default::default()
        },
    )
    .await;
    let payments_app = Upstream::start("payments").await;
    let stock_app = Upstream::start("stock").await;
    let broken_app = Upstream::with(
        "stock",
        UpstreamOpts {
            status: Some(500),
            ..Default::default()
        },
    )
    .await;
    let (orders, orders_id) = m.proxy_node(&[&cp], "orders", "orders", Some(&orders_app), "");
    let (payments, payments_id) =
        m.proxy_node(&[&cp], "payments", "payments", Some(&payments_app), "");
    let (stock, stock_id) = m.proxy_node(&[&cp], "stock", "stock", Some(&stock_app), "");
    let (broken, broken_id) = m.proxy_node(&[&cp], "stock", "stock", Some(&broken_app), "");
    let (web, web_id) = m.proxy_node(&[&cp], "web", "web", None, "");
    let c = TestClient::h1(web.addr("outbound"));
    for host in ["orders", "payments"] {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let r = get(&c, host, "/").await;
            if r.text() == host {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{host} never answered: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (stop, _) = load(web.addr("outbound"));
    let cp_ref = &cp;
    until_mesh(cp_ref, "the traffic never showed in /v1/mesh", |v| {
        ["shop/orders", "shop/payments"].iter().all(|s| {
            row(v, "services", "service", s)
                .is_some_and(|r| r["rate"].as_f64().unwrap_or(0.0) > 0.0)
        }) && row(v, "services", "service", "shop/orders")
            .is_some_and(|r| r["inbound"]["rate"].as_f64().unwrap_or(0.0) > 0.0)
    })
    .await;
    Live {
        m,
        cp,
        web,
        nodes: vec![web_id, orders_id, payments_id, stock_id],
        broken: broken_id,
        _servers: vec![orders, payments, stock, broken],
        _apps: vec![orders_app, payments_app, stock_app, broken_app],
        stop,
    }
}

/// Headless Chromium (Debian's package) on `url` with `args`, killed after
/// a minute: its stdout.
async fn chromium(args: Vec<String>, url: String) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs Debian's headless Chromium; CI installs the `chromium` package (.ci/run), locally: apt-get install -y chromium"
    );
    tokio::task::spawn_blocking(move || {
        let profile = temp_dir().join("chromium-profile");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(&args)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        let _ = std::fs::remove_dir_all(&profile);
        assert!(
            status.is_some_and(|s| s.success()),
            "chromium {args:?} failed ({status:?}):\n{err}"
        );
        out
    })
    .await
    .unwrap()
}

/// The value of `attr` on the element whose `key` attribute is `name`.
fn attr_after(dom: &str, key: &str, name: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("{key}=\"{name}\""))?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[at..tag_end];
    let v = tag.split_once(&format!("{attr}=\""))?.1;
    Some(v.split('"').next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_live_mesh_in_a_real_browser() {
    let live = live_mesh().await;
    let cp = &live.cp;
    // The page is served to anyone; the data behind it is not.
    let (code, page) = cp_curl(cp, "GET", "/", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>Outrigger mesh</title>"));
    let (code, _) = cp_curl(cp, "GET", "/v1/mesh", None, None);
    assert_eq!(code, 401, "/v1/mesh without a token");
    // Edges with identities, verified by the callees' mTLS peers.
    let v = until_mesh(cp, "no edges", |v| {
        v["edges"].as_array().is_some_and(|e| e.len() >= 2)
    })
    .await;
    let e = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == "shop/web" && e["to"] == "shop/payments")
        .unwrap_or_else(|| panic!("no web → payments edge: {v:#}"));
    assert_eq!(
        e["from_identities"][0],
        format!("spiffe://{TD}/ns/{NS}/sa/web")
    );
    assert_eq!(
        e["to_identities"][0],
        format!("spiffe://{TD}/ns/{NS}/sa/payments")
    );
    assert_eq!(e["mtls"], true, "{e}");
    let success = e["success"].as_f64().unwrap();
    assert!(
        success > 0.3 && success < 0.95,
        "one in three payments calls fails: {e}"
    );

    let url = format!(
        "https://{}/#token={}",
        cp.addr("cp"),
        token_for("dashboard")
    );
    // stock's failing replica, ejected by web: named by its node.
    let v = until_mesh(cp, "the failing stock replica was never ejected", |v| {
        v["ejected"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    let ej = &v["ejected"][0];
    assert_eq!(ej["cluster"], "stock.shop:8080", "{ej}");
    assert_eq!(ej["target"], "shop/stock", "{ej}");
    assert_eq!(ej["addresses"][0]["node"], live.broken.as_str(), "{ej}");
    // A snapshot the proxies cannot apply (a zero connect timeout): they
    // nack it and keep serving; the dashboard highlights them.
    live.m.write(
        "orders-policy.yaml",
        &format!("apiVersion: outrigger.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: orders, namespace: {NS} }}\nspec: {{ targetRef: {{ kind: Service, name: orders }}, connectTimeout: 0s }}\n"),
    );
    let web = live.nodes[0].clone();
    let v = until_mesh(cp, "the nack never showed", |v| {
        row(v, "proxies", "node", &web).is_some_and(|p| p["nacked"] == true)
    })
    .await;
    let p = row(&v, "proxies", "node", &web).unwrap();
    assert!(
        p["last_nack"]["error"]
            .as_str()
            .unwrap()
            .contains("connect_timeout"),
        "{p}"
    );
    let dom = chromium(vec!["--dump-dom".into()], url.clone()).await;
    assert!(
        dom.contains(&format!("data-node=\"{web}\" class=\"nack")),
        "the nack is not highlighted:\n{dom}"
    );
    assert!(
        dom.contains("data-cluster=\"stock.shop:8080\"") && dom.contains(&live.broken),
        "the ejected endpoint is not shown:\n{dom}"
    );
    assert!(
        dom.contains("data-loaded="),
        "the page never loaded /v1/mesh:\n{dom}"
    );
    for s in ["shop/orders", "shop/payments", "shop/web"] {
        assert!(
            dom.contains(&format!("data-service=\"{s}\"")),
            "{s} not shown:\n{dom}"
        );
    }
    for s in ["shop/orders", "shop/payments"] {
        let rate: f64 = attr_after(&dom, "data-service", s, "data-rate")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0.0);
        assert!(rate > 0.0, "{s} shows no rate:\n{dom}");
    }
    for node in &live.nodes {
        assert!(
            dom.contains(&format!("data-node=\"{node}\"")),
            "proxy {node} not shown:\n{dom}"
        );
    }
    assert!(
        dom.contains("shop/web → shop/payments"),
        "no edge shown:\n{dom}"
    );
    assert!(dom.contains("<svg"), "no graph:\n{dom}");
    assert!(dom.contains("/s</td>"), "no rate column:\n{dom}");
    // The token left the address bar; nothing of it is in the page.
    assert!(!dom.contains(&token_for("dashboard")));

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        vec![
            format!("--screenshot={}", png.display()),
            "--window-size=1280,900".into(),
            "--hide-scrollbars".into(),
        ],
        url,
    )
    .await;
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    assert!(bytes.len() > 20_000, "an empty page? {} bytes", bytes.len());
    eprintln!("dashboard screenshot: {}", png.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrigger_stat_prints_the_mesh_and_one_proxy() {
    let live = live_mesh().await;
    let token = live.m.token_file("dashboard");
    let ca = live.m.ca_dir.join("ca.pem");
    let url = format!("https://{}", live.cp.addr("cp"));
    let stat = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin())
                .arg("stat")
                .args(&args)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "stat {args:?}: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
            text
        })
    };
    let cp_args: Vec<String> = vec![
        "--control-plane".into(),
        url.clone(),
        "--token-file".into(),
        token.display().to_string(),
        "--ca".into(),
        ca.display().to_string(),
        "--trust-domain".into(),
        TD.into(),
    ];
    let text = stat(cp_args.clone()).await.unwrap();
    eprintln!("{text}");
    assert!(text.contains("SERVICE") && text.contains("ROUTE"), "{text}");
    for s in ["shop/orders", "shop/payments"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("{s} missing:\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(
            cols[2].ends_with("/s") && cols[2] != "0/s",
            "{s} has no rate: {line}"
        );
        assert!(cols[3].ends_with('%'), "{line}");
        assert!(cols[4].ends_with("ms") && cols[5].ends_with("ms"), "{line}");
    }
    // The routes table: the catch-all routes to both services.
    assert!(
        text.lines().any(|l| l.starts_with("orders.shop ")),
        "{text}"
    );

    // One proxy, from its admin port: two scrapes 1 s apart.
    let text = stat(vec!["--admin".into(), live.web.admin.to_string()])
        .await
        .unwrap();
    eprintln!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("outbound") && l.contains("payments.shop"))
        .unwrap_or_else(|| panic!("no payments route:\n{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert!(cols[3] != "0/s", "{line}");
    let success: f64 = cols[4].trim_end_matches('%').parse().unwrap();
    assert!(success < 95.0, "one in three fails: {line}");

    // --watch redraws every 2 s until stopped.
    let mut args = cp_args;
    args.push("--watch".into());
    let mut child = Command::new(bin())
        .arg("stat")
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap();
    assert!(text.matches("SERVICE").count() >= 2, "no redraw:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_checked_bounded_and_go_with_their_node() {
    let m = Mesh::new(&["web", "orders", "dashboard"]);
    m.write("services.yaml", &service("orders"));
    let cp = m.control_plane(&[]);
    let app = Upstream::start("orders").await;
    let (orders, orders_id) = m.proxy_node(&[&cp], "orders", "orders", Some(&app), "");
    let (web, web_id) = m.proxy_node(&[&cp], "web", "web", None, "");
    // Both report right after their first config.
    until_mesh(&cp, "no reports", |v| {
        v["proxies"].as_array().is_some_and(|p| {
            p.len() == 2 && p.iter().all(|x| x["last_report_seconds_ago"].is_number())
        })
    })
    .await;
    let body = m.dir.join("report.json");
    let post = |json: &str| {
        std::fs::write(&body, json).unwrap();
        cp_curl(
            &cp,
            "POST",
            "/v1/report",
            Some(&token_for("web")),
            Some(&body),
        )
    };
    // Its own node: taken.
    let (code, text) = post(&format!("{{\"node\":\"{web_id}\",\"epoch\":1}}"));
    assert_eq!(code, 200, "{text}");
    // Another proxy's node: refused, like an ack.
    let (code, text) = post(&format!("{{\"node\":\"{orders_id}\",\"epoch\":1}}"));
    assert_eq!(code, 403, "{text}");
    let (code, _) = post("{\"node\":\"nobody\"}");
    assert_eq!(code, 404);
    let (code, _) = post("{ not json");
    assert_eq!(code, 400);
    // Over 64 KiB.
    let big = format!("{{\"node\":\"{web_id}\",\"routes\":[{}]}}", vec!["{\"listener\":\"outbound\",\"route\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\",\"cluster\":\"c\",\"requests\":1}"; 1000].join(","));
    let (code, _) = post(&big);
    assert_eq!(code, 413);
    // No token at all.
    std::fs::write(&body, format!("{{\"node\":\"{web_id}\"}}")).unwrap();
    let (code, _) = cp_curl(&cp, "POST", "/v1/report", None, Some(&body));
    assert_eq!(code, 401);
    // Counted (`/v1/mesh` is computed at most once a second).
    let v = until_mesh(&cp, "refusals not counted", |v| {
        v["reports_total"]["too-large"].as_u64() == Some(1)
    })
    .await;
    let totals = &v["reports_total"];
    assert!(totals["accepted"].as_u64().unwrap() >= 3, "{totals}");
    for (k, n) in [("forbidden", 1), ("unknown-node", 1), ("garbled", 1)] {
        assert_eq!(totals[k].as_u64(), Some(n), "{k}: {totals}");
    }
    assert!(v["report_memory_bytes"].as_u64().unwrap() > 0);
    // A removed node's reports go with it.
    drop(orders);
    drop(web);
    until_mesh(&cp, "the gone proxies' reports stayed", |v| {
        v["proxies"].as_array().is_some_and(|p| p.is_empty()) && v["report_memory_bytes"] == 0
    })
    .await;
}
