//! Survives a peer that truncates a shared segment.
//!
//! Any process that can open a segment read-write can also `ftruncate` it. Touching a mapped
//! page past the new end of the file raises SIGBUS, which would kill the process that did
//! nothing wrong. This module installs (once) a SIGBUS handler that knows the address ranges of
//! the segments mapped in this process: a fault inside one of them replaces that whole mapping
//! with private zero pages (`mmap(MAP_FIXED | MAP_ANONYMOUS)`), marks that segment (and only
//! it) broken, and returns, so the faulting access is retried and reads zeros. The ring code
//! then sees impossible positions and reports a protocol violation, and the runtime disconnects
//! the peer with a clear error ([`super::Segment::is_broken`] says why). The handler stays
//! installed: any number of segments may be truncated one after another.
//!
//! Only a real access fault past the end of a file (`si_code == BUS_ADRERR`, raised by the
//! kernel) whose address (`si_addr`) lies in a registered mapping is recovered. Anything else
//! (a fault elsewhere, a misaligned access, a SIGBUS sent with `kill`/`raise`) goes on as if
//! this handler did not exist:
//! - to the handler installed before ours (Rust's stack-overflow handler, or the program's),
//!   called the way its flags say (`SA_SIGINFO` or not; `SA_RESETHAND` honoured);
//! - if that was the default action, the default action: the disposition is restored and the
//!   fault re-executes (a sent signal is re-raised), so the process dies of SIGBUS as it would
//!   have without us;
//! - if it was "ignore", a sent signal is ignored, a fault kills (the kernel does not let a
//!   synchronous fault be ignored either).
//!
//! A previous handler that resets the disposition to the default and returns (Rust's does, for
//! a fault that is not a stack overflow) means "let the default action happen": for a fault the
//! access re-executes and kills; for a sent signal we re-raise it. So a stray SIGBUS never
//! leaves the process running with the guard silently gone.
//!
//! The lookup is async-signal-safe: a fixed table of atomics, no allocation, no lock.
//!
//! This is the technique Wayland compositors use for client shared-memory buffers.

use std::sync::Once;

use crate::sync::{AtomicBool, AtomicUsize, Ordering};

/// Most segments mapped at once that the guard protects; more are mapped unprotected (logged).
const SLOTS: usize = 1024;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    broken: AtomicBool::new(false),
};

static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The handler that was installed before ours. Written once, in `install`, before ours is
/// installed; only read afterwards.
static mut PREVIOUS: Option<libc::sigaction> = None;
/// The previous handler had `SA_RESETHAND` and has run once: from now on it is the default.
static PREVIOUS_RESET: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// A registered mapping; unregisters on drop.
#[derive(Debug)]
pub(super) struct Registration {
    slot: Option<usize>,
}

impl Registration {
    /// Whether a peer truncated this mapping (it now reads zeros).
    pub fn is_broken(&self) -> bool {
        self.slot.is_some_and(|i| SLOTS_TABLE[i].broken.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // Release: the handler's Acquire load of `start` sees the slot free only after the
            // caller is done with the mapping (it is unmapped after this drop).
            SLOTS_TABLE[i].len.store(0, Ordering::Relaxed);
            SLOTS_TABLE[i].broken.store(false, Ordering::Relaxed);
            SLOTS_TABLE[i].start.store(0, Ordering::Release);
        }
    }
}

/// Protects `start..start + len` (a shared mapping) against truncation by a peer.
pub(super) fn register(start: *mut u8, len: usize) -> Registration {
    INSTALL.call_once(install);
    let addr = start as usize;
    for (i, slot) in SLOTS_TABLE.iter().enumerate() {
        // AcqRel: claims the slot exclusively against other registering threads.
        if slot
            .start
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.broken.store(false, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            // Release: pairs with the handler's Acquire load of `start`: it sees `len` first.
            slot.start.store(addr, Ordering::Release);
            return Registration { slot: Some(i) };
        }
    }
    tracing::warn!("more than {SLOTS} segments mapped: this one is not protected against truncation");
    Registration { slot: None }
}

