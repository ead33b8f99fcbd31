//! Throughput of the product's movement path, the frame ring with move frames, against rtrb and
//! against a plain shared-memory ring, in-process and across a real process boundary.
//!
//! One criterion group, `ring`, with `Throughput::Elements(1)` (one element = one 48-byte
//! [`MoveRecord`]) and every competitor in it, so that the ratios come from one run:
//!
//! - `plugbus/one`: one move frame per record, written by [`fastpath::write_frame`] (reserve,
//!   header and record written in place, one `tail` publish: what the host does for each tick),
//!   read with `try_read` and viewed in place with [`fastpath::parse`] (what a plugin does).
//!   A one-record frame takes 8 (frame header) + 16 (move header) + 48 bytes.
//! - `rtrb/one`: rtrb's `push` / `pop` of one record.
//! - `plugbus/batch64`: move frames of 64 records (one reservation and one publish per 64), the
//!   records viewed in place.
//! - `rtrb/batch64`: `push_partial_slice` of 64 records (copy what fits, one publish);
//!   `read_chunk` of everything readable.
//! - `plugbus/xproc-one`, `plugbus/xproc-batch64`: the same two plugbus pairs over a real
//!   shared-memory segment, with the consumer in a child process (this binary, re-executed with
//!   `PLUGBUS_BENCH_CHILD` set).
//! - `plain/xproc-one`, `plain/xproc-batch64`: the baseline over the same segment, a minimal
//!   hand-written SPSC ring of 48-byte slots ([`plain`]): positions on their own 128-byte lines,
//!   cached peer positions, no frames, no validation. What plugbus's framing costs is the gap.
//!
//! Every sample is timed across both sides: from the producer's first push until the consumer
//! (the calling thread, or the child process through an acknowledgement ring) has received all
//! `iters` records. The consumer checks the sequence number of every record it receives, and
//! before anything is measured, each pair moves 100 003 records (wrapping the ring many times and
//! ending in a partial batch) untimed, with every field of every record checked.
//!
//! Waiting loops spin with `spin_loop` and yield every 64th turn: the bench machine may have only
//! two cores for two busy threads and the OS.
//!
//! The producer and the consumer are pinned to two different CPUs (the first two this process
//! may use). Unpinned, a scheduler that finds one core busy with something else puts both sides
//! on the other one; they then take turns filling and draining the whole ring from one cache,
//! which measures time-slicing rather than a cross-core ring (several times faster, and not what a
//! host and a plugin on separate cores see). Set `PLUGBUS_BENCH_NO_PIN=1` to leave placement to
//! the scheduler.
//!
//! Set `PLUGBUS_BENCH_PAIRED=<rounds>` to skip criterion and run the in-process pairs in rounds
//! instead, plugbus and rtrb taking turns within each round (see [`paired`]): on a shared
//! machine, whose load and core placement change from one second to the next, the per-round
//! ratio is steadier than the ratio of two criterion results measured seconds apart.
#![warn(clippy::undocumented_unsafe_blocks)]

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group};
use crossbeam_utils::CachePadded;
use plugbus::fastpath::{self, KIND_MOVES, MoveRecord};
use plugbus::ring::{RegionRef, frame};
use plugbus::segment::{self, RingSpec, Segment};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::{Backoff, die_with_parent};

/// Data bytes of the plugbus frame ring: 3640 one-record frames, 84 frames of 64 records.
const FRAME_BYTES: usize = 1 << 18;
/// Capacity in records of rtrb and of the plain ring (192 KiB of records).
const CAP: usize = 4096;
/// Records per batch.
const BATCH: usize = 64;
/// Records moved in the untimed correctness run: not a multiple of `BATCH`, many times `CAP`.
const VERIFY_N: u64 = 100_003;

/// The record with sequence number `seq`: every field is derived from it, so the consumer can
/// check a whole record. The sequence number is the first 8 bytes of the UUID.
#[inline]
fn rec(seq: u64) -> MoveRecord {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&seq.to_le_bytes());
    uuid[8..].copy_from_slice(&seq.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    MoveRecord::new(uuid, [seq as f64, 64.0, -(seq as f64)], (seq & 0xff) as f32, 1.5)
}

/// Nonzero if `r` is not record `next`: the sequence number always, every field if `FULL`.
#[inline(always)]
fn check<const FULL: bool>(r: &MoveRecord, next: u64) -> u64 {
    let seq = u64::from_le_bytes(r.uuid[..8].try_into().expect("8 bytes"));
    let mut bad = seq ^ next;
    if FULL {
        bad |= u64::from(r.as_bytes() != rec(next).as_bytes());
    }
    bad
}

// ---- producers: push records 0..iters ----

