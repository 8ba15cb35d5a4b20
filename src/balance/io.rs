//! An upstream connection's transport: plain TCP, or mTLS to an endpoint
//! that must present the identity the config names for it.

use crate::error::UpstreamError;
use crate::tls::MeshClient;
use rustls::pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// Whether ALPN settled on HTTP/2.
    pub fn alpn_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => false,
            UpstreamIo::Tls(t) => t.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2),
        }
    }
}

/// The mTLS handshake over `tcp`; a failure says which kind it was (for
/// the reason header and `outrigger_upstream_tls_handshakes_total`).
pub async fn handshake(
    tcp: TcpStream,
    client: &MeshClient,
    h2: bool,
    addr: SocketAddr,
    cluster: &str,
) -> Result<UpstreamIo, UpstreamError> {
    let connector = if h2 { &client.http2 } else { &client.http1 };
    let name = ServerName::IpAddress(addr.ip().into());
    let m = crate::telemetry::metrics();
    match connector.connect(name, tcp).await {
        Ok(s) => {
            m.upstream_tls_handshakes
                .with_label_values(&[cluster, "ok"])
                .inc();
            Ok(UpstreamIo::Tls(Box::new(s)))
        }
        Err(e) => {
            let result = crate::tls::verify::classify(&e);
            m.upstream_tls_handshakes
                .with_label_values(&[cluster, result])
                .inc();
            Err(UpstreamError::Tls {
                addr,
                result,
                detail: if result == "identity-mismatch" {
                    format!("expected {}: {e}", client.expected)
                } else {
                    e.to_string()
                },
            })
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
