//! The frame ring: variable-length byte frames, written in place and read in place.
//!
//! Positions count bytes and are always multiples of 8. A frame is an 8-byte header
//! `[len: u32][kind: u32]` followed by `len` payload bytes, padded to the next multiple of 8,
//! so every payload starts 8-byte aligned and can be viewed as records in place.
//!
//! A frame never straddles the end of the data area: when it would not fit before the end, the
//! producer writes a *padding frame* (kind [`PADDING`]) that fills the rest of the area and the
//! frame starts at offset 0. The largest frame is half the capacity, which guarantees that an
//! empty ring accepts any legal frame wherever its positions stand.
//!
//! Writes are reserve-then-commit: [`Producer::try_reserve`] lends the payload bytes inside the
//! ring, an encoder writes straight into them, and [`Grant::commit`] publishes the frame with
//! one `tail` store. Reads either copy the payload out with raw-pointer copies
//! ([`Frame::copy_to`], for a reader that does not trust the producer) or lend it in place
//! ([`Frame::payload`], for one that does); dropping the frame releases it.
//!
//! Kind 0 is reserved (zeroed memory is never a frame) and [`PADDING`] is the ring's own;
//! every other `u32` is free for the layers above.

use std::ptr::NonNull;

use super::{CONTROL_SIZE, RegionRef, RingControl, RingError, RingLayoutError, check_region, control};
use crate::sync::Ordering;

/// Frame header size (and the alignment of every frame).
pub const HEADER: usize = 8;
/// The kind of a padding frame.
pub const PADDING: u32 = u32::MAX;

/// Bytes needed for a frame ring with `capacity` data bytes (a power of two, at least 16).
pub const fn region_size(capacity: usize) -> usize {
    CONTROL_SIZE + capacity
}

/// Space a frame with a `len`-byte payload takes in the ring.
#[inline]
pub const fn frame_size(len: usize) -> usize {
    HEADER + len.next_multiple_of(8)
}

/// Initializes `region` as an empty ring and returns both ends (same process).
pub fn channel(region: RegionRef) -> Result<(Producer, Consumer), RingLayoutError> {
    check(&region)?;
    super::init(&region)?;
    Ok((Producer::attach(region.clone())?, Consumer::attach(region)?))
}

fn check(region: &RegionRef) -> Result<u64, RingLayoutError> {
    let units = check_region(region, 8)?;
    if units < 2 {
        return Err(RingLayoutError::TooSmall { len: region.len() });
    }
    Ok(units * 8)
}

struct Ring {
    region: RegionRef,
    data: NonNull<u8>,
    /// Data bytes (power of two).
    capacity: u64,
}

impl Ring {
    fn new(region: RegionRef) -> Result<Self, RingLayoutError> {
        let capacity = check(&region)?;
        // SAFETY: check proved region.len() >= CONTROL_SIZE + 16, so the offset is in bounds.
        let data = unsafe { NonNull::new_unchecked(region.as_ptr().add(CONTROL_SIZE)) };
        Ok(Self { region, data, capacity })
    }

    #[inline]
    fn control(&self) -> &RingControl {
        control(&self.region)
    }

    #[inline]
    fn offset(&self, pos: u64) -> u64 {
        pos & (self.capacity - 1)
    }

    /// Largest payload a frame may carry.
    #[inline]
    fn max_payload(&self) -> usize {
        (self.capacity / 2) as usize - HEADER
    }

    /// Reads the header at data offset `off` (a multiple of 8, `off + 8 <= capacity`).
    #[inline]
    fn read_header(&self, off: u64) -> (u32, u32) {
        self.control().tracker.read(off / 8, 1);
        // SAFETY: off is 8-aligned and off + 8 <= capacity, so both u32 reads are aligned and in
        // bounds. Callers only read headers below an acquired tail, which the producer does not
        // write until the consumer releases them; a hostile producer could still race us, which
        // can only produce wrong numbers (u32 has no invalid values), and those are validated.
        unsafe {
            let p = self.data.as_ptr().add(off as usize).cast::<u32>();
            (p.read_volatile(), p.add(1).read_volatile())
        }
    }

