//! Lock-free single-producer / single-consumer rings over a caller-provided byte region.
//!
//! A ring region is `[control block][data area]`. The control block holds the two positions,
//! `tail` (written only by the producer) and `head` (written only by the consumer), each on its
//! own 128-byte line. The data area holds frames. Nothing in the region is a pointer,
//! so the same region works in two processes that map it at different addresses.
//!
//! Positions are `u64` counters that only grow (bytes of [`frame`]s); the capacity is a power of two and `pos & (capacity - 1)` indexes the data.
//! Each side keeps a private cached copy of the other side's position and re-reads the shared
//! one only when the cache says "full" (producer) or "empty" (consumer).
//!
//! Memory ordering:
//! - the producer writes the payload, then stores `tail` with Release;
//! - the consumer loads `tail` with Acquire, reads the payload, then stores `head` with Release
//!   (for a run of released frames at once: see [`frame::Consumer`] for when);
//! - the producer loads `head` with Acquire before it reuses the space the consumer released.
//!
//! The peer is untrusted: every position, length and kind read from the region is checked. A
//! violation returns a [`RingError`] and poisons that side of the ring, which from then on returns
//! the same error. Nothing here panics on bad data, loops on it, or reads outside the region.
//!
//! ```
//! use plugbus::ring::{frame, RegionRef};
//!
//! let region = RegionRef::heap(frame::region_size(4096));
//! let (mut tx, mut rx) = frame::channel(region).unwrap();
//! tx.try_push(7, b"hello").unwrap();
//! let f = rx.try_read().unwrap().expect("one frame");
//! assert_eq!((f.kind(), f.payload()), (7, &b"hello"[..]));
//! ```

pub mod doorbell;
pub mod frame;
mod region;

pub use doorbell::Doorbell;
pub use region::RegionRef;

use crate::sync::{AccessTracker, AtomicU64};

/// Size of one padded line of a shared layout. 128 bytes covers adjacent-line prefetch on
/// x86_64 and the 128-byte lines of some aarch64 cores.
///
/// This is fixed rather than taken from `crossbeam_utils::CachePadded`, whose alignment
/// varies by target: a shared-memory layout must have the same offsets for every reader.
pub const LINE: usize = 128;

/// A value alone on its own 128-byte line (fixed on every target, see [`LINE`]).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The control block at the start of every ring region.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct RingControl {
    /// Written by the producer only (Release), read by the consumer (Acquire).
    tail: Line<AtomicU64>,
    /// Written by the consumer only (Release), read by the producer (Acquire).
    head: Line<AtomicU64>,
    /// Loom's view of payload accesses; zero-sized in the std build.
    tracker: AccessTracker,
}

/// Bytes reserved for the control block at the start of a ring region (a multiple of [`LINE`]).
pub const CONTROL_SIZE: usize = std::mem::size_of::<RingControl>().next_multiple_of(LINE);

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<RingControl>() == 2 * LINE);
    assert!(std::mem::align_of::<RingControl>() == LINE);
    assert!(std::mem::offset_of!(RingControl, tail) == 0);
    assert!(std::mem::offset_of!(RingControl, head) == LINE);
};

/// Why a ring refused to go on: the shared positions or frame headers break the protocol.
///
/// Each variant means the peer process (or memory corruption) broke the ring; the side that sees
/// it is poisoned and keeps returning the error. Disconnect the peer and discard the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The consumer saw a `tail` more than a capacity ahead of `head`, or behind it.
    #[error("ring tail {tail} is out of range for head {head} (capacity {capacity})")]
    TailOutOfRange {
        /// The consumer's head.
        head: u64,
        /// The tail it read.
        tail: u64,
        /// The ring's capacity.
        capacity: u64,
    },
    /// The producer saw a `head` beyond its tail, more than a capacity behind it, or moving back.
    #[error("ring head {head} is out of range for tail {tail} (last head {last_head})")]
    HeadOutOfRange {
        /// The head it read.
        head: u64,
        /// The producer's tail.
        tail: u64,
        /// The head it had seen before.
        last_head: u64,
    },
    /// The `tail` went backwards.
    #[error("ring tail moved back from {last} to {now}")]
    TailMovedBack {
        /// The tail seen before.
        last: u64,
        /// The tail read now.
        now: u64,
    },
    /// A frame ring position is not 8-byte aligned.
    #[error("frame ring position {pos} is not 8-byte aligned")]
    Misaligned {
        /// The position.
        pos: u64,
    },
    /// A frame header's length runs past the published data, the end of the region, or the
    /// largest frame the ring allows.
    #[error("frame at {pos} claims {len} bytes, but only {available} are readable")]
    BadFrameLength {
        /// Position of the frame.
        pos: u64,
        /// The length in its header.
        len: u64,
        /// How many bytes it could have had.
        available: u64,
    },
    /// A frame header carries kind 0 (never written by a producer).
    #[error("frame at {pos} has the reserved kind 0")]
    BadFrameKind {
        /// Position of the frame.
        pos: u64,
    },
    /// A padding frame does not end exactly at the end of the data area.
    #[error("padding frame at {pos} has length {len}, which does not reach the end of the ring")]
    BadPadding {
        /// Position of the padding frame.
        pos: u64,
        /// The length in its header.
        len: u64,
    },
}

