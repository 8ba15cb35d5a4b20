//! A coarse timer wheel for request deadlines (route and per-try timeouts).
//!
//! A tokio `Sleep` costs ~550 instructions a request (a handle clone, a
//! locked insert into the runtime's timer wheel on the first poll, a locked
//! removal on drop), and a route with retries arms two. These deadlines
//! need millisecond resolution and almost never fire, so one wheel per
//! runtime keeps them in 1-ms slots (a slab and a list per slot: insert and
//! removal are O(1), memory follows the requests in flight), and one tokio
//! timer, owned by a driver task, sleeps until the earliest slot in use.
//! In steady traffic new deadlines are later than the one the driver sleeps
//! for, so registering one never wakes the driver; it wakes about once per
//! timeout period to find the slots it slept for emptied.
//!
//! The driver's timer is a tokio timer, so `tokio::time::pause` and
//! auto-advance work as with `Sleep`.

use parking_lot::Mutex;
use slab::Slab;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;

/// Slots of one millisecond. Only deadlines less than [`WINDOW`] away are
/// kept here, so every entry is in the wheel's current turn and the first
/// slot in use after now is the earliest deadline: the driver never wakes
/// for an entry that is not due. (Farther ones, long requests' timeouts,
/// take a tokio timer: see `policy::timeout`.)
const SLOTS: usize = 16_384;
pub const WINDOW: Duration = Duration::from_millis(SLOTS as u64 - 1_000);
const NONE: usize = usize::MAX;

pub struct Wheel {
    origin: Instant,
    /// Every deadline at or before this tick (ms since `origin`) has fired.
    fired_through: AtomicU64,
    state: Mutex<State>,
}

struct State {
    entries: Slab<Entry>,
    /// First entry of each slot's list.
    heads: Box<[usize]>,
    /// Slots with entries, one bit each.
    used: [u64; SLOTS / 64],
    next_id: u64,
    /// The tick the driver sleeps until; `u64::MAX` when it waits for work.
    armed: u64,
    driver: Option<Waker>,
}

struct Entry {
    id: u64,
    tick: u64,
    waker: Waker,
    prev: usize,
    next: usize,
}

