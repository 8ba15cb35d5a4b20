//! `tap`: a live sample of the requests a proxy answers (method, path,
//! status, latency, peer, trace id), for `outrigger tap` and the admin
//! port's `/tap`. Costs one relaxed load per request while nobody taps.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tokio::sync::broadcast;

/// One request, as `/tap` sends it (a JSON line) and `outrigger tap` reads
/// it (a field a proxy does not send reads as empty).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Event {
    pub listener: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    pub duration_ms: f64,
    pub upstream: String,
    pub peer: String,
    pub trace_id: String,
}

static TAPPING: AtomicUsize = AtomicUsize::new(0);

fn channel() -> &'static broadcast::Sender<Event> {
    static TX: OnceLock<broadcast::Sender<Event>> = OnceLock::new();
    // A slow tap loses events (lagged), it never holds a request.
    TX.get_or_init(|| broadcast::channel(1024).0)
}

/// Whether anyone is tapping.
pub fn active() -> bool {
    TAPPING.load(Relaxed) > 0
}

pub fn publish(e: Event) {
    let _ = channel().send(e);
}

/// A tap; requests are published while it lives.
pub struct Tap {
    rx: broadcast::Receiver<Event>,
}

impl Tap {
    pub fn new() -> Tap {
        TAPPING.fetch_add(1, Relaxed);
        Tap {
            rx: channel().subscribe(),
        }
    }

    /// The next event; `None` when the channel is gone.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Default for Tap {
    fn default() -> Self {
        Tap::new()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        TAPPING.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tap_sees_what_is_published_while_it_lives() {
        assert!(!active());
        let mut t = Tap::new();
        assert!(active());
        publish(Event {
            listener: "out".into(),
            method: "GET".into(),
            authority: "a".into(),
            path: "/".into(),
            route: "r".into(),
            status: 200,
            duration_ms: 1.0,
            upstream: String::new(),
            peer: String::new(),
            trace_id: String::new(),
        });
        assert_eq!(t.next().await.unwrap().status, 200);
        drop(t);
        assert!(!active());
    }
}
