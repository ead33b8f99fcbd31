//! Model-based tests of the frame ring: random operation sequences run against the real ring
//! (over a small heap region) and against a `VecDeque` model that predicts every result exactly.
//!
//! Capacities are small (64 to 1024 bytes) so that wrap-around, padding, the full edge and the
//! empty edge come up all the time. Each test counts how often the interesting edges were hit
//! across all cases and fails if the generators stopped reaching them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Debug;

use plugbus::ring::{self, CONTROL_SIZE, RegionRef, frame};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Runs `test` over `strategy` with at least proptest's default 256 cases (`PROPTEST_CASES`
/// can raise it; fewer would starve the edge counters), without writing regression files; a
/// failure panics with the shrunk input.
fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: Debug,
{
    let default = Config::default();
    let config = Config {
        cases: default.cases.max(256),
        failure_persistence: None,
        ..default
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// The address range `[start, end)` of a region's data area.
fn data_area(region: &RegionRef) -> (usize, usize) {
    let base = region.as_ptr() as usize;
    (base + CONTROL_SIZE, base + region.len())
}

// ------------------------------------------------------------------------------------------
// Frame ring
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum FrameOp {
    /// `try_push(kind, payload)` with a payload of `len` bytes.
    Push { kind: u32, len: usize },
    /// `try_reserve(len)`, write in place, `commit_len(kind, commit)` with `commit <= len`.
    ReserveCommit { kind: u32, len: usize, commit: usize },
    /// `try_reserve(len)`, scribble over the grant, drop it: nothing may become visible.
    ReserveAbandon { len: usize },
    /// `try_read`; optionally push while the frame is held (its space is not released yet).
    Read { held_push: Option<(u32, usize)> },
    /// `used` on both ends and `is_empty`.
    Used,
}

fn frame_op(cap: usize) -> impl Strategy<Value = FrameOp> {
    let max = cap / 2 - frame::HEADER;
    // Mostly legal lengths, the largest legal one often, and some too large.
    let len = prop_oneof![
        6 => 0..=max,
        2 => Just(max),
        1 => max - max.min(7)..=max,
        1 => max + 1..=max + 16,
        1 => Just(usize::MAX),
    ];
    let kind = prop_oneof![
        12 => 1u32..=1000,
        2 => any::<u32>(),
        1 => Just(0u32),
        1 => Just(frame::PADDING),
    ];
    let good_kind = 1u32..frame::PADDING;
    prop_oneof![
        6 => (kind.clone(), len.clone()).prop_map(|(kind, len)| FrameOp::Push { kind, len }),
        3 => (good_kind, len.clone(), any::<u16>()).prop_map(|(kind, len, f)| FrameOp::ReserveCommit {
            kind,
            len,
            commit: if len == usize::MAX { 0 } else { usize::from(f) % (len + 1) },
        }),
        1 => len.clone().prop_map(|len| FrameOp::ReserveAbandon { len }),
        7 => proptest::option::weighted(0.25, (kind, len))
            .prop_map(|held_push| FrameOp::Read { held_push }),
        1 => Just(FrameOp::Used),
    ]
}

fn frame_case() -> impl Strategy<Value = (usize, Vec<FrameOp>)> {
    (6u32..=10)
        .prop_map(|s| 1usize << s)
        .prop_flat_map(|cap| (Just(cap), proptest::collection::vec(frame_op(cap), 1..300)))
}

/// Payload bytes of frame number `id`.
fn payload(id: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (id.wrapping_mul(131) as u8) ^ (j as u8).wrapping_mul(7) ^ ((j >> 8) as u8))
        .collect()
}

struct MFrame {
    kind: u32,
    payload: Vec<u8>,
    /// Position of its header.
    start: u64,
    /// Position after it (the consumer's head once it is released).
    next: u64,
}

/// The frame ring as the documentation describes it.
struct FrameModel {
    cap: u64,
    /// The consumer's own head: everything before it is released.
    head: u64,
    /// The head the consumer last published (what the producer and `positions` see).
    published_head: u64,
    /// The tail the consumer last read.
    cached_tail: u64,
    tail: u64,
    q: VecDeque<MFrame>,
    next_id: u64,
}

impl FrameModel {
    fn max(&self) -> usize {
        (self.cap / 2) as usize - frame::HEADER
    }

    /// Where a reservation of `len` bytes goes, or the error it must get.
    fn plan(&self, len: usize) -> Result<u64, frame::ReserveError> {
        let max = self.max();
        if len > max {
            return Err(frame::ReserveError::TooLarge { len, max });
        }
        // The documented layout: an 8-byte header, then the payload rounded up to 8.
        let total = 8 + (len as u64).div_ceil(8) * 8;
        let off = self.tail % self.cap;
        let contiguous = self.cap - off;
        let needed = if total <= contiguous { total } else { contiguous + total };
        let free = self.cap - (self.tail - self.published_head);
        if free < needed {
            return Err(frame::ReserveError::Full {
                needed: needed as usize,
                free: free as usize,
            });
        }
        Ok(if total <= contiguous {
            self.tail
        } else {
            self.tail + contiguous
        })
    }

    /// The consumer re-reads `tail`, publishing its head first.
    fn refresh(&mut self) {
        self.published_head = self.head;
        self.cached_tail = self.tail;
    }

    /// `try_read` and `is_empty` re-read `tail` only when the consumer has caught up with the
    /// one it last read.
    fn refresh_if_caught_up(&mut self) {
        if self.cached_tail == self.head {
            self.refresh();
        }
    }

    /// A frame ending at `next` is released: published if that catches up with the cached tail
    /// or leaves a quarter of the capacity unpublished.
    fn release(&mut self, next: u64) {
        self.head = next;
        if next == self.cached_tail || next - self.published_head >= self.cap / 4 {
            self.published_head = next;
        }
    }

    fn publish(&mut self, kind: u32, payload: Vec<u8>, start: u64) {
        let next = start + 8 + (payload.len() as u64).div_ceil(8) * 8;
        self.q.push_back(MFrame {
            kind,
            payload,
            start,
            next,
        });
        self.tail = next;
    }
}

#[derive(Default, Debug)]
struct FrameStats {
    full: u64,
    too_large: u64,
    reserved_kind: u64,
    padded: u64,
    max_size: u64,
    empty_frames: u64,
    shortened: u64,
    abandoned: u64,
    abandoned_padded: u64,
    held_pushes: u64,
    empty_reads: u64,
    /// Reads after which released bytes were left unpublished.
    unpublished: u64,
}

fn check_frames(cap: usize, ops: &[FrameOp], stats: &mut FrameStats) -> Result<(), TestCaseError> {
    let region = RegionRef::heap(frame::region_size(cap));
    let (data_start, data_end) = data_area(&region);
    let (mut tx, mut rx) = frame::channel(region.clone()).unwrap();
    let mut m = FrameModel {
        cap: cap as u64,
        head: 0,
        published_head: 0,
        cached_tail: 0,
        tail: 0,
        q: VecDeque::new(),
        next_id: 0,
    };
    prop_assert_eq!(tx.capacity(), cap);
    prop_assert_eq!(rx.capacity(), cap);
    prop_assert_eq!(tx.max_payload(), m.max());

    // try_push of a fresh frame, checked against the model (which it updates).
    let push = |tx: &mut frame::Producer, m: &mut FrameModel, kind: u32, len: usize, stats: &mut FrameStats| {
        let expect = if kind == 0 || kind == frame::PADDING {
            Err(frame::ReserveError::ReservedKind(kind))
        } else {
            m.plan(len)
        };
        let id = m.next_id;
        // A too-large frame is refused before any payload is looked at; don't build one.
        let bytes = payload(id, if len <= m.max() { len } else { 0 });
        let got = if len <= m.max() {
            tx.try_push(kind, &bytes)
        } else {
            // try_push takes a slice: ask for the oversized frame through try_reserve, as
            // try_push does after its kind check.
            if kind == 0 || kind == frame::PADDING {
                tx.try_push(kind, &bytes)
            } else {
                tx.try_reserve(len).map(|_| ())
            }
        };
        match (expect, got) {
            (Ok(start), Ok(())) => {
                if start != m.tail {
                    stats.padded += 1;
                }
                if len == m.max() {
                    stats.max_size += 1;
                }
                if len == 0 {
                    stats.empty_frames += 1;
                }
                m.next_id += 1;
                m.publish(kind, bytes, start);
            }
            (Err(want), Err(got)) => {
                prop_assert_eq!(got, want, "push of kind {} len {}", kind, len);
                match want {
                    frame::ReserveError::Full { .. } => stats.full += 1,
                    frame::ReserveError::TooLarge { .. } => stats.too_large += 1,
                    frame::ReserveError::ReservedKind(_) => stats.reserved_kind += 1,
                    frame::ReserveError::Broken(_) => {}
                }
            }
            (want, got) => {
                return Err(TestCaseError::fail(format!(
                    "push of kind {kind} len {len}: model says {want:?}, ring says {got:?}"
                )));
            }
        }
        Ok(())
    };

    for op in ops {
        match *op {
            FrameOp::Push { kind, len } => push(&mut tx, &mut m, kind, len, stats)?,
            FrameOp::ReserveCommit { kind, len, commit } => {
                let expect = m.plan(len);
                match (expect, tx.try_reserve(len)) {
                    (Ok(start), Ok(mut grant)) => {
                        prop_assert_eq!(grant.len(), len);
                        prop_assert_eq!(grant.is_empty(), len == 0);
                        let id = m.next_id;
                        let bytes = payload(id, commit);
                        {
                            let buf = grant.bytes_mut();
                            prop_assert_eq!(buf.len(), len);
                            let p = buf.as_ptr() as usize;
                            prop_assert_eq!(p, data_start + (start % m.cap) as usize + frame::HEADER);
                            prop_assert!(p + len <= data_end);
                            buf[..commit].copy_from_slice(&bytes);
                            // The tail of the reservation that is not committed: garbage.
                            buf[commit..].fill(0xEE);
                        }
                        grant.commit_len(kind, commit);
                        if commit < len {
                            stats.shortened += 1;
                        }
                        if start != m.tail {
                            stats.padded += 1;
                        }
                        m.next_id += 1;
                        m.publish(kind, bytes, start);
                    }
                    (Err(want), Err(got)) => {
                        prop_assert_eq!(got, want, "reserve of {}", len);
                        if matches!(want, frame::ReserveError::Full { .. }) {
                            stats.full += 1;
                        }
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "reserve of {len}: model says {want:?}, ring says {:?}",
                            got.map(|g| g.len())
                        )));
                    }
                }
            }
            FrameOp::ReserveAbandon { len } => {
                let expect = m.plan(len);
                match (expect, tx.try_reserve(len)) {
                    (Ok(start), Ok(mut grant)) => {
                        // Make the abandoned bytes look like frame headers: if any of it became
                        // visible, a read would notice. The grant is abandoned at the end of
                        // this arm, without a commit.
                        grant.bytes_mut().fill(0xFF);
                        stats.abandoned += 1;
                        if start != m.tail {
                            stats.abandoned_padded += 1;
                        }
                    }
                    (Err(want), Err(got)) => prop_assert_eq!(got, want, "reserve of {}", len),
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "reserve of {len}: model says {want:?}, ring says {:?}",
                            got.map(|g| g.len())
                        )));
                    }
                }
            }
            FrameOp::Read { held_push } => {
                m.refresh_if_caught_up();
                let got = rx.try_read().unwrap();
                match (m.q.front(), got) {
                    (None, None) => stats.empty_reads += 1,
                    (Some(want), Some(f)) => {
                        prop_assert_eq!(f.kind(), want.kind);
                        prop_assert_eq!(f.payload(), &want.payload[..]);
                        let p = f.payload().as_ptr() as usize;
                        prop_assert_eq!(
                            p,
                            data_start + (want.start % m.cap) as usize + frame::HEADER,
                            "payload not in place"
                        );
                        prop_assert_eq!(p % 8, 0, "payload not 8-aligned");
                        prop_assert!(p + f.payload().len() <= data_end);
                        let mut copy = Vec::new();
                        f.copy_to(&mut copy);
                        prop_assert_eq!(&copy, &want.payload);
                        if let Some((kind, len)) = held_push {
                            // The held frame's space is not released: the model's head stays.
                            stats.held_pushes += 1;
                            push(&mut tx, &mut m, kind, len, stats)?;
                            prop_assert_eq!(f.payload(), &m.q[0].payload[..], "a push overwrote a held frame");
                        }
                        drop(f);
                        let done = m.q.pop_front().unwrap();
                        m.release(done.next);
                        if m.published_head != m.head {
                            stats.unpublished += 1;
                        }
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "read: model has {:?}, ring gave {:?}",
                            want.map(|w| (w.kind, w.payload.len())),
                            got.map(|f| (f.kind(), f.payload().len()))
                        )));
                    }
                }
            }
            FrameOp::Used => {
                // The producer sees what the consumer published; the consumer publishes when it
                // re-reads the tail.
                prop_assert_eq!(tx.used().unwrap(), (m.tail - m.published_head) as usize);
                m.refresh();
                prop_assert_eq!(rx.used().unwrap(), (m.tail - m.head) as usize);
                prop_assert_eq!(rx.is_empty().unwrap(), m.q.is_empty());
            }
        }
        prop_assert_eq!(
            ring::positions(&region),
            (m.published_head, m.tail),
            "shared positions after {:?}",
            op
        );
        prop_assert_eq!(rx.poisoned(), None);
        prop_assert_eq!(tx.poisoned(), None);
    }

    // Drain: every frame still in the model comes out, in order, then nothing.
    while let Some(want) = m.q.pop_front() {
        let f = rx.try_read().unwrap();
        prop_assert!(f.is_some(), "frame missing at drain");
        let f = f.unwrap();
        prop_assert_eq!((f.kind(), f.payload()), (want.kind, &want.payload[..]));
    }
    prop_assert!(rx.try_read().unwrap().is_none());
    Ok(())
}

