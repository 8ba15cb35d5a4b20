//! The proxy's side of the control-plane feed.
//!
//! Start: the bootstrap config names the control planes, the trust bundle
//! to verify them with, and a token. The proxy makes a key (it never leaves
//! the process), sends a CSR for its identity and gets a short-lived
//! certificate; then it subscribes over mTLS, applies every snapshot (or
//! endpoint delta) atomically and answers each with an ack or a nack
//! carrying the errors. While the control plane is away it keeps serving
//! the last good config and reconnects with exponential backoff and
//! jitter, moving to the next replica. The certificate is renewed at about
//! two thirds of its lifetime. With `cache_dir`, the last good snapshot and
//! certificate are kept on disk so that a restart serves before the control
//! plane answers.
//!
//! On the same session it reports its traffic counters (`POST /v1/report`,
//! right after it has a config, then every 5 s): the control plane's
//! dashboard and `/v1/mesh` are made from them. Why reports and not
//! scrapes: see `crate::control_plane::report`.

use crate::config::{Config, Feed};
use crate::proxy::Proxy;
use crate::telemetry::metrics;
use crate::tls::identity::{Credentials, IdentityStore};
use crate::tls::spiffe::SpiffeId;
use crate::tls::verify::{Roots, ServerIdentityVerifier};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}: {1}")]
    File(String, String),
    #[error("control plane {url}: {message}")]
    ControlPlane { url: String, message: String },
    #[error("identity: {0}")]
    Identity(String),
}

/// Everything the feed needs, made once from the bootstrap config.
pub struct FeedClient {
    bootstrap: Config,
    feed: Feed,
    trust_domain: String,
    identity: SpiffeId,
    cp_identity: SpiffeId,
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// The proxy's credentials, once it has any.
    store: Mutex<Option<Arc<IdentityStore>>>,
    /// The config in force (for endpoint deltas), as the control plane sent it.
    current: Mutex<Option<Config>>,
    /// Said "ready" once, when the first config applied.
    ready_logged: std::sync::atomic::AtomicBool,
    /// Set when this proxy starts stopping: a feed that reconnects during
    /// the drain says so, or the control plane would take it back as an
    /// endpoint and callers would send to a stopping pod.
    draining: std::sync::atomic::AtomicBool,
    next_url: std::sync::atomic::AtomicUsize,
    /// True once a config applied: reports start then.
    configured: tokio::sync::watch::Sender<bool>,
    /// This process's counters: a new epoch tells the control plane they
    /// started over.
    epoch: u64,
}

