//! Shared helpers for the end-to-end tests: the proxy as a real process,
//! real upstream servers and clients on loopback.
#![allow(dead_code)]

pub mod kube_api;
pub mod mesh;
pub mod pki;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use upstream::Upstream;
#[allow(unused_imports)]
pub use upstream::UpstreamOpts;

/// Safety net for readiness waits: long, since they end on a signal, not on time.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outrigger")
}

/// A loopback address nothing listens on: bound, then released.
pub fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A fresh directory for one test. Named by the test process's id; the
/// directories of earlier test processes that have exited are removed at a
/// process's first call, so that runs of the suite do not pile up in /tmp
/// (a test's proxy may still read its files while the test runs, so a
/// process's own directories stay until a later run).
pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_exited_temp_dirs);
    let d = std::env::temp_dir().join(format!(
        "outrigger-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes `outrigger-test-<pid>-<n>` directories whose process is gone.
fn remove_exited_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("outrigger-test-"))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_err() || n.parse::<usize>().is_err() {
            continue;
        }
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

const EOF: &str = "<proxy stdout closed>";

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// An `outrigger run` process. Listeners and admin bind port 0; their
/// addresses are read from the proxy's own log lines.
pub struct ProxyProc {
    child: Child,
    pub listeners: HashMap<String, SocketAddr>,
    pub admin: SocketAddr,
    pub probes: SocketAddr,
    pub config_path: PathBuf,
    lines: Lines,
}

impl ProxyProc {
    /// Starts with `yaml` (which should bind its listeners on port 0) and
    /// waits for the proxy to log that it is ready.
    pub fn start(yaml: &str) -> ProxyProc {
        Self::start_with(yaml, &[])
    }

    pub fn start_with(yaml: &str, args: &[&str]) -> ProxyProc {
        Self::start_until(yaml, args, "\"message\":\"ready\"")
    }

    /// `start_with`, waiting for a log line containing `line` instead.
    pub fn start_until(yaml: &str, args: &[&str], line: &str) -> ProxyProc {
        let dir = temp_dir();
        let config_path = dir.join("config.yaml");
        let full = if yaml.contains("admin:") {
            yaml.to_string()
        } else {
            format!("admin: {{ address: 127.0.0.1:0, probes: 127.0.0.1:0 }}\n{yaml}")
        };
        std::fs::write(&config_path, full).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"]).arg(&config_path);
        // Two workers unless the test asks for its own count.
        if !args.contains(&"--threads") {
            cmd.args(["--threads", "2"]);
        }
        cmd.args(["--watch-interval", "100ms", "--log-level", "info"])
            .args(args);
        Self::spawn(cmd, config_path, line)
    }

    /// Starts `outrigger control-plane ARGS` and waits until it listens;
    /// its address is `addr("cp")`.
    pub fn control_plane(args: &[&str]) -> ProxyProc {
        Self::control_plane_env(args, &[])
    }

    pub fn control_plane_env(args: &[&str], env: &[(&str, &Path)]) -> ProxyProc {
        let mut cmd = Command::new(bin());
        cmd.arg("control-plane").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(
            cmd,
            temp_dir().join("none"),
            "\"message\":\"control plane listening\"",
        )
    }

    pub fn spawn(mut cmd: Command, config_path: PathBuf, ready: &str) -> ProxyProc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn outrigger");
        let stdout = child.stdout.take().unwrap();
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("OUTRIGGER_TEST_ECHO").is_some() {
                    eprintln!("proxy: {line}");
                }
                let (m, c) = &*l2;
                m.lock().unwrap().push(line);
                c.notify_all();
            }
            let (m, c) = &*l2;
            m.lock().unwrap().push(EOF.to_string());
            c.notify_all();
        });
        let mut p = ProxyProc {
            child,
            listeners: HashMap::new(),
            admin: "0.0.0.0:0".parse().unwrap(),
            probes: "0.0.0.0:0".parse().unwrap(),
            config_path,
            lines,
        };
        p.wait_log(|l| l.contains(ready));
        for line in p.log() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let f = &v["fields"];
            let addr = f["address"].as_str().and_then(|a| a.parse().ok());
            match (f["message"].as_str(), addr) {
                (Some("listening"), Some(a)) => {
                    p.listeners
                        .insert(f["listener"].as_str().unwrap_or("").to_string(), a);
                }
                (Some("control plane listening"), Some(a)) => {
                    p.listeners.insert("cp".into(), a);
                }
                (Some("admin server listening"), Some(a)) => match f["kind"].as_str() {
                    Some("Admin") => p.admin = a,
                    _ => p.probes = a,
                },
                _ => {}
            }
        }
        p
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners[listener]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`; returns it.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let (m, c) = &*self.lines;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut lines = m.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                lines.last().map(String::as_str) != Some(EOF),
                "proxy exited; log:\n{}",
                lines.join("\n")
            );
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "log line never came; log:\n{}",
                lines.join("\n")
            );
            lines = c.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Count of lines satisfying `pred`.
    pub fn count_log(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&self) -> String {
        http_get_raw(self.probes, "/metrics").1
    }

    /// The value of the first sample whose line starts with `name` and
    /// contains every `labels` fragment.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// Rewrites the config file and waits until the proxy acked or nacked it.
    pub fn reload(&self, yaml: &str) -> bool {
        let acks = self
            .metric("outrigger_feed_updates_total", &["ack"])
            .unwrap_or(0.0);
        let nacks = self
            .metric("outrigger_feed_updates_total", &["nack"])
            .unwrap_or(0.0);
        let full = format!(
            "admin: {{ address: 127.0.0.1:{}, probes: 127.0.0.1:{} }}\n{yaml}",
            self.admin.port(),
            self.probes.port()
        );
        // Written whole and renamed into place, as a ConfigMap update is:
        // written in place, a stall between truncating and writing on a
        // loaded machine let the watcher read the empty file twice and
        // refuse it (CI, two reload tests at once).
        let tmp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, full).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let m = self.metrics();
            if metric_value(&m, "outrigger_feed_updates_total", &["ack"]).unwrap_or(0.0) > acks {
                return true;
            }
            if metric_value(&m, "outrigger_feed_updates_total", &["nack"]).unwrap_or(0.0) > nacks {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "reload was neither acked nor nacked"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

/// A blocking HTTP/1.1 GET with `connection: close`: (status, body, head).
pub fn http_get_raw(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let resp = raw(addr, req.as_bytes());
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string(), head.to_string())
}

/// Writes raw bytes and reads until the peer closes (or 10 s pass).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A client that connects to one address (the proxy) whatever the host:
/// HTTP/1.1 keep-alive or HTTP/2 with prior knowledge.
pub struct TestClient {
    addr: SocketAddr,
    http2: bool,
    idle: tokio::sync::Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

impl TestClient {
    pub fn h1(addr: SocketAddr) -> Self {
        TestClient {
            addr,
            http2: false,
            idle: Default::default(),
            h2: Default::default(),
        }
    }
    pub fn h2(addr: SocketAddr) -> Self {
        TestClient {
            addr,
            http2: true,
            idle: Default::default(),
            h2: Default::default(),
        }
    }

    async fn connect(&self) -> TokioIo<tokio::net::TcpStream> {
        TokioIo::new(
            tokio::net::TcpStream::connect(self.addr)
                .await
                .expect("connect"),
        )
    }

    /// Sends an HTTP/2 request exactly as built (no Host rewriting); returns its status.
    pub async fn h2_request_raw(&self, req: http::Request<Full<Bytes>>) -> u16 {
        let (mut s, conn) = http2::handshake(TokioExecutor::new(), self.connect().await)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let resp = tokio::time::timeout(READY_TIMEOUT, s.send_request(req))
            .await
            .expect("request hung")
            .expect("request failed");
        resp.status().as_u16()
    }

    /// The current HTTP/2 connection, if any.
    pub async fn h2_sender(&self) -> Option<http2::SendRequest<Full<Bytes>>> {
        self.h2.lock().await.clone()
    }

    pub async fn request(
        &self,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        if self.http2 {
            let mut guard = self.h2.lock().await;
            let mut s = match guard.take().filter(|s| !s.is_closed()) {
                Some(s) => s,
                None => {
                    let (s, conn) =
                        http2::handshake(TokioExecutor::new(), self.connect().await).await?;
                    tokio::spawn(conn);
                    s
                }
            };
            *guard = Some(s.clone());
            drop(guard);
            let host = req.headers_mut().remove("host");
            if let Some(h) = host {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or("/".into());
                *req.uri_mut() = format!("http://{}{pq}", h.to_str().unwrap())
                    .parse()
                    .unwrap();
            }
            return s.send_request(req).await;
        }
        let mut pooled = self.idle.lock().await.pop();
        if let Some(s) = pooled.as_mut()
            && s.ready().await.is_err()
        {
            pooled = None;
        }
        let mut s = match pooled {
            Some(s) => s,
            None => {
                let (s, conn) = http1::handshake(self.connect().await).await?;
                tokio::spawn(conn.with_upgrades());
                s
            }
        };
        let r = s.send_request(req).await;
        self.idle.lock().await.push(s);
        r
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request through `client` to `addr` with `host` and headers.
pub async fn send(
    client: &TestClient,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(READY_TIMEOUT, client.request(req))
        .await
        .expect("request hung")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Resp {
        status,
        headers,
        body: collected.to_bytes(),
        trailers,
    }
}

pub async fn get(client: &TestClient, host: &str, path: &str) -> Resp {
    send(client, "GET", host, path, &[], Bytes::new()).await
}

/// A loopback port free right now, from below the kernel's ephemeral range
/// (32768 and up), so that a process binding port 0 is not handed it
/// before the test's proxy binds it.
pub fn free_port() -> u16 {
    loop {
        let port = 20000 + fastrand::u16(..12000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
}

/// A TCP relay to one address that can be shut: while shut, it closes
/// every new connection at once and the ones it relays. A network
/// partition between one process and another, on loopback.
pub struct Gate {
    pub addr: SocketAddr,
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Gate {
    pub async fn start(to: SocketAddr) -> Gate {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(tokio::sync::watch::Sender::new(true));
        let o = open.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let mut shut = o.subscribe();
                if !*shut.borrow_and_update() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = shut.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Gate { addr, open }
    }

    pub fn shut(&self) {
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}