#[test]
fn frame_ring_matches_model() {
    let stats = RefCell::new(FrameStats::default());
    run(frame_case(), |(cap, ops)| {
        check_frames(cap, &ops, &mut stats.borrow_mut())
    });
    let s = stats.into_inner();
    assert!(s.full > 0, "never hit Full: {s:?}");
    assert!(s.too_large > 0, "never hit TooLarge: {s:?}");
    assert!(s.reserved_kind > 0, "never tried a reserved kind: {s:?}");
    assert!(s.padded > 0, "never wrapped with a padding frame: {s:?}");
    assert!(s.max_size > 0, "never pushed a largest frame: {s:?}");
    assert!(s.empty_frames > 0, "never pushed an empty payload: {s:?}");
    assert!(s.shortened > 0, "never committed less than reserved: {s:?}");
    assert!(s.abandoned > 0, "never abandoned a grant: {s:?}");
    assert!(
        s.abandoned_padded > 0,
        "never abandoned a grant that needed padding: {s:?}"
    );
    assert!(s.held_pushes > 0, "never pushed while a frame was held: {s:?}");
    assert!(s.empty_reads > 0, "never read an empty ring: {s:?}");
    assert!(s.unpublished > 0, "never left a release unpublished: {s:?}");
}

// ------------------------------------------------------------------------------------------
// Fixed cases at the edges the model also covers, spelled out
// ------------------------------------------------------------------------------------------