impl FeedClient {
    pub fn new(bootstrap: &Config) -> Result<Arc<FeedClient>, FeedError> {
        let feed = bootstrap
            .feed
            .clone()
            .ok_or_else(|| FeedError::Identity("no feed section".into()))?;
        let trust_domain = bootstrap
            .identity
            .as_ref()
            .map(|i| i.trust_domain.clone())
            .ok_or_else(|| FeedError::Identity("no identity section".into()))?;
        let identity = SpiffeId::workload(
            &trust_domain,
            &bootstrap.node.namespace,
            &feed.service_account,
        )
        .map_err(|e| FeedError::Identity(format!("node.namespace / feed.service_account: {e}")))?;
        let cp_identity = match &feed.control_plane_identity {
            Some(id) => SpiffeId::parse(id),
            None => SpiffeId::workload(&trust_domain, "outrigger", "control-plane"),
        }
        .map_err(|e| FeedError::Identity(e.to_string()))?;
        let (ca_name, ca) = match (&feed.ca, &feed.ca_pem) {
            (Some(path), _) => (
                path.display().to_string(),
                std::fs::read(path)
                    .map_err(|e| FeedError::File(path.display().to_string(), e.to_string()))?,
            ),
            (None, Some(pem)) => ("feed.ca_pem".to_string(), pem.as_bytes().to_vec()),
            (None, None) => {
                return Err(FeedError::File(
                    "feed.ca".into(),
                    "no CA for the control plane".into(),
                ));
            }
        };
        let mut roots = Vec::new();
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&ca).filter_map(Result::ok) {
            let a = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| FeedError::File(ca_name.clone(), e.to_string()))?;
            roots.push(a.to_owned());
        }
        if roots.is_empty() {
            return Err(FeedError::File(ca_name, "no PEM certificate in it".into()));
        }
        Ok(Arc::new(FeedClient {
            bootstrap: bootstrap.clone(),
            feed,
            trust_domain,
            identity,
            cp_identity,
            roots,
            store: Mutex::new(None),
            current: Mutex::new(None),
            ready_logged: Default::default(),
            draining: Default::default(),
            next_url: Default::default(),
            configured: tokio::sync::watch::Sender::new(false),
            epoch: fastrand::u64(1..),
        }))
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    fn token(&self) -> Option<String> {
        let path = self.feed.token_file.as_ref()?;
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string())
    }

    fn url(&self) -> String {
        let i = self
            .next_url
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.feed.control_plane[i % self.feed.control_plane.len()].clone()
    }

    /// An HTTP/2 connection to `url` over TLS: the control plane must
    /// present its identity; the proxy shows its certificate once it has one.
    async fn connect(&self, url: &str) -> Result<http2::SendRequest<Full<Bytes>>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let host = uri
            .host()
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(15010);
        let verifier = ServerIdentityVerifier::with_roots(
            Roots::Fixed(self.roots.clone()),
            self.cp_identity.clone(),
        );
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let store = self.store.lock().clone();
        let mut config = match store {
            Some(s) => builder.with_client_cert_resolver(Arc::new(StoreCert(s))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => {
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?
            }
        };
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: http::Method,
        url: &str,
        path_and_query: &str,
        body: Bytes,
    ) -> http::Request<Full<Bytes>> {
        let mut b = http::Request::builder().method(method).uri(format!(
            "{}{}",
            url.trim_end_matches('/'),
            path_and_query
        ));
        if let Some(t) = self.token() {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Full::new(body))
            .unwrap_or_else(|_| http::Request::new(Full::new(Bytes::new())))
    }

    /// A certificate for this proxy's identity from the control plane's CA.
    async fn fetch_certificate(&self) -> Result<Credentials, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.subject_alt_names = vec![rcgen::SanType::URI(
            self.identity
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        )];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| e.to_string())?
            .pem()
            .map_err(|e| e.to_string())?;
        let url = self.url();
        let mut sender = self
            .connect(&url)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = sender
            .send_request(self.request(
                http::Method::POST,
                &url,
                "/v1/certificate",
                Bytes::from(csr),
            ))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let body = crate::http_util::success_body(resp, &url).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let cert = v["certificate"]
            .as_str()
            .ok_or("no certificate in the answer")?;
        let roots = v["roots"].as_str().ok_or("no roots in the answer")?;
        let key_pem = key.serialize_pem();
        let creds = Credentials::from_pem(
            cert.as_bytes(),
            key_pem.as_bytes(),
            roots.as_bytes(),
            &self.trust_domain,
            [
                "(control plane certificate)",
                "(local key)",
                "(control plane roots)",
            ],
        )
        .map_err(|e| e.to_string())?;
        self.cache_credentials(cert, &key_pem, roots);
        Ok(creds)
    }

    /// The proxy's identity: from the cache when it is still good, else
    /// from the control plane (retrying until one answers).
    pub async fn identity_store(self: &Arc<Self>) -> Arc<IdentityStore> {
        if let Some(creds) = self.cached_credentials() {
            tracing::info!(id = %creds.id, serial = %creds.serial, "identity from the cache");
            return self.install(creds);
        }
        let mut backoff = Backoff::new();
        loop {
            match self.fetch_certificate().await {
                Ok(creds) => {
                    tracing::info!(id = %creds.id, serial = %creds.serial, not_after = creds.not_after, "certificate from the control plane");
                    return self.install(creds);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no certificate yet; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    fn install(self: &Arc<Self>, creds: Credentials) -> Arc<IdentityStore> {
        let mut slot = self.store.lock();
        match slot.as_ref() {
            Some(s) => {
                s.install(creds);
                s.clone()
            }
            None => {
                let s = IdentityStore::new(&self.trust_domain, creds);
                *slot = Some(s.clone());
                tokio::spawn(self.clone().renew());
                s
            }
        }
    }

    /// Renews the certificate at about two thirds of its lifetime.
    async fn renew(self: Arc<Self>) {
        loop {
            let Some(store) = self.store.lock().clone() else {
                return;
            };
            let now = unix_now();
            let creds = store.current();
            let issued = creds.not_before.max(0) as u64;
            let expires = creds.not_after.max(0) as u64;
            let at = issued + (expires.saturating_sub(issued)) * 2 / 3;
            tokio::time::sleep(Duration::from_secs(at.saturating_sub(now).max(1))).await;
            let mut backoff = Backoff::new();
            loop {
                match self.fetch_certificate().await {
                    Ok(c) => {
                        store.install(c);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "certificate renewal failed; retrying");
                        backoff.wait().await;
                    }
                }
            }
        }
    }

    /// Applies the cached snapshot, if any: serving starts before the
    /// control plane answers.
    pub async fn apply_cached(&self, proxy: &Proxy) {
        let Some(dir) = &self.feed.cache_dir else {
            return;
        };
        let Ok(text) = std::fs::read(dir.join("snapshot.json")) else {
            return;
        };
        let Ok(config) = serde_json::from_slice::<Config>(&text) else {
            return;
        };
        match self.apply_config(proxy, config).await {
            Ok(()) => tracing::info!("serving the cached snapshot until the control plane answers"),
            Err(e) => tracing::warn!(error = %e, "the cached snapshot does not apply"),
        }
    }

    /// The bootstrap keeps what is the proxy's own (admin, identity, feed);
    /// the control plane's document brings the rest.
    fn merge(&self, mut c: Config) -> Config {
        // The node is the proxy's own; the control plane only fills in what
        // the bootstrap left out (its service, namespace).
        let mine = &self.bootstrap.node;
        if !mine.id.is_empty() {
            c.node.id = mine.id.clone();
        }
        if !mine.service.is_empty() {
            c.node.service = mine.service.clone();
        }
        if !mine.namespace.is_empty() {
            c.node.namespace = mine.namespace.clone();
        }
        c.admin = self.bootstrap.admin.clone();
        // Tracing is the proxy's own operational setting (its collector).
        if c.tracing.is_none() {
            c.tracing = self.bootstrap.tracing.clone();
        }
        c.identity = self.bootstrap.identity.clone();
        c.feed = self.bootstrap.feed.clone();
        c
    }

    async fn apply_config(&self, proxy: &Proxy, config: Config) -> Result<(), String> {
        let merged = self.merge(config.clone());
        merged.validate().map_err(|e| {
            let list: Vec<String> = e.0.iter().map(|x| x.to_string()).collect();
            serde_json::to_string(&list).unwrap_or_default()
        })?;
        let version = proxy.apply(merged).await.map_err(|e| e.to_string())?;
        *self.current.lock() = Some(config);
        self.configured.send_replace(true);
        if !self
            .ready_logged
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(version, "ready");
        }
        Ok(())
    }

    /// Subscribes and applies until the process ends.
    pub async fn run(self: Arc<Self>, proxy: Arc<Proxy>) {
        let mut backoff = Backoff::new();
        loop {
            let url = self.url();
            match self.session(&url, &proxy, &mut backoff).await {
                Ok(()) => tracing::info!(%url, "feed ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(%url, error = %e, "feed lost; serving the last good config")
                }
            }
            metrics().feed_connected.set(0);
            backoff.wait().await;
        }
    }

    async fn session(
        self: &Arc<Self>,
        url: &str,
        proxy: &Arc<Proxy>,
        backoff: &mut Backoff,
    ) -> Result<(), String> {
        let mut sender = self.connect(url).await?;
        let f = &self.feed;
        let n = &self.bootstrap.node;
        let said_draining = self.draining.load(std::sync::atomic::Ordering::SeqCst);
        let q = format!(
            "/v1/feed?node={}&namespace={}&service={}&address={}&inbound={}&outbound={}&app={}&ready={}&draining={}&epoch={}",
            n.id,
            n.namespace,
            n.service,
            f.address.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
            f.inbound_port,
            f.outbound_port,
            f.app_port,
            u8::from(self.current.lock().is_some()),
            u8::from(said_draining),
            self.epoch,
        );
        let resp = sender
            .send_request(self.request(http::Method::GET, url, &q, Bytes::new()))
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        metrics().feed_connected.set(1);
        tracing::info!(%url, "feed connected");
        // A drain that began after the query was made may have reached the
        // control plane before this subscription, which then registered a
        // serving proxy over it: say it again.
        if !said_draining && self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            self.post_drain(&mut sender, url).await;
        }
        // Reports go on this session, and end with it.
        let _reporter = AbortOnDrop(tokio::spawn(self.clone().report(
            sender.clone(),
            url.to_string(),
            proxy.clone(),
        )));
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                backoff.reset();
                self.handle_message(&line, proxy, &mut sender, url).await;
            }
        }
        Ok(())
    }

    async fn handle_message(
        &self,
        line: &[u8],
        proxy: &Proxy,
        sender: &mut http2::SendRequest<Full<Bytes>>,
        url: &str,
    ) {
        let m = metrics();
        let msg: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable feed message");
                return;
            }
        };
        let version = msg["version"].as_u64().unwrap_or(0);
        let result = match msg["type"].as_str() {
            Some("snapshot") => match serde_json::from_value::<Config>(msg["config"].clone()) {
                Ok(c) => self.apply_config(proxy, c).await,
                Err(e) => Err(format!("the snapshot does not parse: {e}")),
            },
            Some("endpoints") => {
                let current = self.current.lock().clone();
                match current {
                    None => Err("endpoints before any snapshot".into()),
                    Some(mut c) => {
                        let clusters = msg["clusters"].as_object().cloned().unwrap_or_default();
                        let mut bad = None;
                        for (name, eps) in clusters {
                            match serde_json::from_value::<Vec<crate::config::Endpoint>>(eps) {
                                Ok(eps) => {
                                    if let Some(cl) =
                                        c.clusters.iter_mut().find(|cl| cl.name == name)
                                    {
                                        cl.endpoints = eps;
                                    }
                                }
                                Err(e) => bad = Some(format!("cluster {name}: {e}")),
                            }
                        }
                        match bad {
                            Some(e) => Err(e),
                            None => self.apply_config(proxy, c).await,
                        }
                    }
                }
            }
            other => Err(format!("unknown message type {other:?}")),
        };
        let (ack, error) = match &result {
            Ok(()) => {
                m.feed_updates.with_label_values(&["ack"]).inc();
                m.config_version.set(version as i64);
                tracing::info!(version, "config from the control plane applied");
                self.cache_snapshot();
                (true, None)
            }
            Err(e) => {
                m.feed_updates.with_label_values(&["nack"]).inc();
                tracing::warn!(version, error = %e, "config from the control plane refused; keeping the running one");
                (false, Some(e.clone()))
            }
        };
        let body = serde_json::json!({ "node": self.bootstrap.node.id, "version": version, "ack": ack, "error": error });
        let req = self.request(
            http::Method::POST,
            url,
            "/v1/ack",
            Bytes::from(body.to_string()),
        );
        if let Ok(resp) = sender.send_request(req).await {
            let _ = resp.into_body().collect().await;
        }
    }

    /// Reports the proxy's counters on the feed's connection: once a
    /// config applied (at once when it has one already: a new session's
    /// first report is the control plane's baseline), then every
    /// `REPORT_INTERVAL`. Each report holds only what changed since the
    /// last one this control plane took.
    async fn report(
        self: Arc<Self>,
        mut sender: http2::SendRequest<Full<Bytes>>,
        url: String,
        proxy: Arc<Proxy>,
    ) {
        use crate::control_plane::report::{MAX_REPORT_BYTES, Outbox, REPORT_INTERVAL};
        let mut configured = self.configured.subscribe();
        if configured.wait_for(|c| *c).await.is_err() {
            return;
        }
        let mut outbox = Outbox::default();
        loop {
            let (report, pending) = outbox.next(self.gather(&proxy), MAX_REPORT_BYTES);
            let body = Bytes::from(serde_json::to_vec(&report).unwrap_or_default());
            let req = self.request(http::Method::POST, &url, "/v1/report", body);
            let sent = tokio::time::timeout(REPORT_INTERVAL, async {
                sender.ready().await.map_err(|e| e.to_string())?;
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status.to_string())
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match sent {
                Ok(()) => outbox.accepted(pending),
                // A control plane that does not take reports (an older
                // one) is no reason to stop serving; try again later.
                Err(e) => tracing::debug!(%url, error = %e, "traffic report not taken"),
            }
            tokio::time::sleep(REPORT_INTERVAL).await;
        }
    }

    /// Everything the registry holds, and which endpoints are ejected.
    fn gather(&self, proxy: &Proxy) -> crate::control_plane::report::Report {
        let text = crate::telemetry::render();
        let mut r = crate::control_plane::report::Report::from_prometheus_text(
            &String::from_utf8_lossy(&text),
        );
        r.node = self.bootstrap.node.id.clone();
        r.epoch = self.epoch;
        if !r.endpoints.is_empty() {
            let snap = proxy.snapshot();
            let now = crate::clock::now_ns();
            for e in &mut r.endpoints {
                if let Some(c) = snap.clusters.get(&e.cluster) {
                    e.ejected_addresses = c
                        .endpoints
                        .iter()
                        .filter(|ep| ep.health.state(now) == "ejected")
                        .map(|ep| ep.addr.to_string())
                        .collect();
                }
            }
        }
        r
    }

    /// Tells the control plane this proxy is stopping: its callers stop
    /// getting it before its listeners close.
    pub async fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The replica in use first, then the others: a dead first replica
        // must not keep callers sending to a stopping proxy.
        let n = self.feed.control_plane.len();
        let start = self
            .next_url
            .load(std::sync::atomic::Ordering::Relaxed)
            .wrapping_sub(1);
        for k in 0..n {
            let url = &self.feed.control_plane[start.wrapping_add(k) % n];
            let Ok(Ok(mut sender)) =
                tokio::time::timeout(Duration::from_secs(1), self.connect(url)).await
            else {
                continue;
            };
            if let Some(status) = self.post_drain(&mut sender, url).await {
                // A replica that does not know this node (restarted, 404)
                // or failed did not deregister it: try the next.
                if status.is_success() {
                    tracing::info!(%url, "deregistered from the control plane");
                    return;
                }
                tracing::warn!(%url, %status, "the drain was not taken; trying the next replica");
            }
        }
        tracing::warn!(
            "no control plane answered the drain; callers drop this proxy after the grace period"
        );
    }

    /// `POST /v1/drain` for this node on `sender`: the answer's status, if
    /// one came within 3 s (the control plane waits up to 2 s for acks).
    async fn post_drain(
        &self,
        sender: &mut http2::SendRequest<Full<Bytes>>,
        url: &str,
    ) -> Option<http::StatusCode> {
        let q = format!("/v1/drain?node={}", self.bootstrap.node.id);
        let req = sender.send_request(self.request(http::Method::POST, url, &q, Bytes::new()));
        let resp = tokio::time::timeout(Duration::from_secs(3), req)
            .await
            .ok()?
            .ok()?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        Some(status)
    }

    fn cache_snapshot(&self) {
        let Some(dir) = &self.feed.cache_dir else {
            return;
        };
        if let Some(c) = self.current.lock().as_ref()
            && let Ok(text) = serde_json::to_string(c)
        {
            let _ = crate::tls::ca::private_dir(dir);
            let _ = crate::tls::ca::write_private(&dir.join("snapshot.json"), &text);
        }
    }

    fn cache_credentials(&self, cert: &str, key: &str, roots: &str) {
        let Some(dir) = &self.feed.cache_dir else {
            return;
        };
        let _ = crate::tls::ca::private_dir(dir);
        let _ = crate::tls::ca::write_private(&dir.join("key.pem"), key);
        let _ = crate::tls::ca::write_private(&dir.join("cert.pem"), cert);
        let _ = crate::tls::ca::write_private(&dir.join("roots.pem"), roots);
    }

    fn cached_credentials(&self) -> Option<Credentials> {
        let dir = self.feed.cache_dir.as_ref()?;
        let read = |n: &str| std::fs::read(dir.join(n)).ok();
        let creds = Credentials::from_pem(
            &read("cert.pem")?,
            &read("key.pem")?,
            &read("roots.pem")?,
            &self.trust_domain,
            ["cert.pem", "key.pem", "roots.pem"],
        )
        .ok()?;
        // Only while at least a third of its life is left.
        let left = creds.not_after - unix_now() as i64;
        let life = creds.not_after - creds.not_before;
        (left > life / 3 && creds.id == self.identity).then_some(creds)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The proxy's certificate for the control plane, once it has one.
#[derive(Debug)]
struct StoreCert(Arc<IdentityStore>);

impl rustls::client::ResolvesClientCert for StoreCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Aborts a task when dropped: it lives as long as its owner's scope.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exponential backoff with full jitter: 250 ms doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(250),
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(250);
    }
    async fn wait(&mut self) {
        let d = self.next.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(d).await;
        self.next = (self.next * 2).min(Duration::from_secs(30));
    }
}
