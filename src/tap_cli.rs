//! `outrigger tap`: the requests a running proxy answers, live, from its
//! admin port's `/tap` (one JSON object per line, each sent in a chunk of
//! a chunked body as the request is answered).
//!
//! Blocking std I/O, as `outrigger check`: one connection per window of at
//! most 30 s (the admin port's cap), each event printed as it arrives.
//! `--route` and `--status-min` filter here; `--max` counts what is shown.

use crate::telemetry::tap::{DroppedLine, Event};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The longest window the admin port serves in one response.
const MAX_WINDOW: u64 = 30;
/// The most events the admin port sends in one response.
const MAX_EVENTS: u64 = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Silence allowed beyond the window before the admin port is given up on.
const GRACE: Duration = Duration::from_secs(10);

pub struct Options {
    /// The admin address (`127.0.0.1:15000`, `localhost:15000`).
    pub admin: String,
    pub seconds: u64,
    pub max: u64,
    /// The JSON lines as received instead of one human line each.
    pub json: bool,
    pub filter: Filter,
}

/// What is shown: every event unless a filter is set.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this route (its name in the config).
    pub route: Option<String>,
    /// Only statuses at or above this.
    pub status_min: Option<u16>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.route.as_ref().is_none_or(|r| *r == e.route)
            && self.status_min.is_none_or(|s| e.status >= s)
    }

    fn is_set(&self) -> bool {
        self.route.is_some() || self.status_min.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--admin {0}")]
    Address(String),
    #[error("cannot reach the admin port {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("the admin port {addr} answered /tap with {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the admin port {addr} did not answer /tap with HTTP: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("reading /tap from the admin port {addr}: {source}")]
    Read { addr: SocketAddr, source: io::Error },
    #[error("writing the output: {0}")]
    Output(io::Error),
}

/// How a tap ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub shown: u64,
    pub filtered: u64,
    /// Requests the proxy answered but this tap could not keep up with.
    pub dropped: u64,
    /// `--max` events were shown (else the window ended).
    pub max_reached: bool,
}

/// Taps `o.admin` and prints to stdout; notes (start, end) go to stderr.
pub fn run(o: &Options) -> Result<Summary, TapError> {
    let addr = crate::check::admin_addr(&o.admin).map_err(TapError::Address)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut sum = Summary {
        shown: 0,
        filtered: 0,
        dropped: 0,
        max_reached: false,
    };
    let deadline = Instant::now().checked_add(Duration::from_secs(o.seconds));
    let mut first = true;
    loop {
        let left = deadline.map_or(MAX_WINDOW, |d| {
            d.saturating_duration_since(Instant::now())
                .as_secs_f64()
                .round() as u64
        });
        if left == 0 {
            break;
        }
        let secs = left.min(MAX_WINDOW);
        // Filtered here: the admin port's count would include the rest.
        let ask = if o.filter.is_set() {
            MAX_EVENTS
        } else {
            (o.max - sum.shown).min(MAX_EVENTS)
        };
        let body = open(addr, secs, ask)?;
        if first {
            first = false;
            eprintln!(
                "tapping {addr} for {}s, at most {} (Ctrl-C to stop)",
                o.seconds,
                plural(o.max, "request")
            );
        }
        let more = follow(addr, body, |line| {
            if let Ok(d) = serde_json::from_str::<DroppedLine>(line) {
                eprintln!(
                    "... {} not shown: the tap fell behind",
                    plural(d.dropped, "request")
                );
                sum.dropped += d.dropped;
                return Ok(true);
            }
            let Ok(e) = serde_json::from_str::<Event>(line) else {
                eprintln!("skipping an unreadable event: {line}");
                return Ok(true);
            };
            if !o.filter.matches(&e) {
                sum.filtered += 1;
                return Ok(true);
            }
            let text = if o.json {
                line.to_string()
            } else {
                human(&e, time::OffsetDateTime::now_utc())
            };
            if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
                // Piped into `head`: the reader has all it wants.
                return match e.kind() {
                    io::ErrorKind::BrokenPipe => Ok(false),
                    _ => Err(TapError::Output(e)),
                };
            }
            sum.shown += 1;
            Ok(sum.shown < o.max)
        })?;
        if sum.shown >= o.max {
            sum.max_reached = true;
        }
        if !more {
            break;
        }
    }
    let filtered = match (sum.filtered, sum.dropped) {
        (0, 0) => String::new(),
        (n, 0) => format!(", {n} filtered out"),
        (0, d) => format!(", {d} missed (the tap fell behind)"),
        (n, d) => format!(", {n} filtered out, {d} missed (the tap fell behind)"),
    };
    if sum.max_reached {
        eprintln!(
            "{} shown{filtered} (--max reached)",
            plural(sum.shown, "request")
        );
    } else {
        eprintln!(
            "{} shown in {}s{filtered}",
            plural(sum.shown, "request"),
            o.seconds
        );
    }
    Ok(sum)
}

