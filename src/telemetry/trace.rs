//! Distributed tracing: trace context (W3C `traceparent`/`tracestate`, B3
//! single and multi header) read and written on every hop, head sampling,
//! and one span per request per proxy exported over OTLP/HTTP (protobuf,
//! the OpenTelemetry project's own message types) by a batching task
//! behind a bounded queue: a collector that is down, slow or failing costs
//! dropped (and counted) spans, never a slower request.
//!
//! With no `tracing:` section nothing here runs: one relaxed atomic load
//! per request.

use crate::config::{Config, Tracing};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

// The trace headers as names made once: a lookup by `&str` parses and
// checks the name on every call (~300 instructions each, a dozen a request).
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A request's place in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// How the caller spoke, so the next hop hears the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// What came in: the caller's context (if valid) and whether a header was
/// there but malformed.
#[derive(Debug, PartialEq)]
pub struct Incoming {
    pub parent: Option<Context>,
    pub format: Format,
    pub invalid: bool,
    /// B3's "sample this" without ids (`b3: 1`), or `x-b3-sampled` alone.
    pub sampled_hint: Option<bool>,
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, c) in s.chunks(2).enumerate() {
        let d = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        out[i] = d(c[0])? << 4 | d(c[1])?;
    }
    Some(out)
}

/// A B3 trace id: 32 hex digits, or 16 (the high half zero).
fn b3_trace_id(s: &[u8]) -> Option<[u8; 16]> {
    match s.len() {
        32 => hex::<16>(s),
        16 => {
            let low = hex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn valid(trace_id: &[u8; 16], span_id: &[u8; 8]) -> bool {
    trace_id.iter().any(|b| *b != 0) && span_id.iter().any(|b| *b != 0)
}

/// `00-<trace id>-<parent id>-<flags>` (W3C Trace Context).
pub fn parse_traceparent(v: &[u8]) -> Option<Context> {
    let parts: Vec<&[u8]> = v.split(|b| *b == b'-').collect();
    if parts.len() < 4 || parts[0].len() != 2 || parts[0] == b"ff" {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if parts[0] == b"00" && parts.len() != 4 {
        return None;
    }
    hex::<1>(parts[0])?;
    let trace_id = hex::<16>(parts[1])?;
    let span_id = hex::<8>(parts[2])?;
    let flags = hex::<1>(parts[3])?[0];
    valid(&trace_id, &span_id).then_some(Context {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Reads the caller's trace context: W3C first, then B3 single, then B3
/// multi.
pub fn read(h: &HeaderMap) -> Incoming {
    // Most requests carry no trace header: one pass over the names (a
    // length compare for most) instead of six lookups, each hashing a name.
    if !h.keys().any(|k| {
        let k = k.as_str();
        k == "traceparent" || k == "b3" || k.starts_with("x-b3-")
    }) {
        return Incoming {
            parent: None,
            format: Format::W3c,
            invalid: false,
            sampled_hint: None,
        };
    }
    if let Some(tp) = h.get(&TRACEPARENT) {
        let parent = parse_traceparent(tp.as_bytes());
        return Incoming {
            invalid: parent.is_none(),
            parent,
            format: Format::W3c,
            sampled_hint: None,
        };
    }
    if let Some(b3) = h.get(&B3) {
        let v = b3.as_bytes();
        let parts: Vec<&[u8]> = v.split(|b| *b == b'-').collect();
        let flag = |f: &[u8]| match f {
            b"1" | b"d" => Some(true),
            b"0" => Some(false),
            _ => None,
        };
        if parts.len() == 1 {
            let hint = flag(parts[0]);
            return Incoming {
                parent: None,
                format: Format::B3Single,
                invalid: hint.is_none(),
                sampled_hint: hint,
            };
        }
        let parsed = (|| {
            let trace_id = b3_trace_id(parts[0])?;
            let span_id = hex::<8>(parts.get(1)?)?;
            let sampled = match parts.get(2) {
                Some(f) => flag(f)?,
                None => false,
            };
            valid(&trace_id, &span_id).then_some(Context {
                trace_id,
                span_id,
                sampled,
            })
        })();
        return Incoming {
            invalid: parsed.is_none(),
            parent: parsed,
            format: Format::B3Single,
            sampled_hint: None,
        };
    }
    let tid = h.get(&B3_TRACEID);
    let sid = h.get(&B3_SPANID);
    let sampled = h
        .get(&B3_FLAGS)
        .filter(|f| f.as_bytes() == b"1")
        .map(|_| true)
        .or_else(|| match h.get(&B3_SAMPLED).map(HeaderValue::as_bytes) {
            Some(b"1") | Some(b"true") => Some(true),
            Some(b"0") | Some(b"false") => Some(false),
            _ => None,
        });
    if tid.is_some() || sid.is_some() {
        let parsed = (|| {
            let trace_id = b3_trace_id(tid?.as_bytes())?;
            let span_id = hex::<8>(sid?.as_bytes())?;
            valid(&trace_id, &span_id).then_some(Context {
                trace_id,
                span_id,
                sampled: sampled.unwrap_or(false),
            })
        })();
        return Incoming {
            invalid: parsed.is_none(),
            parent: parsed,
            format: Format::B3Multi,
            sampled_hint: None,
        };
    }
    Incoming {
        parent: None,
        format: Format::W3c,
        invalid: false,
        sampled_hint: sampled,
    }
}

/// Lowercase hex of `b`, written into `out` (twice `b`'s length).
fn hex_into(out: &mut [u8], b: &[u8]) {
    const D: &[u8; 16] = b"0123456789abcdef";
    for (pair, x) in out.chunks_exact_mut(2).zip(b) {
        pair[0] = D[usize::from(x >> 4)];
        pair[1] = D[usize::from(x & 15)];
    }
}

fn to_hex(b: &[u8]) -> String {
    let mut out = vec![0; b.len() * 2];
    hex_into(&mut out, b);
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

/// `00-<32 hex>-<16 hex>-<2 hex>`.
const TRACEPARENT_LEN: usize = 55;

impl Context {
    pub fn trace_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The `traceparent` value, built on the stack: one allocation, in
    /// the header value itself.
    fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut v = [b'-'; TRACEPARENT_LEN];
        v[..2].copy_from_slice(b"00");
        hex_into(&mut v[3..35], &self.trace_id);
        hex_into(&mut v[36..52], &self.span_id);
        v[53..].copy_from_slice(if self.sampled { b"01" } else { b"00" });
        v
    }

    #[cfg(test)]
    pub fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }
}

/// Writes `ctx` (this proxy's span) for the next hop: always W3C, and B3
/// too when the caller spoke B3. Whatever the caller sent (valid or not)
/// is replaced, never forwarded as it was.
pub fn write(h: &mut HeaderMap, ctx: &Context, format: Format, parent: Option<&Context>) {
    // B3 names are looked up (hashed) only when the request has one: one
    // pass over the names instead of six lookups that find nothing.
    let has_b3 = h.keys().any(|k| {
        let k = k.as_str();
        k == "b3" || k.starts_with("x-b3-")
    });
    if has_b3 {
        for name in [
            &B3,
            &B3_TRACEID,
            &B3_SPANID,
            &B3_PARENTSPANID,
            &B3_SAMPLED,
            &B3_FLAGS,
        ] {
            h.remove(name);
        }
    }
    // `insert` replaces every `traceparent` the caller sent.
    if let Ok(v) = HeaderValue::from_bytes(&ctx.traceparent_bytes()) {
        h.insert(TRACEPARENT.clone(), v);
    }
    if parent.is_none() {
        // A new trace: a caller's tracestate belongs to no trace of ours.
        h.remove(&TRACESTATE);
    }
    let set = |h: &mut HeaderMap, k: &HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k.clone(), v);
        }
    };
    let flag = if ctx.sampled { "1" } else { "0" };
    match format {
        Format::W3c => {}
        Format::B3Single => set(
            h,
            &B3,
            format!("{}-{}-{flag}", to_hex(&ctx.trace_id), to_hex(&ctx.span_id)),
        ),
        Format::B3Multi => {
            set(h, &B3_TRACEID, to_hex(&ctx.trace_id));
            set(h, &B3_SPANID, to_hex(&ctx.span_id));
            if let Some(p) = parent {
                set(h, &B3_PARENTSPANID, to_hex(&p.span_id));
            }
            set(h, &B3_SAMPLED, flag.to_string());
        }
    }
}

/// One finished request, as the span exporter needs it.
pub struct Finished {
    pub ctx: Context,
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: span::SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Attempts beyond the first, each a `retry` event.
    pub retries: u32,
    pub error: bool,
}

pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// The tracing settings in force (swapped on reload).
pub struct Tracer {
    default_sampling: f64,
    sampling: HashMap<String, f64>,
    exporter: Option<mpsc::Sender<Finished>>,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACER: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();
/// The running exporter's settings, so a reload with the same ones keeps it.
static EXPORTER: parking_lot::Mutex<Option<(Tracing, String, mpsc::Sender<Finished>)>> =
    parking_lot::Mutex::new(None);

/// The tracer, when the config asks for tracing.
pub fn tracer() -> Option<Arc<Tracer>> {
    if !ENABLED.load(Relaxed) {
        return None;
    }
    TRACER.load_full()
}

/// Applies the config's `tracing:` (on start and every reload).
pub fn configure(config: &Config) {
    let Some(t) = &config.tracing else {
        ENABLED.store(false, Relaxed);
        TRACER.store(None);
        *EXPORTER.lock() = None;
        return;
    };
    let service = t
        .service_name
        .clone()
        .unwrap_or_else(|| match config.node.service.as_str() {
            "" => "outrigger".to_string(),
            s => s.to_string(),
        });
    let exporter = t.otlp.as_ref().map(|url| {
        let mut running = EXPORTER.lock();
        match running.as_ref() {
            Some((settings, svc, tx)) if settings == t && *svc == service => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(t.max_queue);
                tokio::spawn(export_loop(rx, url.clone(), t.clone(), service.clone()));
                *running = Some((t.clone(), service.clone(), tx.clone()));
                tx
            }
        }
    });
    if t.otlp.is_none() {
        *EXPORTER.lock() = None;
    }
    let sampling = config
        .listeners
        .iter()
        .filter_map(|l| l.trace_sampling.map(|s| (l.name.clone(), s)))
        .collect();
    TRACER.store(Some(Arc::new(Tracer {
        default_sampling: t.sampling,
        sampling,
        exporter,
    })));
    ENABLED.store(true, Relaxed);
}

impl Tracer {
    /// Head sampling for a trace this proxy starts on `listener`.
    pub fn sample(&self, listener: &str) -> bool {
        let p = self
            .sampling
            .get(listener)
            .copied()
            .unwrap_or(self.default_sampling);
        p >= 1.0 || (p > 0.0 && fastrand::f64() < p)
    }

    pub fn exports(&self) -> bool {
        self.exporter.is_some()
    }

    /// Queues a span; a full queue drops it (counted), never waits.
    pub fn finish(&self, span: Finished) {
        let Some(tx) = &self.exporter else { return };
        if tx.try_send(span).is_err() {
            super::metrics()
                .trace_spans_dropped
                .with_label_values(&["queue-full"])
                .inc();
        }
    }
}

/// A fresh span in `trace` (a new trace when `None`).
pub fn child(parent: Option<&Context>, sampled: bool) -> Context {
    let mut span_id = fastrand::u64(1..).to_be_bytes();
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    let trace_id = match parent {
        Some(p) => p.trace_id,
        None => fastrand::u128(1..).to_be_bytes(),
    };
    Context {
        trace_id,
        span_id,
        sampled,
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, v: AttrValue) -> KeyValue {
    let value = match v {
        AttrValue::Str(s) => any_value::Value::StringValue(s),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn to_otlp(f: Finished) -> Span {
    let end = unix_nanos(f.end);
    Span {
        trace_id: f.ctx.trace_id.to_vec(),
        span_id: f.ctx.span_id.to_vec(),
        parent_span_id: f.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(f.ctx.sampled),
        name: f.name,
        kind: f.kind as i32,
        start_time_unix_nano: unix_nanos(f.start),
        end_time_unix_nano: end,
        attributes: f.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
        events: (0..f.retries)
            .map(|i| span::Event {
                time_unix_nano: end,
                name: "retry".into(),
                attributes: vec![kv("outrigger.attempt", AttrValue::Int(i64::from(i) + 2))],
                ..Default::default()
            })
            .collect(),
        status: Some(Status {
            code: if f.error { 2 } else { 0 },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The OTLP request for a batch of spans.
pub fn export_request(service: &str, spans: Vec<Finished>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", AttrValue::Str(service.to_string()))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "outrigger".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.into_iter().map(to_otlp).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Batches spans (up to `max_batch`, or every `flush_interval`) and POSTs
/// them; one export at a time, so a slow collector fills the queue and the
/// queue drops, instead of exports piling up.
async fn export_loop(mut rx: mpsc::Receiver<Finished>, url: String, t: Tracing, service: String) {
    let mut batch = Vec::with_capacity(t.max_batch);
    loop {
        let first = match rx.recv().await {
            Some(s) => s,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + t.flush_interval.0;
        while batch.len() < t.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body =
            prost::Message::encode_to_vec(&export_request(&service, std::mem::take(&mut batch)));
        let m = super::metrics();
        match post(&url, Bytes::from(body)).await {
            Ok(()) => m.trace_spans_exported.inc_by(n),
            Err(e) => {
                tracing::debug!(%url, error = %e, "span export failed");
                m.trace_spans_dropped
                    .with_label_values(&["export-failed"])
                    .inc_by(n);
            }
        }
    }
}

const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

async fn post(url: &str, body: Bytes) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/v1/traces", |p| p.as_str());
        let req = http::Request::post(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(http_body_util::Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {}", resp.status()))
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, attempt)
        .await
        .map_err(|_| "collector timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn w3c_traceparent_is_read_and_written() {
        let c = parse_traceparent(TP.as_bytes()).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), TP);
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(format!("01{}-x", &TP[2..]).as_bytes()).is_some());
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let i = read(&h);
        assert_eq!(i.format, Format::B3Single);
        assert!(i.parent.unwrap().sampled);
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("463ac35c9f6413ad"));
        h.insert("x-b3-spanid", HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let i = read(&h);
        assert_eq!(i.format, Format::B3Multi);
        let p = i.parent.unwrap();
        assert_eq!(&p.trace_id[..8], &[0; 8], "64-bit ids are padded");
        assert!(p.sampled);
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("nothex"));
        h.insert("x-b3-spanid", HeaderValue::from_static("a2fb4a1d1a96d312"));
        assert!(read(&h).invalid);
    }

    #[test]
    fn a_malformed_header_is_replaced_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-zz-zz-01"));
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let i = read(&h);
        assert!(i.invalid && i.parent.is_none());
        let ctx = child(None, true);
        write(&mut h, &ctx, i.format, None);
        assert_eq!(h["traceparent"], ctx.traceparent().as_str());
        assert!(h.get("tracestate").is_none());
    }

    #[test]
    fn a_child_keeps_the_trace_and_b3_callers_hear_b3() {
        let parent = parse_traceparent(TP.as_bytes()).unwrap();
        let c = child(Some(&parent), parent.sampled);
        assert_eq!(c.trace_id, parent.trace_id);
        assert_ne!(c.span_id, parent.span_id);
        let mut h = HeaderMap::new();
        write(&mut h, &c, Format::B3Multi, Some(&parent));
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(h.get("traceparent").is_some());
    }

    #[test]
    fn no_trace_header_reads_as_none_and_a_lone_sampled_flag_as_a_hint() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let none = Incoming {
            parent: None,
            format: Format::W3c,
            invalid: false,
            sampled_hint: None,
        };
        assert_eq!(read(&h), none);
        h.insert("x-b3-sampled", HeaderValue::from_static("0"));
        assert_eq!(read(&h).sampled_hint, Some(false));
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        h.remove("x-b3-sampled");
        assert_eq!(read(&h), none, "tracestate alone carries no context");
    }

    #[test]
    fn stale_b3_and_repeated_traceparents_are_replaced() {
        const B3_NAMES: [&str; 6] = [
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
        ];
        // W3C wins when both are sent: the next hop hears W3C only, once.
        let mut h = HeaderMap::new();
        h.append("traceparent", HeaderValue::from_static(TP));
        h.append("traceparent", HeaderValue::from_static(TP));
        for name in B3_NAMES {
            h.insert(name, HeaderValue::from_static("1"));
        }
        h.insert("x-b3-other", HeaderValue::from_static("kept"));
        let i = read(&h);
        assert_eq!(i.format, Format::W3c);
        let parent = i.parent.unwrap();
        let ctx = child(Some(&parent), false);
        write(&mut h, &ctx, i.format, Some(&parent));
        let tps: Vec<_> = h.get_all("traceparent").iter().collect();
        assert_eq!(tps.len(), 1);
        let tp = tps[0].to_str().unwrap();
        assert_eq!(tp, ctx.traceparent());
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-00"));
        assert_eq!(parse_traceparent(tp.as_bytes()), Some(ctx));
        for name in B3_NAMES {
            assert!(h.get(name).is_none(), "{name} was forwarded");
        }
        assert_eq!(h["x-b3-other"], "kept");
    }

    #[test]
    fn spans_encode_as_otlp() {
        let parent = parse_traceparent(TP.as_bytes()).unwrap();
        let ctx = child(Some(&parent), true);
        let now = SystemTime::now();
        let req = export_request(
            "web",
            vec![Finished {
                ctx,
                parent: Some(parent.span_id),
                name: "outbound orders".into(),
                kind: span::SpanKind::Client,
                start: now,
                end: now,
                attributes: vec![("http.response.status_code", AttrValue::Int(200))],
                retries: 1,
                error: false,
            }],
        );
        let bytes = prost::Message::encode_to_vec(&req);
        let back: ExportTraceServiceRequest = prost::Message::decode(bytes.as_slice()).unwrap();
        let s = &back.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(s.parent_span_id, parent.span_id.to_vec());
        assert_eq!(s.events.len(), 1);
    }
}