fn install() {
    // SAFETY: sigaction with a null new action only reads the current one into a zeroed local.
    // PREVIOUS is written here, before our handler is installed (the second sigaction call), so
    // the handler never sees it unwritten; Once makes this the only writer. Our action: a zeroed
    // struct with our handler, SA_SIGINFO | SA_ONSTACK (Rust threads have an alternate signal
    // stack for the stack-overflow handler) and an empty mask.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            tracing::warn!(
                "cannot read the SIGBUS disposition: {}; a peer truncating a segment would crash this process",
                std::io::Error::last_os_error()
            );
            return;
        }
        (&raw mut PREVIOUS).write(Some(previous));
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::warn!(
                "cannot install the SIGBUS guard: {}; a peer truncating a segment would crash this process",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Whether this SIGBUS is a synchronous fault of the current instruction (raised by the kernel,
/// re-raised if the instruction runs again): BUS_ADRALN, BUS_ADRERR, BUS_OBJERR,
/// BUS_MCEERR_AR. A signal sent by a process (`si_code <= 0`) or an asynchronous machine-check
/// notice (BUS_MCEERR_AO) is not.
fn synchronous(code: libc::c_int) -> bool {
    (1..=4).contains(&code)
}

/// The registered mapping containing `addr`, as (slot, start, len).
fn lookup(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    for slot in &SLOTS_TABLE {
        // Acquire: pairs with the Release store of `start` in `register`, so `len` is that
        // registration's.
        let start = slot.start.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX || addr < start {
            continue;
        }
        let len = slot.len.load(Ordering::Relaxed);
        // Acquire, again: if the slot was released and reused while we read `len`, `start`
        // changed (a new registration stores a new start after its len), and we skip it.
        if addr - start >= len || slot.start.load(Ordering::Acquire) != start {
            continue;
        }
        return Some((slot, start, len));
    }
    None
}

/// Sets the SIGBUS disposition to the default action.
fn restore_default() {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument; no old action is wanted.
    // sigaction is async-signal-safe.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

/// Lets the default action happen: for a synchronous fault, returning re-executes the access,
/// which faults again and kills; a sent signal is raised again (blocked while we run, so it
/// is delivered when the handler returns, to the default action).
fn die_by_default(sig: libc::c_int, synchronous: bool) {
    restore_default();
    if !synchronous {
        // SAFETY: raise is async-signal-safe and takes any signal number.
        unsafe { libc::raise(sig) };
    }
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction`, `raise`, nothing that
/// allocates or locks.
extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; si_code is always set,
    // si_addr is meaningful for the fault codes we check it with.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((slot, start, len)) = lookup(addr) {
            // SAFETY: start..start + len is a live mapping this process registered (the slot
            // is cleared before it is unmapped). Replacing it with private anonymous pages of
            // the same size at the same address keeps every pointer into it valid: they read
            // zeros now.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                // Release: pairs with the Acquire load in `Registration::is_broken`.
                slot.broken.store(true, Ordering::Release);
                return;
            }
            // The remap failed: nothing to recover with; treat it as any other fault.
        }
    }
    chain(sig, info, ctx, synchronous(code));
}

/// Hands a SIGBUS that is not ours to whoever would have had it without us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, synchronous: bool) {
    // SAFETY: PREVIOUS was written once in `install` before the handler could run, and is
    // only read afterwards.
    let Some(prev) = (unsafe { (&raw const PREVIOUS).read() }) else {
        die_by_default(sig, synchronous);
        return;
    };
    // Relaxed: a flag only this handler sets; a concurrent fault on another thread sees either
    // value, each of which is a valid state of the emulated disposition.
    if prev.sa_sigaction == libc::SIG_DFL || PREVIOUS_RESET.load(Ordering::Relaxed) {
        die_by_default(sig, synchronous);
        return;
    }
    if prev.sa_sigaction == libc::SIG_IGN {
        if synchronous {
            // The kernel does not let a synchronous fault be ignored: it kills.
            die_by_default(sig, true);
        }
        return;
    }
    if prev.sa_flags & libc::SA_RESETHAND != 0 {
        // The kernel would have reset the disposition on this delivery.
        PREVIOUS_RESET.store(true, Ordering::Relaxed);
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: a handler installed with SA_SIGINFO has this signature; we pass the arguments
        // the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO has this signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig);
    }
    if !synchronous && disposition_is_default() {
        // The previous handler reset the disposition and returned, expecting the default action
        // to follow (Rust's stack-overflow handler does). A sent signal does not come back by
        // itself: raise it again.
        // SAFETY: raise is async-signal-safe and takes any signal number.
        unsafe { libc::raise(sig) };
    }
}

/// Whether the SIGBUS disposition is now the default action.
fn disposition_is_default() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into a zeroed local;
    // it is async-signal-safe.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_DFL
    }
}
