//! Shared-memory segments holding a [`Header`] and a set of rings: anonymous (a memfd handed
//! over as a file descriptor) or named (POSIX shared memory).
//!
//! The *creator* (the host, in plugbus) makes a segment, sizes it with `ftruncate`, maps it
//! with memmap2, writes the header, initializes every ring's control block, and publishes the
//! magic number last. Two kinds:
//! - [`Segment::create_memfd`], for a plugin the host launches: `memfd_create`, sealed with
//!   `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`. No name exists, so no other process can open
//!   it (or create it first); the descriptor goes to the one child that inherits it, and both
//!   sides close it once mapped. The seals fix its size: neither side can truncate it under the
//!   other's mapping. Its [`Segment::name`] is `memfd:<memfd name>`, for logs and for this
//!   process's own inspection.
//! - [`Segment::create`], for attach mode (a plugin started by someone else, who finds the
//!   segment by name): `shm_open` with `O_CREAT | O_EXCL` and mode 0600. A name is open to every
//!   process of the same user: attach mode trusts them.
//!
//! The *attacher* (the plugin) maps it with [`Segment::open_inherited`] / [`Segment::open_fd`]
//! (which first check the seals and close the descriptor after mapping) or [`Segment::open`]
//! (by name). Opening checks before it maps: the file's size with `fstat`, then the header read
//! with `pread` into local memory (magic, layout version, header size, segment size against the
//! real size, every ring descriptor). A file that fails is never mapped, so a planted file costs
//! nothing; one that passes is mapped, checked again from the mapping (the rings used are the
//! ones mapped), and only then populated. A failure is a [`SegmentOpenError`] that says which
//! check failed.
//!
//! Names all start with [`PREFIX`]. The creator unlinks the name when its [`Segment`] is dropped
//! (the memory itself lives until the last mapping goes). [`stale::remove_stale`] removes
//! segments whose creator died without doing so. A memfd has nothing to unlink: its memory goes
//! with the last mapping, whoever dies.
//!
//! Why memmap2 over `shm_open` rather than the `shared_memory` crate: plugbus needs `O_EXCL`
//! creation with an exact mode, its own naming and prefix for stale-segment cleanup, `fstat`
//! size checks against an untrusted header, and read-only inspection of other processes'
//! segments; `shared_memory` hides the file descriptor and the open flags, and pulls in nix 0.23
//! and rand 0.8 for what are four libc calls here.
//!
//! Linux only (`/dev/shm` is read to list named segments; memfd and seals).

#[cfg(not(loom))]
mod guard;
pub mod header;
mod shm;
pub mod stale;

use std::fs::File;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::MmapRaw;

pub use header::{Header, LAYOUT_VERSION, MAGIC, MAX_RINGS, RingDesc, RingKind};

use crate::ring::{CONTROL_SIZE, LINE, RegionRef};
use crate::sync::Ordering;

/// Every plugbus segment name starts with this.
pub const PREFIX: &str = "plugbus.";
/// Longest segment name accepted (well under NAME_MAX).
pub const MAX_NAME: usize = 200;
/// The [`Segment::name`] of an anonymous (memfd) segment starts with this, then the memfd's own
/// name (`memfd:plugbus.<pid>.<tag>.<n>`).
pub const MEMFD_PREFIX: &str = "memfd:";

/// One ring of a segment to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSpec {
    /// The ring's kind (a frame ring: [`RingSpec::frames`]).
    pub kind: RingKind,
    /// Ignored: a frame ring's unit is 8.
    pub unit: u32,
    /// Data bytes; a power of two, at least 64.
    pub capacity: u64,
}

impl RingSpec {
    /// A frame ring with `bytes` data bytes.
    pub const fn frames(bytes: u64) -> Self {
        Self {
            kind: RingKind::Frame,
            unit: 8,
            capacity: bytes,
        }
    }

    fn region_len(&self) -> Option<u64> {
        self.kind.data_bytes(self.capacity)?.checked_add(CONTROL_SIZE as u64)
    }
}

