//! A future polled only when its own wakers fired.
//!
//! `select!` polls every branch each time the task wakes. A connection's
//! task wakes several times a request, and its "close when idle or
//! draining" branch (a tokio timer and a watch) costs ~150 instructions a
//! poll for nothing: it is ready once in the connection's life. Wrapped in
//! [`WhenWoken`], it is polled at first and after its own wake-ups only;
//! every other poll costs one atomic swap and a waker comparison.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::AcqRel, Ordering::Release};
use std::task::{Context, Poll, Wake, Waker};

pub struct WhenWoken<F> {
    fut: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        WhenWoken {
            fut: Box::pin(fut),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, AcqRel) {
            return Poll::Pending;
        }
        this.fut
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn polled_at_first_and_after_its_own_wake_ups_only() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let sleep = tokio::time::sleep(Duration::from_secs(10));
        let mut w = Box::pin(WhenWoken::new(async move {
            tokio::pin!(sleep);
            std::future::poll_fn(|cx| {
                counted.fetch_add(1, SeqCst);
                sleep.as_mut().poll(cx)
            })
            .await
        }));
        for _ in 0..5 {
            assert!(futures_util::poll!(w.as_mut()).is_pending());
        }
        assert_eq!(polls.load(SeqCst), 1, "polled without being woken");
        w.await;
        assert_eq!(polls.load(SeqCst), 2);
    }
}
