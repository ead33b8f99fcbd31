//! Throughput of the plugbus record ring against rtrb, and across a real process boundary.
//!
//! One criterion group, `ring`, with `Throughput::Elements(1)` (one element = one 48-byte record)
//! and every competitor in it, so that the ratios come from one run:
//!
//! - `plugbus/one`: `try_push` one record at a time; the consumer borrows whatever is readable in
//!   place (`read`) and commits it: the zero-copy path.
//! - `plugbus/one-pop`: `try_push` / `try_pop`, one record at a time on both sides: the
//!   like-for-like match for `rtrb/one`.
//! - `rtrb/one`: rtrb's `push` / `pop`.
//! - `plugbus/batch64`: `push_slice` of 64 records (one `tail` publish); zero-copy reads.
//! - `rtrb/batch64`: `push_partial_slice` of 64 records (the same semantics as `push_slice`: copy
//!   what fits, one publish); `read_chunk` of everything readable.
//! - `plugbus/cross-process`: the `plugbus/one` pair over a real shared-memory segment, with the
//!   consumer in a child process (this binary, re-executed with `PLUGBUS_BENCH_CHILD` set).
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
#![warn(clippy::undocumented_unsafe_blocks)]

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group};
use crossbeam_utils::CachePadded;
use plugbus::ring::{RegionRef, record};
use plugbus::segment::{self, RingSpec, Segment};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

mod common;
use common::{Backoff, die_with_parent};

/// Ring capacity in records, for every competitor.
const CAP: usize = 4096;
/// Records per batch push.
const BATCH: usize = 64;
/// Records moved in the untimed correctness run: not a multiple of `BATCH`, many times `CAP`.
const VERIFY_N: u64 = 100_003;

/// A game-server event: 48 bytes, no padding, any bit pattern valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Rec {
    seq: u64,
    tick: u64,
    entity: u64,
    value: u64,
    pos: [f32; 3],
    kind: u32,
}

const _: () = {
    assert!(std::mem::size_of::<Rec>() == 48);
    assert!(std::mem::align_of::<Rec>() == 8);
    assert!(std::mem::offset_of!(Rec, pos) == 32);
    assert!(std::mem::offset_of!(Rec, kind) == 44);
};

impl Rec {
    /// The record with sequence number `seq`; every field is derived from it, so the consumer
    /// can check a whole record.
    #[inline]
    fn new(seq: u64) -> Self {
        Self {
            seq,
            tick: seq >> 6,
            entity: seq & 0xffff,
            value: seq.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pos: [seq as f32, 1.5, -2.0],
            kind: (seq & 3) as u32 + 1,
        }
    }
}

/// Nonzero if `r` is not record `next`: the sequence number always, every field if `FULL`.
#[inline(always)]
fn check<const FULL: bool>(r: &Rec, next: u64) -> u64 {
    let mut bad = r.seq ^ next;
    if FULL {
        bad |= u64::from(*r != Rec::new(next));
    }
    bad
}

// ---- producers: push records 0..iters ----

/// plugbus, one `try_push` per record; `stalled` runs now and then while the ring stays full.
fn push_plugbus_one(tx: &mut record::Producer<Rec>, iters: u64, mut stalled: impl FnMut()) {
    let mut backoff = Backoff(0);
    for seq in 0..iters {
        push_plugbus(tx, Rec::new(seq), &mut backoff, &mut stalled);
    }
}

#[inline]
fn push_plugbus(tx: &mut record::Producer<Rec>, rec: Rec, backoff: &mut Backoff, stalled: &mut impl FnMut()) {
    while let Err(e) = tx.try_push(rec) {
        match e {
            record::PushError::Full(_) => {
                if backoff.snooze() {
                    stalled();
                }
            }
            record::PushError::Broken(e) => panic!("plugbus ring broken: {e}"),
        }
    }
}

fn push_rtrb_one(p: &mut rtrb::Producer<Rec>, iters: u64) {
    let mut backoff = Backoff(0);
    for seq in 0..iters {
        while p.push(Rec::new(seq)).is_err() {
            backoff.snooze();
        }
    }
}

/// Fills batches of `BATCH` records (the last one shorter) and hands them to `push`, which copies
/// as many as fit and returns how many.
#[inline]
fn push_batches(iters: u64, mut push: impl FnMut(&[Rec]) -> usize) {
    let mut buf = [Rec::new(0); BATCH];
    let mut backoff = Backoff(0);
    let mut seq = 0;
    while seq < iters {
        let n = (iters - seq).min(BATCH as u64) as usize;
        for (i, r) in buf[..n].iter_mut().enumerate() {
            *r = Rec::new(seq + i as u64);
        }
        let mut done = 0;
        while done < n {
            let k = push(&buf[done..n]);
            if k == 0 {
                backoff.snooze();
            }
            done += k;
        }
        seq += n as u64;
    }
}

fn push_plugbus_batch(tx: &mut record::Producer<Rec>, iters: u64) {
    push_batches(iters, |b| tx.push_slice(b).expect("plugbus ring broken"));
}

