//! A real upstream HTTP server (HTTP/1.1 and HTTP/2 cleartext) that
//! records what it receives.
//!
//! Paths: `/echo` streams the request body back; `/sink` reads the body and
//! answers its length; `/respond` answers with the headers a request asks
//! for in `x-respond-*`; `/early` answers 413 without reading the body; `/trailers` answers with trailers; `/ws` is a
//! WebSocket echo; `/status/NNN` answers NNN; `/slow` waits `delay` first;
//! anything else answers the server's name.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
}

#[derive(Clone, Default)]
pub struct UpstreamOpts {
    pub delay: Option<Duration>,
    /// Answer every request with this status.
    pub status: Option<u16>,
    /// (n, status): every n-th request (the 1st, the n+1-th, ...) gets `status`.
    pub fail_every: Option<(usize, u16)>,
    /// Speak only HTTP/1.1, as most apps do (an HTTP/2 preface gets a 400).
    pub http1_only: bool,
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<tokio::sync::Notify>,
    opts: UpstreamOpts,
    faults: Arc<Mutex<Faults>>,
    /// Bumped by `kill`: every open connection closes.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Misbehaviour switched on and off while the server runs.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Never answer.
    pub hang: bool,
    /// Close the connection instead of answering.
    pub reset: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::with(name, UpstreamOpts::default()).await
    }

    /// An upstream that accepts requests and never answers them.
    pub async fn hanging(name: &str) -> Upstream {
        let u = Self::start(name).await;
        u.set_faults(Faults {
            hang: true,
            ..Default::default()
        });
        u
    }

    pub async fn with(name: &str, opts: UpstreamOpts) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(l, name, opts)
    }

    pub fn on(l: TcpListener, name: &str, opts: UpstreamOpts) -> Upstream {
        let u = Upstream {
            addr: l.local_addr().unwrap(),
            name: name.to_string(),
            hits: Arc::default(),
            seen: Arc::default(),
            stop: Arc::default(),
            opts,
            faults: Arc::default(),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        };
        u.serve(l);
        u
    }

    fn serve(&self, l: TcpListener) {
        let u2 = self.clone();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let (stream, _) = tokio::select! {
                    _ = u2.stop.notified() => return,
                    r = l.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let u3 = u2.clone();
                let u4 = u2.clone();
                let builder = builder.clone();
                let mut killed = u2.generation.subscribe();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let u = u4.clone();
                        async move { u.handle(req).await }
                    });
                    let io = TokioIo::new(stream);
                    // hyper-util's auto builder serves HTTP/2 whatever its
                    // version setting says once upgrades are on: use hyper's own.
                    let conn: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                        if u3.opts.http1_only {
                            let c = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .with_upgrades();
                            Box::pin(async move {
                                let _ = c.await;
                            })
                        } else {
                            let c = builder.serve_connection_with_upgrades(io, svc).into_owned();
                            Box::pin(async move {
                                let _ = c.await;
                            })
                        };
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
    }

    /// Switches misbehaviour on or off.
    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }

    /// Stops accepting and closes every open connection, as a killed process would.
    pub fn kill(&self) {
        self.stop.notify_one();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Serves again on the same address after `kill`.
    pub async fn restart(&self) {
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.serve(l);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request seen")
    }

    /// Stops accepting (open connections stay).
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    fn status(&self, code: u16) -> Response<Body> {
        let mut r = Response::new(full(format!("{} says {code}", self.name)));
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
        r
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
        let faults = self.faults.lock().unwrap().clone();
        if faults.reset {
            self.hits.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        if faults.hang {
            self.hits.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if let Some(d) = faults.delay {
            tokio::time::sleep(d).await;
        }
        Ok(self.answer(req).await)
    }

    async fn answer(&self, mut req: Request<Incoming>) -> Response<Body> {
        let opts = &self.opts;
        let n = self.hits.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            version: req.version(),
            headers: req.headers().clone(),
        });
        if let Some(d) = opts.delay {
            tokio::time::sleep(d).await;
        }
        let path = req.uri().path().to_string();
        let fail = match opts.fail_every {
            Some((every, code)) if n.is_multiple_of(every) => Some(code),
            _ => opts.status,
        };
        let mut resp = if let (Some(code), "/sink") = (fail, path.as_str()) {
            // Read the whole body before failing, to tell what arrived.
            let n = body_len(req).await;
            let mut r = self.status(code);
            r.headers_mut().insert("x-received", n.into());
            r
        } else if let Some(code) = fail {
            self.status(code)
        } else if path == "/echo" {
            Response::new(req.into_body().boxed())
        } else if path == "/sink" {
            Response::new(full(body_len(req).await.to_string()))
        } else if path == "/trailers" {
            let frames = vec![
                Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"with trailers"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("x-trailer", "yes".parse().unwrap());
                    t
                })),
            ];
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        } else if let Some(code) = path.strip_prefix("/status/") {
            self.status(code.parse().unwrap_or(500))
        } else if path == "/stall" {
            // One chunk, then silence: the stream never ends.
            let chunk = futures_util::stream::iter(vec![Ok::<_, hyper::Error>(Frame::data(
                Bytes::from_static(b"first"),
            ))]);
            let stall = chunk.chain(futures_util::stream::pending());
            Response::new(BodyExt::boxed(StreamBody::new(stall)))
        } else if path == "/ws" {
            return websocket(&mut req);
        } else if path == "/respond" {
            // Answers with the headers asked for in `x-respond-NAME: VALUE`.
            let mut r = Response::new(full(self.name.clone()));
            for (k, v) in req.headers() {
                if let Some(name) = k.as_str().strip_prefix("x-respond-") {
                    r.headers_mut().append(
                        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        v.clone(),
                    );
                }
            }
            r
        } else if path == "/early" {
            // Answers at once without reading the request body (a 413 on an upload).
            let mut r = self.status(413);
            r.headers_mut()
                .insert("connection", "keep-alive".parse().unwrap());
            return r;
        } else {
            Response::new(full(self.name.clone()))
        };
        resp.headers_mut()
            .insert("x-upstream", self.name.parse().unwrap());
        resp
    }
}

async fn body_len(req: Request<Incoming>) -> usize {
    req.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(0)
}

fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()));
    let Some(accept) = key else {
        let mut r = Response::new(full("not a websocket request"));
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        return r;
    };
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap()
}

/// An upstream that answers every request head with fixed raw bytes (a
/// misbehaving server), counting the heads it saw.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub heads: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub async fn start(answer: &'static [u8]) -> RawUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(AtomicUsize::new(0));
        let h2 = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let heads = h2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            heads.fetch_add(1, Ordering::SeqCst);
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream { addr, heads }
    }
}

/// Reads one request head from a hand-written app's connection: the head,
/// lower-cased, taken out of `buf` (what follows stays: a body, the next
/// request); `None` at the end of the stream.
pub async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break e + 4;
        }
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    Some(head)
}

/// A TCP echo server (a CONNECT target).
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