/// Writes `records` as one move frame of tick `tick`, retrying while the ring is full;
/// `stalled` runs now and then while it stays full.
#[inline]
fn push_frame(
    tx: &mut frame::Producer,
    tick: u64,
    records: &[MoveRecord],
    backoff: &mut Backoff,
    stalled: &mut impl FnMut(),
) {
    loop {
        match fastpath::write_frame(tx, tick, 0, records) {
            Ok(_) => return,
            Err(frame::ReserveError::Full { .. }) => {
                if backoff.snooze() {
                    stalled();
                }
            }
            Err(e) => panic!("plugbus ring broken: {e}"),
        }
    }
}

/// plugbus, one move frame per record (the frame's tick is the record's sequence number).
fn push_plugbus_one(tx: &mut frame::Producer, iters: u64, mut stalled: impl FnMut()) {
    let mut backoff = Backoff(0);
    for seq in 0..iters {
        push_frame(tx, seq, &[rec(seq)], &mut backoff, &mut stalled);
    }
}

/// plugbus, move frames of `BATCH` records (the last one shorter); the frame's tick is the
/// sequence number of its first record.
fn push_plugbus_batch(tx: &mut frame::Producer, iters: u64, mut stalled: impl FnMut()) {
    let mut backoff = Backoff(0);
    fill_batches(iters, |seq, b| push_frame(tx, seq, b, &mut backoff, &mut stalled));
}

fn push_rtrb_one(p: &mut rtrb::Producer<MoveRecord>, iters: u64) {
    let mut backoff = Backoff(0);
    for seq in 0..iters {
        while p.push(rec(seq)).is_err() {
            backoff.snooze();
        }
    }
}

/// Fills batches of `BATCH` records (the last one shorter) and hands each to `push` with the
/// sequence number of its first record.
#[inline]
fn fill_batches(iters: u64, mut push: impl FnMut(u64, &[MoveRecord])) {
    let mut buf = [MoveRecord::default(); BATCH];
    let mut seq = 0;
    while seq < iters {
        let n = (iters - seq).min(BATCH as u64) as usize;
        for (i, r) in buf[..n].iter_mut().enumerate() {
            *r = rec(seq + i as u64);
        }
        push(seq, &buf[..n]);
        seq += n as u64;
    }
}

/// Hands `push` (which copies as many records as fit and returns how many) each batch until
/// all of it is in.
#[inline]
fn push_partial_batches(iters: u64, mut push: impl FnMut(&[MoveRecord]) -> usize, stalled: &mut impl FnMut()) {
    let mut backoff = Backoff(0);
    fill_batches(iters, |_, b| {
        let mut done = 0;
        while done < b.len() {
            let k = push(&b[done..]);
            if k == 0 && backoff.snooze() {
                stalled();
            }
            done += k;
        }
    });
}

fn push_rtrb_batch(p: &mut rtrb::Producer<MoveRecord>, iters: u64) {
    push_partial_batches(iters, |b| p.push_partial_slice(b).0.len(), &mut || {});
}

// ---- consumers: receive records 0..iters, return nonzero if any was wrong ----

/// plugbus: read each frame in place, view its records with `fastpath::parse`, check them;
/// dropping the frame releases it.
fn read_plugbus<const FULL: bool>(rx: &mut frame::Consumer, iters: u64) -> u64 {
    let (mut next, mut bad, mut backoff) = (0, 0, Backoff(0));
    while next < iters {
        let Some(f) = rx.try_read().expect("plugbus ring broken") else {
            backoff.snooze();
            continue;
        };
        if f.kind() != KIND_MOVES {
            return u64::MAX;
        }
        let Ok((header, records)) = fastpath::parse(f.payload()) else {
            return u64::MAX;
        };
        bad |= header.tick ^ next;
        for r in records {
            bad |= check::<FULL>(r, next);
            next += 1;
        }
    }
    bad
}

fn pop_rtrb<const FULL: bool>(c: &mut rtrb::Consumer<MoveRecord>, iters: u64) -> u64 {
    let (mut bad, mut backoff) = (0, Backoff(0));
    for next in 0..iters {
        loop {
            if let Ok(r) = c.pop() {
                bad |= check::<FULL>(&r, next);
                break;
            }
            backoff.snooze();
        }
    }
    bad
}

/// rtrb chunks: borrow every readable record in place (two slices), check, commit.
fn read_rtrb<const FULL: bool>(c: &mut rtrb::Consumer<MoveRecord>, iters: u64) -> u64 {
    let (mut next, mut bad, mut backoff) = (0, 0, Backoff(0));
    while next < iters {
        let n = c.slots().min((iters - next) as usize);
        if n == 0 {
            backoff.snooze();
            continue;
        }
        let chunk = c.read_chunk(n).expect("slots() said these are readable");
        let (first, second) = chunk.as_slices();
        for r in first.iter().chain(second) {
            bad |= check::<FULL>(r, next);
            next += 1;
        }
        chunk.commit_all();
    }
    bad
}