fn push_rtrb_batch(p: &mut rtrb::Producer<Rec>, iters: u64) {
    push_batches(iters, |b| p.push_partial_slice(b).0.len());
}

// ---- consumers: receive records 0..iters, return nonzero if any was wrong ----

/// plugbus zero-copy: borrow every readable record in place, check it, commit.
fn read_plugbus<const FULL: bool>(rx: &mut record::Consumer<Rec>, iters: u64) -> u64 {
    let (mut next, mut bad, mut backoff) = (0, 0, Backoff(0));
    while next < iters {
        let batch = rx.read((iters - next) as usize).expect("plugbus ring broken");
        if batch.is_empty() {
            backoff.snooze();
            continue;
        }
        for r in batch.iter() {
            bad |= check::<FULL>(r, next);
            next += 1;
        }
        batch.commit();
    }
    bad
}

fn pop_plugbus<const FULL: bool>(rx: &mut record::Consumer<Rec>, iters: u64) -> u64 {
    let (mut bad, mut backoff) = (0, Backoff(0));
    for next in 0..iters {
        loop {
            if let Some(r) = rx.try_pop().expect("plugbus ring broken") {
                bad |= check::<FULL>(&r, next);
                break;
            }
            backoff.snooze();
        }
    }
    bad
}

fn pop_rtrb<const FULL: bool>(c: &mut rtrb::Consumer<Rec>, iters: u64) -> u64 {
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
fn read_rtrb<const FULL: bool>(c: &mut rtrb::Consumer<Rec>, iters: u64) -> u64 {
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
/// Capacity of the acknowledgement ring (child -> parent).
const ACK_CAP: u64 = 64;
/// The `seq` of a control record (data records never get there).
const CONTROL: u64 = u64::MAX;
/// Control kinds, parent -> child: a run of `value` records, checked per `seq` or in full; quit.
const RUN: u32 = 1;
const RUN_FULL: u32 = 2;
const QUIT: u32 = 3;
/// Control kinds, child -> parent: ready for the run; run done (`value` nonzero if bad).
const READY: u32 = 4;
const DONE: u32 = 5;
/// Idle polls before the child sleeps on its doorbell between runs.
const IDLE_POLLS: u32 = 1 << 16;

fn control(kind: u32, value: u64) -> Rec {
    Rec {
        seq: CONTROL,
        kind,
        value,
        ..Rec::new(0)
    }
}

/// The parent side: a segment with a data ring (parent -> child) and an ack ring back, and the
/// child consuming from it. Made once per benchmark function, reused by every sample.
struct CrossProcess {
    child: Child,
    tx: record::Producer<Rec>,
    acks: record::Consumer<Rec>,
    seg: Segment,
}

impl CrossProcess {
    fn spawn() -> Self {
        let name = segment::unique_name("bench");
        let rings = [RingSpec::records::<Rec>(CAP as u64), RingSpec::records::<Rec>(ACK_CAP)];
        let seg = Segment::create(&name, "bench", &rings).expect("create the bench segment");
        let tx = record::Producer::attach(seg.ring_region(0).expect("data ring")).expect("attach data ring");
        let acks = record::Consumer::attach(seg.ring_region(1).expect("ack ring")).expect("attach ack ring");
        let exe = std::env::current_exe().expect("path of the bench binary");
        let mut cmd = Command::new(exe);
        cmd.env(CHILD_ENV, &name).stdin(Stdio::null());
        if let Some(c) = cpus() {
            cmd.env(CHILD_CPU_ENV, c.consumer.to_string());
        }
        let child = cmd.spawn().expect("spawn the bench child");
        let mut cp = Self { child, tx, acks, seg };
        cp.run(VERIFY_N, RUN_FULL);
        cp
    }

    /// One run of `iters` records, timed from the first data push until the child's DONE. The
    /// calling thread produces on `Cpus::producer` (the child consumes on `Cpus::consumer`).
    fn run(&mut self, iters: u64, kind: u32) -> Duration {
        if let Some(c) = cpus() {
            pin(&[c.producer]);
        }
        let elapsed = self.run_here(iters, kind);
        if let Some(c) = cpus() {
            pin(&c.all);
        }
        elapsed
    }

    fn run_here(&mut self, iters: u64, kind: u32) -> Duration {
        self.send_control(kind, iters);
        assert_eq!(self.wait_ack(READY), 0);
        let start = Instant::now();
        let child = &mut self.child;
        push_plugbus_one(&mut self.tx, iters, || check_child(child));
        let bad = self.wait_ack(DONE);
        let elapsed = start.elapsed();
        assert_eq!(bad, 0, "the child received records out of order or damaged");
        elapsed
    }

    fn send_control(&mut self, kind: u32, value: u64) {
        let child = &mut self.child;
        push_plugbus(&mut self.tx, control(kind, value), &mut Backoff(0), &mut || {
            check_child(child)
        });
        self.seg.header().to_attacher.ring();
    }

    fn wait_ack(&mut self, kind: u32) -> u64 {
        let mut backoff = Backoff(0);
        loop {
            if let Some(r) = self.acks.try_pop().expect("ack ring broken") {
                assert!(r.seq == CONTROL && r.kind == kind, "expected ack {kind}, got {r:?}");
                return r.value;
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
        if self.tx.try_push(control(QUIT, 0)).is_ok() {
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
    let mut rx = record::Consumer::<Rec>::attach(seg.ring_region(0).expect("data ring")).expect("attach data ring");
    let mut acks = record::Producer::<Rec>::attach(seg.ring_region(1).expect("ack ring")).expect("attach ack ring");
    let mut ack = |kind, value| push_plugbus(&mut acks, control(kind, value), &mut Backoff(0), &mut || {});
    loop {
        let ctl = next_control(&seg, &mut rx);
        let bad = match ctl.kind {
            RUN => {
                ack(READY, 0);
                read_plugbus::<false>(&mut rx, ctl.value)
            }
            RUN_FULL => {
                ack(READY, 0);
                read_plugbus::<true>(&mut rx, ctl.value)
            }
            QUIT => return,
            k => panic!("bench child: unknown control kind {k}"),
        };
        ack(DONE, bad);
    }
}

/// Waits for the next control record: spins a while, then sleeps on the segment's doorbell.
fn next_control(seg: &Segment, rx: &mut record::Consumer<Rec>) -> Rec {
    let bell = &seg.header().to_attacher;
    let (mut polls, mut backoff) = (0u32, Backoff(0));
    loop {
        if let Some(r) = rx.try_pop().expect("data ring broken") {
            assert_eq!(r.seq, CONTROL, "bench child: expected a control record, got {r:?}");
            return r;
        }
        if polls < IDLE_POLLS {
            polls += 1;
            backoff.snooze();
            continue;
        }
        bell.prepare_sleep();
        if rx.available().expect("data ring broken") > 0 {
            bell.cancel_sleep();
            continue;
        }
        bell.sleep(Some(Duration::from_millis(100)));
    }
}

// ---- the group ----

fn bench_ring(c: &mut Criterion) {
    let region = RegionRef::heap(record::region_size::<Rec>(CAP));
    let (ptx, prx) = record::channel::<Rec>(region).expect("plugbus ring");
    let (mut ptx, mut prx) = (CachePadded::new(ptx), CachePadded::new(prx));
    let (rtx, rrx) = rtrb::RingBuffer::<Rec>::new(CAP);
    let (mut rtx, mut rrx) = (CachePadded::new(rtx), CachePadded::new(rrx));

    // Correctness first, untimed (this also faults in every page of both rings).
    two_threads(
        &mut ptx,
        &mut prx,
        VERIFY_N,
        |t, n| push_plugbus_one(t, n, || {}),
        read_plugbus::<true>,
    );
    two_threads(
        &mut ptx,
        &mut prx,
        VERIFY_N,
        |t, n| push_plugbus_one(t, n, || {}),
        pop_plugbus::<true>,
    );
    two_threads(&mut ptx, &mut prx, VERIFY_N, push_plugbus_batch, read_plugbus::<true>);
    two_threads(&mut rtx, &mut rrx, VERIFY_N, push_rtrb_one, pop_rtrb::<true>);
    two_threads(&mut rtx, &mut rrx, VERIFY_N, push_rtrb_batch, read_rtrb::<true>);

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1))
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(30);

    g.bench_function("plugbus/one", |b| {
        b.iter_custom(|n| {
            two_threads(
                &mut ptx,
                &mut prx,
                n,
                |t, n| push_plugbus_one(t, n, || {}),
                read_plugbus::<false>,
            )
        })
    });
    g.bench_function("plugbus/one-pop", |b| {
        b.iter_custom(|n| {
            two_threads(
                &mut ptx,
                &mut prx,
                n,
                |t, n| push_plugbus_one(t, n, || {}),
                pop_plugbus::<false>,
            )
        })
    });
    g.bench_function("rtrb/one", |b| {
        b.iter_custom(|n| two_threads(&mut rtx, &mut rrx, n, push_rtrb_one, pop_rtrb::<false>))
    });
    g.bench_function("plugbus/batch64", |b| {
        b.iter_custom(|n| two_threads(&mut ptx, &mut prx, n, push_plugbus_batch, read_plugbus::<false>))
    });
    g.bench_function("rtrb/batch64", |b| {
        b.iter_custom(|n| two_threads(&mut rtx, &mut rrx, n, push_rtrb_batch, read_rtrb::<false>))
    });

    // The child is spawned (and checked) on the first sample and serves every later one.
    let mut cross: Option<CrossProcess> = None;
    g.bench_function("plugbus/cross-process", |b| {
        let cp = cross.get_or_insert_with(CrossProcess::spawn);
        b.iter_custom(|n| cp.run(n, RUN))
    });
    g.finish();
    drop(cross);
}

criterion_group!(benches, bench_ring);

fn main() {
    // Re-executed as the cross-process consumer: serve, and do not touch criterion.
    if let Ok(name) = std::env::var(CHILD_ENV) {
        child_main(&name);
        return;
    }
    // Read the affinity mask before anything is pinned.
    cpus();
    // What criterion_main! would generate.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