/// Why a segment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SegmentCreateError {
    /// The name lacks the prefix, is too long, or has characters other than `[A-Za-z0-9._-]`.
    #[error(
        "invalid segment name {0:?}: it must start with \"plugbus.\", be at most 200 characters, and use only A-Z a-z 0-9 . _ -"
    )]
    InvalidName(String),
    /// A segment of that name already exists (`O_EXCL`).
    #[error("segment {0:?} already exists; pick another name or remove it (plugbus cleanup removes stale ones)")]
    AlreadyExists(String),
    /// A ring spec is unusable.
    #[error("ring {index}: {reason}")]
    BadRing {
        /// Position in the spec list.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{op} failed for segment {name:?}: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The segment.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a segment could not be opened. Each variant names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentOpenError {
    /// No segment by that name.
    #[error("no segment named {0:?} (is the host running? is the address right?)")]
    NotFound(String),
    /// The name is not a valid plugbus segment name.
    #[error("invalid segment name {0:?}")]
    InvalidName(String),
    /// The magic number is wrong: not a plugbus segment, or its creator has not finished.
    #[error("segment {name:?} is not a plugbus segment (magic {found:#018x}), or is still being created")]
    NotPlugbus {
        /// The segment.
        name: String,
        /// The magic read.
        found: u64,
    },
    /// Made by an incompatible plugbus.
    #[error("segment {name:?} has layout version {found}; this plugbus supports version {expected}")]
    WrongVersion {
        /// The segment.
        name: String,
        /// Version read.
        found: u32,
        /// Version supported.
        expected: u32,
    },
    /// Shorter than its header says (or than a header).
    #[error("segment {name:?} is truncated: {actual} bytes mapped, {expected} expected")]
    Truncated {
        /// The segment.
        name: String,
        /// Bytes the header (or the minimum) requires.
        expected: u64,
        /// Real size.
        actual: u64,
    },
    /// A header field is inconsistent.
    #[error("segment {name:?} has a corrupt header: {reason}")]
    Corrupt {
        /// The segment.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An inherited segment is not sealed against shrinking and growing (or is not a memory
    /// file at all): its size could change under the mapping.
    #[error(
        "segment {name:?} is not a sealed memfd ({reason}); a launched plugin's segment is a memfd the host sealed against shrinking and growing"
    )]
    Unsealed {
        /// The segment (`fd:<n>` or the memfd's name).
        name: String,
        /// What was found.
        reason: String,
    },
    /// Another live process is attached.
    #[error("segment {name:?} is already attached by live process {pid}")]
    AlreadyAttached {
        /// The segment.
        name: String,
        /// The attacher.
        pid: u32,
    },
    /// An operating-system call failed.
    #[error("{op} failed for segment {name:?}: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The segment.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which side of the segment this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Made the segment (the host).
    Creator,
    /// Opened it (the plugin).
    Attacher,
}

/// The mapping, shared by every [`RegionRef`] handed out. The guard registration drops first,
/// before the mapping is unmapped.
struct Mapping {
    #[cfg(not(loom))]
    guard: guard::Registration,
    map: MmapRaw,
}

impl Mapping {
    fn new(map: MmapRaw) -> Self {
        Self {
            #[cfg(not(loom))]
            guard: guard::register(map.as_mut_ptr(), map.len()),
            map,
        }
    }
}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least size_of::<Header>() bytes (create
        // wrote it; open checked the size). Header holds only integers and atomics, valid for any
        // bit pattern; the fields another process changes are atomics.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }
}

/// A segment's `to_attacher` doorbell, ringable from any thread (see
/// [`Segment::attacher_bell`]). It holds the mapping: ringing after the segment's other users
/// are gone only touches memory that is still mapped.
#[derive(Clone)]
pub struct AttacherBell {
    map: Arc<Mapping>,
}

impl std::fmt::Debug for AttacherBell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttacherBell").finish_non_exhaustive()
    }
}

impl AttacherBell {
    /// Rings the doorbell ([`crate::ring::Doorbell::ring`]): wakes the attacher if it sleeps;
    /// returns whether a wake-up was sent.
    #[inline]
    pub fn ring(&self) -> bool {
        self.map.header().to_attacher.ring()
    }
}

/// A mapped plugbus segment.
pub struct Segment {
    name: String,
    map: Arc<Mapping>,
    side: Side,
    rings: Vec<RingDesc>,
    unlink_on_drop: bool,
    /// This handle holds the attacher slot (made by `open`, not `open_unattached`); dropping
    /// it gives the slot back.
    attached: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("side", &self.side)
            .field("len", &self.map.map.len())
            .field("rings", &self.rings)
            .finish()
    }
}