// ---- the plain ring: the baseline ----

/// A minimal shared-memory SPSC ring of [`MoveRecord`] slots, as one would write it by hand:
/// `tail` and `head` on their own 128-byte lines, each side caching the other's position, one
/// Release store per push (or per slice), no frames, no validation of the peer. It lays itself
/// over a frame-ring region (the same control-block layout), so a segment can carry it.
mod plain {
    use plugbus::fastpath::MoveRecord;
    use plugbus::ring::{CONTROL_SIZE, Line, RegionRef};
    use plugbus::sync::{AtomicU64, Ordering};

    use super::CAP;

    #[repr(C)]
    struct Control {
        tail: Line<AtomicU64>,
        head: Line<AtomicU64>,
    }

    /// Bytes a plain ring needs: the control block and `CAP` slots.
    pub const REGION: usize = CONTROL_SIZE + CAP * std::mem::size_of::<MoveRecord>();

    struct Ring {
        region: RegionRef,
        slots: *mut MoveRecord,
    }

    impl Ring {
        /// The ring over a zeroed (or previously used by a plain ring) region.
        fn new(region: RegionRef) -> Self {
            assert!(region.len() >= REGION && region.as_ptr() as usize % 128 == 0);
            // SAFETY: the region is at least CONTROL_SIZE + CAP slots long (asserted), so the
            // data area starts in bounds.
            let slots = unsafe { region.as_ptr().add(CONTROL_SIZE) }.cast::<MoveRecord>();
            Self { region, slots }
        }

        #[inline]
        fn control(&self) -> &Control {
            // SAFETY: the region starts 128-aligned and is longer than Control (asserted in new);
            // zeroed bytes are valid atomics, and only atomics are accessed through it.
            unsafe { &*self.region.as_ptr().cast::<Control>() }
        }

        #[inline]
        fn slot(&self, pos: u64) -> *mut MoveRecord {
            // SAFETY: the index is masked below CAP, inside the data area.
            unsafe { self.slots.add(pos as usize & (CAP - 1)) }
        }
    }

    pub struct Producer {
        ring: Ring,
        tail: u64,
        cached_head: u64,
    }

    // SAFETY: the unique writer of its ring; the region is Send + Sync.
    unsafe impl Send for Producer {}

    impl Producer {
        pub fn attach(region: RegionRef) -> Self {
            let ring = Ring::new(region);
            let tail = ring.control().tail.load(Ordering::Acquire);
            let cached_head = ring.control().head.load(Ordering::Acquire);
            Self {
                ring,
                tail,
                cached_head,
            }
        }

        /// Free slots, refreshing `head` only if fewer than `want` are known free.
        #[inline]
        fn free(&mut self, want: u64) -> u64 {
            let free = CAP as u64 - (self.tail - self.cached_head);
            if free >= want {
                return free;
            }
            // Acquire: pairs with the Release store of `head` in the consumer.
            self.cached_head = self.ring.control().head.load(Ordering::Acquire);
            CAP as u64 - (self.tail - self.cached_head)
        }

        #[inline]
        pub fn push(&mut self, r: &MoveRecord) -> bool {
            if self.free(1) == 0 {
                return false;
            }
            // SAFETY: slot `tail` is free (below head + CAP) and only we write it.
            unsafe { self.ring.slot(self.tail).write(*r) };
            self.tail += 1;
            // Release: pairs with the consumer's Acquire load of `tail`.
            self.ring.control().tail.store(self.tail, Ordering::Release);
            true
        }

        /// Copies as many of `rs` as fit, with one publish; returns how many.
        #[inline]
        pub fn push_slice(&mut self, rs: &[MoveRecord]) -> usize {
            let n = (self.free(rs.len() as u64) as usize).min(rs.len());
            if n == 0 {
                return 0;
            }
            let off = self.tail as usize & (CAP - 1);
            let first = n.min(CAP - off);
            // SAFETY: the n slots from `tail` are free; the first part ends at most at the end of
            // the data area, the second starts at slot 0; our slice does not overlap the ring.
            unsafe {
                std::ptr::copy_nonoverlapping(rs.as_ptr(), self.ring.slot(self.tail), first);
                std::ptr::copy_nonoverlapping(rs.as_ptr().add(first), self.ring.slot(0), n - first);
            }
            self.tail += n as u64;
            // Release: pairs with the consumer's Acquire load of `tail`.
            self.ring.control().tail.store(self.tail, Ordering::Release);
            n
        }
    }

