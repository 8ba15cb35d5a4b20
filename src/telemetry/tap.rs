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

/// What a tap reads next.
#[derive(Debug, PartialEq)]
pub enum Tapped {
    Event(Event),
    /// This many events went by while the reader was slow: the channel
    /// keeps 1,024, and a request never waits for a tap.
    Dropped(u64),
}

/// The line `/tap` sends for `Tapped::Dropped`.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DroppedLine {
    pub dropped: u64,
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

    /// The next event, or how many were lost before it; `None` when the
    /// channel is gone.
    pub async fn next(&mut self) -> Option<Tapped> {
        match self.rx.recv().await {
            Ok(e) => Some(Tapped::Event(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Tapped::Dropped(n)),
            Err(broadcast::error::RecvError::Closed) => None,
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
        let Some(Tapped::Event(e)) = t.next().await else {
            panic!("the event");
        };
        assert_eq!(e.status, 200);

        // A reader that falls behind is told how many it lost, then reads on.
        for status in 0..1100 {
            publish(Event {
                status,
                ..Event::default()
            });
        }
        // (At least: another test's requests may be published meanwhile.)
        let Some(Tapped::Dropped(n)) = t.next().await else {
            panic!("the gap first");
        };
        assert!(n >= 1100 - 1024, "{n}");
        assert!(matches!(t.next().await, Some(Tapped::Event(_))));
        drop(t);
        assert!(!active());
    }
}