/// Checks a full segment name.
pub fn valid_name(name: &str) -> bool {
    name.starts_with(PREFIX)
        && name.len() > PREFIX.len()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A fresh name `plugbus.<pid>.<tag>.<n>` unique within this process (tag sanitized).
pub fn unique_name(tag: &str) -> String {
    static NEXT: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
    let n = {
        let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        *next
    };
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{PREFIX}{}.{tag}.{n}", std::process::id())
}

/// The clock heartbeats use (see [`crate::clock`]).
pub use crate::clock::monotonic_ns;

/// Maps a segment file this process just made, shared, with every page faulted in now
/// (`MAP_POPULATE`), so the creator pays no page faults on its first ticks. An opener maps with
/// [`Segment::map_file`] instead: it populates only what it validated.
fn map_segment(file: &File) -> std::io::Result<MmapRaw> {
    memmap2::MmapOptions::new().populate().map_raw(file)
}

/// Where each ring goes (after the reserved header, each on its own page) and the total size.
fn layout(rings: &[RingSpec]) -> Result<(Vec<RingDesc>, u64), SegmentCreateError> {
    if rings.len() > MAX_RINGS {
        return Err(SegmentCreateError::BadRing {
            index: MAX_RINGS,
            reason: format!("at most {MAX_RINGS} rings per segment"),
        });
    }
    let mut descs = Vec::with_capacity(rings.len());
    let mut offset = header::HEADER_RESERVED as u64;
    for (index, spec) in rings.iter().enumerate() {
        let bad = |reason: &str| SegmentCreateError::BadRing {
            index,
            reason: reason.to_owned(),
        };
        let unit = match spec.kind {
            RingKind::Frame => 8,
        };
        if !spec.capacity.is_power_of_two() || spec.capacity < 64 {
            return Err(bad("capacity must be a power of two (at least 64 bytes for frames)"));
        }
        let spec = RingSpec { unit, ..*spec };
        let len = spec
            .region_len()
            .filter(|&l| l <= 1 << 40)
            .ok_or_else(|| bad("ring too large"))?;
        descs.push(RingDesc {
            offset,
            capacity: spec.capacity,
            unit,
            kind: spec.kind as u32,
        });
        offset = (offset + len).next_multiple_of(4096);
    }
    Ok((descs, offset))
}

/// Opens the file of named segment `name` (read-write, close-on-exec).
fn open_named(name: &str) -> Result<File, SegmentOpenError> {
    shm::open(name, true).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SegmentOpenError::NotFound(name.to_owned())
        } else {
            SegmentOpenError::Os {
                op: "shm_open",
                name: name.to_owned(),
                source: e,
            }
        }
    })
}

/// A name for the segment behind an inherited descriptor: the memfd's own name
/// (`memfd:plugbus.<pid>.<tag>.<n>`, read from `/proc/self/fd`), else `fd:<n>`.
fn fd_name(fd: BorrowedFd<'_>) -> String {
    let raw = fd.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .and_then(|p| {
            let p = p.strip_prefix('/')?;
            let p = p.strip_suffix(" (deleted)").unwrap_or(p);
            (p.starts_with(MEMFD_PREFIX) && p.len() <= MAX_NAME + MEMFD_PREFIX.len()).then(|| p.to_owned())
        })
        .unwrap_or_else(|| format!("fd:{raw}"))
}

/// The memfd segments this process created, so that it can inspect its own by name (they have
/// none in `/dev/shm`). Entries hold the mapping weakly: a dropped segment is gone.
mod local {
    use std::sync::{Arc, Mutex, Weak};

    use super::{Mapping, RingDesc, Segment, Side};

    struct Entry {
        name: String,
        map: Weak<Mapping>,
        rings: Vec<RingDesc>,
    }

    static SEGMENTS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    pub(super) fn register(seg: &Segment) {
        let mut all = SEGMENTS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|e| e.map.strong_count() > 0);
        all.push(Entry {
            name: seg.name.clone(),
            map: Arc::downgrade(&seg.map),
            rings: seg.rings.clone(),
        });
    }

    /// A handle on the live memfd segment `name` of this process (unattached, for inspection).
    pub(super) fn find(name: &str) -> Option<Segment> {
        let mut all = SEGMENTS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|e| e.map.strong_count() > 0);
        let e = all.iter().find(|e| e.name == name)?;
        Some(Segment {
            name: e.name.clone(),
            map: e.map.upgrade()?,
            side: Side::Attacher,
            rings: e.rings.clone(),
            unlink_on_drop: false,
            attached: false,
        })
    }
}

