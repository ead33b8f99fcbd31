//! The wake thread: wakes sleeping plugins so that the tick thread makes no system call.
//!
//! Waking a parked plugin is a `futex_wake`; on a virtual machine, where the plugin's CPU is
//! idle, it is also an inter-processor interrupt, which costs the caller tens of microseconds.
//! That was most of a tick's cost. The tick instead hands each wake-up to this thread, which
//! spends a short window awake (spinning) around the moment the next tick is due, and makes
//! the system calls itself.
//!
//! **When it is awake.** The tick thread learns its own cadence (one [`Cadence`] observation
//! per `end_tick`, a few arithmetic operations) and publishes when the next tick should end.
//! The wake thread sleeps until shortly before that, opens its window (`READY`), and spins
//! until the tick ends or the window closes. A server without a steady rate, or a tick that
//! ends outside the window, gets the plain behaviour: the tick thread wakes its plugins itself.
//!
//! **No wake-up is lost.** One word holds both the window (`READY`) and the requests (a bit per
//! slot, and `END`). The tick thread posts a request with a compare-and-swap that succeeds only
//! while `READY` is set; otherwise it wakes the plugin itself. The wake thread takes requests
//! only with swaps (`swap(READY)` while the window is open, `swap(0)` to close it), so every
//! posted bit is taken by exactly one swap, and served. Ordering: the tick thread's ring writes
//! come before its posting CAS (AcqRel, whose Release half pairs with the Acquire half of the
//! wake thread's swap), and the wake thread rings the doorbell after its swap, so the doorbell
//! protocol ([`crate::ring::doorbell`]) sees the same order as if the tick thread had rung.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::plugin::Cadence;
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::transport::WakeHandle;

/// Slots the wake thread serves (bits 0..SLOTS of the word); the others are woken inline.
pub(super) const SLOTS: usize = 62;
/// The wake thread's window is open: requests may be posted.
const READY: u64 = 1 << 63;
/// The tick ended: serve what is posted and close the window.
const END: u64 = 1 << 62;
const MASK: u64 = END - 1;

/// The window opens this long before the tick is due and closes this long after (plus the
/// learned jitter of tick ends).
const LEAD: Duration = Duration::from_micros(150);
/// The most the window widens for jittery tick ends, and the most a timed sleep is started
/// early for a late timer: a server more irregular than this gets its wake-ups from the tick
/// thread, rather than a wake thread spinning through most of every tick.
const MAX_JITTER: Duration = Duration::from_micros(250);
const MAX_OVERSLEEP: Duration = Duration::from_micros(500);
/// While no tick is due (no steady cadence), the wake thread looks again this often.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// Spins between two `sched_yield`s while the window is open (on a machine with few cores, the
/// plugins it just woke may need this CPU).
const YIELD_EVERY: u32 = 256;

struct Shared {
    /// `READY`, `END` and one request bit per slot.
    word: AtomicU64,
    /// When the next tick is due to end, ns since `base` (0: not known).
    due_ns: AtomicU64,
    /// Half the window's width beyond [`LEAD`]: the tick ends' jitter, ns.
    jitter_ns: AtomicU64,
    stop: AtomicBool,
    /// Each slot's wake handle (the tick thread sets it when the slot's link changes).
    handles: Mutex<Vec<Option<Arc<dyn WakeHandle>>>>,
    /// Wake-ups (system calls) sent per slot.
    woken: Vec<AtomicU64>,
    /// Windows opened, and windows that ended with the tick's request (the others timed out).
    windows: AtomicU64,
    served_ends: AtomicU64,
    /// Time spent with the window open (spinning), ns.
    window_ns: AtomicU64,
}

/// The tick thread's side of the wake thread.
pub(super) struct Waker {
    shared: Arc<Shared>,
    base: Instant,
    cadence: Cadence,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

/// What the wake thread did (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakerStats {
    /// Windows opened.
    pub windows: u64,
    /// Windows that ended with the tick's hand-over (the rest closed on their own).
    pub served_ticks: u64,
    /// Time spent with a window open (the wake thread spinning), ns.
    pub window_ns: u64,
}