    pub struct Consumer {
        ring: Ring,
        head: u64,
        cached_tail: u64,
    }

    // SAFETY: the unique reader of its ring; the region is Send + Sync.
    unsafe impl Send for Consumer {}

    impl Consumer {
        pub fn attach(region: RegionRef) -> Self {
            let ring = Ring::new(region);
            let head = ring.control().head.load(Ordering::Acquire);
            Self {
                ring,
                head,
                cached_tail: head,
            }
        }

        /// Readable records, refreshing `tail` only if the cache says empty.
        #[inline]
        fn available(&mut self) -> u64 {
            if self.cached_tail == self.head {
                // Acquire: pairs with the producer's Release store of `tail`.
                self.cached_tail = self.ring.control().tail.load(Ordering::Acquire);
            }
            self.cached_tail - self.head
        }

        /// Lends the next record to `f` and releases it; `false` if the ring is empty.
        #[inline]
        pub fn pop_with(&mut self, f: impl FnOnce(&MoveRecord)) -> bool {
            if self.available() == 0 {
                return false;
            }
            // SAFETY: slot `head` is below the acquired tail: written and published, and not
            // rewritten until we release it below.
            f(unsafe { &*self.ring.slot(self.head) });
            self.head += 1;
            // Release: pairs with the producer's Acquire load of `head`.
            self.ring.control().head.store(self.head, Ordering::Release);
            true
        }

        /// Lends every readable record (at most `max`) to `f` in place, then releases them with
        /// one store; returns how many.
        #[inline]
        pub fn read_with(&mut self, max: u64, mut f: impl FnMut(&MoveRecord)) -> u64 {
            let n = self.available().min(max);
            for i in 0..n {
                // SAFETY: as in pop_with, for each of the n readable slots.
                f(unsafe { &*self.ring.slot(self.head + i) });
            }
            self.head += n;
            // Release: pairs with the producer's Acquire load of `head`.
            self.ring.control().head.store(self.head, Ordering::Release);
            n
        }
    }
}

fn push_plain_one(tx: &mut plain::Producer, iters: u64, mut stalled: impl FnMut()) {
    let mut backoff = Backoff(0);
    for seq in 0..iters {
        let r = rec(seq);
        while !tx.push(&r) {
            if backoff.snooze() {
                stalled();
            }
        }
    }
}

fn push_plain_batch(tx: &mut plain::Producer, iters: u64, mut stalled: impl FnMut()) {
    push_partial_batches(iters, |b| tx.push_slice(b), &mut stalled);
}

fn pop_plain<const FULL: bool>(rx: &mut plain::Consumer, iters: u64) -> u64 {
    let (mut bad, mut backoff) = (0, Backoff(0));
    for next in 0..iters {
        while !rx.pop_with(|r| bad |= check::<FULL>(r, next)) {
            backoff.snooze();
        }
    }
    bad
}

fn read_plain<const FULL: bool>(rx: &mut plain::Consumer, iters: u64) -> u64 {
    let (mut next, mut bad, mut backoff) = (0, 0, Backoff(0));
    while next < iters {
        let n = rx.read_with(iters - next, |r| {
            bad |= check::<FULL>(r, next);
            next += 1;
        });
        if n == 0 {
            backoff.snooze();
        }
    }
    bad
}

// ---- CPU placement ----

/// Environment variable that turns pinning off.
const NO_PIN_ENV: &str = "PLUGBUS_BENCH_NO_PIN";
/// Environment variable that tells the child which CPU to consume on.
const CHILD_CPU_ENV: &str = "PLUGBUS_BENCH_CHILD_CPU";

/// Where the two sides run: every CPU the process may use, and one for each side.
struct Cpus {
    all: Vec<usize>,
    producer: usize,
    consumer: usize,
}

/// The placement, read once from the process's affinity mask before anything is pinned; `None`
/// with fewer than two CPUs or with `PLUGBUS_BENCH_NO_PIN` set.
fn cpus() -> Option<&'static Cpus> {
    static CPUS: OnceLock<Option<Cpus>> = OnceLock::new();
    CPUS.get_or_init(|| {
        if std::env::var_os(NO_PIN_ENV).is_some() {
            return None;
        }
        // SAFETY: cpu_set_t is an array of integers, so all-zero bits are a valid (empty) set;
        // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it, its exact size;
        // CPU_ISSET reads bit c < CPU_SETSIZE of it.
        let all: Vec<usize> = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        };
        (all.len() >= 2).then(|| Cpus {
            producer: all[0],
            consumer: all[1],
            all,
        })
    })
    .as_ref()
}