    #[inline]
    fn write_header(&self, off: u64, len: u32, kind: u32) {
        self.control().tracker.write(off / 8, 1);
        // SAFETY: as in read_header, and the producer owns [tail, head + capacity), which
        // contains this header.
        unsafe {
            let p = self.data.as_ptr().add(off as usize).cast::<u32>();
            p.write(len);
            p.add(1).write(kind);
        }
    }
}

/// The writing end of a frame ring. One per ring, in one thread at a time.
pub struct Producer {
    ring: Ring,
    tail: u64,
    cached_head: u64,
    poison: Option<RingError>,
}

// SAFETY: the unique writer of its ring; the region is Send + Sync.
unsafe impl Send for Producer {}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// Not enough free space now; the consumer is behind. Try again later.
    #[error("ring full: {needed} bytes needed, {free} free")]
    Full {
        /// Bytes the frame (and any padding before it) needs.
        needed: usize,
        /// Bytes free now.
        free: usize,
    },
    /// The frame can never fit: its payload exceeds half the ring's capacity.
    #[error("frame of {len} bytes is larger than this ring's maximum of {max}")]
    TooLarge {
        /// Payload length asked for.
        len: usize,
        /// The ring's maximum payload.
        max: usize,
    },
    /// The kind is 0 or [`PADDING`], which the ring reserves.
    #[error("frame kind {0} is reserved")]
    ReservedKind(u32),
    /// The ring is broken.
    #[error(transparent)]
    Broken(#[from] RingError),
}

impl Producer {
    /// Attaches the writing end to an initialized ring region, continuing from its tail.
    pub fn attach(region: RegionRef) -> Result<Self, RingLayoutError> {
        let ring = Ring::new(region)?;
        // Acquire: pairs with the Release stores of a previous producer / the consumer.
        let tail = ring.control().tail.load(Ordering::Acquire);
        let head = ring.control().head.load(Ordering::Acquire);
        let mut p = Self {
            ring,
            tail,
            cached_head: head,
            poison: None,
        };
        if head > tail || tail - head > p.ring.capacity || tail % 8 != 0 || head % 8 != 0 {
            p.poison = Some(RingError::HeadOutOfRange {
                head,
                tail,
                last_head: head,
            });
        }
        Ok(p)
    }

    /// Data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity as usize
    }

    /// The largest payload a frame may carry in this ring.
    pub fn max_payload(&self) -> usize {
        self.ring.max_payload()
    }

    /// The first protocol violation seen, if any.
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    /// Bytes in use as the producer last saw it (refreshes the consumer's head).
    pub fn used(&mut self) -> Result<usize, RingError> {
        self.free(u64::MAX)?;
        Ok((self.tail - self.cached_head) as usize)
    }

    /// Bytes that frames with these payload lengths take when written one after the other
    /// from the current tail: their sizes plus every padding frame the wraps need.
    pub fn bytes_needed(&self, lens: impl IntoIterator<Item = usize>) -> usize {
        let cap = self.ring.capacity;
        let mut off = self.ring.offset(self.tail);
        let mut total = 0u64;
        for len in lens {
            let size = frame_size(len) as u64;
            let contiguous = cap - off;
            if size > contiguous {
                total += contiguous;
                off = 0;
            }
            total += size;
            off = (off + size) & (cap - 1);
        }
        total as usize
    }

    /// Whether `bytes` bytes are free (refreshes the consumer's head only if the cache says
    /// fewer). A frame with a `len`-byte payload needs `frame_size(len)` bytes, plus padding
    /// when it would cross the end of the ring (never for an empty payload).
    #[inline]
    pub fn has_room(&mut self, bytes: usize) -> Result<bool, RingError> {
        Ok(self.free(bytes as u64)? >= bytes as u64)
    }

    /// Free bytes, refreshing `head` if fewer than `want` are known free.
    #[inline]
    fn free(&mut self, want: u64) -> Result<u64, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        let free = self.ring.capacity - (self.tail - self.cached_head);
        if free >= want {
            return Ok(free);
        }
        // Acquire: pairs with the consumer's Release store of `head` in `Consumer::release`,
        // so its reads of the bytes we are about to reuse happened before our writes.
        let head = self.ring.control().head.load(Ordering::Acquire);
        if head < self.cached_head || head > self.tail || head % 8 != 0 {
            let e = RingError::HeadOutOfRange {
                head,
                tail: self.tail,
                last_head: self.cached_head,
            };
            self.poison = Some(e);
            return Err(e);
        }
        self.cached_head = head;
        Ok(self.ring.capacity - (self.tail - head))
    }

    /// Reserves a frame with a `len`-byte payload. Nothing is visible to the consumer until
    /// [`Grant::commit`]; dropping the grant abandons it.
    #[inline]
    pub fn try_reserve(&mut self, len: usize) -> Result<Grant<'_>, ReserveError> {
        let max = self.ring.max_payload();
        if len > max {
            return Err(ReserveError::TooLarge { len, max });
        }
        let total = frame_size(len) as u64;
        let off = self.ring.offset(self.tail);
        let contiguous = self.ring.capacity - off;
        let needed = if total <= contiguous { total } else { contiguous + total };
        let free = self.free(needed)?;
        if free < needed {
            return Err(ReserveError::Full {
                needed: needed as usize,
                free: free as usize,
            });
        }
        let mut start = self.tail;
        if total > contiguous {
            // The padding frame is published together with the frame, by the same tail store.
            self.ring
                .write_header(off, (contiguous - HEADER as u64) as u32, PADDING);
            start += contiguous;
        }
        Ok(Grant {
            start,
            len,
            producer: self,
        })
    }

    /// Copies `payload` into a new frame of `kind`.
    pub fn try_push(&mut self, kind: u32, payload: &[u8]) -> Result<(), ReserveError> {
        if kind == 0 || kind == PADDING {
            return Err(ReserveError::ReservedKind(kind));
        }
        let mut grant = self.try_reserve(payload.len())?;
        grant.bytes_mut().copy_from_slice(payload);
        grant.commit(kind);
        Ok(())
    }
}