impl Wheel {
    /// The wheel of the runtime this is called on, made (with its driver
    /// task) the first time; `None` outside a runtime.
    pub fn current() -> Option<Arc<Wheel>> {
        static WHEELS: Mutex<Vec<(tokio::runtime::Id, Weak<Wheel>)>> = Mutex::new(Vec::new());
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let id = handle.id();
        let mut wheels = WHEELS.lock();
        if let Some(w) = wheels
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, w)| w.upgrade())
        {
            return Some(w);
        }
        // Wheels of runtimes that have ended (their drivers are gone).
        wheels.retain(|(_, w)| w.strong_count() > 0);
        let wheel = Arc::new(Wheel::new());
        wheels.push((id, Arc::downgrade(&wheel)));
        handle.spawn(Driver::new(wheel.clone()));
        Some(wheel)
    }

    fn new() -> Wheel {
        Wheel {
            origin: Instant::now(),
            fired_through: AtomicU64::new(0),
            state: Mutex::new(State {
                entries: Slab::new(),
                heads: vec![NONE; SLOTS].into_boxed_slice(),
                used: [0; SLOTS / 64],
                next_id: 1,
                armed: u64::MAX,
                driver: None,
            }),
        }
    }

    /// Ticks are whole milliseconds since `origin`; a deadline's tick is
    /// rounded up (never fires early), the present's down.
    fn tick_ceil(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
        u64::try_from(ms).unwrap_or(u64::MAX - 1)
    }

    fn tick_floor(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn instant(&self, tick: u64) -> Instant {
        self.origin
            .checked_add(Duration::from_millis(tick))
            .unwrap_or_else(|| self.origin + Duration::from_secs(86_400 * 365 * 30))
    }

    /// A deadline `after` from now, armed at its first poll.
    pub fn deadline(self: &Arc<Self>, after: Duration) -> Deadline {
        // A deadline past the clock's range (a huge `grpc-timeout`) never fires.
        let tick = Instant::now()
            .checked_add(after)
            .map_or(u64::MAX - 1, |at| self.tick_ceil(at));
        Deadline {
            wheel: self.clone(),
            tick,
            key: NONE,
            id: 0,
            waker: None,
        }
    }

    fn register(&self, tick: u64, waker: &Waker) -> Option<(usize, u64)> {
        let mut s = self.state.lock();
        // Checked under the lock: the driver cannot have swept past `tick`
        // between this check and the insert.
        if self.fired_through.load(Acquire) >= tick {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        let slot = (tick % SLOTS as u64) as usize;
        let head = s.heads[slot];
        let key = s.entries.insert(Entry {
            id,
            tick,
            waker: waker.clone(),
            prev: NONE,
            next: head,
        });
        if head != NONE
            && let Some(h) = s.entries.get_mut(head)
        {
            h.prev = key;
        }
        s.heads[slot] = key;
        s.used[slot / 64] |= 1 << (slot % 64);
        let wake = if tick < s.armed {
            s.armed = tick;
            s.driver.take()
        } else {
            None
        };
        drop(s);
        if let Some(w) = wake {
            w.wake();
        }
        Some((key, id))
    }

    /// False when the entry is gone: the sweep fired it (only a sweep or
    /// the deadline's own drop removes one), possibly waking the old task.
    fn set_waker(&self, key: usize, id: u64, waker: &Waker) -> bool {
        let mut s = self.state.lock();
        match s.entries.get_mut(key) {
            Some(e) if e.id == id => {
                e.waker = waker.clone();
                true
            }
            _ => false,
        }
    }

    fn cancel(&self, key: usize, id: u64) {
        let mut s = self.state.lock();
        if s.entries.get(key).is_some_and(|e| e.id == id) {
            s.unlink(key);
        }
    }

    /// Fires every entry due at or before `now` (the driver's sweep) and
    /// returns the tick to sleep until, `None` when the wheel is empty; the
    /// driver's waker is kept for a nearer deadline.
    fn sweep(&self, now: u64, driver: &Waker) -> Option<u64> {
        let mut wake = Vec::new();
        let next = {
            let mut s = self.state.lock();
            let from = self.fired_through.load(Acquire);
            if now > from {
                let span = (now - from).min(SLOTS as u64);
                for t in (now + 1 - span)..=now {
                    let slot = (t % SLOTS as u64) as usize;
                    let mut key = s.heads[slot];
                    while key != NONE {
                        let Some(e) = s.entries.get(key) else {
                            break;
                        };
                        let (next, due) = (e.next, e.tick <= now);
                        if due && let Some(e) = s.unlink(key) {
                            wake.push(e.waker);
                        }
                        key = next;
                    }
                }
                self.fired_through.store(now, Release);
            }
            let next = s.next_used(now);
            s.armed = next.unwrap_or(u64::MAX);
            if !s.driver.as_ref().is_some_and(|w| w.will_wake(driver)) {
                s.driver = Some(driver.clone());
            }
            next
        };
        for w in wake {
            w.wake();
        }
        next
    }
}

impl State {
    fn unlink(&mut self, key: usize) -> Option<Entry> {
        let e = self.entries.try_remove(key)?;
        if e.prev == NONE {
            let slot = (e.tick % SLOTS as u64) as usize;
            self.heads[slot] = e.next;
            if e.next == NONE {
                self.used[slot / 64] &= !(1 << (slot % 64));
            }
        } else if let Some(p) = self.entries.get_mut(e.prev) {
            p.next = e.next;
        }
        if e.next != NONE
            && let Some(n) = self.entries.get_mut(e.next)
        {
            n.prev = e.prev;
        }
        Some(e)
    }

    /// The first tick after `now` whose slot has entries: the earliest
    /// deadline, as every entry is less than a turn away.
    fn next_used(&self, now: u64) -> Option<u64> {
        if self.entries.is_empty() {
            return None;
        }
        let start = ((now + 1) % SLOTS as u64) as usize;
        let words = SLOTS / 64;
        // The start word from the start bit, every other word, then the
        // start word's bits before the start bit.
        for i in 0..=words {
            let w = (start / 64 + i) % words;
            let mut bits = self.used[w];
            if i == 0 {
                bits &= u64::MAX << (start % 64);
            } else if i == words {
                bits &= !(u64::MAX << (start % 64));
            }
            if bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                let ahead = (slot + SLOTS - start) % SLOTS;
                return Some(now + 1 + ahead as u64);
            }
        }
        None
    }
}

/// Sleeps until the earliest slot in use, sweeps, and again.
struct Driver {
    wheel: Arc<Wheel>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The tick `sleep` is set for.
    target: u64,
}