impl Segment {
    /// Creates segment `name` with the given rings. The returned segment unlinks the name on
    /// drop.
    ///
    /// Any process of the same user can open a named segment: use names only where that is
    /// trusted (a plugin in attach mode); a launched plugin gets a [`Segment::create_memfd`].
    pub fn create(name: &str, tag: &str, rings: &[RingSpec]) -> Result<Self, SegmentCreateError> {
        if !valid_name(name) {
            return Err(SegmentCreateError::InvalidName(name.to_owned()));
        }
        let (descs, size) = layout(rings)?;
        let os = |op: &'static str| {
            move |source: std::io::Error| SegmentCreateError::Os {
                op,
                name: name.to_owned(),
                source,
            }
        };
        let file = shm::create(name).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                SegmentCreateError::AlreadyExists(name.to_owned())
            } else {
                os("shm_open")(e)
            }
        })?;
        // From here on, a failure must not leave the name behind.
        let cleanup = |e| {
            let _ = shm::unlink(name);
            e
        };
        file.set_len(size).map_err(os("ftruncate")).map_err(cleanup)?;
        let map = map_segment(&file).map_err(os("mmap")).map_err(cleanup)?;
        Ok(Self::init(name.to_owned(), map, tag, &descs, size, true))
    }

    /// Creates an anonymous segment (a memfd) with the given rings: no name exists for it, so no
    /// other process can open it; the returned descriptor is the only way in, to be handed to
    /// one process (a launched plugin inherits it) and then closed. Its size is sealed
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): neither side can truncate it under the
    /// other's mapping.
    ///
    /// Its [`name`](Segment::name) is `memfd:plugbus.<pid>.<tag>.<n>` (the memfd's own name, as
    /// `/proc/<pid>/maps` shows it). While the segment lives, this process can open it for
    /// inspection by that name ([`Segment::open_unattached`]); no other process can.
    pub fn create_memfd(tag: &str, rings: &[RingSpec]) -> Result<(Self, OwnedFd), SegmentCreateError> {
        let (descs, size) = layout(rings)?;
        let memfd_name = unique_name(tag);
        let name = format!("{MEMFD_PREFIX}{memfd_name}");
        let os = |op: &'static str| {
            let name = &name;
            move |source: std::io::Error| SegmentCreateError::Os {
                op,
                name: name.clone(),
                source,
            }
        };
        let file = shm::memfd(&memfd_name).map_err(os("memfd_create"))?;
        file.set_len(size).map_err(os("ftruncate"))?;
        shm::seal(&file).map_err(os("fcntl(F_ADD_SEALS)"))?;
        let map = map_segment(&file).map_err(os("mmap"))?;
        let seg = Self::init(name, map, tag, &descs, size, false);
        local::register(&seg);
        Ok((seg, file.into()))
    }

    /// Writes the header of a fresh mapping, initializes its rings and publishes the magic.
    fn init(name: String, map: MmapRaw, tag: &str, descs: &[RingDesc], size: u64, unlink_on_drop: bool) -> Self {
        let seg = Self {
            name,
            map: Arc::new(Mapping::new(map)),
            side: Side::Creator,
            rings: descs.to_vec(),
            unlink_on_drop,
            attached: false,
        };
        let mut tag_bytes = [0u8; header::TAG_LEN];
        let t = tag.as_bytes();
        let n = t.len().min(header::TAG_LEN);
        tag_bytes[..n].copy_from_slice(&t[..n]);
        let mut ring_array = [RingDesc::default(); MAX_RINGS];
        ring_array[..descs.len()].copy_from_slice(descs);
        let pid = std::process::id();
        let fixed = header::Fixed {
            magic: crate::sync::AtomicU64::new(0),
            version: LAYOUT_VERSION,
            header_size: std::mem::size_of::<Header>() as u32,
            segment_size: size,
            creator_pid: pid,
            ring_count: descs.len() as u32,
            creator_start: stale::process_start_ticks(pid).unwrap_or(0),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tag: tag_bytes,
            rings: ring_array,
            creator_pidns: stale::own_pid_namespace(),
        };
        let hdr = Header {
            fixed: crate::ring::Line(fixed),
            shared: Default::default(),
            creator_heartbeat: Default::default(),
            attacher_heartbeat: Default::default(),
            to_attacher: Default::default(),
            to_creator: Default::default(),
            creator_counters: Default::default(),
            attacher_counters: Default::default(),
        };
        // SAFETY: the mapping is page-aligned (so aligned for Header) and at least
        // HEADER_RESERVED >= size_of::<Header>() bytes (`layout` puts the first ring there); the
        // file was created just now (exclusively by name, or anonymously), and the magic is
        // still 0, so no opener uses the header yet.
        unsafe { seg.map.map.as_mut_ptr().cast::<Header>().write(hdr) };
        for i in 0..descs.len() {
            let region = seg.ring_region(i).expect("ring descriptor just computed");
            crate::ring::init(&region).expect("segment rings are page-aligned and sized");
        }
        seg.header().creator_heartbeat.store(monotonic_ns(), Ordering::Relaxed);
        seg.header().shared.state.store(header::STATE_READY, Ordering::Relaxed);
        // Release: pairs with the Acquire load of `magic` in `validate`: an opener that sees
        // the magic sees the whole header and initialized rings.
        seg.header().fixed.magic.store(MAGIC, Ordering::Release);
        seg
    }

    /// Opens segment `name` as the attacher, checking everything in its header, and records
    /// this process as the attacher. Refused if another live process is attached.
    pub fn open(name: &str) -> Result<Self, SegmentOpenError> {
        if !valid_name(name) {
            return Err(SegmentOpenError::InvalidName(name.to_owned()));
        }
        let file = open_named(name)?;
        Self::map_file(&file, name.to_owned(), true)?.claim()
    }

    /// Opens the segment behind an inherited descriptor (a launched plugin's memfd) as the
    /// attacher, like [`Segment::open`], and closes the descriptor: once mapped, no other
    /// process can reach the segment through this one's `/proc/<pid>/fd`.
    ///
    /// Refused ([`SegmentOpenError::Unsealed`]) unless the file is sealed against shrinking,
    /// growing and further sealing, as [`Segment::create_memfd`] makes it: an unsealed file
    /// could be truncated under the mapping. The descriptor is closed on every path.
    pub fn open_fd(fd: OwnedFd) -> Result<Self, SegmentOpenError> {
        let name = fd_name(fd.as_fd());
        let os = |op: &'static str| {
            let name = &name;
            move |source: std::io::Error| SegmentOpenError::Os {
                op,
                name: name.clone(),
                source,
            }
        };
        // Until it is closed below, a process this one starts must not inherit it.
        shm::set_cloexec(fd.as_fd()).map_err(os("fcntl(F_SETFD)"))?;
        let unsealed = |reason: String| SegmentOpenError::Unsealed {
            name: name.clone(),
            reason,
        };
        let seals = shm::seals(fd.as_fd()).map_err(|e| unsealed(format!("F_GET_SEALS: {e}")))?;
        if seals & shm::SEALS != shm::SEALS {
            return Err(unsealed(format!(
                "seals {seals:#x}, expected at least {:#x} (shrink, grow, seal)",
                shm::SEALS
            )));
        }
        let file = File::from(fd);
        let seg = Self::map_file(&file, name.clone(), true)?;
        // Closes the descriptor; the mapping keeps the memory.
        drop(file);
        seg.claim()
    }

    /// Opens the segment a launched plugin inherited as descriptor `fd` (see
    /// [`Segment::open_fd`]), taking the descriptor over and closing it.
    ///
    /// The descriptor is taken only if it is open and a sealed memory file, and only once per
    /// process: an address naming a descriptor this process uses for something else is refused
    /// without touching it, and a second open of the same number (closed by the first, perhaps
    /// reused since) is refused with [`SegmentOpenError::NotFound`].
    pub fn open_inherited(fd: RawFd) -> Result<Self, SegmentOpenError> {
        static TAKEN: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
        let label = format!("fd:{fd}");
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        if fd < 0 || taken.contains(&fd) {
            return Err(SegmentOpenError::NotFound(format!(
                "{label} (an inherited segment opens once per process, and this one was opened already)"
            )));
        }
        if !shm::is_open(fd) {
            return Err(SegmentOpenError::NotFound(format!(
                "{label} (no such open descriptor: was this process started by a plugbus host?)"
            )));
        }
        // SAFETY: `fd` is open (checked just above, and nothing in this function closes it); the
        // borrow ends before this function returns.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match shm::seals(borrowed) {
            Ok(seals) if seals & shm::SEALS == shm::SEALS => {}
            Ok(seals) => {
                return Err(SegmentOpenError::Unsealed {
                    name: fd_name(borrowed),
                    reason: format!(
                        "seals {seals:#x}, expected at least {:#x} (shrink, grow, seal)",
                        shm::SEALS
                    ),
                });
            }
            Err(e) => {
                return Err(SegmentOpenError::Unsealed {
                    name: fd_name(borrowed),
                    reason: format!("F_GET_SEALS: {e}"),
                });
            }
        }
        taken.push(fd);
        drop(taken);
        // SAFETY: `fd` is open and a sealed memory file, which only the host's `create_memfd`
        // hands to a plugin, at the number its address names: it is this link's descriptor.
        // It was never taken before in this process (TAKEN), so no other owner exists here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::open_fd(owned)
    }

    /// Opens and validates segment `name` without claiming the attacher slot (for inspection).
    /// A memfd segment this process created (see [`Segment::create_memfd`]) opens by its
    /// `memfd:` name; nothing else does.
    pub fn open_unattached(name: &str) -> Result<Self, SegmentOpenError> {
        if name.starts_with(MEMFD_PREFIX) {
            return local::find(name).ok_or_else(|| SegmentOpenError::NotFound(name.to_owned()));
        }
        if !valid_name(name) {
            return Err(SegmentOpenError::InvalidName(name.to_owned()));
        }
        let file = open_named(name)?;
        Self::map_file(&file, name.to_owned(), false)
    }

    /// Maps a segment file after checking it: its size with `fstat`, then its header, read with
    /// `pread` into this process's memory, so a file that fails validation is never mapped, and
    /// nothing large is mapped before its size is known to be the header's. Then the header is
    /// validated again from the mapping (the creator could have changed it in between: the rings
    /// used are the ones mapped), and only then are the pages faulted in (`populate`).
    fn map_file(file: &File, name: String, populate: bool) -> Result<Self, SegmentOpenError> {
        use std::os::unix::fs::FileExt as _;

        let os = |op: &'static str| {
            let name = &name;
            move |source: std::io::Error| SegmentOpenError::Os {
                op,
                name: name.clone(),
                source,
            }
        };
        let actual = file.metadata().map_err(os("fstat"))?.len();
        let min = std::mem::size_of::<Header>() as u64;
        if actual < min {
            return Err(SegmentOpenError::Truncated {
                name,
                expected: min,
                actual,
            });
        }
        let mut copy = std::mem::MaybeUninit::<Header>::zeroed();
        // SAFETY: `copy` is size_of::<Header>() bytes owned by this frame, all initialized
        // (zeroed, padding included); the slice is its only use until it ends.
        let bytes = unsafe { std::slice::from_raw_parts_mut(copy.as_mut_ptr().cast::<u8>(), min as usize) };
        file.read_exact_at(bytes, 0).map_err(os("pread"))?;
        // SAFETY: every byte is initialized (above), and Header holds only integers and atomics,
        // valid for any bit pattern.
        let copy = unsafe { copy.assume_init_ref() };
        validate(copy, &name, actual)?;
        let len = usize::try_from(actual).map_err(|_| SegmentOpenError::Corrupt {
            name: name.clone(),
            reason: format!("{actual} bytes do not fit this process's address space"),
        })?;
        let map = memmap2::MmapOptions::new().len(len).map_raw(file).map_err(os("mmap"))?;
        let mut seg = Self {
            name,
            map: Arc::new(Mapping::new(map)),
            side: Side::Attacher,
            rings: Vec::new(),
            unlink_on_drop: false,
            attached: false,
        };
        seg.rings = validate(seg.header(), &seg.name, actual)?;
        if populate {
            shm::populate(seg.map.map.as_mut_ptr(), seg.map.map.len());
        }
        Ok(seg)
    }

    /// Records this process as the attacher. Refused if another live process is attached.
    fn claim(mut self) -> Result<Self, SegmentOpenError> {
        let me = std::process::id();
        let shared = &self.header().shared;
        let mut current = shared.attacher_pid.load(Ordering::Acquire);
        loop {
            if current != 0 && current != me && stale::pid_alive(current, 0) {
                return Err(SegmentOpenError::AlreadyAttached {
                    name: self.name.clone(),
                    pid: current,
                });
            }
            // AcqRel: pairs with another attacher's CAS, so exactly one wins.
            match shared
                .attacher_pid
                .compare_exchange(current, me, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.header()
            .attacher_heartbeat
            .store(monotonic_ns(), Ordering::Relaxed);
        shared.state.store(header::STATE_ATTACHED, Ordering::Release);
        self.attached = true;
        Ok(self)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which side this process is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.map.len()
    }

    /// Never true (a segment holds at least its header); for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The header. Only its atomics change after creation; the fixed part was validated.
    pub fn header(&self) -> &Header {
        self.map.header()
    }

    /// The attacher's doorbell (`to_attacher`) as a handle any thread may ring, which keeps the
    /// mapping alive for as long as it lives (even after this `Segment` is dropped).
    pub fn attacher_bell(&self) -> AttacherBell {
        AttacherBell { map: self.map.clone() }
    }

    /// The validated ring descriptors.
    pub fn rings(&self) -> &[RingDesc] {
        &self.rings
    }

    /// The region of ring `index` (control block and data), or `None` if there is no such ring.
    pub fn ring_region(&self, index: usize) -> Option<RegionRef> {
        let d = self.rings.get(index)?;
        let len = d.data_bytes() + CONTROL_SIZE as u64;
        let base = NonNull::new(self.map.map.as_mut_ptr())?;
        let owner: Arc<dyn Send + Sync> = self.map.clone();
        // SAFETY: the mapping lives as long as `owner` (an Arc of it); its bytes are accessed only
        // through the ring protocol and header atomics.
        let whole = unsafe { RegionRef::from_raw_parts(base, self.map.map.len(), owner) };
        whole.slice(d.offset as usize, len as usize)
    }

    /// The region of ring `index`, checked to be a frame ring.
    pub fn frame_region(&self, index: usize) -> Result<RegionRef, SegmentOpenError> {
        self.typed_region(index, RingKind::Frame, 8)
    }

    fn typed_region(&self, index: usize, kind: RingKind, unit: u32) -> Result<RegionRef, SegmentOpenError> {
        let corrupt = |reason: String| SegmentOpenError::Corrupt {
            name: self.name.clone(),
            reason,
        };
        let d = self
            .rings
            .get(index)
            .ok_or_else(|| corrupt(format!("no ring {index} ({} rings)", self.rings.len())))?;
        if d.kind != kind as u32 || d.unit != unit {
            return Err(corrupt(format!(
                "ring {index} is kind {} with {}-byte units, expected kind {} with {unit}-byte units",
                d.kind, d.unit, kind as u32
            )));
        }
        self.ring_region(index)
            .ok_or_else(|| corrupt(format!("ring {index} does not fit the mapping")))
    }

    /// Whether the other side truncated the segment: the mapping was replaced by zero pages
    /// (so this process did not die of SIGBUS) and everything read from it is meaningless.
    /// Disconnect the peer.
    pub fn is_broken(&self) -> bool {
        #[cfg(not(loom))]
        return self.map.guard.is_broken();
        #[cfg(loom)]
        return false;
    }

    /// Publishes this side's heartbeat (now).
    pub fn beat(&self) {
        let hb = match self.side {
            Side::Creator => &self.header().creator_heartbeat,
            Side::Attacher => &self.header().attacher_heartbeat,
        };
        hb.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Nanoseconds since the other side's last heartbeat.
    pub fn peer_heartbeat_age_ns(&self) -> u64 {
        let hb = match self.side {
            Side::Creator => &self.header().attacher_heartbeat,
            Side::Attacher => &self.header().creator_heartbeat,
        };
        monotonic_ns().saturating_sub(hb.load(Ordering::Relaxed))
    }

    /// Whether the other side's process is alive (pid check; the creator's start time guards
    /// against pid reuse). `false` if no attacher is recorded.
    pub fn peer_alive(&self) -> bool {
        let f = &self.header().fixed;
        match self.side {
            Side::Attacher => stale::pid_alive(f.creator_pid, f.creator_start),
            Side::Creator => {
                let pid = self.header().shared.attacher_pid.load(Ordering::Acquire);
                pid != 0 && stale::pid_alive(pid, 0)
            }
        }
    }

    /// Keeps the name after drop (e.g. an attacher that was handed creator duties). Mostly for
    /// tests of stale cleanup.
    pub fn leak_name(&mut self) {
        self.unlink_on_drop = false;
    }

    /// Removes a segment name. The memory lives until every mapping is gone.
    pub fn unlink(name: &str) -> std::io::Result<()> {
        shm::unlink(name)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.attached {
            let shared = &self.header().shared;
            let me = std::process::id();
            if shared
                .attacher_pid
                .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let _ = shared.state.compare_exchange(
                    header::STATE_ATTACHED,
                    header::STATE_DETACHED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
        if self.unlink_on_drop {
            let _ = shm::unlink(&self.name);
        }
    }
}

/// Checks every field of an untrusted header against the real size; returns the rings.
fn validate(h: &Header, name: &str, actual: u64) -> Result<Vec<RingDesc>, SegmentOpenError> {
    let corrupt = |reason: String| SegmentOpenError::Corrupt {
        name: name.to_owned(),
        reason,
    };
    // Acquire: pairs with the Release store of `magic` at the end of `create`.
    let magic = h.fixed.magic.load(Ordering::Acquire);
    if magic != MAGIC {
        return Err(SegmentOpenError::NotPlugbus {
            name: name.to_owned(),
            found: magic,
        });
    }
    // SAFETY (for the reads below): plain integer fields of the mapped header; the creator wrote
    // them before the Release store of magic we just acquired, and never writes them again.
    // A hostile creator could, which only yields other integers, and they are all checked.
    let f = &h.fixed;
    if f.version != LAYOUT_VERSION {
        return Err(SegmentOpenError::WrongVersion {
            name: name.to_owned(),
            found: f.version,
            expected: LAYOUT_VERSION,
        });
    }
    if f.header_size as usize != std::mem::size_of::<Header>() {
        return Err(corrupt(format!(
            "header size {} (expected {})",
            f.header_size,
            std::mem::size_of::<Header>()
        )));
    }
    if f.segment_size > actual {
        return Err(SegmentOpenError::Truncated {
            name: name.to_owned(),
            expected: f.segment_size,
            actual,
        });
    }
    if f.segment_size != actual {
        return Err(corrupt(format!(
            "segment size {} but the mapping has {actual} bytes",
            f.segment_size
        )));
    }
    let count = f.ring_count as usize;
    if count > MAX_RINGS {
        return Err(corrupt(format!("{count} rings (at most {MAX_RINGS})")));
    }
    let mut rings: Vec<RingDesc> = f.rings[..count].to_vec();
    for (i, d) in rings.iter().enumerate() {
        let Some(kind) = RingKind::from_u32(d.kind) else {
            return Err(corrupt(format!("ring {i} has unknown kind {}", d.kind)));
        };
        if d.unit != 8 {
            return Err(corrupt(format!("ring {i} has unit {}", d.unit)));
        }
        if !d.capacity.is_power_of_two() || d.capacity < 64 {
            return Err(corrupt(format!(
                "ring {i} capacity {} is not a power of two (at least 64 for frames)",
                d.capacity
            )));
        }
        if d.offset % LINE as u64 != 0 || d.offset < std::mem::size_of::<Header>() as u64 {
            return Err(corrupt(format!("ring {i} offset {} is misplaced", d.offset)));
        }
        let end = kind
            .data_bytes(d.capacity)
            .and_then(|b| b.checked_add(CONTROL_SIZE as u64))
            .and_then(|b| b.checked_add(d.offset));
        match end {
            Some(end) if end <= actual => {}
            Some(end) => {
                return Err(SegmentOpenError::Truncated {
                    name: name.to_owned(),
                    expected: end,
                    actual,
                });
            }
            None => return Err(corrupt(format!("ring {i} size overflows"))),
        }
    }
    let mut sorted = rings.clone();
    sorted.sort_by_key(|d| d.offset);
    for w in sorted.windows(2) {
        let end = w[0].offset + w[0].data_bytes() + CONTROL_SIZE as u64;
        if end > w[1].offset {
            return Err(corrupt(format!("rings at {} and {} overlap", w[0].offset, w[1].offset)));
        }
    }
    rings.shrink_to_fit();
    Ok(rings)
}