/// A reserved, unpublished frame: its payload bytes inside the ring.
pub struct Grant<'a> {
    /// Position of the frame header (after any padding).
    start: u64,
    len: usize,
    producer: &'a mut Producer,
}

impl Grant<'_> {
    /// The reserved payload bytes, to be written in place. Their content is whatever the ring
    /// held before (not zeroed).
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let ring = &self.producer.ring;
        let off = ring.offset(self.start) + HEADER as u64;
        ring.control().tracker.write(off / 8, (self.len as u64).div_ceil(8));
        // SAFETY: try_reserve checked that [start, start + frame_size(len)) is free and does not
        // straddle the end, so these len bytes are in the data area, owned by the producer until
        // commit, and not readable by the consumer (not yet below tail). `&mut self` makes the
        // borrow unique on our side.
        unsafe { std::slice::from_raw_parts_mut(ring.data.as_ptr().add(off as usize), self.len) }
    }

    /// Reserved payload length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the reservation has no payload bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Publishes the frame with its full reserved length.
    #[inline]
    pub fn commit(self, kind: u32) {
        let len = self.len;
        self.commit_len(kind, len);
    }

    /// Publishes the frame with the first `len` bytes (at most the reserved length) as payload.
    ///
    /// # Panics
    /// If `kind` is 0 or [`PADDING`], or `len` exceeds the reservation (caller bugs, not peer
    /// input).
    #[inline]
    pub fn commit_len(self, kind: u32, len: usize) {
        assert!(kind != 0 && kind != PADDING, "frame kind {kind} is reserved");
        assert!(
            len <= self.len,
            "commit of {len} bytes exceeds the reservation of {}",
            self.len
        );
        let p = self.producer;
        p.ring.write_header(p.ring.offset(self.start), len as u32, kind);
        p.tail = self.start + frame_size(len) as u64;
        // Release: pairs with the consumer's Acquire load of `tail` in `Consumer::refresh`, so
        // the header, the payload and any padding frame are visible before the new tail.
        p.ring.control().tail.store(p.tail, Ordering::Release);
    }
}

