//! The movement fast path: fixed-size move records in packed frames, read in place.
//!
//! A move frame is one frame of kind [`KIND_MOVES`] in a frame ring:
//!
//! ```text
//! [MoveFrameHeader: tick u64, count u32, flags u32][MoveRecord x count]
//! ```
//!
//! The frame payload is 8-byte aligned (a frame ring guarantee) and the header is 16 bytes, so
//! the records are aligned for [`MoveRecord`] and the reader lends them as `&[MoveRecord]`
//! straight from shared memory: no copy, no decoding. One frame per tick (or a few, when a tick
//! has more records than one frame may hold) means one publish and one wake-up per tick.
//!
//! For transports that are not shared memory, [`MoveRecord`] converts to and from the
//! df.plugin messages `PlayerMoveEvent` and `PlayerMovementsPacked`.
//!
//! ```
//! use plugbus::fastpath::{self, MoveRecord};
//! use plugbus::ring::{frame, RegionRef};
//!
//! let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 16))).unwrap();
//! let moves = [MoveRecord::new([7; 16], [1.0, 64.0, -3.5], 90.0, 0.0)];
//! assert_eq!(fastpath::write_frame(&mut tx, 42, 0, &moves).unwrap(), 1);
//! let f = rx.try_read().unwrap().unwrap();
//! let (header, records) = fastpath::parse(f.payload()).unwrap();
//! assert_eq!((header.tick, records), (42, &moves[..]));
//! ```

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::proto;
use crate::ring::frame::{self, ReserveError};

/// Frame kind of a move frame.
pub const KIND_MOVES: u32 = 3;

/// Flag: the records were conflated (the plugin lagged; each player's latest position only).
pub const FLAG_CONFLATED: u32 = 1;
/// Flag: more frames of the same tick follow.
pub const FLAG_MORE: u32 = 2;

/// One player's position and rotation: 48 bytes, no padding, any bit pattern valid.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MoveRecord {
    /// The player's UUID, 16 raw bytes (RFC 4122 byte order).
    pub uuid: [u8; 16],
    /// Position x.
    pub x: f64,
    /// Position y.
    pub y: f64,
    /// Position z.
    pub z: f64,
    /// Rotation yaw, degrees.
    pub yaw: f32,
    /// Rotation pitch, degrees.
    pub pitch: f32,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<MoveRecord>() == 48);
    assert!(align_of::<MoveRecord>() == 8);
    assert!(offset_of!(MoveRecord, uuid) == 0);
    assert!(offset_of!(MoveRecord, x) == 16);
    assert!(offset_of!(MoveRecord, y) == 24);
    assert!(offset_of!(MoveRecord, z) == 32);
    assert!(offset_of!(MoveRecord, yaw) == 40);
    assert!(offset_of!(MoveRecord, pitch) == 44);
};

impl MoveRecord {
    /// A record from a UUID, a position `[x, y, z]`, and a rotation.
    pub const fn new(uuid: [u8; 16], pos: [f64; 3], yaw: f32, pitch: f32) -> Self {
        Self {
            uuid,
            x: pos[0],
            y: pos[1],
            z: pos[2],
            yaw,
            pitch,
        }
    }
}

/// The 16 bytes before the records of a move frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MoveFrameHeader {
    /// The host's tick number.
    pub tick: u64,
    /// Number of records that follow.
    pub count: u32,
    /// [`FLAG_CONFLATED`], [`FLAG_MORE`].
    pub flags: u32,
}

impl MoveFrameHeader {
    /// The plugin lagged: the records are each player's latest position over several ticks,
    /// some of which it never saw ([`FLAG_CONFLATED`]).
    #[inline]
    pub fn is_conflated(&self) -> bool {
        self.flags & FLAG_CONFLATED != 0
    }