/// Restricts the calling thread to `cpus` (each < CPU_SETSIZE).
fn pin(cpus: &[usize]) {
    let size = libc::CPU_SETSIZE as usize;
    assert!(cpus.iter().all(|&c| c < size), "cpu number out of range");
    // SAFETY: all-zero bits are a valid (empty) cpu_set_t; CPU_SET writes bit c < CPU_SETSIZE
    // (asserted above) of it; sched_setaffinity reads size_of::<cpu_set_t>() bytes from it, its
    // exact size, and applies to the calling thread only (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity({cpus:?}): {}",
        std::io::Error::last_os_error()
    );
}

// ---- in-process pairs ----

type Push<P> = fn(&mut P, u64);
type Pop<C> = fn(&mut C, u64) -> u64;

/// Moves `iters` records from a producer thread to the calling thread. Timed from the producer's
/// first push until the consumer has every record.
///
/// The two ends live on their own cache lines: each writes its private position on every
/// push / pop, and two ends side by side on one stack would share a line between the threads.
/// The producer thread runs on `Cpus::producer`, the caller on `Cpus::consumer` until it returns.
fn two_threads<P: Send, C>(
    tx: &mut CachePadded<P>,
    rx: &mut CachePadded<C>,
    iters: u64,
    push: Push<P>,
    pop: Pop<C>,
) -> Duration {
    let cpus = cpus();
    let elapsed = std::thread::scope(|s| {
        let producer = s.spawn(move || {
            if let Some(c) = cpus {
                pin(&[c.producer]);
            }
            let start = Instant::now();
            push(&mut **tx, iters);
            start
        });
        if let Some(c) = cpus {
            pin(&[c.consumer]);
        }
        let bad = pop(&mut **rx, iters);
        let stop = Instant::now();
        let start = producer.join().expect("producer thread panicked");
        assert_eq!(bad, 0, "records arrived out of order or damaged");
        stop.saturating_duration_since(start)
    });
    if let Some(c) = cpus {
        pin(&c.all);
    }
    elapsed
}

// ---- cross-process ----

/// Environment variable that turns this binary into the consumer child; its value is the
/// segment name.
const CHILD_ENV: &str = "PLUGBUS_BENCH_CHILD";
/// Data bytes of the acknowledgement ring (child -> parent).
const ACK_BYTES: u64 = 4096;
/// Frame kind of a control message (`[command, value]`, two u64) on the data or ack ring.
const KIND_CONTROL: u32 = 100;
/// What a run moves, parent -> child: plugbus move frames, or the plain ring one record at a
/// time or in batches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Frames,
    PlainOne,
    PlainBatch,
}
/// Commands, parent -> child: a run of `value` records in a `Mode` (+ `FULL`: every field
/// checked); quit.
const RUN: u64 = 1;
const FULL: u64 = 16;
const QUIT: u64 = 3;
/// Commands, child -> parent: ready for the run; run done (`value` nonzero if bad).
const READY: u64 = 4;
const DONE: u64 = 5;
/// Idle polls before the child sleeps on its doorbell between runs.
const IDLE_POLLS: u32 = 1 << 16;

fn run_command(mode: Mode, full: bool) -> u64 {
    RUN | (mode as u64) << 8 | if full { FULL } else { 0 }
}

fn send_command(tx: &mut frame::Producer, cmd: u64, value: u64, stalled: &mut impl FnMut()) {
    let mut backoff = Backoff(0);
    let payload = [cmd, value];
    while let Err(e) = tx.try_push(KIND_CONTROL, payload.as_bytes()) {
        match e {
            frame::ReserveError::Full { .. } => {
                if backoff.snooze() {
                    stalled();
                }
            }
            e => panic!("bench ring broken: {e}"),
        }
    }
}

/// The next control message on `rx`, if any (a data frame here is a bug).
fn try_command(rx: &mut frame::Consumer) -> Option<(u64, u64)> {
    let f = rx.try_read().expect("bench ring broken")?;
    assert_eq!(f.kind(), KIND_CONTROL, "expected a control frame");
    let [cmd, value] = <[u64; 2]>::read_from_bytes(f.payload()).expect("a 16-byte control frame");
    Some((cmd, value))
}

/// The rings of the bench segment.
const RING_FRAMES: usize = 0;
const RING_ACKS: usize = 1;
const RING_PLAIN: usize = 2;

/// The parent side: a segment with a data ring (parent -> child; control messages and move
/// frames), an ack ring back, a plain ring, and the child consuming from them. Made once, reused
/// by every sample of every cross-process function.
struct CrossProcess {
    child: Child,
    tx: frame::Producer,
    acks: frame::Consumer,
    plain: plain::Producer,
    seg: Segment,
}

