//! Monotonic nanoseconds on tokio's clock, so that code reading it can be
//! tested with `tokio::time::pause`, stored in an `AtomicU64`.

use std::sync::OnceLock;
use tokio::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the first call; never 0 after that instant, so 0 can mean "unset".
pub fn now_ns() -> u64 {
    Instant::now().saturating_duration_since(epoch()).as_nanos() as u64 + 1
}