/// The reading end of a frame ring. One per ring, in one thread at a time.
///
/// Releasing a frame (dropping it) moves the consumer's own `head`; the shared `head`, which the
/// producer reads, is published with one store when the consumer has caught up with the `tail`
/// it last read, when it is about to read `tail` again (so before [`Consumer::try_read`] or
/// [`Consumer::is_empty`] reports an empty ring, and in [`Consumer::used`]), and at least every
/// quarter of the capacity. A consumer working through a backlog thus stores `head` a few times
/// per lap instead of once per frame, and the producer, which reads `head` whenever the ring
/// looks full, is not handed one frame's worth of space at a time. [`Consumer::release`]
/// publishes at once; a consumer dropped with frames released but unpublished leaves them for
/// the next one attached to read again.
pub struct Consumer {
    ring: Ring,
    /// Position of the next frame (everything before it is released).
    head: u64,
    /// The `head` last stored in the shared control block.
    published_head: u64,
    /// Publish once this many released bytes are unpublished (a quarter of the capacity).
    publish_every: u64,
    cached_tail: u64,
    poison: Option<RingError>,
}

// SAFETY: the unique reader of its ring; the region is Send + Sync.
unsafe impl Send for Consumer {}

impl Consumer {
    /// Attaches the reading end to an initialized ring region, continuing from its head.
    pub fn attach(region: RegionRef) -> Result<Self, RingLayoutError> {
        let ring = Ring::new(region)?;
        // Acquire: pairs with the Release stores of the producer / a previous consumer.
        let head = ring.control().head.load(Ordering::Acquire);
        let publish_every = ring.capacity / 4;
        let mut c = Self {
            ring,
            head,
            published_head: head,
            publish_every,
            cached_tail: head,
            poison: None,
        };
        if head % 8 != 0 {
            c.poison = Some(RingError::Misaligned { pos: head });
        }
        Ok(c)
    }