/// Asks `/tap` for one window; the body once the head said 200.
fn open(addr: SocketAddr, secs: u64, max: u64) -> Result<Box<dyn BufRead>, TapError> {
    let connect = |source| TapError::Connect { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect)?;
    // Between two events there may be the whole window.
    let _ = s.set_read_timeout(Some(Duration::from_secs(secs) + GRACE));
    let _ = s.set_write_timeout(Some(CONNECT_TIMEOUT));
    write!(
        s,
        "GET /tap?seconds={secs}&max={max} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: outrigger-tap\r\naccept: application/x-ndjson\r\nconnection: close\r\n\r\n"
    )
    .map_err(connect)?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r).map_err(|e| match e {
        HeadError::Io(source) => TapError::Read { addr, source },
        HeadError::Malformed(what) => TapError::Protocol { addr, what },
    })?;
    let body = body(r, &head);
    if head.status != 200 {
        let mut text = Vec::new();
        let _ = body.take(4096).read_to_end(&mut text);
        let text = String::from_utf8_lossy(&text);
        let text = text.trim();
        return Err(TapError::Status {
            addr,
            status: head.status,
            body: if text.is_empty() {
                "no body".into()
            } else {
                clean(text)
            },
        });
    }
    Ok(body)
}

/// Hands each non-empty line of `body` to `each` as it arrives, until the
/// body ends (true) or `each` says stop (false).
fn follow(
    addr: SocketAddr,
    mut body: impl BufRead,
    mut each: impl FnMut(&str) -> Result<bool, TapError>,
) -> Result<bool, TapError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = body
            .read_until(b'\n', &mut line)
            .map_err(|source| TapError::Read { addr, source })?;
        if n == 0 {
            return Ok(true);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if !text.is_empty() && !each(text)? {
            return Ok(false);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    chunked: bool,
    length: Option<u64>,
}

#[derive(Debug)]
enum HeadError {
    Io(io::Error),
    Malformed(String),
}

/// The status line and the headers, up to the empty line.
fn read_head(r: &mut impl BufRead) -> Result<Head, HeadError> {
    let mut line = String::new();
    let mut next = |line: &mut String| -> Result<(), HeadError> {
        line.clear();
        let n = (&mut *r)
            .take(8192)
            .read_line(line)
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Malformed(
                "the connection closed before the response head".into(),
            ));
        }
        Ok(())
    };
    next(&mut line)?;
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| HeadError::Malformed(format!("status line `{}`", clean(line.trim()))))?;
    let mut head = Head {
        status,
        chunked: false,
        length: None,
    };
    for _ in 0..100 {
        next(&mut line)?;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            head.length = value.parse().ok();
        }
    }
    Err(HeadError::Malformed("more than 100 header lines".into()))
}