    /// The tick's records go on in the next frame ([`FLAG_MORE`]).
    #[inline]
    pub fn continues(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

const _: () = {
    assert!(std::mem::size_of::<MoveFrameHeader>() == 16);
    assert!(std::mem::size_of::<MoveFrameHeader>() % std::mem::align_of::<MoveRecord>() == 0);
};

const HEADER_LEN: usize = std::mem::size_of::<MoveFrameHeader>();
const RECORD_LEN: usize = std::mem::size_of::<MoveRecord>();

/// Why a move frame payload was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoveFrameError {
    /// Shorter than a header.
    #[error("move frame of {0} bytes is shorter than its 16-byte header")]
    Short(usize),
    /// The count does not match the payload length.
    #[error("move frame claims {count} records but carries {bytes} bytes of records")]
    CountMismatch {
        /// Count in the header.
        count: u32,
        /// Bytes after the header.
        bytes: usize,
    },
    /// The payload is not aligned for records (cannot happen with a frame ring).
    #[error("move frame payload is not 8-byte aligned")]
    Misaligned,
}

/// Largest number of records one frame of `producer`'s ring can carry.
#[inline]
pub fn max_records_per_frame(producer: &frame::Producer) -> usize {
    (producer.max_payload() - HEADER_LEN) / RECORD_LEN
}

/// Writes `records` as move frames of tick `tick` (several frames with [`FLAG_MORE`] if they do
/// not fit in one), each with one publish. All or nothing: if the ring lacks room for every
/// frame, nothing is written and `Full` is returned. Returns the number of frames written.
#[inline]
pub fn write_frame(
    producer: &mut frame::Producer,
    tick: u64,
    flags: u32,
    records: &[MoveRecord],
) -> Result<usize, ReserveError> {
    // The common case, a tick that fits one frame: one reservation, one publish, no more.
    if records.len() <= max_records_per_frame(producer) {
        write_one(producer, tick, flags, records)?;
        return Ok(1);
    }
    write_frames(producer, tick, flags, records)
}

/// [`write_frame`] for a tick that needs more than one frame.
#[inline(never)]
fn write_frames(
    producer: &mut frame::Producer,
    tick: u64,
    flags: u32,
    records: &[MoveRecord],
) -> Result<usize, ReserveError> {
    let per = max_records_per_frame(producer).max(1);
    let frames = records.len().div_ceil(per);
    // Check room for the whole tick first (padding included), so a tick is never
    // half-delivered.
    let needed = producer.bytes_needed(records.chunks(per).map(|c| HEADER_LEN + c.len() * RECORD_LEN));
    if needed > producer.capacity() {
        return Err(ReserveError::TooLarge {
            len: needed,
            max: producer.capacity(),
        });
    }
    if !producer.has_room(needed)? {
        let free = producer.capacity() - producer.used()?;
        return Err(ReserveError::Full { needed, free });
    }
    let mut chunks = records.chunks(per).peekable();
    while let Some(chunk) = chunks.next() {
        let more = if chunks.peek().is_some() { FLAG_MORE } else { 0 };
        write_one(producer, tick, flags | more, chunk)?;
    }
    Ok(frames)
}

#[inline]
fn write_one(
    producer: &mut frame::Producer,
    tick: u64,
    flags: u32,
    records: &[MoveRecord],
) -> Result<(), ReserveError> {
    let mut grant = producer.try_reserve(HEADER_LEN + records.len() * RECORD_LEN)?;
    let header = MoveFrameHeader {
        tick,
        count: records.len() as u32,
        flags,
    };
    let (head, body) = grant.bytes_mut().split_at_mut(HEADER_LEN);
    head.copy_from_slice(header.as_bytes());
    // Record by record: fixed 48-byte copies the compiler inlines, where one copy of a length
    // known only at run time is a call to memcpy (most of the cost of a one-record frame).
    for (dst, r) in body.chunks_exact_mut(RECORD_LEN).zip(records) {
        dst.copy_from_slice(r.as_bytes());
    }
    grant.commit(KIND_MOVES);
    Ok(())
}

/// Builds one move frame in place in the ring: reserve room for up to `max` records, push them
/// one by one straight into shared memory, and publish once with [`MoveFrameWriter::finish`].
pub struct MoveFrameWriter<'a> {
    grant: frame::Grant<'a>,
    tick: u64,
    flags: u32,
    count: usize,
    max: usize,
}

impl<'a> MoveFrameWriter<'a> {
    /// Reserves a frame for up to `max` records (clamped to what one frame may carry).
    pub fn begin(producer: &'a mut frame::Producer, tick: u64, max: usize) -> Result<Self, ReserveError> {
        let max = max.min(max_records_per_frame(producer));
        let grant = producer.try_reserve(HEADER_LEN + max * RECORD_LEN)?;
        Ok(Self {
            grant,
            tick,
            flags: 0,
            count: 0,
            max,
        })
    }

    /// Appends one record in place; `false` if the reservation is full.
    #[inline]
    pub fn push(&mut self, record: &MoveRecord) -> bool {
        if self.count == self.max {
            return false;
        }
        let at = HEADER_LEN + self.count * RECORD_LEN;
        self.grant.bytes_mut()[at..at + RECORD_LEN].copy_from_slice(record.as_bytes());
        self.count += 1;
        true
    }

    /// Sets frame flags.
    pub fn set_flags(&mut self, flags: u32) {
        self.flags = flags;
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Publishes the frame with the records pushed (one tail store).
    pub fn finish(mut self) {
        let header = MoveFrameHeader {
            tick: self.tick,
            count: self.count as u32,
            flags: self.flags,
        };
        self.grant.bytes_mut()[..HEADER_LEN].copy_from_slice(header.as_bytes());
        let len = HEADER_LEN + self.count * RECORD_LEN;
        self.grant.commit_len(KIND_MOVES, len);
    }
}

/// Parses a move frame payload into its header and records, lent in place.
#[inline]
pub fn parse(payload: &[u8]) -> Result<(MoveFrameHeader, &[MoveRecord]), MoveFrameError> {
    let (header, body) =
        MoveFrameHeader::read_from_prefix(payload).map_err(|_| MoveFrameError::Short(payload.len()))?;
    if body.len() != header.count as usize * RECORD_LEN {
        return Err(MoveFrameError::CountMismatch {
            count: header.count,
            bytes: body.len(),
        });
    }
    let records = <[MoveRecord]>::ref_from_bytes(body).map_err(|_| MoveFrameError::Misaligned)?;
    Ok((header, records))
}

/// Formats a UUID's 16 bytes as the hyphenated lowercase text the df.plugin messages carry.
pub fn uuid_to_string(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).hyphenated().to_string()
}