impl Driver {
    fn new(wheel: Arc<Wheel>) -> Driver {
        let origin = wheel.origin;
        Driver {
            wheel,
            sleep: Box::pin(tokio::time::sleep_until(origin)),
            target: 0,
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // A timer that went off counts as its whole tick gone by, even
            // if the clock reads a hair less.
            let mut now = self.wheel.tick_floor(Instant::now());
            if self.sleep.is_elapsed() {
                now = now.max(self.target);
            }
            let Some(next) = self.wheel.sweep(now, cx.waker()) else {
                return Poll::Pending;
            };
            if next != self.target || self.sleep.is_elapsed() {
                self.target = next;
                let at = self.wheel.instant(next);
                self.sleep.as_mut().reset(at);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// One request's deadline on a [`Wheel`]: registered at its first poll,
/// removed when dropped.
pub struct Deadline {
    wheel: Arc<Wheel>,
    tick: u64,
    key: usize,
    id: u64,
    /// Who the entry's waker wakes (`Waker::data` and `vtable`), to notice
    /// a move to another task; the identity, not a clone: a clone costs a
    /// reference count taken and given back a deadline. The entry's own
    /// clone keeps that task alive, so its address cannot be reused while
    /// this is compared.
    waker: Option<(usize, usize)>,
}

fn identity(w: &Waker) -> (usize, usize) {
    (w.data() as usize, std::ptr::from_ref(w.vtable()) as usize)
}

impl Deadline {
    pub fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.wheel.fired_through.load(Acquire) >= self.tick {
            return Poll::Ready(());
        }
        match &self.waker {
            None => match self.wheel.register(self.tick, cx.waker()) {
                Some((key, id)) => {
                    self.key = key;
                    self.id = id;
                    self.waker = Some(identity(cx.waker()));
                }
                None => return Poll::Ready(()),
            },
            Some(w) if *w != identity(cx.waker()) => {
                if !self.wheel.set_waker(self.key, self.id, cx.waker()) {
                    return Poll::Ready(());
                }
                self.waker = Some(identity(cx.waker()));
            }
            Some(_) => {}
        }
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if self.id != 0 && self.wheel.fired_through.load(Acquire) < self.tick {
            self.wheel.cancel(self.key, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn elapsed(d: &mut Deadline) {
        poll_fn(|cx| d.poll_elapsed(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_at_its_time_not_before() {
        let wheel = Wheel::current().unwrap();
        let start = Instant::now();
        let mut d = wheel.deadline(Duration::from_millis(250));
        elapsed(&mut d).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(250), "fired after {took:?}");
        assert!(took < Duration::from_millis(252), "fired after {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_nearest_of_many_fires_first_and_dropped_ones_never() {
        let wheel = Wheel::current().unwrap();
        let mut far = wheel.deadline(Duration::from_secs(14));
        let mut near = wheel.deadline(Duration::from_millis(30));
        // Registered (polled once), then dropped: must not fire or linger.
        let mut dropped = wheel.deadline(Duration::from_millis(10));
        assert!(futures_util::poll!(poll_fn(|cx| dropped.poll_elapsed(cx))).is_pending());
        assert!(futures_util::poll!(poll_fn(|cx| far.poll_elapsed(cx))).is_pending());
        drop(dropped);
        let start = Instant::now();
        tokio::select! {
            _ = elapsed(&mut far) => panic!("the far deadline fired first"),
            _ = elapsed(&mut near) => {}
        }
        assert!(start.elapsed() >= Duration::from_millis(30));
        elapsed(&mut far).await;
        assert!(start.elapsed() >= Duration::from_millis(13_970));
        assert!(wheel.state.lock().entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_past_is_ready_without_registering() {
        let wheel = Wheel::current().unwrap();
        let mut first = wheel.deadline(Duration::from_millis(5));
        elapsed(&mut first).await;
        let mut zero = wheel.deadline(Duration::ZERO);
        assert!(futures_util::poll!(poll_fn(|cx| zero.poll_elapsed(cx))).is_ready());
        assert!(wheel.state.lock().entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_nearer_deadline_wakes_a_driver_asleep_for_a_later_one() {
        let wheel = Wheel::current().unwrap();
        let mut late = wheel.deadline(Duration::from_secs(15));
        assert!(futures_util::poll!(poll_fn(|cx| late.poll_elapsed(cx))).is_pending());
        // Let the driver go to sleep for the 15 s one.
        tokio::task::yield_now().await;
        let start = Instant::now();
        let mut soon = wheel.deadline(Duration::from_millis(100));
        elapsed(&mut soon).await;
        let took = start.elapsed();
        assert!(took < Duration::from_millis(102), "fired after {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn many_deadlines_in_one_slot_fire_together_and_cancel_apart() {
        let wheel = Wheel::current().unwrap();
        let mut all: Vec<Deadline> = (0..50)
            .map(|_| wheel.deadline(Duration::from_millis(40)))
            .collect();
        for d in &mut all {
            assert!(futures_util::poll!(poll_fn(|cx| d.poll_elapsed(cx))).is_pending());
        }
        // Cancel every other one, from the middle of the slot's list.
        let kept: Vec<Deadline> = all
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| (i % 2 == 0).then_some(d))
            .collect();
        assert_eq!(wheel.state.lock().entries.len(), 25);
        for mut d in kept {
            elapsed(&mut d).await;
        }
        assert!(wheel.state.lock().entries.is_empty());
    }

    #[test]
    fn the_next_slot_in_use_is_found_across_the_turn() {
        let wheel = Wheel::new();
        let waker = futures_util::task::noop_waker();
        let mut s = wheel.state.lock();
        assert_eq!(s.next_used(0), None);
        drop(s);
        // now = SLOTS - 10: a deadline 5 ms ahead and one 20 ms ahead (in
        // the next turn's first slots, before the start bit's word).
        let now = SLOTS as u64 - 10;
        wheel.fired_through.store(now, Release);
        assert!(wheel.register(now + 20, &waker).is_some());
        s = wheel.state.lock();
        assert_eq!(s.next_used(now), Some(now + 20));
        drop(s);
        assert!(wheel.register(now + 5, &waker).is_some());
        s = wheel.state.lock();
        assert_eq!(s.next_used(now), Some(now + 5));
        // A slot in the start bit's own word, behind the start bit.
        drop(s);
        let mut w2 = Wheel::new();
        w2.fired_through = AtomicU64::new(100);
        assert!(w2.register(100 + SLOTS as u64 - 1, &waker).is_some());
        assert_eq!(w2.state.lock().next_used(100), Some(100 + SLOTS as u64 - 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fired_while_changing_tasks_is_not_lost() {
        let wheel = Wheel::current().unwrap();
        let mut d = wheel.deadline(Duration::from_millis(10));
        assert!(futures_util::poll!(poll_fn(|cx| d.poll_elapsed(cx))).is_pending());
        // The sweep fires the entry, then the deadline is polled by another
        // task before it sees `fired_through` (as a stale read would).
        let (key, id) = (d.key, d.id);
        wheel.cancel(key, id);
        let other = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&other);
        assert!(d.poll_elapsed(&mut cx).is_ready());
    }

    /// A waker that notes it was woken.
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_to_another_task_wakes_that_task() {
        let wheel = Wheel::current().unwrap();
        let mut d = wheel.deadline(Duration::from_millis(10));
        let (first, second) = (Arc::new(Flag(false.into())), Arc::new(Flag(false.into())));
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(d.poll_elapsed(&mut Context::from_waker(&w1)).is_pending());
        // Polled again by the same task: nothing to change.
        assert!(
            d.poll_elapsed(&mut Context::from_waker(&w1.clone()))
                .is_pending()
        );
        // Then by another: the entry must now wake that one.
        assert!(d.poll_elapsed(&mut Context::from_waker(&w2)).is_pending());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            second.0.load(std::sync::atomic::Ordering::SeqCst),
            "the new task was not woken"
        );
        assert!(
            !first.0.load(std::sync::atomic::Ordering::SeqCst),
            "the old task was woken"
        );
        assert!(d.poll_elapsed(&mut Context::from_waker(&w2)).is_ready());
    }

    #[test]
    fn one_wheel_per_runtime() {
        let a = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let b = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let wa = a.block_on(async { Wheel::current().unwrap() });
        let wa2 = a.block_on(async { Wheel::current().unwrap() });
        let wb = b.block_on(async { Wheel::current().unwrap() });
        assert!(Arc::ptr_eq(&wa, &wa2));
        assert!(!Arc::ptr_eq(&wa, &wb));
        assert!(Wheel::current().is_none());
    }
}
