//! The one switch between `std` and `loom`.
//!
//! Every atomic, every cell whose accesses a model checker must see, and the futex used for
//! wake-ups come from here. Under `--cfg loom` they are loom's instrumented versions, so the
//! model tests in `loom-tests/` explore the real ring code. No other module names
//! `std::sync::atomic` or `UnsafeCell` (clippy.toml's `disallowed-types` enforces it).
//!
//! In the std build the atomic wrappers are `#[repr(transparent)]`: they have exactly the layout
//! of the integer they hold, so they can live in a shared-memory segment.
#![allow(clippy::disallowed_types)]

#[cfg(loom)]
use loom::sync::atomic as imp;
#[cfg(not(loom))]
use std::sync::atomic as imp;

pub use imp::Ordering;

/// A memory fence (`std::sync::atomic::fence`, or loom's under `cfg(loom)`).
#[inline]
pub fn fence(order: Ordering) {
    imp::fence(order);
}

macro_rules! atomic_int {
    ($(#[$doc:meta])* $name:ident, $int:ty) => {
        $(#[$doc])*
        #[repr(transparent)]
        pub struct $name(imp::$name);

        impl $name {
            /// A new atomic holding `v`.
            #[cfg(not(loom))]
            #[inline]
            pub const fn new(v: $int) -> Self {
                Self(imp::$name::new(v))
            }
            /// A new atomic holding `v`.
            #[cfg(loom)]
            pub fn new(v: $int) -> Self {
                Self(imp::$name::new(v))
            }
            /// Loads the value.
            #[inline]
            pub fn load(&self, order: Ordering) -> $int {
                self.0.load(order)
            }
            /// Stores `v`.
            #[inline]
            pub fn store(&self, v: $int, order: Ordering) {
                self.0.store(v, order)
            }
            /// Stores `v`, returning the previous value.
            #[inline]
            pub fn swap(&self, v: $int, order: Ordering) -> $int {
                self.0.swap(v, order)
            }
            /// Adds `v` (wrapping), returning the previous value.
            #[inline]
            pub fn fetch_add(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_add(v, order)
            }
            /// Subtracts `v` (wrapping), returning the previous value.
            #[inline]
            pub fn fetch_sub(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_sub(v, order)
            }
            /// Bitwise-ors `v` into the value, returning the previous value.
            #[inline]
            pub fn fetch_or(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_or(v, order)
            }
            /// Stores the maximum of the current value and `v`, returning the previous value.
            #[inline]
            pub fn fetch_max(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_max(v, order)
            }
            /// Stores `new` if the value is `current`.
            #[inline]
            pub fn compare_exchange(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                self.0.compare_exchange(current, new, success, failure)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new(0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.load(Ordering::Relaxed).fmt(f)
            }
        }
    };
}

atomic_int!(
    /// A `u32` with atomic operations (std or loom).
    AtomicU32,
    u32
);
atomic_int!(
    /// A `u64` with atomic operations (std or loom).
    AtomicU64,
    u64
);
atomic_int!(
    /// A `usize` with atomic operations (std or loom).
    AtomicUsize,
    usize
);

/// A `bool` with atomic operations (std or loom).
#[repr(transparent)]
#[derive(Default)]
pub struct AtomicBool(imp::AtomicBool);

impl AtomicBool {
    /// A new atomic holding `v`.
    #[cfg(not(loom))]
    pub const fn new(v: bool) -> Self {
        Self(imp::AtomicBool::new(v))
    }
    /// A new atomic holding `v`.
    #[cfg(loom)]
    pub fn new(v: bool) -> Self {
        Self(imp::AtomicBool::new(v))
    }
    /// Loads the value.
    #[inline]
    pub fn load(&self, order: Ordering) -> bool {
        self.0.load(order)
    }
    /// Stores `v`.
    #[inline]
    pub fn store(&self, v: bool, order: Ordering) {
        self.0.store(v, order)
    }
    /// Stores `v`, returning the previous value.
    #[inline]
    pub fn swap(&self, v: bool, order: Ordering) -> bool {
        self.0.swap(v, order)
    }
}

/// A hint that the caller is spinning (loom: a yield, so the model can make progress).
#[inline]
pub fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

pub use futex::{FutexWord, wait_any};
pub use track::AccessTracker;

#[cfg(not(loom))]
mod futex {
    use super::{AtomicU32, Ordering};
    use std::time::Duration;

    /// A 32-bit word that a thread of any process mapping it can sleep on (Linux futex,
    /// process-shared: no `FUTEX_PRIVATE_FLAG`).
    ///
    /// Under loom it is modelled by a mutex and a condition variable with the same contract,
    /// so a lost wake-up shows up as a deadlock the model checker reports.
    #[repr(transparent)]
    #[derive(Debug, Default)]
    pub struct FutexWord(AtomicU32);

    impl FutexWord {
        /// A word holding `v`.
        pub const fn new(v: u32) -> Self {
            Self(AtomicU32::new(v))
        }

        /// The atomic word itself.
        #[inline]
        pub fn word(&self) -> &AtomicU32 {
            &self.0
        }

        /// Sleeps while the word holds `expected`, until a wake, the timeout, or a spurious
        /// return (callers re-check their condition in a loop).
        pub fn wait(&self, expected: u32, timeout: Option<Duration>) {
            let ts = timeout.map(|d| libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: FUTEX_WAIT reads the aligned 32-bit word at `self.0` (a live AtomicU32,
            // u32-aligned by its type) and a timespec that outlives the call; it writes nothing.
            // The word may be in a shared mapping, which is what the non-private op is for.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    std::ptr::from_ref(&self.0),
                    libc::FUTEX_WAIT,
                    expected,
                    ts_ptr,
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }

        /// Wakes every thread sleeping on this word, in any process.
        pub fn wake_all(&self) {
            // SAFETY: FUTEX_WAKE only uses the address of the word as a key; the word is live.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    std::ptr::from_ref(&self.0),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }

        /// `load` on the word.
        #[inline]
        pub fn load(&self, order: Ordering) -> u32 {
            self.0.load(order)
        }
        /// `store` on the word.
        #[inline]
        pub fn store(&self, v: u32, order: Ordering) {
            self.0.store(v, order)
        }
        /// `swap` on the word.
        #[inline]
        pub fn swap(&self, v: u32, order: Ordering) -> u32 {
            self.0.swap(v, order)
        }
    }
    /// Sleeps until one of `words` no longer holds its expected value (a wake on any of them),
    /// `timeout` passes, or spuriously; callers re-check their condition in a loop.
    ///
    /// One `futex_waitv` system call (Linux 5.16 and later). On an older kernel it sleeps on
    /// the first word for at most 1 ms at a time instead (the others are then seen within 1 ms).
    pub fn wait_any(words: &[(&FutexWord, u32)], timeout: Duration) {
        use rustix::thread::futex;
        const MAX: usize = 128; // the kernel's limit for futex_waitv
        let Some(((first, first_expected), _)) = words.split_first() else {
            std::thread::sleep(timeout);
            return;
        };
        if words.len() > MAX {
            first.wait(*first_expected, Some(timeout.min(Duration::from_millis(1))));
            return;
        }
        let mut waits = [futex::Wait::new(); MAX];
        for (w, (word, expected)) in waits.iter_mut().zip(words) {
            w.val = u64::from(*expected);
            w.uaddr = futex::WaitPtr::new(std::ptr::from_ref(word.word()).cast_mut().cast());
            w.flags = futex::WaitFlags::SIZE_U32;
        }
        // futex_waitv takes an absolute time on the given clock. (The clock is read through libc:
        // rustix would read the vDSO itself, which valgrind does not support.)
        let deadline_ns =
            crate::clock::monotonic_ns().saturating_add(timeout.as_nanos().min(u128::from(u64::MAX / 2)) as u64);
        let deadline = rustix::time::Timespec {
            tv_sec: (deadline_ns / 1_000_000_000) as _,
            tv_nsec: (deadline_ns % 1_000_000_000) as _,
        };
        let woke = futex::waitv(
            &waits[..words.len()],
            futex::WaitvFlags::empty(),
            Some(&deadline),
            rustix::time::ClockId::Monotonic,
        );
        // Woken, timed out, a word already changed (EAGAIN), or interrupted: the caller
        // re-checks either way. Only a kernel without futex_waitv needs the fallback.
        if let Err(rustix::io::Errno::NOSYS) = woke {
            first.wait(*first_expected, Some(timeout.min(Duration::from_millis(1))));
        }
    }
}

#[cfg(loom)]
mod futex {
    use super::{AtomicU32, Ordering};
    use loom::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// Loom model of a futex word: the check of the value and the sleep are atomic with
    /// respect to `wake_all`, exactly like `FUTEX_WAIT` / `FUTEX_WAKE`. Timeouts are ignored,
    /// so a missed wake-up is a deadlock that loom reports.
    #[derive(Debug)]
    pub struct FutexWord {
        word: AtomicU32,
        lock: Mutex<()>,
        cv: Condvar,
    }

    impl Default for FutexWord {
        fn default() -> Self {
            Self::new(0)
        }
    }

    impl FutexWord {
        /// A word holding `v`.
        pub fn new(v: u32) -> Self {
            Self {
                word: AtomicU32::new(v),
                lock: Mutex::new(()),
                cv: Condvar::new(),
            }
        }
        /// The atomic word itself.
        pub fn word(&self) -> &AtomicU32 {
            &self.word
        }
        /// Sleeps while the word holds `expected` (timeouts ignored under loom).
        pub fn wait(&self, expected: u32, _timeout: Option<Duration>) {
            let guard = self.lock.lock().unwrap();
            if self.word.load(Ordering::SeqCst) != expected {
                return;
            }
            drop(self.cv.wait(guard).unwrap());
        }
        /// Wakes every sleeper.
        pub fn wake_all(&self) {
            let _guard = self.lock.lock().unwrap();
            self.cv.notify_all();
        }
        /// `load` on the word.
        pub fn load(&self, order: Ordering) -> u32 {
            self.word.load(order)
        }
        /// `store` on the word.
        pub fn store(&self, v: u32, order: Ordering) {
            self.word.store(v, order)
        }
        /// `swap` on the word.
        pub fn swap(&self, v: u32, order: Ordering) -> u32 {
            self.word.swap(v, order)
        }
    }

    /// Under loom: a yield (the model checks the rings and doorbells, not this wait).
    pub fn wait_any(_words: &[(&FutexWord, u32)], _timeout: Duration) {
        loom::thread::yield_now();
    }
}

#[cfg(not(loom))]
mod track {
    /// Records which parts of a ring's data area each side touches, for loom's race detector.
    /// In the std build it is empty and every method compiles to nothing.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct AccessTracker;

    impl AccessTracker {
        /// An empty tracker.
        pub const fn new() -> Self {
            Self
        }
        /// Notes a read of granules `first..first + count` (no-op without loom).
        #[inline(always)]
        pub fn read(&self, _first: u64, _count: u64) {}
        /// Notes a write of granules `first..first + count` (no-op without loom).
        #[inline(always)]
        pub fn write(&self, _first: u64, _count: u64) {}
    }
}

#[cfg(loom)]
mod track {
    use loom::cell::UnsafeCell;

    /// The number of granules loom tracks; a ring under loom must not have more.
    pub const GRANULES: usize = 64;

    /// Under loom: one instrumented cell per granule of a ring's data area (a record slot, or
    /// 8 bytes of a frame ring). Reads and writes of payload bytes are reported here, so a
    /// missing happens-before between a producer's write and a consumer's read (or the reverse,
    /// on reuse after wrap) is a data race loom detects.
    pub struct AccessTracker {
        cells: Vec<UnsafeCell<()>>,
    }

    impl std::fmt::Debug for AccessTracker {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("AccessTracker")
        }
    }

    impl Default for AccessTracker {
        fn default() -> Self {
            Self::new()
        }
    }

    impl AccessTracker {
        /// A tracker of [`GRANULES`] cells.
        pub fn new() -> Self {
            Self {
                cells: (0..GRANULES).map(|_| UnsafeCell::new(())).collect(),
            }
        }
        /// Notes a read of granules `first..first + count`.
        pub fn read(&self, first: u64, count: u64) {
            for g in first..first + count {
                let g = usize::try_from(g).expect("granule index fits usize");
                assert!(g < GRANULES, "ring too large for loom: granule {g}");
                self.cells[g].with(|_| ());
            }
        }
        /// Notes a write of granules `first..first + count`.
        pub fn write(&self, first: u64, count: u64) {
            for g in first..first + count {
                let g = usize::try_from(g).expect("granule index fits usize");
                assert!(g < GRANULES, "ring too large for loom: granule {g}");
                self.cells[g].with_mut(|_| ());
            }
        }
    }
}
