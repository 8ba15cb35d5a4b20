//! Watches the HTTP/1 request stream of a connection for heads that carry
//! both `Content-Length` and `Transfer-Encoding`, on every request of a
//! keep-alive connection.
//!
//! hyper (1.12) drops the `Content-Length` of a head that also carries
//! `Transfer-Encoding`, in either order, before our service sees the
//! request: the conflict (RFC 9112 §6.3, the stuff of request smuggling)
//! is visible only here. This wrapper
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

/// The part of a header line kept to tell its name: enough for
/// `transfer-encoding:` and the start of a request line.
const NAME: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request head (lines end at LF; a CR before it is ignored, as
    /// httparse does).
    Head,
    /// `n` body bytes left.
    Body(u64),
    /// Chunked framing, byte by byte exactly as hyper's decoder takes it
    /// (CRLF only): the size's first digit, more digits, whitespace after
    /// them, an extension, the LF ending the size line.
    ChunkStart,
    ChunkSize,
    ChunkSizeLws,
    ChunkExt,
    ChunkSizeLf,
    /// `n` chunk bytes left, then CR LF.
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    /// After the last chunk: CR LF ends the message, anything else starts
    /// a trailer line, which ends only at CR LF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    /// Not HTTP/1 (an HTTP/2 preface, a tunnel), or framing hyper refuses
    /// (it closes the connection): stop looking.
    Opaque,
}

/// What a header line is, as far as framing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Undecided,
    ContentLength(LenParse),
    TransferEncoding,
    Other,
}

/// A `Content-Length` value parsed as it streams: optional whitespace,
/// digits, optional whitespace (then the CR of the line end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LenParse {
    Before,
    Digits(u64),
    After(u64),
    Invalid,
}

impl LenParse {
    fn push(self, b: u8) -> LenParse {
        match (self, b) {
            (LenParse::Invalid, _) => LenParse::Invalid,
            (LenParse::Before, b' ' | b'\t') => LenParse::Before,
            (LenParse::Before, d @ b'0'..=b'9') => LenParse::Digits(u64::from(d - b'0')),
            (LenParse::Digits(n), d @ b'0'..=b'9') => n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .map_or(LenParse::Invalid, LenParse::Digits),
            (LenParse::Digits(n) | LenParse::After(n), b' ' | b'\t' | b'\r') => LenParse::After(n),
            _ => LenParse::Invalid,
        }
    }

    fn value(self) -> Option<u64> {
        match self {
            LenParse::Digits(n) | LenParse::After(n) => Some(n),
            _ => None,
        }
    }
}