/// The body after `head`: chunked, of a length, or up to the close.
fn body(r: BufReader<TcpStream>, head: &Head) -> Box<dyn BufRead> {
    match (head.chunked, head.length) {
        (true, _) => Box::new(BufReader::new(Chunked::new(r))),
        (false, Some(n)) => Box::new(r.take(n)),
        (false, None) => Box::new(r),
    }
}

/// A chunked body's data: each chunk is handed on as it arrives, never
/// held back for the next.
struct Chunked<R> {
    inner: R,
    /// Bytes left of the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Chunked {
            inner,
            left: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if (&mut self.inner).take(4096).read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended mid-body (the proxy went away?)",
            ));
        }
        Ok(line)
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let n = u64::from_str_radix(size, 16)
                .map_err(|_| bad(format!("a bad chunk size `{}`", clean(line.trim()))))?;
            if n == 0 {
                // Trailers, up to the empty line.
                while !self.line()?.trim_end_matches(['\r', '\n']).is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended mid-chunk (the proxy went away?)",
            ));
        }
        self.left -= got as u64;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
            if crlf != *b"\r\n" {
                return Err(bad("a chunk not ended by CRLF".into()));
            }
        }
        Ok(got)
    }
}

/// One event on one line: arrival time (UTC), listener, method, authority,
/// path, status, latency, then the upstream, route, peer identity and
/// trace id when there is one:
///
/// `14:03:07.123 out GET reviews /api/x → 200 3.1ms upstream=127.0.0.1:9001 route=r peer=spiffe://td/ns/a/sa/b trace=4bf9…`
pub fn human(e: &Event, at: time::OffsetDateTime) -> String {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut line = format!(
        "{:02}:{:02}:{:02}.{:03} {} {} {} {} → {} {}",
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond(),
        or_dash(&e.listener),
        or_dash(&e.method),
        or_dash(&e.authority),
        or_dash(&e.path),
        e.status,
        latency(e.duration_ms)
    );
    for (k, v) in [
        ("upstream", &e.upstream),
        ("route", &e.route),
        ("peer", &e.peer),
        ("trace", &e.trace_id),
    ] {
        if !v.is_empty() {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    clean(&line)
}

/// `0.4ms`, `31.2ms`, `1.25s`.
fn latency(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1e3)
    }
}

