//! A hostile peer: random bytes written over a ring's positions, frame headers and payload
//! while the ring is used. Whatever it does, the reading side must return an error or valid
//! data, never panic, never hang, never lend memory outside the region, and once it has
//! returned an error it must keep returning that same error (poisoned).
//!
//! Layout facts used here (documented in `ring`): the region starts with a 256-byte control
//! block, `tail` (u64) at offset 0 and `head` (u64) at offset 128; then the data area. A frame
//! header is `[len: u32][kind: u32]` at the frame's 8-aligned offset in the data area.
//!
//! Four kinds of test: every `RingError` variant provoked on purpose; a deterministic loop
//! (scribble, then use the ring, single thread); a scribbler thread racing a reader; and a
//! scribbler in another process racing a reader over a real shared-memory segment.

use std::panic::AssertUnwindSafe;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugbus::ring::{self, CONTROL_SIZE, RegionRef, RingError, frame};
use plugbus::segment::{RingSpec, Segment, unique_name};
use plugbus::sync::{AtomicBool, AtomicU64, Ordering};

const TAIL: usize = 0;
const HEAD: usize = 128;
/// How long any reader may run before it counts as hung.
const WATCHDOG: Duration = Duration::from_secs(60);

#[test]
fn layout_facts_hold() {
    assert_eq!(CONTROL_SIZE, 256);
    let region = RegionRef::heap(frame::region_size(256));
    let (mut tx, mut rx) = frame::channel(region.clone()).unwrap();
    tx.try_push(7, b"abc").unwrap();
    assert_eq!(read_u64(&region, TAIL), 16);
    assert_eq!(read_u32(&region, CONTROL_SIZE), 3);
    assert_eq!(read_u32(&region, CONTROL_SIZE + 4), 7);
    drop(rx.try_read().unwrap().unwrap());
    assert_eq!(read_u64(&region, HEAD), 16);
}

// ------------------------------------------------------------------------------------------
// Raw access to a region, as a hostile peer would do it
// ------------------------------------------------------------------------------------------

/// The shared position word at `off` (TAIL or HEAD) as the atomic the ring uses for it.
fn position(region: &RegionRef, off: usize) -> &AtomicU64 {
    assert!(off == TAIL || off == HEAD);
    assert!(region.len() >= CONTROL_SIZE);
    // SAFETY: the region is at least CONTROL_SIZE bytes and 128-aligned (RegionRef::heap is
    // page-aligned; segment rings are page-aligned), so offsets 0 and 128 hold aligned u64s.
    // They are exactly the ring's `tail` / `head`, which are `plugbus::sync::AtomicU64`
    // (`#[repr(transparent)]` over the std atomic, valid for every bit pattern), and the ring
    // itself only accesses them atomically; the region outlives the returned borrow.
    unsafe { &*region.as_ptr().add(off).cast::<AtomicU64>() }
}

/// Stores a position the way a peer that breaks the protocol would (atomically, so the only
/// thing wrong is the value).
fn set_pos(region: &RegionRef, off: usize, v: u64) {
    position(region, off).store(v, Ordering::Release);
}

fn read_u64(region: &RegionRef, off: usize) -> u64 {
    position(region, off).load(Ordering::Acquire)
}

fn read_u32(region: &RegionRef, off: usize) -> u32 {
    assert!(off % 4 == 0 && off + 4 <= region.len());
    // SAFETY: in bounds and 4-aligned (checked above; the region base is page-aligned). Only
    // used in single-threaded tests, where nothing writes the region concurrently.
    unsafe { region.as_ptr().add(off).cast::<u32>().read_volatile() }
}