/// Parses a UUID from df.plugin text (any form the `uuid` crate accepts); `None` if invalid.
pub fn uuid_from_str(s: &str) -> Option<[u8; 16]> {
    uuid::Uuid::try_parse(s).ok().map(|u| u.into_bytes())
}

impl MoveRecord {
    /// The df.plugin envelope form (one `PlayerMoveEvent` per player), for transports that are
    /// not shared memory. `name` and `world` are not part of a record and are passed in.
    pub fn to_move_event(&self, name: &str, world: &str) -> proto::PlayerMoveEvent {
        proto::PlayerMoveEvent {
            player_uuid: uuid_to_string(&self.uuid),
            name: name.to_owned(),
            world: world.to_owned(),
            position: Some(proto::Vec3 {
                x: self.x,
                y: self.y,
                z: self.z,
            }),
            rotation: Some(proto::Rotation {
                yaw: self.yaw,
                pitch: self.pitch,
            }),
        }
    }

    /// From a `PlayerMoveEvent`; `None` if its UUID does not parse. Missing position or
    /// rotation count as zero.
    pub fn from_move_event(e: &proto::PlayerMoveEvent) -> Option<Self> {
        let pos = e.position.unwrap_or_default();
        let rot = e.rotation.unwrap_or_default();
        Some(Self::new(
            uuid_from_str(&e.player_uuid)?,
            [pos.x, pos.y, pos.z],
            rot.yaw,
            rot.pitch,
        ))
    }

    /// The df.plugin packed form. Positions become `f32` there (the protocol's choice), so this
    /// conversion rounds them.
    pub fn to_packed(&self) -> proto::PackedPlayerMove {
        proto::PackedPlayerMove {
            player_uuid_bytes: self.uuid.to_vec(),
            x: self.x as f32,
            y: self.y as f32,
            z: self.z as f32,
            yaw: self.yaw,
            pitch: self.pitch,
        }
    }

    /// From the packed form; `None` unless the UUID has exactly 16 bytes.
    pub fn from_packed(p: &proto::PackedPlayerMove) -> Option<Self> {
        let uuid: [u8; 16] = p.player_uuid_bytes.as_slice().try_into().ok()?;
        Some(Self::new(
            uuid,
            [f64::from(p.x), f64::from(p.y), f64::from(p.z)],
            p.yaw,
            p.pitch,
        ))
    }
}

/// All records as one `PlayerMovementsPacked` message of tick `tick` with frame `flags`.
pub fn to_packed(tick: u64, flags: u32, records: &[MoveRecord]) -> proto::PlayerMovementsPacked {
    proto::PlayerMovementsPacked {
        moves: records.iter().map(MoveRecord::to_packed).collect(),
        tick,
        flags,
    }
}

/// Records from a `PlayerMovementsPacked` into `out` (cleared first), skipping entries whose
/// UUID is not 16 bytes; returns how many were skipped.
pub fn from_packed(p: &proto::PlayerMovementsPacked, out: &mut Vec<MoveRecord>) -> usize {
    out.clear();
    let mut bad = 0;
    for m in &p.moves {
        match MoveRecord::from_packed(m) {
            Some(r) => out.push(r),
            None => bad += 1,
        }
    }
    bad
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ring::RegionRef;

    /// A tick of more records than one frame holds goes out as several frames (all but the
    /// last flagged "more"), whole, wherever the ring's positions stand, and the reader gets
    /// every record in order; a tick larger than the ring is refused as too large.
    #[test]
    fn a_tick_larger_than_a_frame_is_written_whole_in_several_frames() {
        let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 12))).unwrap();
        let per = max_records_per_frame(&tx);
        let records: Vec<MoveRecord> = (0..per + 3)
            .map(|i| MoveRecord::new([i as u8; 16], [i as f64, 0.0, 0.0], 0.0, 0.0))
            .collect();
        for tick in 0..40u64 {
            // A one-record frame between ticks moves the ring's positions around.
            write_frame(&mut tx, 1000 + tick, 0, &records[..1]).unwrap();
            assert_eq!(write_frame(&mut tx, tick, 0, &records).unwrap(), 2);
            let one = rx.try_read().unwrap().unwrap();
            assert_eq!(parse(one.payload()).unwrap().0.tick, 1000 + tick);
            drop(one);
            let mut got = Vec::new();
            for k in 0..2 {
                let f = rx.try_read().unwrap().expect("every frame of the tick");
                let (h, r) = parse(f.payload()).unwrap();
                assert_eq!((h.tick, h.continues()), (tick, k < 1));
                got.extend_from_slice(r);
            }
            assert_eq!(got, records);
        }
        // Two full frames and one more record: more than the whole ring.
        let huge = vec![MoveRecord::default(); 2 * per + 1];
        assert!(matches!(
            write_frame(&mut tx, 0, 0, &huge),
            Err(ReserveError::TooLarge { .. })
        ));
    }
}
