//! HTTP/2 streams served on their connection's own task.
//!
//! hyper hands every HTTP/2 stream to its executor, which would spawn a
//! task for it. With one worker thread that buys nothing (every task runs
//! on the same thread) and costs the task machinery and another copy of the
//! stream's future. [`StreamExec`] gives each stream to the connection being
//! polled on this thread instead, and [`Streams::drive`] polls the
//! connection and its streams together. With more than one worker, streams
//! are spawned as before, so that one busy HTTP/2 connection (another
//! sidecar's pooled one) is still served by every worker. (The tasks of
//! HTTP/2 CONNECT tunnels, which hyper starts from inside a stream's poll,
//! are always spawned.) A panicking stream ends alone, as a task would.

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Whether a connection that adopts its streams is being polled on this
/// thread, and whether it handed any over (a poll that did not, as every
/// HTTP/1.1 one, costs three accesses to a thread-local cell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Adopt {
    Off,
    On,
    Handed,
}

thread_local! {
    static ADOPTING: Cell<Adopt> = const { Cell::new(Adopt::Off) };
    /// The streams handed over while `ADOPTING` was on.
    static HANDED: RefCell<Vec<StreamFuture>> = const { RefCell::new(Vec::new()) };
}

/// hyper's executor for the proxy's listeners.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        if ADOPTING.get() == Adopt::Off {
            tokio::spawn(fut);
        } else {
            ADOPTING.set(Adopt::Handed);
            // Boxed before the hand-over, and built in its box: the stream's
            // future (the whole request's) is copied once, not three times.
            let fut: StreamFuture = crate::policy::boxed(move || {
                std::panic::AssertUnwindSafe(fut).catch_unwind().map(|_| ())
            });
            HANDED.with_borrow_mut(|handed| handed.push(fut));
        }
    }
}

/// The streams one connection runs on its own task, and the connection's
/// result (`O`) once it has one.
pub struct Streams<O> {
    running: FuturesUnordered<StreamFuture>,
    adopt: bool,
    /// Kept here, not in [`Drive`]: a dropped `Drive` must not lose it.
    ended: Option<O>,
}

impl<O> Streams<O> {
    /// Streams are adopted when the runtime has a single worker.
    pub fn for_this_runtime() -> Self {
        let workers = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(0);
        Self::new(workers == 1)
    }

    pub fn new(adopt: bool) -> Self {
        Streams {
            running: FuturesUnordered::new(),
            adopt,
            ended: None,
        }
    }

    /// Polls `conn` and the streams it handed over until the connection has
    /// ended and every stream has finished. The connection is dropped
    /// (`conn` set to `None`) as soon as it ends: that is how h2 tells the
    /// streams still running that it is gone. Dropping the returned future
    /// (a `select!` that went the other way) leaves the streams running here,
    /// to be driven again.
    pub fn drive<'a, C>(&'a mut self, conn: Pin<&'a mut Option<C>>) -> Drive<'a, C>
    where
        C: Future<Output = O>,
    {
        Drive {
            streams: self,
            conn,
        }
    }
}

pub struct Drive<'a, C: Future> {
    streams: &'a mut Streams<C::Output>,
    conn: Pin<&'a mut Option<C>>,
}

/// Ends the adoption even if the connection's poll panics, so that later
/// streams on this thread are spawned. (Streams a panicking poll handed
/// over are adopted with the next ones handed over here: they still run.)
struct Adopting;

impl Adopting {
    fn start() -> Self {
        ADOPTING.set(Adopt::On);
        Adopting
    }

    /// Whether any stream was handed over since `start`.
    fn handed(&self) -> bool {
        ADOPTING.get() == Adopt::Handed
    }
}

impl Drop for Adopting {
    fn drop(&mut self) {
        if ADOPTING.replace(Adopt::Off) == Adopt::Handed && std::thread::panicking() {
            HANDED.with_borrow_mut(Vec::clear);
        }
    }
}