    /// Data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity as usize
    }

    /// The first protocol violation seen, if any.
    pub fn poisoned(&self) -> Option<RingError> {
        self.poison
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.poison = Some(e);
        e
    }

    /// Re-reads `tail` and validates it. Returns the bytes readable.
    #[inline]
    fn refresh(&mut self) -> Result<u64, RingError> {
        self.release();
        // Acquire: pairs with the producer's Release store of `tail` in `Grant::commit_len`, so
        // every frame below the new tail (headers, payloads, padding) is visible.
        let tail = self.ring.control().tail.load(Ordering::Acquire);
        if tail < self.cached_tail {
            return Err(self.fail(RingError::TailMovedBack {
                last: self.cached_tail,
                now: tail,
            }));
        }
        if tail % 8 != 0 {
            return Err(self.fail(RingError::Misaligned { pos: tail }));
        }
        if tail - self.head > self.ring.capacity {
            return Err(self.fail(RingError::TailOutOfRange {
                head: self.head,
                tail,
                capacity: self.ring.capacity,
            }));
        }
        self.cached_tail = tail;
        Ok(tail - self.head)
    }

    /// Whether a frame may be readable (refreshes `tail` when the cache says empty).
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        if self.cached_tail != self.head {
            return Ok(false);
        }
        Ok(self.refresh()? == 0)
    }

    /// Bytes published and not yet released (refreshes `tail`).
    pub fn used(&mut self) -> Result<usize, RingError> {
        if let Some(e) = self.poison {
            return Err(e);
        }
        Ok(self.refresh()? as usize)
    }

    /// Lends the next frame in place, or `None` if the ring is empty. The frame is released
    /// (`head` advances past it) when the returned [`Frame`] is dropped.
    #[inline]
    pub fn try_read(&mut self) -> Result<Option<Frame<'_>>, RingError> {
        if self.is_empty()? {
            return Ok(None);
        }
        // The common case, kept small enough to inline: a real frame that fits everything the
        // slow path checks. Anything else (padding, or a frame that fails a check) goes through
        // the slow path, which reads the same header again and decides.
        let avail = self.cached_tail - self.head;
        let off = self.ring.offset(self.head);
        let (len, kind) = self.ring.read_header(off);
        let total = frame_size(len as usize) as u64;
        let limit = avail.min(self.ring.capacity - off).min(self.ring.capacity / 2);
        if kind != PADDING && kind != 0 && total <= limit {
            return Ok(Some(self.lend(off, len, kind, total)));
        }
        self.try_read_slow()
    }

    /// [`Consumer::try_read`] past a padding frame, or on a header that breaks the protocol.
    #[cold]
    #[inline(never)]
    fn try_read_slow(&mut self) -> Result<Option<Frame<'_>>, RingError> {
        // At most two headers: a padding frame, then a real frame at offset 0. A padding frame
        // at offset 0 would span the whole ring, which no producer writes; it fails validation.
        for _ in 0..2 {
            let avail = self.cached_tail - self.head;
            if avail == 0 {
                // Only padding was left: release it, and publish before reporting empty.
                self.release();
                return Ok(None);
            }
            let off = self.ring.offset(self.head);
            let contiguous = self.ring.capacity - off;
            let (len, kind) = self.ring.read_header(off);
            let total = frame_size(len as usize) as u64;
            if kind == PADDING {
                if total != contiguous || contiguous > avail || off == 0 {
                    let pos = self.head;
                    return Err(self.fail(RingError::BadPadding { pos, len: len.into() }));
                }
                self.head += contiguous;
                continue;
            }
            if kind == 0 {
                let pos = self.head;
                return Err(self.fail(RingError::BadFrameKind { pos }));
            }
            let limit = avail.min(contiguous).min(self.ring.capacity / 2);
            if total > limit {
                let pos = self.head;
                return Err(self.fail(RingError::BadFrameLength {
                    pos,
                    len: len.into(),
                    available: limit.saturating_sub(HEADER as u64),
                }));
            }
            return Ok(Some(self.lend(off, len, kind, total)));
        }
        let pos = self.head;
        Err(self.fail(RingError::BadPadding { pos, len: 0 }))
    }

    /// The frame at data offset `off` (position `head`), whose header was checked: `total`
    /// (its size in the ring) is at most the bytes published and the bytes before the end.
    #[inline]
    fn lend(&mut self, off: u64, len: u32, kind: u32, total: u64) -> Frame<'_> {
        self.ring
            .control()
            .tracker
            .read((off + HEADER as u64) / 8, u64::from(len).div_ceil(8));
        // SAFETY: off + total <= capacity (checked by the callers against the bytes before the
        // end), so the payload lies inside the data area (a pointer into it, no reference).
        let payload = unsafe { self.ring.data.as_ptr().add((off + HEADER as u64) as usize) };
        let next = self.head + total;
        Frame {
            kind,
            payload,
            len: len as usize,
            next,
            consumer: self,
        }
    }

    /// Publishes the consumer's `head`: every frame released so far becomes free space for the
    /// producer. Done by the ring itself at the points listed on [`Consumer`]; call it to hand
    /// space back at once (before pausing mid-backlog, say).
    #[inline]
    pub fn release(&mut self) {
        if self.published_head != self.head {
            self.published_head = self.head;
            // Release: pairs with the producer's Acquire load of `head` in `Producer::free`, so
            // our reads of the released bytes happen before the producer reuses them.
            self.ring.control().head.store(self.head, Ordering::Release);
        }
    }

    /// Releases the frame ending at `next` (moves `head`), publishing when the rules on
    /// [`Consumer`] say so.
    #[inline]
    fn release_to(&mut self, next: u64) {
        self.head = next;
        if next == self.cached_tail || next - self.published_head >= self.publish_every {
            self.release();
        }
    }
}

/// A frame lent in place by [`Consumer::try_read`]; released when dropped.
///
/// Its payload stays in the ring. Two ways to read it:
/// - [`Frame::copy_to`] / [`Frame::copy_into`] copy it out with raw-pointer copies, never
///   forming a Rust reference over ring memory. This is how a reader that does not trust the
///   producer (the host, reading what plugins write) takes its bytes: a producer that breaks the
///   protocol and rewrites a published frame changes at most the bytes copied, never memory
///   the reader holds a `&[u8]` to.
/// - [`Frame::payload`] lends the bytes in place, as `&[u8]`, for a reader that trusts the
///   producer (a plugin reading its host's frames, in place, with no copy).
pub struct Frame<'a> {
    kind: u32,
    /// First payload byte, inside the ring's data area.
    payload: *const u8,
    len: usize,
    next: u64,
    consumer: &'a mut Consumer,
}

