//! What the cross-thread and cross-process benches share: the waiting loop's backoff, and the
//! guard that makes a child process die with the bench.

/// A waiting loop yields its core every this many turns (a power of two).
pub const YIELD_EVERY: u32 = 64;
/// A waiting loop reports a possible stall (for liveness checks) every this many turns (a
/// power of two).
pub const STALL_EVERY: u32 = 1 << 14;
const _: () = assert!(YIELD_EVERY.is_power_of_two() && STALL_EVERY.is_power_of_two());

/// Spin, and yield the core every `YIELD_EVERY` turns.
pub struct Backoff(pub u32);

impl Backoff {
    /// One turn of waiting. Returns true every `STALL_EVERY` turns, for callers that check
    /// whether their peer is still alive.
    #[inline]
    pub fn snooze(&mut self) -> bool {
        self.0 = self.0.wrapping_add(1);
        if self.0 & (YIELD_EVERY - 1) == 0 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        self.0 & (STALL_EVERY - 1) == 0
    }
}

/// Makes the kernel kill this child if the bench process dies, so no orphan spins on. Exits at
/// once if `parent` (the bench process's pid, `None` if unknown) is not this process's parent:
/// the bench died before the guard took effect, or the child was started by hand.
pub fn die_with_parent(parent: Option<u32>) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number by value and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    assert_eq!(rc, 0, "prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error());
    if parent != Some(std::os::unix::process::parent_id()) {
        std::process::exit(1);
    }
}
