//! Per-request policies, one file each, in request order: rate limit,
//! fault, timeout (route and per-try), retry, circuit breaker, outlier
//! detection; and the metrics layer on the connection stack.
//!
//! A policy that has nothing to do for a request costs a branch: its future
//! is the inner future itself (`PolicyFuture::Direct`). Only a request the
//! policy acts on pays for a boxed future.

pub mod authz;
pub mod circuit_breaker;
pub mod fault;
pub mod metrics;
pub mod outlier;
pub mod rate_limit;
pub mod retry;
pub mod timeout;
pub mod total_timeout;
pub mod trace;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Boxes the future that `make` builds, allocating first. `Box::pin(value)`
/// builds the value on the stack and copies all of it (a request's future
/// is kilobytes, though little of it is set at the start) into the box;
/// allocating first lets the optimiser build it in the box instead. That is
/// not guaranteed (a debug build still copies), but it is what the release
/// build does: the copy is gone from the profile (benches/README.md).
pub fn boxed<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

pin_project_lite::pin_project! {
    /// A layer's future: the inner one untouched, a boxed one when the
    /// policy acts, or an answer known at once.
    #[project = PolicyProj]
    pub enum PolicyFuture<F, T> {
        Direct { #[pin] inner: F },
        Boxed { inner: BoxFuture<T> },
        Ready { out: Option<T> },
    }
}

impl<F, T> PolicyFuture<F, T> {
    pub fn direct(inner: F) -> Self {
        PolicyFuture::Direct { inner }
    }
    /// The future `make` builds, built in its box (see [`boxed`]).
    pub fn boxed<G>(make: impl FnOnce() -> G) -> Self
    where
        G: Future<Output = T> + Send + 'static,
    {
        PolicyFuture::Boxed { inner: boxed(make) }
    }
    pub fn ready(out: T) -> Self {
        PolicyFuture::Ready { out: Some(out) }
    }
}

impl<F: Future<Output = T>, T> Future for PolicyFuture<F, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project() {
            PolicyProj::Direct { inner } => inner.poll(cx),
            PolicyProj::Boxed { inner } => inner.as_mut().poll(cx),
            PolicyProj::Ready { out } => match out.take() {
                Some(v) => Poll::Ready(v),
                None => Poll::Pending,
            },
        }
    }
}
