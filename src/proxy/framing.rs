//! Watches the head of the first HTTP/1 request on a connection for
//! `Content-Length` and `Transfer-Encoding` together.
//!
//! hyper drops a `Content-Length` that follows `Transfer-Encoding` before
//! our service sees the request, so the conflict (RFC 9112 §6.3, the stuff
//! of request smuggling) is invisible there in that order. This wrapper
//! reads nothing itself: it looks at the bytes hyper reads, only until the
//! end of the first head, then steps aside. Later requests on the same
//! connection are covered by hyper closing any connection that carried
//! both, and by the service's own check when both survive into the map.
//!
//! It also bounds how long the first head may take (slowloris): past
//! `header_read_timeout` it answers 408 itself and ends the connection.
//! One timer per connection, none per request; later requests on a
//! keep-alive connection are bounded by the listener's idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct FramingWatch<T> {
    inner: T,
    head: Option<Vec<u8>>,
    limit: usize,
    pub conflict: Arc<AtomicBool>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    pub timed_out: Arc<AtomicBool>,
}

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\nx-outrigger-reason: header-timeout\r\n\r\n";

impl<T> FramingWatch<T> {
    pub fn new(inner: T, limit: usize, header_timeout: Option<std::time::Duration>) -> Self {
        FramingWatch {
            inner,
            head: Some(Vec::new()),
            limit,
            conflict: Arc::default(),
            deadline: header_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
            timed_out: Arc::default(),
        }
    }

    fn inspect(&mut self, new: &[u8]) {
        let Some(head) = self.head.as_mut() else {
            return;
        };
        head.extend_from_slice(new);
        if head.starts_with(b"PRI ") {
            self.head = None; // HTTP/2 preface: binary frames follow.
            self.deadline = None;
            return;
        }
        let end = find(head, b"\r\n\r\n");
        if end.is_none() && head.len() < self.limit {
            return;
        }
        self.deadline = None;
        let head = self.head.take().unwrap_or_default();
        let head = &head[..end.unwrap_or(head.len())];
        let (mut te, mut cl) = (false, false);
        for line in head.split(|b| *b == b'\n') {
            te |= starts_with_ci(line, b"transfer-encoding:");
            cl |= starts_with_ci(line, b"content-length:");
        }
        if te && cl {
            self.conflict.store(true, Ordering::Relaxed);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            // Best effort: the socket is idle, so the short answer fits its buffer.
            let _ = Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT);
            this.deadline = None;
            this.head = None;
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.head.is_some() && matches!(r, Poll::Ready(Ok(()))) {
            let new = buf.filled()[before..].to_vec();
            this.inspect(&new);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingWatch<T> {
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

    fn check(parts: &[&[u8]]) -> bool {
        let mut w = FramingWatch::new((), 65536, None);
        for p in parts {
            w.inspect(p);
        }
        w.conflict.load(Ordering::Relaxed)
    }

    #[test]
    fn sees_both_orders_and_split_reads() {
        assert!(check(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        ]));
        assert!(check(&[
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\n",
            b"transfer-encoding: chunked\r\n\r\n"
        ]));
        assert!(!check(&[
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nTransfer-Encoding: x"
        ]));
        assert!(!check(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]));
    }
}
