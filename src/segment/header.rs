//! The segment header: the first bytes of every plugbus segment.
//!
//! ```text
//! line 0-1  Fixed:   magic, layout version, header size, segment size, creator pid and start
//!                    time, creation time, tag, ring descriptors (offset, capacity, unit, kind),
//!                    creator's pid namespace
//! line 2    Shared:  attacher pid, state word
//! line 3    creator heartbeat (CLOCK_MONOTONIC ns)
//! line 4    attacher heartbeat
//! line 5    doorbell the attacher sleeps on (rung by the creator)
//! line 6    doorbell the creator sleeps on (rung by the attacher)
//! line 7    counters written by the creator (16 x u64)
//! line 8    counters written by the attacher (16 x u64)
//! ```
//! Every field has a fixed offset (asserted below); nothing is a pointer.

use crate::ring::{Doorbell, Line};
use crate::sync::{AtomicU32, AtomicU64};

/// `b"PLUGBUS\x01"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PLUGBUS\x01");
/// Version of this header layout and of the ring layouts and protocols. Bumped on any
/// incompatible change (2: the control ring announces each move frame with a marker).
pub const LAYOUT_VERSION: u32 = 2;
/// Most rings one segment may hold.
pub const MAX_RINGS: usize = 4;
/// Bytes of the free-text tag (the plugin id, for `plugbus inspect`).
pub const TAG_LEN: usize = 64;
/// Number of counters per side.
pub const COUNTERS: usize = 16;

/// A ring's kind, as stored in its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RingKind {
    /// A [`crate::ring::frame`] ring: `capacity` data bytes (`unit` is 8). (Kind 1 was a ring
    /// of fixed-size records, which plugbus no longer has; a segment with one is refused.)
    Frame = 2,
}

impl RingKind {
    /// Data bytes of a ring of this kind with `capacity` units (a frame ring's capacity
    /// already counts bytes), or `None` on overflow.
    pub fn data_bytes(self, capacity: u64) -> Option<u64> {
        match self {
            Self::Frame => Some(capacity),
        }
    }

    /// Decodes a stored kind.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            2 => Some(Self::Frame),
            _ => None,
        }
    }
}

/// Where one ring lives in the segment.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingDesc {
    /// Byte offset of the ring region (control block first) from the segment start.
    pub offset: u64,
    /// Capacity in data bytes; a power of two.
    pub capacity: u64,
    /// Unit of the capacity in bytes (8 for a frame ring, its alignment).
    pub unit: u32,
    /// [`RingKind`] as u32.
    pub kind: u32,
}

impl RingDesc {
    /// Data bytes of the ring (0 for an unknown kind or on overflow; [`Segment::open`]
    /// refuses those).
    ///
    /// [`Segment::open`]: crate::segment::Segment::open
    pub fn data_bytes(&self) -> u64 {
        RingKind::from_u32(self.kind)
            .and_then(|k| k.data_bytes(self.capacity))
            .unwrap_or(0)
    }
}

/// Fields written once by the creator before `magic` is published.
#[repr(C)]
#[derive(Debug)]
pub struct Fixed {
    /// [`MAGIC`]; stored last (Release) so an opener that sees it sees the rest.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// `size_of::<Header>()` of the creator.
    pub header_size: u32,
    /// Total bytes of the segment.
    pub segment_size: u64,
    /// The creator's process id.
    pub creator_pid: u32,
    /// Number of valid entries in `rings`.
    pub ring_count: u32,
    /// The creator's start time (clock ticks after boot, from /proc), to tell a dead creator
    /// from a new process that reused its pid.
    pub creator_start: u64,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Free text (UTF-8, NUL padded): the plugin id.
    pub tag: [u8; TAG_LEN],
    /// Ring descriptors.
    pub rings: [RingDesc; MAX_RINGS],
    /// The inode of the creator's pid namespace (`/proc/self/ns/pid`), 0 if unknown: a process
    /// in the same namespace can trust `creator_pid`; in another, only the heartbeat.
    pub creator_pidns: u64,
}

/// Fields either side updates.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Shared {
    /// Process id of the attached side, 0 if none.
    pub attacher_pid: AtomicU32,
    /// Lifecycle state, one of the `STATE_*` constants.
    pub state: AtomicU32,
}

/// No side has marked anything yet (the creator is initializing).
pub const STATE_INIT: u32 = 0;
/// Created, waiting for the attacher.
pub const STATE_READY: u32 = 1;
/// The attacher is attached.
pub const STATE_ATTACHED: u32 = 2;
/// The attacher detached cleanly.
pub const STATE_DETACHED: u32 = 3;
/// The creator is shutting down; the attacher should finish and detach.
pub const STATE_SHUTDOWN: u32 = 4;

/// The whole header.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    /// Written once at creation.
    pub fixed: Line<Fixed>,
    /// Attacher pid and state.
    pub shared: Line<Shared>,
    /// CLOCK_MONOTONIC ns of the creator's last heartbeat.
    pub creator_heartbeat: Line<AtomicU64>,
    /// CLOCK_MONOTONIC ns of the attacher's last heartbeat.
    pub attacher_heartbeat: Line<AtomicU64>,
    /// The attacher sleeps here; the creator rings it after publishing to the attacher.
    pub to_attacher: Line<Doorbell>,
    /// The creator sleeps here; the attacher rings it after publishing to the creator.
    pub to_creator: Line<Doorbell>,
    /// Counters the creator publishes (meaning assigned by the layer above).
    pub creator_counters: Line<[AtomicU64; COUNTERS]>,
    /// Counters the attacher publishes.
    pub attacher_counters: Line<[AtomicU64; COUNTERS]>,
}

#[cfg(not(loom))]
const _: () = {
    use crate::ring::LINE;
    use std::mem::{offset_of, size_of};
    assert!(size_of::<Fixed>() == 120 + MAX_RINGS * 24);
    assert!(size_of::<Fixed>() <= 2 * LINE);
    assert!(size_of::<RingDesc>() == 24);
    assert!(offset_of!(Header, fixed) == 0);
    assert!(offset_of!(Header, shared) == 2 * LINE);
    assert!(offset_of!(Header, creator_heartbeat) == 3 * LINE);
    assert!(offset_of!(Header, attacher_heartbeat) == 4 * LINE);
    assert!(offset_of!(Header, to_attacher) == 5 * LINE);
    assert!(offset_of!(Header, to_creator) == 6 * LINE);
    assert!(offset_of!(Header, creator_counters) == 7 * LINE);
    assert!(offset_of!(Header, attacher_counters) == 8 * LINE);
    assert!(size_of::<Header>() == 9 * LINE);
};

/// Bytes reserved for the header: rings start on the next page.
pub const HEADER_RESERVED: usize = std::mem::size_of::<Header>().next_multiple_of(4096);