impl Frame<'_> {
    /// The frame's kind (never 0 or [`PADDING`]).
    #[inline]
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// Payload length in bytes (at most half the ring's capacity).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload, in place in the ring, 8-byte aligned: the one place the ring lends a
    /// reference to memory another process maps.
    ///
    /// The reference is sound while the producer keeps the ring protocol: it wrote these bytes
    /// before publishing `tail`, and does not write them again until this frame is dropped
    /// (which releases them). Only a reader that trusts its producer should use it (a plugin
    /// reading its host's frames). A reader facing an untrusted producer (the host reading a
    /// plugin's replies) copies with [`Frame::copy_to`] instead, since a producer that breaks
    /// the protocol could change these bytes while they are borrowed.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        // SAFETY: `payload..payload + len` lies in the data area (checked in try_read), which
        // lives as long as the consumer this frame borrows. The bytes are below the acquired
        // tail and not released before this frame drops, so under the ring protocol nothing
        // writes them while the slice lives (see the conditions above).
        unsafe { std::slice::from_raw_parts(self.payload, self.len) }
    }

    /// Copies the payload into `buf` (cleared first; its capacity is reused, so no allocation
    /// once it has grown to the largest frame) with a raw-pointer copy: no reference is formed
    /// over the ring.
    #[inline]
    pub fn copy_to(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(self.len);
        // SAFETY: the source is `len` bytes inside the ring's data area (checked in try_read);
        // the destination has room for `len` bytes (reserved above) and is our own allocation,
        // so the two do not overlap. u8 has no invalid values, so whatever the producer wrote
        // (even concurrently, breaking the protocol) is a valid value; set_len covers exactly
        // the bytes just written.
        unsafe {
            std::ptr::copy_nonoverlapping(self.payload, buf.as_mut_ptr(), self.len);
            buf.set_len(self.len);
        }
    }

    /// Copies the payload into the start of `dst` with a raw-pointer copy (no reference over
    /// the ring) and returns its length, or `None` (nothing copied) if `dst` is too short.
    #[inline]
    pub fn copy_into(&self, dst: &mut [u8]) -> Option<usize> {
        let dst = dst.get_mut(..self.len)?;
        // SAFETY: as in copy_to; `dst` is exactly `len` bytes of the caller's own memory.
        unsafe { std::ptr::copy_nonoverlapping(self.payload, dst.as_mut_ptr(), self.len) };
        Some(self.len)
    }
}

impl Drop for Frame<'_> {
    #[inline]
    fn drop(&mut self) {
        self.consumer.release_to(self.next);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The raw-pointer copies give back exactly the bytes pushed, for frames on either side of
    /// the wrap (the second lap starts with a padding frame), and reuse the buffer.
    #[test]
    fn copies_equal_what_was_written_across_the_wrap() {
        let (mut tx, mut rx) = channel(RegionRef::heap(region_size(256))).unwrap();
        let mut buf = Vec::with_capacity(128);
        let cap = buf.capacity();
        let mut dst = [0u8; 128];
        let mut wrapped = false;
        for round in 0u8..40 {
            // 40 bytes of payload, 48 in the ring: 256 is not a multiple of 48, so the frames
            // fall on every offset and some need a padding frame before them.
            let payload: Vec<u8> = (0..40).map(|i| round.wrapping_mul(31).wrapping_add(i)).collect();
            let before = tx.ring.offset(tx.tail);
            tx.try_push(u32::from(round) + 1, &payload).unwrap();
            wrapped |= before + frame_size(payload.len()) as u64 > 256;
            let f = rx.try_read().unwrap().expect("a frame");
            assert_eq!(f.kind(), u32::from(round) + 1);
            assert_eq!((f.len(), f.is_empty()), (40, false));
            f.copy_to(&mut buf);
            assert_eq!(buf, payload, "round {round}");
            assert_eq!(f.copy_into(&mut dst), Some(40));
            assert_eq!(&dst[..40], &payload[..]);
            assert_eq!(f.copy_into(&mut dst[..39]), None, "a short destination is refused");
            assert_eq!(f.payload(), &payload[..]);
        }
        assert!(wrapped, "no frame needed a padding frame");
        assert_eq!(buf.capacity(), cap, "the buffer was reallocated");
        // An empty frame copies to an empty buffer.
        tx.try_push(3, &[]).unwrap();
        let f = rx.try_read().unwrap().expect("a frame");
        f.copy_to(&mut buf);
        assert!(buf.is_empty() && f.is_empty());
    }
}