/// The region handed to a ring has the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingLayoutError {
    /// The data area (region minus control block) is not a power of two of the unit.
    #[error(
        "ring data area of {data_bytes} bytes is not a power-of-two number of {unit}-byte units \
         (use ring::frame::region_size)"
    )]
    NotPowerOfTwo {
        /// Bytes after the control block.
        data_bytes: usize,
        /// Record size, or 8 for frames.
        unit: usize,
    },
    /// The region's start is not aligned to [`LINE`].
    #[error("ring region at {addr:#x} is not aligned to {LINE} bytes")]
    Misaligned {
        /// The start address.
        addr: usize,
    },
    /// The record type cannot be stored (zero-sized, or aligned above [`LINE`]).
    #[error("record type of size {size} and alignment {align} cannot live in a ring")]
    BadRecordType {
        /// `size_of::<T>()`.
        size: usize,
        /// `align_of::<T>()`.
        align: usize,
    },
    /// The region is smaller than the control block plus the minimum data area.
    #[error("ring region of {len} bytes is too small")]
    TooSmall {
        /// Region length.
        len: usize,
    },
}

/// Splits a region into its control block and data area, checking the shape.
/// Returns the data capacity in `unit`s.
fn check_region(region: &RegionRef, unit: usize) -> Result<u64, RingLayoutError> {
    let addr = region.as_ptr() as usize;
    if addr % LINE != 0 {
        return Err(RingLayoutError::Misaligned { addr });
    }
    if region.len() < CONTROL_SIZE + unit {
        return Err(RingLayoutError::TooSmall { len: region.len() });
    }
    let data_bytes = region.len() - CONTROL_SIZE;
    let units = data_bytes / unit;
    if data_bytes % unit != 0 || !units.is_power_of_two() {
        return Err(RingLayoutError::NotPowerOfTwo { data_bytes, unit });
    }
    Ok(units as u64)
}

/// Writes a fresh control block (both positions 0) at the start of `region`.
///
/// The creator of a region does this once, before either side attaches.
pub fn init(region: &RegionRef) -> Result<(), RingLayoutError> {
    let addr = region.as_ptr() as usize;
    if addr % LINE != 0 {
        return Err(RingLayoutError::Misaligned { addr });
    }
    if region.len() < CONTROL_SIZE {
        return Err(RingLayoutError::TooSmall { len: region.len() });
    }
    // SAFETY: the checks above prove the region starts LINE-aligned (RingControl's alignment) and
    // is at least CONTROL_SIZE >= size_of::<RingControl>() bytes long; RegionRef guarantees the
    // bytes are valid for writes while it lives. No side is attached yet, so nothing else reads
    // or writes the control block during this write.
    unsafe { region.as_ptr().cast::<RingControl>().write(RingControl::default()) };
    Ok(())
}

/// The control block of a checked region.
fn control(region: &RegionRef) -> &RingControl {
    // SAFETY: callers ran check_region (aligned, long enough); the block was written by `init`
    // (or is a zeroed mapping, a valid RingControl: atomics of 0, zero-sized tracker in std).
    // Only atomics are accessed through the shared reference.
    unsafe { &*region.as_ptr().cast::<RingControl>() }
}

/// `(head, tail)` of a ring region, for inspection (no validation, no side effects).
pub fn positions(region: &RegionRef) -> (u64, u64) {
    if check_region(region, 8).is_err() && (region.as_ptr() as usize % LINE != 0 || region.len() < CONTROL_SIZE) {
        return (0, 0);
    }
    let c = control(region);
    (
        c.head.load(crate::sync::Ordering::Acquire),
        c.tail.load(crate::sync::Ordering::Acquire),
    )
}