/// No control characters reach the terminal.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn event() -> Event {
        Event {
            listener: "out".into(),
            method: "GET".into(),
            authority: "reviews".into(),
            path: "/api/x".into(),
            route: "r".into(),
            status: 200,
            duration_ms: 3.12,
            upstream: "127.0.0.1:9001".into(),
            peer: "spiffe://td/ns/a/sa/b".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        }
    }

    fn at() -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_587_123_456_789).unwrap()
    }

    #[test]
    fn a_human_line() {
        assert_eq!(
            human(&event(), at()),
            "22:23:07.123 out GET reviews /api/x → 200 3.1ms upstream=127.0.0.1:9001 route=r peer=spiffe://td/ns/a/sa/b trace=4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn empty_fields_are_left_out_or_dashed() {
        let e = Event {
            listener: "in".into(),
            method: "POST".into(),
            path: "/p\u{1b}[2J".into(),
            status: 503,
            duration_ms: 1520.0,
            ..Event::default()
        };
        assert_eq!(
            human(&e, at()),
            "22:23:07.123 in POST - /p\u{fffd}[2J → 503 1.52s"
        );
    }

    #[test]
    fn latencies() {
        assert_eq!(latency(0.04), "0.0ms");
        assert_eq!(latency(0.44), "0.4ms");
        assert_eq!(latency(999.94), "999.9ms");
        assert_eq!(latency(1000.0), "1.00s");
        assert_eq!(latency(61_234.0), "61.23s");
    }

    #[test]
    fn filters() {
        let e = event();
        assert!(Filter::default().matches(&e));
        let route = |r: &str| Filter {
            route: Some(r.into()),
            status_min: None,
        };
        assert!(route("r").matches(&e));
        assert!(!route("other").matches(&e));
        assert!(!route("").matches(&e));
        let min = |s| Filter {
            route: None,
            status_min: Some(s),
        };
        assert!(min(200).matches(&e));
        assert!(!min(201).matches(&e));
        assert!(min(500).matches(&Event {
            status: 503,
            ..e.clone()
        }));
        let both = Filter {
            route: Some("r".into()),
            status_min: Some(500),
        };
        assert!(!both.matches(&e));
        assert!(both.matches(&Event {
            status: 500,
            ..e.clone()
        }));
        assert!(!both.matches(&Event {
            status: 500,
            route: "s".into(),
            ..e
        }));
    }

    #[test]
    fn events_read_what_the_admin_port_writes() {
        let line = serde_json::to_string(&event()).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event());
        // A field a proxy does not send reads as empty; new ones are ignored.
        // A gap line is told apart from an event (which reads any object).
        let gap = serde_json::to_string(&DroppedLine { dropped: 7 }).unwrap();
        assert_eq!(
            serde_json::from_str::<DroppedLine>(&gap).unwrap(),
            DroppedLine { dropped: 7 }
        );
        assert!(serde_json::from_str::<DroppedLine>(&line).is_err());
        let e: Event = serde_json::from_str(r#"{"status":404,"new":1}"#).unwrap();
        assert_eq!(e.status, 404);
        assert_eq!(e.route, "");
    }

    fn dechunk(raw: &str) -> io::Result<String> {
        let mut out = String::new();
        Chunked::new(Cursor::new(raw.as_bytes())).read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").unwrap(),
            "hello world"
        );
        assert_eq!(
            dechunk("A\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n").unwrap(),
            "0123456789"
        );
        assert_eq!(dechunk("0\r\n\r\n").unwrap(), "");
        // Cut short: the proxy went away mid-stream.
        for cut in ["5\r\nhel", "5\r\nhello\r\n", "5\r\nhello\r\n0\r\n"] {
            let e = dechunk(cut).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{cut:?}");
        }
        for bad in ["zz\r\nhello\r\n0\r\n\r\n", "5\r\nhelloXX0\r\n\r\n"] {
            let e = dechunk(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }

    #[test]
    fn response_heads() {
        let mut r = Cursor::new(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\nrest",
        );
        assert_eq!(
            read_head(&mut r).unwrap(),
            Head {
                status: 200,
                chunked: true,
                length: None
            }
        );
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "rest");
        let mut r = Cursor::new("HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n\r\nnope\n");
        assert_eq!(
            read_head(&mut r).unwrap(),
            Head {
                status: 403,
                chunked: false,
                length: Some(5)
            }
        );
        assert!(matches!(
            read_head(&mut Cursor::new("SSH-2.0-OpenSSH\r\n")),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            read_head(&mut Cursor::new("HTTP/1.1 200 OK\r\n")),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn lines_are_handed_on_one_by_one_until_told_to_stop() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let raw = "f\r\n{\"status\":200}\n\r\n1b\r\n{\"status\":201}\n\n{\"status\":2\r\n3\r\n02}\r\n0\r\n\r\n";
        let body = || BufReader::new(Chunked::new(Cursor::new(raw.as_bytes())));
        let mut seen = Vec::new();
        let ended = follow(addr, body(), |l| {
            seen.push(l.to_string());
            Ok(true)
        })
        .unwrap();
        assert!(ended);
        assert_eq!(
            seen,
            [
                r#"{"status":200}"#,
                r#"{"status":201}"#,
                r#"{"status":202}"#
            ]
        );
        let mut n = 0;
        let ended = follow(addr, body(), |_| {
            n += 1;
            Ok(n < 2)
        })
        .unwrap();
        assert!(!ended);
        assert_eq!(n, 2);
    }
}