/// The incremental parser. Kept apart from the I/O so it can be tested
/// (and fuzzed) on byte slices.
#[derive(Debug)]
pub struct Parser {
    state: State,
    /// The current head line: bytes seen, the first ones (lowercased), and
    /// what kind of line it is.
    line_len: usize,
    name: [u8; NAME],
    line: Line,
    /// Heads completed so far (the index of the current one).
    heads: u64,
    /// In the current head: lines seen, and what they said.
    lines: u32,
    te: bool,
    cl: Option<u64>,
    /// A `Content-Length` hyper would refuse (it answers 400 and closes).
    cl_invalid: bool,
    chunk: u64,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::Head,
            line_len: 0,
            name: [0; NAME],
            line: Line::Undecided,
            heads: 0,
            lines: 0,
            te: false,
            cl: None,
            cl_invalid: false,
            chunk: 0,
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
        self.state == State::Opaque
    }

    /// Follows `bytes`, the next bytes of the stream. Body bytes are
    /// skipped by count; everything else is looked at once.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Found {
        let mut found = Found::default();
        while let Some((&b, rest)) = bytes.split_first() {
            match self.state {
                State::Opaque => break,
                State::Body(n) | State::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    let left = n - take;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkDataCr,
                        (_, l) => State::ChunkData(l),
                    };
                    continue;
                }
                // The rest of a line whose kind is known (the request
                // line past its start, a header that is not about framing)
                // is skipped to its end at memchr speed: most of a head.
                State::Head if self.line_settled() => match memchr::memchr(b'\n', bytes) {
                    Some(i) => {
                        self.line_len += i;
                        self.end_line(&mut found);
                        bytes = &bytes[i + 1..];
                        continue;
                    }
                    None => {
                        self.line_len += bytes.len();
                        break;
                    }
                },
                State::Head => self.head_byte(b, &mut found),
                _ => self.chunked_byte(b),
            }
            bytes = rest;
        }
        found
    }

    fn chunked_byte(&mut self, b: u8) {
        let hex = (b as char).to_digit(16).map(u64::from);
        self.state = match (self.state, b, hex) {
            (State::ChunkStart, _, Some(d)) => {
                self.chunk = d;
                State::ChunkSize
            }
            (State::ChunkSize, _, Some(d)) => match self.chunk.checked_mul(16) {
                Some(n) => {
                    self.chunk = n + d;
                    State::ChunkSize
                }
                None => State::Opaque,
            },
            (State::ChunkSize | State::ChunkSizeLws, b' ' | b'\t', _) => State::ChunkSizeLws,
            (State::ChunkSize | State::ChunkSizeLws, b';', _) => State::ChunkExt,
            (State::ChunkSize | State::ChunkSizeLws | State::ChunkExt, b'\r', _) => {
                State::ChunkSizeLf
            }
            (State::ChunkExt, b'\n', _) => State::Opaque,
            (State::ChunkExt, _, _) => State::ChunkExt,
            (State::ChunkSizeLf, b'\n', _) if self.chunk == 0 => State::EndCr,
            (State::ChunkSizeLf, b'\n', _) => State::ChunkData(self.chunk),
            (State::ChunkDataCr, b'\r', _) => State::ChunkDataLf,
            (State::ChunkDataLf, b'\n', _) => State::ChunkStart,
            (State::EndCr, b'\r', _) => State::EndLf,
            (State::Trailer, b'\r', _) => State::TrailerLf,
            (State::EndCr | State::Trailer, _, _) => State::Trailer,
            (State::TrailerLf, b'\n', _) => State::EndCr,
            (State::EndLf, b'\n', _) => State::Head,
            // Anything else is a framing error hyper refuses, closing the
            // connection: nothing more to watch.
            _ => State::Opaque,
        };
    }

    /// Whether the current head line's remaining bytes up to its LF
    /// cannot change anything: only its LF matters now.
    fn line_settled(&self) -> bool {
        if self.lines == 0 {
            self.line_len >= NAME
        } else {
            self.line == Line::Other
        }
    }

    fn head_byte(&mut self, b: u8, found: &mut Found) {
        if b == b'\n' {
            return self.end_line(found);
        }
        // Only `content-length` and `transfer-encoding` matter: a header
        // line starting otherwise is settled at its first byte (and then
        // skipped whole). A CR first may be a blank line: kept.
        if self.lines > 0 && self.line_len == 0 && !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r') {
            self.line_len = 1;
            self.name[0] = b;
            self.line = Line::Other;
            return;
        }
        if self.line_len < NAME {
            self.name[self.line_len] = b.to_ascii_lowercase();
        }
        self.line_len += 1;
        if self.lines == 0 {
            return; // the request line: only its start matters (end_line)
        }
        self.line = match self.line {
            Line::Undecided if b == b':' => match &self.name[..self.line_len.min(NAME) - 1] {
                b"content-length" => Line::ContentLength(LenParse::Before),
                b"transfer-encoding" => Line::TransferEncoding,
                _ => Line::Other,
            },
            Line::Undecided if self.line_len > NAME => Line::Other,
            Line::ContentLength(v) => Line::ContentLength(v.push(b)),
            other => other,
        };
    }

    fn end_line(&mut self, found: &mut Found) {
        let blank = self.line_len == 0 || (self.line_len == 1 && self.name[0] == b'\r');
        if self.lines == 0 {
            if blank {
                // RFC 9112 §2.2: a stray empty line before a request line.
            } else if self.name[..self.line_len.min(NAME)].starts_with(b"pri * http/2.0") {
                self.state = State::Opaque;
            } else {
                self.lines = 1;
            }
        } else if blank {
            self.end_head(found);
        } else {
            match self.line {
                Line::TransferEncoding => self.te = true,
                Line::ContentLength(v) => match v.value() {
                    Some(n) => self.cl = Some(n),
                    None => self.cl_invalid = true,
                },
                _ => {}
            }
            self.lines += 1;
        }
        self.line_len = 0;
        self.line = Line::Undecided;
    }

    fn end_head(&mut self, found: &mut Found) {
        if self.te && (self.cl.is_some() || self.cl_invalid) {
            found.conflict.get_or_insert(self.heads);
        }
        if self.heads == 0 {
            found.first_head_done = true;
        }
        self.heads += 1;
        self.state = if self.cl_invalid && !self.te {
            // hyper answers 400 and closes: the rest is not a request stream.
            State::Opaque
        } else if self.te {
            State::ChunkStart
        } else {
            match self.cl {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
        self.lines = 0;
        self.te = false;
        self.cl = None;
        self.cl_invalid = false;
    }
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
        let f =
            p.feed(b"POST / HTTP/1.1\ntransfer-encoding: chunked\ncontent-length: 1\n\n0\r\n\r\n");
        assert_eq!(f.conflict, Some(1));
    }

    #[test]
    fn chunk_extensions_and_large_chunks() {
        let mut p = Parser::default();
        p.feed(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        p.feed(b"10 ;name=value\r\n");
        p.feed(&[b'x'; 16]);
        p.feed(b"\r\n0\r\n\r\n");
        let f =
            p.feed(b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(f.conflict, Some(1));
    }

    #[test]
    fn a_long_content_length_line_is_read_whole() {
        // Found in review: a value past the first 64 bytes of its line
        // (padding, leading zeros) was read as 0 and the body as heads.
        let padded = format!(
            "POST / HTTP/1.1\r\ncontent-length:{}5\r\n\r\nhello",
            " ".repeat(60)
        );
        let zeros = format!(
            "POST / HTTP/1.1\r\ncontent-length: {}5\r\n\r\nhello",
            "0".repeat(70)
        );
        for first in [padded, zeros] {
            let mut stream = first.into_bytes();
            stream.extend_from_slice(
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n0\r\n\r\n",
            );
            assert_eq!(
                conflicts(&[&stream]),
                [1],
                "{}",
                String::from_utf8_lossy(&stream)
            );
            assert_eq!(bytewise(&stream), [1]);
        }
    }

    #[test]
    fn bare_lf_is_trailer_content_as_hyper_reads_it() {
        // Found in review: hyper ends trailer lines only at CRLF, so this
        // "request" is part of the trailers, not a head.
        let stream = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\nPOST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 99999\r\n\r\n";
        assert!(conflicts(&[stream]).is_empty());
    }

    #[test]
    fn framing_hyper_refuses_stops_the_watch() {
        let mut p = Parser::default();
        p.feed(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\nhello");
        assert!(p.is_opaque(), "a bare LF after a chunk size: hyper closes");
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
