//! The doorbell: how a consumer sleeps when its rings are empty, and how a producer wakes it
//! without a system call when it is awake.
//!
//! One word, two values: [`AWAKE`] and [`SLEEPING`]. The protocol uses read-modify-write
//! operations on that single word, so it needs no sequentially consistent fences:
//!
//! - consumer, before sleeping: `swap(SLEEPING)` (AcqRel), re-check its rings, then
//!   `futex_wait(word, SLEEPING)`; after waking (or when the re-check found work),
//!   `swap(AWAKE)` (AcqRel). Every consumer write is a read-modify-write;
//! - producer, after publishing (its `tail` Release store): `swap(AWAKE)` (AcqRel); if the old
//!   value was `SLEEPING`, `futex_wake`.
//!
//! Both swaps are on one word, so they are totally ordered. If the producer's swap comes second
//! it reads `SLEEPING` and wakes the consumer (whose `futex_wait` either sleeps and is woken, or
//! returns at once because the word is no longer `SLEEPING`). If the consumer's swap comes second
//! it reads the producer's `AWAKE` with Acquire, which synchronizes with the producer's Release
//! swap, so the consumer's re-check sees everything published before it: no lost wake-up.
//! `loom-tests/` checks exactly this.

use std::time::Duration;

use crate::sync::{FutexWord, Ordering};

/// The consumer is running (or about to re-check).
pub const AWAKE: u32 = 0;
/// The consumer announced it will sleep.
pub const SLEEPING: u32 = 1;

/// A wake-up word shared by a producer and a consumer (possibly in two processes).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Doorbell {
    word: FutexWord,
}

impl Doorbell {
    /// A doorbell whose consumer is awake.
    pub fn new() -> Self {
        Self {
            word: FutexWord::new(AWAKE),
        }
    }

    /// Producer side: call after publishing. Wakes the consumer only if it announced sleep;
    /// returns whether a wake-up was sent.
    #[inline]
    pub fn ring(&self) -> bool {
        // AcqRel: the Release half pairs with the Acquire half of the consumer's swap in
        // `prepare_sleep`, making our earlier `tail` stores visible to its re-check; the Acquire
        // half orders the wake after we saw it sleeping.
        if self.word.swap(AWAKE, Ordering::AcqRel) == SLEEPING {
            self.word.wake_all();
            true
        } else {
            false
        }
    }

    /// Consumer side, step 1: announce the intent to sleep. Re-check the rings after this and
    /// call [`Doorbell::sleep`] only if they are still empty, or [`Doorbell::cancel_sleep`].
    #[inline]
    pub fn prepare_sleep(&self) {
        // AcqRel: the Acquire half pairs with the Release half of the producer's swap in `ring`:
        // if the producer rang before us, we see what it published when we re-check.
        self.word.swap(SLEEPING, Ordering::AcqRel);
    }

    /// Consumer side: the re-check found work; stay awake.
    #[inline]
    pub fn cancel_sleep(&self) {
        // A swap, not a plain store: every consumer write to the word must be a read-modify-write
        // so that it continues the release sequence of a producer's `ring` swap that came before
        // it. A plain store would cut that sequence, and a later `prepare_sleep` reading it
        // would not synchronize with the producer: its re-check could miss published data.
        // AcqRel: Acquire pairs with the producer's swap in `ring`, as in `prepare_sleep`.
        self.word.swap(AWAKE, Ordering::AcqRel);
    }

    /// Consumer side, step 2: sleep until rung (or `timeout`, or spuriously). Always re-check the
    /// rings afterwards.
    #[inline]
    pub fn sleep(&self, timeout: Option<Duration>) {
        self.word.wait(SLEEPING, timeout);
        self.cancel_sleep();
    }

    /// The futex word and the value it holds while the consumer sleeps: for a consumer that
    /// waits on several doorbells at once (`prepare_sleep` on each, re-check, then
    /// [`crate::sync::wait_any`], then `cancel_sleep` on each).
    pub fn sleep_word(&self) -> (&FutexWord, u32) {
        (&self.word, SLEEPING)
    }

    /// Whether the consumer has announced sleep (for metrics and inspection).
    pub fn is_sleeping(&self) -> bool {
        self.word.load(Ordering::Relaxed) == SLEEPING
    }
}
