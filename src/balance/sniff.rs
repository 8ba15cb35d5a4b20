//! Tells from the first bytes an upstream sends on a new HTTP/2 connection
//! whether it speaks HTTP/2 at all: an HTTP/2 server answers the client
//! preface with a SETTINGS frame, an HTTP/1.1 server with an `HTTP/1.1 400`
//! (or by closing). Reads nothing itself; it looks at what hyper reads,
//! once, and then steps aside.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Http2,
    Http1,
    Closed,
    Other,
}

impl Answer {
    fn of(first: &[u8]) -> Answer {
        const SETTINGS: u8 = 0x4;
        if first.is_empty() {
            Answer::Closed
        } else if first.starts_with(b"HTTP/") || b"HTTP/".starts_with(first) {
            Answer::Http1
        } else if first.len() >= 4 && first[3] == SETTINGS {
            Answer::Http2
        } else {
            Answer::Other
        }
    }

    /// For the error message: what the endpoint did with the preface.
    pub fn describe(self) -> &'static str {
        match self {
            Answer::Http2 => "with HTTP/2",
            Answer::Http1 => "with HTTP/1.1",
            Answer::Closed => "by closing the connection",
            Answer::Other => "with bytes that are not HTTP",
        }
    }
}

pub struct Sniff<T> {
    inner: T,
    tx: Option<oneshot::Sender<Answer>>,
}

impl<T> Sniff<T> {
    pub fn new(inner: T, tx: Option<oneshot::Sender<Answer>>) -> Self {
        Sniff { inner, tx }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(res) = &r
            && let Some(tx) = this.tx.take()
        {
            let answer = match res {
                Ok(()) => Answer::of(&buf.filled()[before..]),
                Err(_) => Answer::Closed,
            };
            let _ = tx.send(answer);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(Answer::of(b"\x00\x00\x12\x04\x00"), Answer::Http2);
        assert_eq!(Answer::of(b"HTTP/1.1 400 Bad Request\r\n"), Answer::Http1);
        assert_eq!(Answer::of(b"HTT"), Answer::Http1);
        assert_eq!(Answer::of(b""), Answer::Closed);
        assert_eq!(Answer::of(b"\x15\x03\x03"), Answer::Other);
    }
}
