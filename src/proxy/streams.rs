//! HTTP/2 streams served on their connection's own task.
//!
//! hyper hands every HTTP/2 stream to its executor, which would spawn a
//! task for it. With one worker thread that buys nothing (every task runs
//! on the same thread) and costs the task machinery and another copy of the
//! stream's future. [`StreamExec`] gives each stream to the connection being
//! polled on this thread instead, and [`Streams::drive`] polls the
//! connection and its streams together. With more than one worker, streams
//! are spawned as before, so that one busy HTTP/2 connection (another
//! sidecar's pooled one) is still served by every worker.

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
            HANDED.with_borrow_mut(|handed| handed.push(Box::pin(fut)));
        }
    }
}

/// The streams one connection runs on its own task, and the connection's
/// result (`O`) once it has one.
pub struct Streams<O> {
    running: FuturesUnordered<StreamFuture>,
    adopt: bool,
    /// Kept here, not in [`Drive`]: a dropped `Drive` must not lose it (an
    /// ended connection must not be polled again).
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
    /// ended and every stream has finished. Dropping the returned future
    /// (a `select!` that went the other way) leaves the streams running here,
    /// to be driven again.
    pub fn drive<'a, C>(&'a mut self, conn: Pin<&'a mut C>) -> Drive<'a, C>
    where
        C: Future<Output = O> + ?Sized,
    {
        Drive {
            streams: self,
            conn,
        }
    }
}

pub struct Drive<'a, C: Future + ?Sized> {
    streams: &'a mut Streams<C::Output>,
    conn: Pin<&'a mut C>,
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
        ADOPTING.set(Adopt::Off);
    }
}

impl<C> Future for Drive<'_, C>
where
    C: Future + ?Sized,
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
            if streams.ended.is_some() {
                break;
            }
            let (polled, handed) = if streams.adopt {
                let adopting = Adopting::start();
                let polled = this.conn.as_mut().poll(cx);
                (polled, adopting.handed())
            } else {
                (this.conn.as_mut().poll(cx), false)
            };
            if let Poll::Ready(out) = polled {
                streams.ended = Some(out);
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

    /// A "connection" that hands `n` streams to the executor on its first
    /// poll and ends at once; each stream waits for its own signal.
    fn conn_with_streams(
        n: usize,
        done: Arc<AtomicUsize>,
    ) -> (impl Future<Output = ()>, Vec<oneshot::Sender<()>>) {
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
        (conn, senders)
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
        for tx in senders {
            let _ = tx.send(());
        }
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
        for tx in senders {
            let _ = tx.send(());
        }
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
        for tx in senders {
            let _ = tx.send(());
        }
        streams.drive(conn.as_mut()).await;
        assert_eq!(done.load(SeqCst), 1);
    }

    #[test]
    fn a_panicking_connection_leaves_no_list_behind() {
        let r = std::panic::catch_unwind(|| {
            let _adopting = Adopting::start();
            panic!("connection poll panicked");
        });
        assert!(r.is_err());
        assert_eq!(ADOPTING.get(), Adopt::Off);
    }
}