/// Writes raw bytes at byte offset `off` of the region (the data area is not atomic).
fn poke(region: &RegionRef, off: usize, bytes: &[u8]) {
    assert!(
        off >= CONTROL_SIZE && off + bytes.len() <= region.len(),
        "poke outside the data area"
    );
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: off + i < region.len() (asserted above), and the region stays alive while
        // `region` is borrowed, so the byte is valid for writes. The data area is plain bytes
        // with no validity invariant. In the racing tests another thread may read the same
        // byte at the same time: that is the hostile peer being simulated, and exactly the
        // situation the ring claims to survive (it only reads headers with volatile loads and
        // validates them; the tests never read payload bytes that a scribbler may be writing).
        unsafe { std::ptr::write_volatile(region.as_ptr().add(off + i), b) };
    }
}

/// Writes a frame header `[len][kind]` at data-area offset `off`.
fn put_header(region: &RegionRef, off: usize, len: u32, kind: u32) {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_ne_bytes());
    h[4..].copy_from_slice(&kind.to_ne_bytes());
    poke(region, CONTROL_SIZE + off, &h);
}

/// `[ptr, ptr + bytes)` lies in the region's data area.
fn in_data_area(region: &RegionRef, ptr: *const u8, bytes: usize) -> bool {
    let start = region.as_ptr() as usize + CONTROL_SIZE;
    let end = region.as_ptr() as usize + region.len();
    let p = ptr as usize;
    p >= start && p.checked_add(bytes).is_some_and(|e| e <= end)
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// A position a hostile peer might write: mostly near the current one (so that the ring goes
/// on and deeper checks are reached), sometimes anything. `cap`: the ring's data bytes.
fn hostile_position(rng: &mut Rng, current: u64, cap: usize) -> u64 {
    let cap = cap as u64;
    match rng.below(8) {
        0 => rng.next(),
        1 => rng.below(4 * cap),
        2 => current.wrapping_sub(8 * (1 + rng.below(4))),
        3 => current.wrapping_add(rng.below(8)),
        4 => current.wrapping_add(cap + 8 * rng.below(4)),
        _ => current.wrapping_add(8 * rng.below(cap / 8 + 1)),
    }
}

/// One hostile write over a frame ring of `cap` data bytes: a position, a frame header, or
/// payload bytes.
fn scribble(region: &RegionRef, cap: usize, rng: &mut Rng) {
    let (head, tail) = ring::positions(region);
    match rng.below(8) {
        0 | 1 => set_pos(region, TAIL, hostile_position(rng, tail, cap)),
        2 => set_pos(region, HEAD, hostile_position(rng, head, cap)),
        3..=5 => {
            // A header: at the next frame to read, or anywhere 8-aligned.
            let off = if rng.chance(2) {
                (head as usize) & (cap - 1) & !7
            } else {
                rng.below(cap as u64 / 8) as usize * 8
            };
            let len = match rng.below(6) {
                0 => rng.next() as u32,
                1 => (cap - off - 8) as u32,
                2 => (cap / 2 - 8 + rng.below(16) as usize) as u32,
                _ => rng.below(64) as u32,
            };
            let kind = match rng.below(5) {
                0 => 0,
                1 => frame::PADDING,
                2 => rng.next() as u32,
                _ => 1 + rng.below(8) as u32,
            };
            put_header(region, off, len, kind);
        }
        _ => {
            let off = rng.below(cap as u64) as usize;
            poke(region, CONTROL_SIZE + off, &[rng.next() as u8]);
        }
    }
}

/// Runs `f` in its own thread under `catch_unwind`, failing if it panics or is still running
/// after [`WATCHDOG`] (it is then left behind: the test has failed anyway).
fn under_watchdog<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let handle = std::thread::spawn(move || std::panic::catch_unwind(AssertUnwindSafe(f)));
    let start = Instant::now();
    while !handle.is_finished() {
        assert!(
            start.elapsed() < WATCHDOG,
            "{what} hung: still running after {WATCHDOG:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    match handle.join().expect("the watchdog thread itself does not panic") {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("{what} panicked: {msg}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// Poisoning
// ------------------------------------------------------------------------------------------

/// After `e`, every call of the frame consumer returns `e` again.
fn frame_consumer_poisoned(rx: &mut frame::Consumer, e: RingError) -> Result<(), String> {
    let again = [
        rx.poisoned(),
        rx.try_read().map(|_| ()).err(),
        rx.is_empty().err(),
        rx.used().err(),
    ];
    for (i, got) in again.iter().enumerate() {
        if *got != Some(e) {
            return Err(format!("frame consumer call {i} after {e:?} returned {got:?}"));
        }
    }
    Ok(())
}

fn frame_producer_poisoned(tx: &mut frame::Producer, e: RingError) -> Result<(), String> {
    let b = frame::ReserveError::Broken(e);
    let again = [
        tx.try_push(1, b"x").err(),
        tx.try_reserve(0).map(|_| ()).err(),
        tx.used().err().map(frame::ReserveError::Broken),
        tx.poisoned().map(frame::ReserveError::Broken),
    ];
    for (i, got) in again.iter().enumerate() {
        if *got != Some(b) {
            return Err(format!("frame producer call {i} after {e:?} returned {got:?}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Every error variant, provoked on purpose
// ------------------------------------------------------------------------------------------

const FCAP: usize = 256;

fn frames() -> (RegionRef, frame::Producer, frame::Consumer) {
    let region = RegionRef::heap(frame::region_size(FCAP));
    let (tx, rx) = frame::channel(region.clone()).unwrap();
    (region, tx, rx)
}

/// Brings both positions of a fresh frame ring to `pos` with legitimate frames.
fn advance(tx: &mut frame::Producer, rx: &mut frame::Consumer, pos: u64) {
    let mut at = 0u64;
    while at < pos {
        let len = ((pos - at).min(64) - 8) as usize;
        tx.try_push(1, &vec![0; len]).unwrap();
        drop(rx.try_read().unwrap().unwrap());
        at += frame::frame_size(len) as u64;
    }
    assert_eq!(at, pos);
}

/// Checks the consumer's error, its poisoning, and that repairing the region does not cure it.
fn expect_consumer_error(region: &RegionRef, rx: &mut frame::Consumer, want: RingError) {
    let got = rx.try_read().map(|f| f.map(|f| (f.kind(), f.payload().len())));
    assert_eq!(got, Err(want));
    frame_consumer_poisoned(rx, want).unwrap();
    // Make the region look healthy again: still poisoned.
    let (head, _) = ring::positions(region);
    set_pos(region, TAIL, head);
    frame_consumer_poisoned(rx, want).unwrap();
}

#[test]
fn frame_tail_beyond_capacity() {
    let (region, _tx, mut rx) = frames();
    set_pos(&region, TAIL, FCAP as u64 + 8);
    let want = RingError::TailOutOfRange {
        head: 0,
        tail: FCAP as u64 + 8,
        capacity: FCAP as u64,
    };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_tail_moved_back() {
    let (region, mut tx, mut rx) = frames();
    tx.try_push(3, &[1; 20]).unwrap();
    tx.try_push(3, &[2; 20]).unwrap();
    drop(rx.try_read().unwrap().unwrap());
    drop(rx.try_read().unwrap().unwrap());
    set_pos(&region, TAIL, 8);
    let want = RingError::TailMovedBack { last: 64, now: 8 };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_tail_misaligned() {
    let (region, _tx, mut rx) = frames();
    set_pos(&region, TAIL, 12);
    expect_consumer_error(&region, &mut rx, RingError::Misaligned { pos: 12 });
}

#[test]
fn frame_head_misaligned_at_attach() {
    let (region, _tx, _rx) = frames();
    set_pos(&region, HEAD, 4);
    set_pos(&region, TAIL, 4);
    let mut rx = frame::Consumer::attach(region.clone()).unwrap();
    frame_consumer_poisoned(&mut rx, RingError::Misaligned { pos: 4 }).unwrap();
    let mut tx = frame::Producer::attach(region.clone()).unwrap();
    let want = RingError::HeadOutOfRange {
        head: 4,
        tail: 4,
        last_head: 4,
    };
    frame_producer_poisoned(&mut tx, want).unwrap();
}

#[test]
fn frame_kind_zero() {
    let (region, _tx, mut rx) = frames();
    put_header(&region, 0, 4, 0);
    set_pos(&region, TAIL, 16);
    expect_consumer_error(&region, &mut rx, RingError::BadFrameKind { pos: 0 });
}

#[test]
fn frame_length_beyond_tail() {
    let (region, _tx, mut rx) = frames();
    put_header(&region, 0, 100, 5);
    set_pos(&region, TAIL, 16);
    let want = RingError::BadFrameLength {
        pos: 0,
        len: 100,
        available: 8,
    };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_length_beyond_half_capacity() {
    let (region, _tx, mut rx) = frames();
    // The ring is "full", the frame would fit in it, but no legal frame is that large.
    put_header(&region, 0, (FCAP / 2) as u32, 5);
    set_pos(&region, TAIL, FCAP as u64);
    let want = RingError::BadFrameLength {
        pos: 0,
        len: (FCAP / 2) as u64,
        available: (FCAP / 2 - 8) as u64,
    };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_length_huge() {
    let (region, _tx, mut rx) = frames();
    put_header(&region, 0, u32::MAX, 5);
    set_pos(&region, TAIL, FCAP as u64);
    let got = rx.try_read().map(|f| f.is_some());
    assert!(
        matches!(got, Err(RingError::BadFrameLength { pos: 0, len, .. }) if len == u64::from(u32::MAX)),
        "{got:?}"
    );
}

#[test]
fn frame_length_past_the_end_of_the_area() {
    let (region, mut tx, mut rx) = frames();
    advance(&mut tx, &mut rx, 240);
    // 16 bytes to the end; a 24-byte payload would run 16 bytes past it.
    put_header(&region, 240, 24, 5);
    set_pos(&region, TAIL, 240 + 32);
    let want = RingError::BadFrameLength {
        pos: 240,
        len: 24,
        available: 8,
    };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_padding_short_of_the_end() {
    let (region, mut tx, mut rx) = frames();
    advance(&mut tx, &mut rx, 224);
    put_header(&region, 224, 8, frame::PADDING);
    set_pos(&region, TAIL, 224 + 64);
    let want = RingError::BadPadding { pos: 224, len: 8 };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_padding_beyond_tail() {
    let (region, mut tx, mut rx) = frames();
    advance(&mut tx, &mut rx, 224);
    // A padding frame that does reach the end, but the tail says only 8 bytes are published.
    put_header(&region, 224, 24, frame::PADDING);
    set_pos(&region, TAIL, 224 + 8);
    let want = RingError::BadPadding { pos: 224, len: 24 };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_padding_at_offset_zero() {
    let (region, _tx, mut rx) = frames();
    put_header(&region, 0, (FCAP - 8) as u32, frame::PADDING);
    set_pos(&region, TAIL, FCAP as u64);
    let want = RingError::BadPadding {
        pos: 0,
        len: (FCAP - 8) as u64,
    };
    expect_consumer_error(&region, &mut rx, want);
}

#[test]
fn frame_padding_after_padding() {
    let (region, mut tx, mut rx) = frames();
    advance(&mut tx, &mut rx, 240);
    put_header(&region, 240, 8, frame::PADDING);
    put_header(&region, 0, (FCAP - 8) as u32, frame::PADDING);
    set_pos(&region, TAIL, 240 + 16 + 64);
    let want = RingError::BadPadding {
        pos: FCAP as u64,
        len: (FCAP - 8) as u64,
    };
    expect_consumer_error(&region, &mut rx, want);
}

/// A padding frame that is published alone (no frame after it) is skipped and the ring reads
/// as empty: harmless, and the consumer stays usable.
#[test]
fn frame_padding_alone_reads_empty() {
    let (region, mut tx, mut rx) = frames();
    advance(&mut tx, &mut rx, 240);
    put_header(&region, 240, 8, frame::PADDING);
    set_pos(&region, TAIL, 256);
    assert!(rx.try_read().unwrap().is_none());
    assert_eq!(ring::positions(&region), (256, 256));
    assert_eq!(rx.poisoned(), None);
}

/// A consumer that moves `head` backwards, beyond the tail, or to a misaligned place is caught
/// by the producer the next time it needs to look.
#[test]
fn frame_head_out_of_range() {
    for (bad_head, last_head) in [(0u64, 64u64), (1000, 64), (68, 64)] {
        let (region, mut tx, mut rx) = frames();
        // Fill the ring: 4 frames of 64 bytes, read one, so the producer's cached head is 0.
        for _ in 0..4 {
            tx.try_push(2, &[9; 56]).unwrap();
        }
        drop(rx.try_read().unwrap().unwrap());
        // The producer refreshes its cached head to 64.
        tx.try_push(2, &[9; 56]).unwrap();
        assert_eq!(ring::positions(&region), (64, 320));
        set_pos(&region, HEAD, bad_head);
        let want = RingError::HeadOutOfRange {
            head: bad_head,
            tail: 320,
            last_head,
        };
        assert_eq!(tx.try_push(2, &[9; 56]), Err(frame::ReserveError::Broken(want)));
        frame_producer_poisoned(&mut tx, want).unwrap();
        set_pos(&region, HEAD, 320);
        frame_producer_poisoned(&mut tx, want).unwrap();
    }
}

#[test]
fn frame_producer_attach_checks_positions() {
    for (head, tail) in [(16u64, 8u64), (0, FCAP as u64 + 8), (0, 12)] {
        let (region, _tx, _rx) = frames();
        set_pos(&region, HEAD, head);
        set_pos(&region, TAIL, tail);
        let mut tx = frame::Producer::attach(region.clone()).unwrap();
        let want = RingError::HeadOutOfRange {
            head,
            tail,
            last_head: head,
        };
        frame_producer_poisoned(&mut tx, want).unwrap();
    }
}

// ------------------------------------------------------------------------------------------
// Deterministic: scribble, then use the ring, in one thread
// ------------------------------------------------------------------------------------------

/// Counts of what the reader saw, by outcome.
#[derive(Default, Debug)]
struct Seen {
    frames: u64,
    empty: u64,
    tail_out_of_range: u64,
    tail_moved_back: u64,
    misaligned: u64,
    bad_len: u64,
    bad_kind: u64,
    bad_padding: u64,
    head_out_of_range: u64,
}

impl Seen {
    fn error(&mut self, e: RingError) {
        match e {
            RingError::TailOutOfRange { .. } => self.tail_out_of_range += 1,
            RingError::TailMovedBack { .. } => self.tail_moved_back += 1,
            RingError::Misaligned { .. } => self.misaligned += 1,
            RingError::BadFrameLength { .. } => self.bad_len += 1,
            RingError::BadFrameKind { .. } => self.bad_kind += 1,
            RingError::BadPadding { .. } => self.bad_padding += 1,
            RingError::HeadOutOfRange { .. } => self.head_out_of_range += 1,
        }
    }

    fn errors(&self) -> u64 {
        self.tail_out_of_range
            + self.tail_moved_back
            + self.misaligned
            + self.bad_len
            + self.bad_kind
            + self.bad_padding
            + self.head_out_of_range
    }
}

/// Checks one frame the consumer lent: legal kind, payload inside the data area, aligned.
fn check_frame(region: &RegionRef, f: &frame::Frame<'_>, read_bytes: bool) -> Result<(), String> {
    let p = f.payload();
    if f.kind() == 0 || f.kind() == frame::PADDING {
        return Err(format!("lent a frame of reserved kind {:#x}", f.kind()));
    }
    if !in_data_area(region, p.as_ptr(), p.len()) || (p.as_ptr() as usize) < region.as_ptr() as usize + CONTROL_SIZE + 8
    {
        return Err(format!("payload {:p}+{} outside the data area", p.as_ptr(), p.len()));
    }
    if p.as_ptr() as usize % 8 != 0 {
        return Err("payload not 8-aligned".to_owned());
    }
    if read_bytes {
        // Touch every byte: an out-of-bounds slice would fault (or trip a sanitizer) here.
        std::hint::black_box(p.iter().fold(0u8, |a, &b| a ^ b));
    }
    Ok(())
}

fn frame_round_trip(region: RegionRef, cap: usize, seed: u64, rounds: u32) -> Result<Seen, String> {
    let mut rng = Rng(seed);
    let mut seen = Seen::default();
    let payload = vec![0x5Au8; cap];
    let (mut tx, mut rx) = frame::channel(region.clone()).unwrap();
    for _ in 0..rounds {
        let mut reset = false;
        for _ in 0..rng.below(4) {
            let len = rng.below(cap as u64 / 2) as usize;
            match tx.try_push(1 + rng.below(100) as u32, &payload[..len]) {
                Ok(()) | Err(frame::ReserveError::Full { .. } | frame::ReserveError::TooLarge { .. }) => {}
                Err(frame::ReserveError::Broken(e)) => {
                    seen.error(e);
                    frame_producer_poisoned(&mut tx, e)?;
                    reset = true;
                    break;
                }
                Err(e) => return Err(format!("unexpected {e:?}")),
            }
        }
        if rng.chance(3) {
            for _ in 0..1 + rng.below(2) {
                scribble(&region, cap, &mut rng);
            }
        }
        if rng.chance(50) {
            // A consumer that attaches to whatever the region says now.
            rx = frame::Consumer::attach(region.clone()).unwrap();
        }
        for _ in 0..1 + rng.below(4) {
            match read_frame(&region, &mut rx, true)? {
                Ok(true) => seen.frames += 1,
                Ok(false) => {
                    seen.empty += 1;
                    break;
                }
                Err(e) => {
                    seen.error(e);
                    reset = true;
                    break;
                }
            }
        }
        if reset {
            (tx, rx) = frame::channel(region.clone()).unwrap();
        }
    }
    Ok(seen)
}

#[test]
fn frame_scribble_then_read() {
    for (cap, seed) in [(64usize, 1u64), (256, 2), (1024, 3)] {
        let region = RegionRef::heap(frame::region_size(cap));
        let seen = under_watchdog("frame reader", move || frame_round_trip(region, cap, seed, 50_000)).unwrap();
        // The loop must have explored: valid frames, empty reads, and every consumer-side
        // error (the seed is fixed, so this is deterministic).
        assert!(seen.frames > 10_000, "cap {cap}: {seen:?}");
        assert!(seen.empty > 1_000, "cap {cap}: {seen:?}");
        assert!(seen.tail_out_of_range > 0, "cap {cap}: {seen:?}");
        assert!(seen.tail_moved_back > 0, "cap {cap}: {seen:?}");
        assert!(seen.misaligned > 0, "cap {cap}: {seen:?}");
        assert!(seen.bad_len > 0, "cap {cap}: {seen:?}");
        assert!(seen.bad_kind > 0, "cap {cap}: {seen:?}");
        assert!(seen.bad_padding > 0, "cap {cap}: {seen:?}");
        assert!(seen.head_out_of_range > 0, "cap {cap}: {seen:?}");
    }
}

/// One checked `try_read`: `Ok(Ok(true))` a valid frame, `Ok(Ok(false))` empty,
/// `Ok(Err(e))` a ring error after which the consumer was checked to be poisoned.
fn read_frame(
    region: &RegionRef,
    rx: &mut frame::Consumer,
    read_bytes: bool,
) -> Result<Result<bool, RingError>, String> {
    let e = match rx.try_read() {
        Ok(None) => return Ok(Ok(false)),
        Ok(Some(f)) => {
            check_frame(region, &f, read_bytes)?;
            return Ok(Ok(true));
        }
        Err(e) => e,
    };
    frame_consumer_poisoned(rx, e)?;
    Ok(Err(e))
}

// ------------------------------------------------------------------------------------------
// Racing: a scribbler thread against a reader thread
// ------------------------------------------------------------------------------------------

/// How much racing each test does (both conditions must be met).
const RACE_ITERS: u64 = 200_000;
const RACE_SCRIBBLES: u64 = 100_000;
/// Racing stops after this long even if the targets above were not reached (a loaded machine)…
const RACE_TIME: Duration = Duration::from_secs(10);
/// …but with less than this much racing, the test fails rather than pass without testing.
const RACE_FLOOR: u64 = 2_000;

/// The racing tests (two busy threads each, or two processes) run one at a time.
static RACING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts a thread that scribbles over `region` until `stop`, counting its writes.
fn scribbler(
    region: RegionRef,
    cap: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        while !stop.load(Ordering::Relaxed) {
            scribble(&region, cap, &mut rng);
            count.fetch_add(1, Ordering::Relaxed);
            // Leave the ring alone for a moment now and then, so it also gets somewhere.
            for _ in 0..rng.below(64) {
                std::hint::spin_loop();
            }
            if rng.chance(16) {
                std::thread::yield_now();
            }
        }
    })
}

/// Runs `reader` (which gets the scribble counter) against a scribbler; stops the scribbler.
fn race<R: Send + 'static>(
    what: &str,
    region: &RegionRef,
    cap: usize,
    seed: u64,
    reader: impl FnOnce(Arc<AtomicU64>) -> R + Send + 'static,
) -> R {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let s = scribbler(region.clone(), cap, seed, stop.clone(), count.clone());
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let guard = Stop(stop);
    let r = under_watchdog(what, move || reader(count));
    drop(guard);
    s.join().expect("scribbler");
    r
}

/// Whether a racing reader has done enough: its own iterations and the scribbler's writes (so
/// a scribbler that was not scheduled does not make the test pass vacuously), or [`RACE_TIME`]
/// has passed (the caller then checks [`RACE_FLOOR`]).
fn raced_enough(iters: u64, count: &AtomicU64, start: Instant) -> bool {
    (iters >= RACE_ITERS && count.load(Ordering::Relaxed) >= RACE_SCRIBBLES) || start.elapsed() > RACE_TIME
}

/// Puts both positions at the current tail (8-aligned for frames), atomically, so that a ring
/// broken by the scribbler gets going again once both ends re-attach.
fn heal(region: &RegionRef, align: u64) {
    let (_, tail) = ring::positions(region);
    let p = tail / align * align;
    set_pos(region, HEAD, p);
    set_pos(region, TAIL, p);
}

#[test]
fn frame_reader_races_scribbler() {
    let _racing = RACING.lock().unwrap_or_else(|p| p.into_inner());
    for (cap, seed) in [(256usize, 11u64), (4096, 12)] {
        let region = RegionRef::heap(frame::region_size(cap));
        let r = region.clone();
        let seen = race("racing frame reader", &region, cap, seed, move |count| {
            let region = r;
            let mut rng = Rng(seed ^ 0xABCD);
            let mut seen = Seen::default();
            let payload = vec![0x77u8; cap];
            let mut tx = frame::Producer::attach(region.clone()).unwrap();
            let mut rx = frame::Consumer::attach(region.clone()).unwrap();
            let start = Instant::now();
            let mut iters = 0u64;
            while !raced_enough(iters, &count, start) {
                iters += 1;
                let len = rng.below(cap as u64 / 2) as usize;
                let mut broken = false;
                if let Err(frame::ReserveError::Broken(e)) = tx.try_push(1 + rng.below(9) as u32, &payload[..len]) {
                    seen.error(e);
                    frame_producer_poisoned(&mut tx, e)?;
                    broken = true;
                }
                // The payload may be changing under us: check where it is, not what it says.
                match read_frame(&region, &mut rx, false)? {
                    Ok(true) => seen.frames += 1,
                    Ok(false) => seen.empty += 1,
                    Err(e) => {
                        seen.error(e);
                        broken = true;
                    }
                }
                if broken {
                    heal(&region, 8);
                    rx = frame::Consumer::attach(region.clone()).unwrap();
                    tx = frame::Producer::attach(region.clone()).unwrap();
                }
            }
            Ok::<_, String>((seen, iters, count.load(Ordering::Relaxed)))
        });
        let (seen, iters, scribbles) = seen.unwrap();
        assert!(
            iters >= RACE_FLOOR && scribbles >= RACE_FLOOR,
            "too little racing: {iters} reads, {scribbles} scribbles"
        );
        assert!(seen.frames > 0 && seen.errors() > 0, "cap {cap}: {seen:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Cross-process: a scribbler process against a reader over a real segment
// ------------------------------------------------------------------------------------------

const CHILD_VAR: &str = "PLUGBUS_HOSTILE_CHILD";
const XCAP_FRAMES: u64 = 4096;
const X_SCRIBBLES: u64 = 300_000;

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The hostile child: opens the segment and scribbles over its ring, then reports how much.
#[test]
fn child_scribbler() {
    let Ok(name) = std::env::var(CHILD_VAR) else {
        return;
    };
    let seg = Segment::open(&name).expect("open the segment");
    let frames = seg.ring_region(0).expect("frame ring");
    let mut rng = Rng(0xC0FFEE);
    for _ in 0..X_SCRIBBLES {
        scribble(&frames, XCAP_FRAMES as usize, &mut rng);
        for _ in 0..rng.below(256) {
            std::hint::spin_loop();
        }
    }
    println!("\nRESULT scribbles={X_SCRIBBLES}");
}

#[test]
fn reader_survives_scribbler_process() {
    let _racing = RACING.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("hostile");
    let seg = Segment::create(&name, "hostile", &[RingSpec::frames(XCAP_FRAMES)]).unwrap();
    let frames = seg.ring_region(0).unwrap();
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", "child_scribbler", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, &name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);

    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = stop.clone();
    let reader = std::thread::spawn(move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Seen, String> {
            let mut seen = Seen::default();
            let payload = vec![0x33u8; XCAP_FRAMES as usize];
            let mut rng = Rng(99);
            let (mut ftx, mut frx) = (
                frame::Producer::attach(frames.clone()).unwrap(),
                frame::Consumer::attach(frames.clone()).unwrap(),
            );
            while !stop_reader.load(Ordering::Relaxed) {
                let len = rng.below(XCAP_FRAMES / 2) as usize;
                if let Err(frame::ReserveError::Broken(e)) = ftx.try_push(1 + rng.below(9) as u32, &payload[..len]) {
                    seen.error(e);
                    frame_producer_poisoned(&mut ftx, e)?;
                }
                // Another process may write the payload while it is read: the threat model the
                // ring is built for. Touch every byte of it.
                match read_frame(&frames, &mut frx, true)? {
                    Ok(true) => seen.frames += 1,
                    Ok(false) => seen.empty += 1,
                    Err(e) => {
                        seen.error(e);
                        (ftx, frx) = frame::channel(frames.clone()).unwrap();
                    }
                }
                // A broken producer: start the ring afresh (only this thread uses it here).
                if ftx.poisoned().is_some() {
                    (ftx, frx) = frame::channel(frames.clone()).unwrap();
                }
            }
            Ok(seen)
        }))
    });

    // The reader runs until the scribbler is done (or the watchdog fires).
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            !reader.is_finished(),
            "the reader stopped while the scribbler was running"
        );
        assert!(
            start.elapsed() < WATCHDOG,
            "the scribbler did not finish within {WATCHDOG:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    stop.store(true, Ordering::Relaxed);
    while !reader.is_finished() {
        assert!(start.elapsed() < WATCHDOG, "the reader hung");
        std::thread::sleep(Duration::from_millis(2));
    }
    let seen = match reader.join().unwrap() {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("the reader panicked"),
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "scribbler failed ({status}): {out}");
    assert!(
        out.contains(&format!("RESULT scribbles={X_SCRIBBLES}")),
        "scribbler output: {out}"
    );
    assert!(seen.errors() > 0, "{seen:?}");
    drop(seg);
}
