//! Survives a peer that truncates a shared segment.
//!
//! Any process that can open a segment read-write can also `ftruncate` it. Touching a mapped
//! page past the new end of the file raises SIGBUS, which would kill the process that did
//! nothing wrong. This module installs (once) a SIGBUS handler that knows the address ranges of
//! the segments mapped in this process: a fault inside one of them replaces that whole mapping
//! with private zero pages (`mmap(MAP_FIXED | MAP_ANONYMOUS)`), marks the segment broken, and
//! returns, so the faulting access is retried and reads zeros. The ring code then sees
//! impossible positions and reports a protocol violation, and the runtime disconnects the peer
//! with a clear error ([`super::Segment::is_broken`] says why). A fault anywhere else is handed
//! to the previous handler (Rust's stack-overflow handler, or the default action), so genuine
//! crashes stay crashes.
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

/// The handler that was installed before ours.
static mut PREVIOUS: Option<libc::sigaction> = None;
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
    // SAFETY: sigaction with a zeroed struct filled with our handler, SA_SIGINFO | SA_ONSTACK
    // (Rust threads have an alternate signal stack for the stack-overflow handler) and an empty
    // mask; the previous action is written into a local, then stored before anything can fault
    // into our handler, because Once runs this before the first registration returns.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            tracing::warn!(
                "cannot install the SIGBUS guard: {}; a peer truncating a segment would crash this process",
                std::io::Error::last_os_error()
            );
            return;
        }
        (&raw mut PREVIOUS).write(Some(previous));
    }
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction`, nothing that allocates
/// or locks.
extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_TABLE {
        // Acquire: pairs with the Release store of `start` in `register`.
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Relaxed);
        if start == 0 || start == usize::MAX || addr < start || addr >= start + len {
            continue;
        }
        // SAFETY: start..start + len is a live mapping this process registered (the slot is
        // cleared before it is unmapped). Replacing it with private anonymous pages of the same
        // size at the same address keeps every pointer into it valid: they read zeros now.
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
            slot.broken.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or the remap failed): hand it to whoever was there before.
    // SAFETY: PREVIOUS was written once in `install` before the handler could run, and is
    // only read afterwards.
    let previous = unsafe { (&raw const PREVIOUS).read() };
    match previous {
        Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a SA_SIGINFO handler has this signature; we pass our own arguments.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Restore the default action and return: the access faults again and the process
            // dies of SIGBUS, as it would have without us.
            // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument; no old action wanted.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}