impl CrossProcess {
    fn spawn() -> Self {
        let name = segment::unique_name("bench");
        let rings = [
            RingSpec::frames(FRAME_BYTES as u64),
            RingSpec::frames(ACK_BYTES),
            RingSpec::frames((plain::REGION - plugbus::ring::CONTROL_SIZE).next_power_of_two() as u64),
        ];
        let seg = Segment::create(&name, "bench", &rings).expect("create the bench segment");
        let tx = frame::Producer::attach(seg.frame_region(RING_FRAMES).expect("data ring")).expect("attach data ring");
        let acks = frame::Consumer::attach(seg.frame_region(RING_ACKS).expect("ack ring")).expect("attach ack ring");
        let plain = plain::Producer::attach(seg.frame_region(RING_PLAIN).expect("plain ring"));
        let exe = std::env::current_exe().expect("path of the bench binary");
        let mut cmd = Command::new(exe);
        cmd.env(CHILD_ENV, &name).stdin(Stdio::null());
        if let Some(c) = cpus() {
            cmd.env(CHILD_CPU_ENV, c.consumer.to_string());
        }
        let child = cmd.spawn().expect("spawn the bench child");
        let mut cp = Self {
            child,
            tx,
            acks,
            plain,
            seg,
        };
        // Correctness first, untimed, every field of every record checked.
        for (mode, batched) in [
            (Mode::Frames, false),
            (Mode::Frames, true),
            (Mode::PlainOne, false),
            (Mode::PlainBatch, true),
        ] {
            cp.run(VERIFY_N, mode, batched, true);
        }
        cp
    }

    /// One run of `iters` records, timed from the first data push until the child's DONE. The
    /// calling thread produces on `Cpus::producer` (the child consumes on `Cpus::consumer`).
    fn run(&mut self, iters: u64, mode: Mode, batched: bool, full: bool) -> Duration {
        if let Some(c) = cpus() {
            pin(&[c.producer]);
        }
        let elapsed = self.run_here(iters, mode, batched, full);
        if let Some(c) = cpus() {
            pin(&c.all);
        }
        elapsed
    }

    fn run_here(&mut self, iters: u64, mode: Mode, batched: bool, full: bool) -> Duration {
        let child = &mut self.child;
        send_command(&mut self.tx, run_command(mode, full), iters, &mut || check_child(child));
        self.seg.header().to_attacher.ring();
        assert_eq!(self.wait_ack(READY), 0);
        let start = Instant::now();
        let child = &mut self.child;
        let stalled = || check_child(child);
        match (mode, batched) {
            (Mode::Frames, false) => push_plugbus_one(&mut self.tx, iters, stalled),
            (Mode::Frames, true) => push_plugbus_batch(&mut self.tx, iters, stalled),
            (Mode::PlainOne, _) => push_plain_one(&mut self.plain, iters, stalled),
            (Mode::PlainBatch, _) => push_plain_batch(&mut self.plain, iters, stalled),
        }
        let bad = self.wait_ack(DONE);
        let elapsed = start.elapsed();
        assert_eq!(bad, 0, "the child received records out of order or damaged");
        elapsed
    }

    fn wait_ack(&mut self, want: u64) -> u64 {
        let mut backoff = Backoff(0);
        loop {
            if let Some((cmd, value)) = try_command(&mut self.acks) {
                assert_eq!(cmd, want, "unexpected ack");
                return value;
            }
            if backoff.snooze() {
                check_child(&mut self.child);
            }
        }
    }
}

fn check_child(child: &mut Child) {
    if let Some(status) = child.try_wait().expect("waitpid on the bench child") {
        panic!("the bench child exited during a run: {status}");
    }
}

