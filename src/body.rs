//! The two body types of the request path: what goes upstream and what goes
//! back downstream. Plain enums rather than boxed trait objects, so the hot
//! path neither allocates nor dispatches dynamically for a body.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stream on which the peer sent nothing for the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("stream idle for {0:?}")]
pub struct StreamIdle(pub Duration);

/// A response body cut by the route's total timeout.
#[derive(Debug, thiserror::Error)]
#[error("the route's total timeout passed while the response body streamed")]
pub struct TotalTimeout;

/// Stream idle timeout: armed only while a body makes its reader wait, so
/// a body that arrives in one go never creates a timer.
#[derive(Debug)]
pub struct IdleTimer {
    after: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    pub fn new(after: Duration) -> Self {
        IdleTimer { after, sleep: None }
    }

    /// The stream moved: the next wait starts a fresh period.
    pub fn progressed(&mut self) {
        self.sleep = None;
    }

    /// Called when the stream is pending: true once it has waited too long.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let after = self.after;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Applies the timer to one poll of a body.
    pub fn watch<E: Into<BoxError>>(
        timer: &mut Option<IdleTimer>,
        cx: &mut Context<'_>,
        r: Poll<Option<Result<Frame<Bytes>, E>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(t) = timer.as_mut() {
            if r.is_ready() {
                t.progressed();
            } else if t.expired(cx) {
                return Poll::Ready(Some(Err(Box::new(StreamIdle(t.after)))));
            }
        }
        r.map(|o| o.map(|f| f.map_err(Into::into)))
    }
}

/// The client's request body as it streams in, with the stream idle timeout.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    idle: Option<IdleTimer>,
}

impl ClientBody {
    pub fn new(inner: Incoming, idle: Option<Duration>) -> Self {
        ClientBody {
            inner,
            idle: idle.map(IdleTimer::new),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        IdleTimer::watch(&mut this.idle, cx, r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The one data frame of an in-memory body, once; nothing for an empty one.
pub fn take_data(b: &mut Option<Bytes>) -> Option<Frame<Bytes>> {
    b.take().filter(|b| !b.is_empty()).map(Frame::data)
}

/// A request body on its way upstream.
#[derive(Debug)]
pub enum ReqBody {
    /// Streamed from the client as it arrives.
    Incoming(ClientBody),
    /// Held in memory (for replay by retries), trailers included.
    Replay {
        data: Option<Bytes>,
        trailers: Option<Box<HeaderMap>>,
    },
    /// Frames read while trying to buffer, then the rest of the stream.
    /// Boxed, like the trailers: rare, and a small body type keeps every
    /// request future on the hot path small.
    Chained(Box<(VecDeque<Frame<Bytes>>, ClientBody)>),
}

impl ReqBody {
    pub fn empty() -> Self {
        ReqBody::Replay {
            data: None,
            trailers: None,
        }
    }
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> Self {
        ReqBody::Incoming(ClientBody::new(b, None))
    }
}

/// What trying to buffer a body for replay gave.
pub enum Buffered {
    /// The whole body, small enough to replay.
    Whole {
        data: Bytes,
        trailers: Option<Box<HeaderMap>>,
    },
    /// Larger than the bound: the body to send once, nothing lost.
    TooLarge(ReqBody),
}

/// Reads `body` into memory if it is at most `max` bytes. A larger body
/// (known from its length or found while reading) comes back whole as a
/// stream, never truncated.
pub async fn buffer(body: ReqBody, max: usize) -> Result<Buffered, BoxError> {
    let mut incoming = match body {
        ReqBody::Replay { data, trailers } => {
            return Ok(Buffered::Whole {
                data: data.unwrap_or_default(),
                trailers,
            });
        }
        ReqBody::Chained(_) => return Ok(Buffered::TooLarge(body)),
        ReqBody::Incoming(b) => b,
    };
    if incoming.size_hint().lower() > max as u64 {
        return Ok(Buffered::TooLarge(ReqBody::Incoming(incoming)));
    }
    let mut read: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut incoming).poll_frame(cx)).await
    {
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            len += d.len();
        }
        read.push_back(frame);
        if len > max {
            return Ok(Buffered::TooLarge(ReqBody::Chained(Box::new((
                read, incoming,
            )))));
        }
    }
    let mut data = bytes::BytesMut::with_capacity(len);
    for f in read {
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok().map(Box::new),
        }
    }
    Ok(Buffered::Whole {
        data: data.freeze(),
        trailers,
    })
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Replay { data, trailers } => Poll::Ready(
                take_data(data)
                    .or_else(|| trailers.take().map(|t| Frame::trailers(*t)))
                    .map(Ok),
            ),
            ReqBody::Chained(c) => match c.0.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(&mut c.1).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Incoming(b) => b.is_end_stream(),
            ReqBody::Replay { data, trailers } => {
                data.as_ref().is_none_or(|d| d.is_empty()) && trailers.is_none()
            }
            ReqBody::Chained(c) => c.0.is_empty() && c.1.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Incoming(b) => b.size_hint(),
            ReqBody::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Chained(c) => {
                let (read, rest) = &**c;
                let buffered: u64 = read
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum();
                let mut h = SizeHint::new();
                h.set_lower(rest.size_hint().lower() + buffered);
                if let Some(u) = rest.size_hint().upper() {
                    h.set_upper(u + buffered);
                }
                h
            }
        }
    }
}