/// An abandoned reservation that wrote a padding header leaves nothing visible, and the next
/// frame (which fits before the end) overwrites that header.
#[test]
fn abandoned_padding_is_invisible() {
    let region = RegionRef::heap(frame::region_size(128));
    let (mut tx, mut rx) = frame::channel(region.clone()).unwrap();
    // Move both positions to 112: 16 bytes left before the end.
    for _ in 0..2 {
        tx.try_push(1, &[1; 48]).unwrap();
        drop(rx.try_read().unwrap().unwrap());
    }
    assert_eq!(ring::positions(&region), (112, 112));
    // 24 bytes of payload need 32: padding (16) + frame (32) = 48 <= 128 free.
    {
        // Reserved, written, and abandoned (no commit) at the end of this block.
        let mut g = tx.try_reserve(24).unwrap();
        g.bytes_mut().fill(0xFF);
    }
    assert!(rx.try_read().unwrap().is_none(), "an abandoned grant became visible");
    assert_eq!(ring::positions(&region), (112, 112));
    // This one fits before the end exactly: no padding, and it must be read as itself.
    tx.try_push(9, &[7; 8]).unwrap();
    let f = rx.try_read().unwrap().unwrap();
    assert_eq!((f.kind(), f.payload()), (9, &[7u8; 8][..]));
    drop(f);
    assert_eq!(ring::positions(&region), (128, 128));
}

