//! The clock every plugbus process agrees on: CLOCK_MONOTONIC, in nanoseconds. Heartbeats in
//! shared memory and the latencies the load test measures across processes use it.

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process of the machine).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`. (libc's,
    // not rustix's: rustix reads the vDSO itself, which valgrind, under which the C plugins are
    // tested, does not support.)
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