impl Drop for CrossProcess {
    fn drop(&mut self) {
        if self.tx.try_push(KIND_CONTROL, [QUIT, 0].as_bytes()).is_ok() {
            self.seg.header().to_attacher.ring();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => break,
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child: attach to the segment, then serve runs until told to quit.
fn child_main(name: &str) {
    let seg = Segment::open(name).unwrap_or_else(|e| panic!("bench child: {e}"));
    die_with_parent(Some(seg.header().fixed.creator_pid));
    if let Ok(cpu) = std::env::var(CHILD_CPU_ENV) {
        pin(&[cpu.parse().expect("PLUGBUS_BENCH_CHILD_CPU is a CPU number")]);
    }
    let mut rx = frame::Consumer::attach(seg.frame_region(RING_FRAMES).expect("data ring")).expect("attach data ring");
    let mut acks = frame::Producer::attach(seg.frame_region(RING_ACKS).expect("ack ring")).expect("attach ack ring");
    let mut plain = plain::Consumer::attach(seg.frame_region(RING_PLAIN).expect("plain ring"));
    let mut ack = |cmd, value| send_command(&mut acks, cmd, value, &mut || {});
    loop {
        let (cmd, n) = next_command(&seg, &mut rx);
        if cmd == QUIT {
            return;
        }
        assert_eq!(cmd & 0xf, RUN, "bench child: unknown command {cmd}");
        let full = cmd & FULL != 0;
        ack(READY, 0);
        let bad = match (cmd >> 8, full) {
            (m, false) if m == Mode::Frames as u64 => read_plugbus::<false>(&mut rx, n),
            (m, true) if m == Mode::Frames as u64 => read_plugbus::<true>(&mut rx, n),
            (m, false) if m == Mode::PlainOne as u64 => pop_plain::<false>(&mut plain, n),
            (m, true) if m == Mode::PlainOne as u64 => pop_plain::<true>(&mut plain, n),
            (m, false) if m == Mode::PlainBatch as u64 => read_plain::<false>(&mut plain, n),
            (m, true) if m == Mode::PlainBatch as u64 => read_plain::<true>(&mut plain, n),
            (m, _) => panic!("bench child: unknown mode {m}"),
        };
        ack(DONE, bad);
    }
}

/// Waits for the next command: spins a while, then sleeps on the segment's doorbell.
fn next_command(seg: &Segment, rx: &mut frame::Consumer) -> (u64, u64) {
    let bell = &seg.header().to_attacher;
    let (mut polls, mut backoff) = (0u32, Backoff(0));
    loop {
        if let Some(c) = try_command(rx) {
            return c;
        }
        if polls < IDLE_POLLS {
            polls += 1;
            backoff.snooze();
            continue;
        }
        bell.prepare_sleep();
        if !rx.is_empty().expect("data ring broken") {
            bell.cancel_sleep();
            continue;
        }
        bell.sleep(Some(Duration::from_millis(100)));
    }
}

// ---- the group ----

/// Both in-process pairs, each end on its own cache line.
struct InProcess {
    ptx: CachePadded<frame::Producer>,
    prx: CachePadded<frame::Consumer>,
    rtx: CachePadded<rtrb::Producer<MoveRecord>>,
    rrx: CachePadded<rtrb::Consumer<MoveRecord>>,
}

impl InProcess {
    /// New rings, every pair checked first, untimed: `VERIFY_N` records with every field of
    /// every record compared (this also faults in every page of both rings).
    fn checked() -> Self {
        let (ptx, prx) = frame::channel(RegionRef::heap(frame::region_size(FRAME_BYTES))).expect("plugbus ring");
        let (rtx, rrx) = rtrb::RingBuffer::<MoveRecord>::new(CAP);
        let mut r = Self {
            ptx: CachePadded::new(ptx),
            prx: CachePadded::new(prx),
            rtx: CachePadded::new(rtx),
            rrx: CachePadded::new(rrx),
        };
        let (ptx, prx, rtx, rrx) = (&mut r.ptx, &mut r.prx, &mut r.rtx, &mut r.rrx);
        two_threads(
            ptx,
            prx,
            VERIFY_N,
            |t, n| push_plugbus_one(t, n, || {}),
            read_plugbus::<true>,
        );
        two_threads(
            ptx,
            prx,
            VERIFY_N,
            |t, n| push_plugbus_batch(t, n, || {}),
            read_plugbus::<true>,
        );
        two_threads(rtx, rrx, VERIFY_N, push_rtrb_one, pop_rtrb::<true>);
        two_threads(rtx, rrx, VERIFY_N, push_rtrb_batch, read_rtrb::<true>);
        r
    }
}

fn bench_ring(c: &mut Criterion) {
    let mut r = InProcess::checked();

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1))
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(30);

    g.bench_function("plugbus/one", |b| {
        b.iter_custom(|n| {
            two_threads(
                &mut r.ptx,
                &mut r.prx,
                n,
                |t, n| push_plugbus_one(t, n, || {}),
                read_plugbus::<false>,
            )
        })
    });
    g.bench_function("rtrb/one", |b| {
        b.iter_custom(|n| two_threads(&mut r.rtx, &mut r.rrx, n, push_rtrb_one, pop_rtrb::<false>))
    });
    g.bench_function("plugbus/batch64", |b| {
        b.iter_custom(|n| {
            two_threads(
                &mut r.ptx,
                &mut r.prx,
                n,
                |t, n| push_plugbus_batch(t, n, || {}),
                read_plugbus::<false>,
            )
        })
    });
    g.bench_function("rtrb/batch64", |b| {
        b.iter_custom(|n| two_threads(&mut r.rtx, &mut r.rrx, n, push_rtrb_batch, read_rtrb::<false>))
    });

    // The child is spawned (and checked) on the first sample and serves every later one.
    let mut cross: Option<CrossProcess> = None;
    for (id, mode, batched) in [
        ("plugbus/xproc-one", Mode::Frames, false),
        ("plugbus/xproc-batch64", Mode::Frames, true),
        ("plain/xproc-one", Mode::PlainOne, false),
        ("plain/xproc-batch64", Mode::PlainBatch, true),
    ] {
        g.bench_function(id, |b| {
            let cp = cross.get_or_insert_with(CrossProcess::spawn);
            b.iter_custom(|n| cp.run(n, mode, batched, false))
        });
    }
    g.finish();
    drop(cross);
}

criterion_group!(benches, bench_ring);

// ---- paired in-process runs: plugbus and rtrb alternating, for a ratio less exposed to drift ----

/// Environment variable that runs [`paired`] instead of criterion; its value is the number of
/// rounds.
const PAIRED_ENV: &str = "PLUGBUS_BENCH_PAIRED";
/// Records each run of a pair moves (about 10 to 40 ms at this bench's rates): short, so the two
/// runs of a round see the same machine.
const PAIRED_N: u64 = 1 << 20;

/// Runs `rounds` rounds of the four in-process pairs, plugbus and rtrb taking turns within each
/// round (the first in one round goes second in the next), and prints, per mode, the
/// median rate of each ring and the median, quartiles and range of the per-round ratio
/// plugbus / rtrb.
///
/// The criterion group measures each function for seconds before the next one starts, so a
/// change in the machine's load between the two shows up in their ratio (on a shared 2-vCPU
/// machine, runs gave ratios from 0.81 to 1.14 with nothing changed). Here the two runs of a
/// round are tens of milliseconds apart, and the ratio is taken per round.
fn paired(rounds: usize) {
    let mut r = InProcess::checked();
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default();
    let rate = |d: Duration| PAIRED_N as f64 / d.as_secs_f64() / 1e6;
    for round in 0..rounds {
        for (mode, batched) in [false, true].into_iter().enumerate() {
            let mut run_plugbus = || {
                rate(if batched {
                    two_threads(
                        &mut r.ptx,
                        &mut r.prx,
                        PAIRED_N,
                        |t, n| push_plugbus_batch(t, n, || {}),
                        read_plugbus::<false>,
                    )
                } else {
                    two_threads(
                        &mut r.ptx,
                        &mut r.prx,
                        PAIRED_N,
                        |t, n| push_plugbus_one(t, n, || {}),
                        read_plugbus::<false>,
                    )
                })
            };
            let mut run_rtrb = || {
                rate(if batched {
                    two_threads(&mut r.rtx, &mut r.rrx, PAIRED_N, push_rtrb_batch, read_rtrb::<false>)
                } else {
                    two_threads(&mut r.rtx, &mut r.rrx, PAIRED_N, push_rtrb_one, pop_rtrb::<false>)
                })
            };
            let (p, r) = if round % 2 == 0 {
                let p = run_plugbus();
                (p, run_rtrb())
            } else {
                let r = run_rtrb();
                (run_plugbus(), r)
            };
            rates[mode][0].push(p);
            rates[mode][1].push(r);
        }
    }
    println!("paired runs: {rounds} rounds of {PAIRED_N} records per run, M records/s");
    for (mode, name) in ["one", "batch64"].into_iter().enumerate() {
        let [p, r] = &rates[mode];
        let mut ratios: Vec<f64> = p.iter().zip(r).map(|(p, r)| p / r).collect();
        ratios.sort_by(f64::total_cmp);
        let at_least = ratios.iter().filter(|&&x| x >= 1.0).count();
        println!(
            "{name:>8}: plugbus {:.1}  rtrb {:.1}  ratio median {:.3}  quartiles {:.3} .. {:.3}  range {:.3} .. {:.3}  plugbus >= rtrb in {at_least} of {}",
            median(p),
            median(r),
            quantile(&ratios, 0.5),
            quantile(&ratios, 0.25),
            quantile(&ratios, 0.75),
            ratios[0],
            ratios[ratios.len() - 1],
            ratios.len()
        );
    }
}

/// The median of `v` (not empty).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    quantile(&s, 0.5)
}

/// The `q` quantile of sorted, non-empty `s` (nearest rank).
fn quantile(s: &[f64], q: f64) -> f64 {
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    // Re-executed as the cross-process consumer: serve, and do not touch criterion.
    if let Ok(name) = std::env::var(CHILD_ENV) {
        child_main(&name);
        return;
    }
    // Read the affinity mask before anything is pinned.
    cpus();
    if let Ok(v) = std::env::var(PAIRED_ENV) {
        let rounds = v.parse().ok().filter(|&r| r > 0);
        paired(rounds.unwrap_or_else(|| panic!("{PAIRED_ENV} must be a number of rounds above 0, not {v:?}")));
        return;
    }
    // What criterion_main! would generate.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