impl Waker {
    /// Starts the wake thread.
    pub(super) fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            due_ns: AtomicU64::new(0),
            jitter_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            handles: Mutex::new(vec![None; SLOTS]),
            woken: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            windows: AtomicU64::new(0),
            served_ends: AtomicU64::new(0),
            window_ns: AtomicU64::new(0),
        });
        let base = Instant::now();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("plugbus-waker".into())
            .spawn(move || run(&s, base))?;
        Ok(Self {
            shared,
            base,
            cadence: Cadence::default(),
            thread: Some(thread),
        })
    }

    /// Sets slot `i`'s wake handle (its link changed). Slots past [`SLOTS`] are never posted.
    pub(super) fn set_handle(&self, i: usize, handle: Option<Arc<dyn WakeHandle>>) {
        if i < SLOTS {
            let mut h = self
                .shared
                .handles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            h[i] = handle;
        }
    }

    /// Hands slot `i`'s wake-up to the wake thread; `false` if its window is closed (or the
    /// slot is past [`SLOTS`]): then the caller wakes the plugin itself.
    #[inline]
    pub(super) fn post(&self, i: usize) -> bool {
        i < SLOTS && self.post_bits(1 << i)
    }

    #[inline]
    fn post_bits(&self, bits: u64) -> bool {
        let w = &self.shared.word;
        let mut v = w.load(Ordering::Relaxed);
        loop {
            if v & READY == 0 {
                return false;
            }
            // AcqRel: the Release half pairs with the Acquire half of the wake thread's swaps in
            // `run`, so the ring writes made before this post are visible before it rings.
            match w.compare_exchange(v, v | bits, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
    }

    /// The tick ended (every wake-up of the tick was posted or made): lets an open window
    /// close, and learns the tick's cadence.
    pub(super) fn end_tick(&mut self, now: Instant) {
        self.post_bits(END);
        self.cadence.work(now);
        let jitter = self.cadence.jitter();
        // The next tick's end: the first due time half a period or more from now.
        let due = self
            .cadence
            .period()
            .and_then(|p| self.cadence.next_due(now + p / 2, Duration::ZERO))
            .map_or(0, |d| d.saturating_duration_since(self.base).as_nanos() as u64);
        self.shared.jitter_ns.store(jitter.as_nanos() as u64, Ordering::Relaxed);
        self.shared.due_ns.store(due, Ordering::Relaxed);
    }

    /// Wake-ups the wake thread sent to slot `i`.
    pub(super) fn woken(&self, i: usize) -> u64 {
        self.shared.woken.get(i).map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// What the wake thread did.
    pub(super) fn stats(&self) -> WakerStats {
        WakerStats {
            windows: self.shared.windows.load(Ordering::Relaxed),
            served_ticks: self.shared.served_ends.load(Ordering::Relaxed),
            window_ns: self.shared.window_ns.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rings every slot whose bit is set in `bits`.
fn serve(shared: &Shared, bits: u64) {
    let bits = bits & MASK;
    if bits == 0 {
        return;
    }
    let handles = shared.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rest = bits;
    while rest != 0 {
        let i = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        if let Some(h) = handles.get(i).and_then(Option::as_ref) {
            if h.wake() {
                shared.woken[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn run(shared: &Shared, base: Instant) {
    // How late this thread's timed sleeps return (smoothed), so it can set them earlier.
    let mut oversleep = Duration::from_micros(60);
    while !shared.stop.load(Ordering::Relaxed) {
        let due_ns = shared.due_ns.load(Ordering::Relaxed);
        let jitter = Duration::from_nanos(shared.jitter_ns.load(Ordering::Relaxed)).min(MAX_JITTER);
        let now = Instant::now();
        if due_ns == 0 {
            std::thread::sleep(IDLE_POLL);
            continue;
        }
        let due = base + Duration::from_nanos(due_ns);
        let close = due + LEAD + jitter;
        if now >= close {
            // That tick came and went (the tick thread woke its plugins itself).
            std::thread::sleep(IDLE_POLL.min(Duration::from_micros(500)));
            continue;
        }
        let open = due.checked_sub(LEAD + jitter).unwrap_or(due);
        if let Some(wait) = open.checked_duration_since(now + oversleep) {
            if !wait.is_zero() {
                let asked = wait.min(IDLE_POLL * 25);
                let slept_at = Instant::now();
                std::thread::sleep(asked);
                let late = slept_at.elapsed().saturating_sub(asked).min(MAX_OVERSLEEP);
                oversleep = (oversleep * 7 + late) / 8;
                continue;
            }
        }
        // The window: open, spin until the tick hands over (END) or the window closes.
        shared.windows.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        // AcqRel (every access to the word): pairs with the tick thread's posting CAS.
        shared.word.fetch_or(READY, Ordering::AcqRel);
        let mut spins = 0u32;
        loop {
            if shared.word.load(Ordering::Relaxed) & !READY != 0 {
                let v = shared.word.swap(READY, Ordering::AcqRel);
                serve(shared, v);
                if v & END != 0 {
                    shared.served_ends.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            spins = spins.wrapping_add(1);
            if spins % YIELD_EVERY == 0 {
                if Instant::now() >= close || shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Close: whatever was posted up to this swap is served; later posts see no READY.
        let v = shared.word.swap(0, Ordering::AcqRel);
        serve(shared, v);
        if v & END != 0 {
            shared.served_ends.fetch_add(1, Ordering::Relaxed);
        }
        shared
            .window_ns
            .fetch_add(opened.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Do not reopen for the tick just served.
        while shared.due_ns.load(Ordering::Relaxed) == due_ns && !shared.stop.load(Ordering::Relaxed) {
            if Instant::now() >= close {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let v = shared.word.swap(0, Ordering::AcqRel);
    serve(shared, v);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A wake handle that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicU64);

    impl WakeHandle for Count {
        fn wake(&self) -> bool {
            self.0.fetch_add(1, Ordering::Relaxed);
            true
        }
    }

    /// Waits until `c` counts more than `before` (a wake-up after the post); fails after 2 s.
    fn served_after(c: &Count, before: u64, what: &str) {
        let t = Instant::now();
        while c.0.load(Ordering::Relaxed) <= before {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{what}: an accepted wake-up was never served"
            );
            std::thread::yield_now();
        }
    }

    /// Ticks at a steady 5 ms until the wake thread has taken 20 wake-ups (or 10 s passed),
    /// while a second slot posts mid-tick too. Every post the wake thread accepted is followed
    /// by a wake-up of the slot it was posted for (two posts of one slot that meet before the
    /// wake thread takes them are served by one wake-up, which comes after both); a refused
    /// post is the caller's to make.
    #[test]
    fn every_accepted_wake_up_is_served_and_refused_ones_are_left_to_the_caller() {
        let mut w = Waker::start().expect("wake thread");
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        w.set_handle(3, Some(a.clone()));
        w.set_handle(SLOTS - 1, Some(b.clone()));
        let (mut posted_a, mut posted_b, mut refused) = (0u64, 0u64, 0u64);
        let period = Duration::from_millis(5);
        let start = Instant::now();
        let mut next = start;
        while posted_a < 20 && start.elapsed() < Duration::from_secs(10) {
            next += period;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            // Mid-tick: an immediate event for slot SLOTS - 1; the end of the tick: slot 3.
            let (a0, b0) = (a.0.load(Ordering::Relaxed), b.0.load(Ordering::Relaxed));
            let took_b = w.post(SLOTS - 1);
            let took_a = w.post(3);
            assert!(!w.post(SLOTS), "a slot past SLOTS is never taken");
            w.end_tick(Instant::now());
            if took_b {
                posted_b += 1;
                served_after(&b, b0, "slot 61");
            }
            if took_a {
                posted_a += 1;
                served_after(&a, a0, "slot 3");
            }
            refused += u64::from(!took_a) + u64::from(!took_b);
        }
        let stats = w.stats();
        drop(w);
        assert!(
            posted_a >= 20,
            "the wake thread took only {posted_a} wake-ups in 10 s ({refused} refused)"
        );
        // Never more wake-ups than posts (nothing is served twice, or for another slot).
        assert!(a.0.load(Ordering::Relaxed) <= posted_a, "slot 3");
        assert!(b.0.load(Ordering::Relaxed) <= posted_b, "slot {}", SLOTS - 1);
        assert!(
            stats.served_ticks > 0 && stats.windows >= stats.served_ticks,
            "{stats:?}"
        );
    }

    /// Without a steady cadence the window never opens: every post is refused at once.
    #[test]
    fn without_a_cadence_nothing_is_taken() {
        let w = Waker::start().expect("wake thread");
        for _ in 0..1000 {
            assert!(!w.post(0));
        }
        assert_eq!(w.stats().windows, 0);
    }
}
