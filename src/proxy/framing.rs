//! Watches the HTTP/1 request stream of a connection for heads that carry
//! both `Content-Length` and `Transfer-Encoding`, on every request of a
//! keep-alive connection.
//!
//! hyper drops a `Content-Length` that follows `Transfer-Encoding` before
//! our service sees the request, so the conflict (RFC 9112 §6.3, the stuff
//! of request smuggling) is invisible there in that order. This wrapper
//! reads nothing itself: it follows the bytes hyper reads with a small
//! incremental parser — heads line by line (CRLF or bare LF, as hyper
//! accepts both), bodies skipped by their length or chunk sizes — so each
//! byte is looked at once, however slowly a client sends. A conflicting
//! head is recorded by its index on the connection; the service refuses
//! that request (400) before anything is forwarded.
//!
//! It also bounds how long the first head may take (slowloris): past
//! `header_read_timeout` it answers 408 itself and ends the connection.
//! One timer per connection, none per request; later requests on a
//! keep-alive connection are bounded by the listener's idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the watch found, shared with the connection's service.
#[derive(Debug)]
pub struct Framing {
    /// Index of the first request head with both framings (`u64::MAX`: none).
    first_conflict: AtomicU64,
    /// The first head never completed in time; a 408 was written.
    pub timed_out: AtomicBool,
    /// The connection became a tunnel: its bytes are no longer HTTP.
    opaque: AtomicBool,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            first_conflict: AtomicU64::new(u64::MAX),
            timed_out: AtomicBool::new(false),
            opaque: AtomicBool::new(false),
        }
    }
}

impl Framing {
    /// Whether request number `index` (0-based) on this connection, or one
    /// before it, carried both framings.
    pub fn conflict_at(&self, index: u64) -> bool {
        self.first_conflict.load(Relaxed) <= index
    }

    /// The connection was upgraded: stop reading its bytes as HTTP.
    pub fn set_opaque(&self) {
        self.opaque.store(true, Relaxed);
    }
}

/// The longest line prefix kept: enough for the header names and values
/// that decide framing.
const LINE: usize = 64;

#[derive(Debug)]
enum State {
    /// In a request head.
    Head,
    /// `n` body bytes left.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// `n` chunk bytes left, then the CRLF that ends the chunk.
    ChunkData(u64),
    /// The line ending a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk.
    Trailers,
    /// Not HTTP/1 (an HTTP/2 preface, a tunnel): stop looking.
    Opaque,
}

/// The incremental parser. Kept apart from the I/O so it can be tested
/// (and fuzzed) on byte slices.
#[derive(Debug)]
pub struct Parser {
    state: State,
    line: [u8; LINE],
    line_len: usize,
    line_total: usize,
    /// Heads completed so far (the index of the current one).
    heads: u64,
    /// In the current head: lines seen, and what they said.
    lines: u32,
    te: bool,
    cl: Option<u64>,
    chunk: u64,
    chunk_digits: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::Head,
            line: [0; LINE],
            line_len: 0,
            line_total: 0,
            heads: 0,
            lines: 0,
            te: false,
            cl: None,
            chunk: 0,
            chunk_digits: false,
        }
    }
}

/// What one call to `feed` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Index of a head that carried both framings.
    pub conflict: Option<u64>,
    /// The first head (index 0) ended in these bytes.
    pub first_head_done: bool,
}

impl Parser {
    pub fn is_opaque(&self) -> bool {
        matches!(self.state, State::Opaque)
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Found {
        let mut found = Found::default();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Opaque => break,
                State::Body(n) => {
                    let take = (*n).min(bytes.len() as u64);
                    *n -= take;
                    bytes = &bytes[take as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min(bytes.len() as u64);
                    *n -= take;
                    bytes = &bytes[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkEnd;
                    }
                }
                State::ChunkSize => {
                    let (line_done, used) = self.chunk_size_bytes(bytes);
                    bytes = &bytes[used..];
                    if line_done {
                        self.state = match self.chunk {
                            0 => State::Trailers,
                            n => State::ChunkData(n),
                        };
                        self.chunk = 0;
                        self.chunk_digits = false;
                    }
                }
                State::ChunkEnd | State::Trailers | State::Head => {
                    let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                        self.keep(bytes);
                        break;
                    };
                    self.keep(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    self.end_line(&mut found);
                }
            }
        }
        found
    }

    /// Keeps the start of the current line.
    fn keep(&mut self, part: &[u8]) {
        let room = LINE - self.line_len;
        let n = room.min(part.len());
        self.line[self.line_len..self.line_len + n].copy_from_slice(&part[..n]);
        self.line_len += n;
        self.line_total += part.len();
    }