/// Committing more than reserved, or a reserved kind, is a caller bug: it panics, and nothing
/// is published.
#[test]
fn commit_len_panics_on_caller_bugs_and_publishes_nothing() {
    let region = RegionRef::heap(frame::region_size(256));
    let (mut tx, mut rx) = frame::channel(region.clone()).unwrap();
    for (kind, len) in [(5, 17), (0, 4), (frame::PADDING, 4)] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let g = tx.try_reserve(16).unwrap();
            g.commit_len(kind, len);
        }));
        assert!(r.is_err(), "commit_len({kind}, {len}) of a 16-byte grant did not panic");
        assert!(rx.try_read().unwrap().is_none());
        assert_eq!(ring::positions(&region), (0, 0));
    }
    tx.try_push(3, b"ok").unwrap();
    assert_eq!(rx.try_read().unwrap().unwrap().payload(), b"ok");
}

/// Regions of the wrong shape are refused with the layout error that says why.
#[test]
fn bad_region_shapes_are_refused() {
    use plugbus::ring::RingLayoutError;
    let r = RegionRef::heap(CONTROL_SIZE + 3 * 8);
    assert!(matches!(
        frame::channel(r).err(),
        Some(RingLayoutError::NotPowerOfTwo {
            data_bytes: 24,
            unit: 8
        })
    ));
    let r = RegionRef::heap(CONTROL_SIZE + 4);
    assert!(matches!(
        frame::channel(r).err(),
        Some(RingLayoutError::TooSmall { .. })
    ));
    let r = RegionRef::heap(CONTROL_SIZE + 8);
    assert!(matches!(
        frame::channel(r).err(),
        Some(RingLayoutError::TooSmall { .. })
    ));
    let r = RegionRef::heap(frame::region_size(64) + 128)
        .slice(8, frame::region_size(64))
        .unwrap();
    assert!(matches!(
        frame::channel(r).err(),
        Some(RingLayoutError::Misaligned { .. })
    ));
}