impl<C> Future for Drive<'_, C>
where
    C: Future,
{
    type Output = C::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        let streams = &mut *this.streams;
        loop {
            // Streams first: a response they produce is written by the
            // connection's poll below, in this same turn.
            if !streams.running.is_empty() {
                while let Poll::Ready(Some(())) = streams.running.poll_next_unpin(cx) {}
            }
            let Some(conn) = this.conn.as_mut().as_pin_mut() else {
                break;
            };
            let (polled, handed) = if streams.adopt {
                let adopting = Adopting::start();
                let polled = conn.poll(cx);
                (polled, adopting.handed())
            } else {
                (conn.poll(cx), false)
            };
            if let Poll::Ready(out) = polled {
                streams.ended = Some(out);
                this.conn.set(None);
            }
            if !handed {
                break;
            }
            // New streams get their first poll now (sending the request on).
            HANDED.with_borrow_mut(|handed| {
                for stream in handed.drain(..) {
                    streams.running.push(stream);
                }
            });
        }
        if streams.running.is_empty()
            && let Some(out) = streams.ended.take()
        {
            return Poll::Ready(out);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::sync::oneshot;

    /// A "connection" (in the `Option` `Streams::drive` takes) that hands
    /// `n` streams to the executor on its first poll and ends at once; each
    /// stream waits for its own signal, then counts itself done.
    fn conn_with_streams(
        n: usize,
        done: Arc<AtomicUsize>,
    ) -> (Option<impl Future<Output = ()>>, Vec<oneshot::Sender<()>>) {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = oneshot::channel::<()>();
            senders.push(tx);
            receivers.push(rx);
        }
        let conn = async move {
            for rx in receivers {
                let done = done.clone();
                StreamExec.execute(async move {
                    let _ = rx.await;
                    done.fetch_add(1, SeqCst);
                });
            }
        };
        (Some(conn), senders)
    }

    fn release(senders: Vec<oneshot::Sender<()>>) {
        for tx in senders {
            let _ = tx.send(());
        }
    }

    #[tokio::test]
    async fn adopted_streams_run_on_the_connection_and_outlive_its_end() {
        let done = Arc::new(AtomicUsize::new(0));
        let (conn, senders) = conn_with_streams(3, done.clone());
        tokio::pin!(conn);
        let mut streams = Streams::new(true);
        let drive = streams.drive(conn.as_mut());
        tokio::pin!(drive);
        // The connection ended on the first poll; its streams have not.
        assert!(futures_util::poll!(drive.as_mut()).is_pending());
        assert_eq!(done.load(SeqCst), 0);
        release(senders);
        drive.await;
        assert_eq!(done.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn without_adoption_streams_are_spawned() {
        let done = Arc::new(AtomicUsize::new(0));
        let (conn, senders) = conn_with_streams(2, done.clone());
        tokio::pin!(conn);
        let mut streams = Streams::new(false);
        // Ends with the connection: the streams are tasks of their own.
        streams.drive(conn.as_mut()).await;
        assert!(streams.running.is_empty());
        release(senders);
        while done.load(SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_dropped_drive_keeps_its_streams() {
        let done = Arc::new(AtomicUsize::new(0));
        let (conn, senders) = conn_with_streams(1, done.clone());
        tokio::pin!(conn);
        let mut streams = Streams::new(true);
        {
            let drive = streams.drive(conn.as_mut());
            tokio::pin!(drive);
            assert!(futures_util::poll!(drive.as_mut()).is_pending());
        }
        assert_eq!(streams.running.len(), 1);
        release(senders);
        streams.drive(conn.as_mut()).await;
        assert_eq!(done.load(SeqCst), 1);
    }

    #[test]
    fn a_panicking_connection_leaves_no_list_behind() {
        let r = std::panic::catch_unwind(|| {
            let _adopting = Adopting::start();
            StreamExec.execute(async {});
            panic!("connection poll panicked");
        });
        assert!(r.is_err());
        assert_eq!(ADOPTING.get(), Adopt::Off);
        assert!(HANDED.with_borrow(Vec::is_empty));
    }

    /// h2 tells running streams that their connection is gone when the
    /// connection is dropped: it must not wait for the streams to end.
    #[tokio::test]
    async fn an_ended_connection_is_dropped_while_its_streams_run() {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (inner, senders) = conn_with_streams(1, done.clone());
        let guard = Dropped(dropped.clone());
        let conn = inner.map(|inner| async move {
            let _guard = guard;
            inner.await
        });
        tokio::pin!(conn);
        let mut streams = Streams::new(true);
        let drive = streams.drive(conn.as_mut());
        tokio::pin!(drive);
        assert!(futures_util::poll!(drive.as_mut()).is_pending());
        assert_eq!(
            dropped.load(SeqCst),
            1,
            "the ended connection is still held"
        );
        release(senders);
        drive.await;
        assert_eq!(done.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_alone() {
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel::<()>();
        let counted = done.clone();
        let conn = Some(async move {
            StreamExec.execute(async { panic!("a stream panicked") });
            StreamExec.execute(async move {
                let _ = rx.await;
                counted.fetch_add(1, SeqCst);
            });
        });
        tokio::pin!(conn);
        let mut streams = Streams::new(true);
        let drive = streams.drive(conn.as_mut());
        tokio::pin!(drive);
        assert!(futures_util::poll!(drive.as_mut()).is_pending());
        let _ = tx.send(());
        drive.await;
        assert_eq!(done.load(SeqCst), 1);
    }
}