    /// Reads chunk-size hex digits up to the line's end; returns whether the
    /// line ended and how many bytes were used.
    fn chunk_size_bytes(&mut self, bytes: &[u8]) -> (bool, usize) {
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                return (true, i + 1);
            }
            if self.chunk_digits {
                match (b as char).to_digit(16) {
                    Some(d) => {
                        self.chunk = self.chunk.saturating_mul(16).saturating_add(u64::from(d));
                    }
                    // `;ext`, CR or anything else ends the digits.
                    None => self.chunk_digits = false,
                }
            }
        }
        (false, bytes.len())
    }

    fn end_line(&mut self, found: &mut Found) {
        let mut line = &self.line[..self.line_len];
        if line.last() == Some(&b'\r') && self.line_total == self.line_len {
            line = &line[..line.len() - 1];
        }
        let empty = self.line_total <= 1 && line.is_empty();
        match self.state {
            State::ChunkEnd => self.start_chunk(),
            State::Trailers if empty => self.state = State::Head,
            State::Head if empty && self.lines == 0 => {} // RFC 9112 §2.2: a stray CRLF before a request line
            State::Head if empty => self.end_head(found),
            State::Head => {
                if self.lines == 0 && line.starts_with(b"PRI * HTTP/2.0") {
                    self.state = State::Opaque;
                } else if self.lines > 0 {
                    if starts_with_ci(line, b"transfer-encoding:") {
                        self.te = true;
                    } else if let Some(v) = strip_prefix_ci(line, b"content-length:") {
                        self.cl = parse_len(v);
                    }
                }
                self.lines += 1;
            }
            _ => {}
        }
        self.line_len = 0;
        self.line_total = 0;
    }

    fn start_chunk(&mut self) {
        self.state = State::ChunkSize;
        self.chunk = 0;
        self.chunk_digits = true;
    }

    fn end_head(&mut self, found: &mut Found) {
        if self.te && self.cl.is_some() {
            found.conflict.get_or_insert(self.heads);
        }
        if self.heads == 0 {
            found.first_head_done = true;
        }
        self.heads += 1;
        if self.te {
            self.start_chunk();
        } else {
            match self.cl {
                Some(n) if n > 0 => self.state = State::Body(n),
                _ => self.state = State::Head,
            }
        }
        self.lines = 0;
        self.te = false;
        self.cl = None;
    }
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    starts_with_ci(line, prefix).then(|| &line[prefix.len()..])
}

fn parse_len(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        // Not a length hyper would accept: it refuses the request itself.
        return Some(0);
    }
    std::str::from_utf8(v).ok()?.parse().ok().or(Some(u64::MAX))
}

pub struct FramingWatch<T> {
    inner: T,
    parser: Parser,
    pub framing: Arc<Framing>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\nx-outrigger-reason: header-timeout\r\n\r\n";

impl<T> FramingWatch<T> {
    pub fn new(inner: T, header_timeout: Option<std::time::Duration>) -> Self {
        FramingWatch {
            inner,
            parser: Parser::default(),
            framing: Arc::default(),
            deadline: header_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
        }
    }

    fn inspect(&mut self, new: &[u8]) {
        if self.framing.opaque.load(Relaxed) {
            self.parser.state = State::Opaque;
        }
        let found = self.parser.feed(new);
        if found.first_head_done || self.parser.is_opaque() {
            self.deadline = None;
        }
        if let Some(i) = found.conflict {
            self.framing.first_conflict.fetch_min(i, Relaxed);
        }
    }
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
            // Only before the first head is complete, so never inside a
            // response. Best effort: the socket is idle, the answer is short.
            let _ = Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT);
            this.deadline = None;
            this.parser.state = State::Opaque;
            this.framing.timed_out.store(true, Relaxed);
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.parser.is_opaque() && matches!(r, Poll::Ready(Ok(()))) {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.inspect(new);
            }
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

    /// Feeds `parts` one after another; returns the conflicting head indexes.
    fn conflicts(parts: &[&[u8]]) -> Vec<u64> {
        let mut p = Parser::default();
        parts.iter().filter_map(|b| p.feed(b).conflict).collect()
    }

    /// Feeds a whole stream one byte at a time.
    fn bytewise(stream: &[u8]) -> Vec<u64> {
        let mut p = Parser::default();
        stream
            .chunks(1)
            .filter_map(|b| p.feed(b).conflict)
            .collect()
    }

    #[test]
    fn sees_both_orders_and_split_reads() {
        assert_eq!(
            conflicts(&[
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
            ]),
            [0]
        );
        assert_eq!(
            conflicts(&[
                b"POST / HTTP/1.1\r\ncontent-length: 4\r\n",
                b"transfer-encoding: chunked\r\n\r\n"
            ]),
            [0]
        );
        assert!(
            conflicts(&[b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nTransfer-Encoding: x"])
                .is_empty()
        );
        assert!(conflicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
    }

    #[test]
    fn follows_bodies_to_the_next_head_on_keep_alive() {
        let stream = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nhost: x\r\n\r\n\
POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab\r\nc\r\n0\r\nx-t: 1\r\n\r\n\
POST /d HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n";
        assert_eq!(conflicts(&[stream]), [3], "the fourth request conflicts");
        assert_eq!(bytewise(stream), [3], "the same when sent byte by byte");
    }

    #[test]
    fn understands_bare_lf() {
        let mut p = Parser::default();
        let f = p.feed(b"GET / HTTP/1.1\nhost: x\n\n");
        assert!(f.first_head_done, "a head ended by bare LFs is complete");
        let f = p.feed(b"POST / HTTP/1.1\ntransfer-encoding: chunked\ncontent-length: 1\n\n0\n\n");
        assert_eq!(f.conflict, Some(1));
    }

    #[test]
    fn chunk_extensions_and_large_chunks() {
        let mut p = Parser::default();
        p.feed(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        p.feed(b"10;name=value\r\n");
        p.feed(&[b'x'; 16]);
        p.feed(b"\r\n0\r\n\r\n");
        let f =
            p.feed(b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(f.conflict, Some(1));
    }

    #[test]
    fn long_heads_cost_linear_time() {
        // A 60 KB head in 3-byte pieces: each byte is looked at once.
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            head.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(20)).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut p = Parser::default();
        let mut done = false;
        for piece in head.chunks(3) {
            done |= p.feed(piece).first_head_done;
        }
        assert!(done);
    }
}
