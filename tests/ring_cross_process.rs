//! The frame ring between two real processes over a real shared-memory segment: move frames
//! (the movement fast path) and frames of every length and kind.
//!
//! The parent test creates a segment and re-executes this test binary as the child
//! (`--exact <child test> --nocapture --test-threads=1`, role and segment name in
//! [`CHILD_VAR`]). The child attaches with `Segment::open`, consumes and verifies everything,
//! and reports through its exit status and a `RESULT` line on stdout (count and running hash),
//! which the parent compares with its own. Without the variable the child tests return at once.
//!
//! Every wait loop gives up after [`STALL`] without progress, and the parent also stops as soon
//! as the child has exited, so a bug fails the test instead of hanging it.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use plugbus::fastpath::{self, MoveRecord};
use plugbus::ring::{self, frame};
use plugbus::segment::header::{RingKind, STATE_DETACHED};
use plugbus::segment::{RingSpec, Segment, unique_name};
use plugbus::sync::Ordering;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `<role>:<parent pid>:<segment name>` for a child; absent in the parent.
const CHILD_VAR: &str = "PLUGBUS_XPROC_CHILD";
/// How long a wait loop may go without progress before the test fails.
const STALL: Duration = Duration::from_secs(120);

/// Move records streamed (a tenth in unoptimized builds, which are ~10x slower; the full count
/// is what `cargo test --release` runs).
const RECORDS: u64 = if cfg!(debug_assertions) { 1_000_000 } else { 10_000_000 };
/// Data bytes of the moves ring: a tick of 1024 records (49 176 bytes) fits one frame.
const MOVES_CAPACITY: u64 = 1 << 17;
const RECORD_SEED: u64 = 0x5EED_0000_0000_0001;

/// Frames streamed (a tenth in unoptimized builds, as for [`RECORDS`]).
const FRAMES: u64 = if cfg!(debug_assertions) { 100_000 } else { 1_000_000 };
const FRAME_CAPACITY: u64 = 1 << 18;
const FRAME_MAX_LEN: u64 = 4096;
const FRAME_SEED: u64 = 0x5EED_0000_0000_0002;

/// The two streaming tests each keep two processes busy; on a small machine they run one at a
/// time.
static HEAVY: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------

/// xorshift64: deterministic, so both processes draw the same sequence from the same seed.
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

    /// Uniform enough in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A 64-bit mixer (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A running hash both sides compute over what went through the ring.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Hash(u64);

impl Hash {
    const START: Self = Self(0xCBF2_9CE4_8422_2325);

    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(17);
    }
}

/// Waits politely: spins a little, then yields; checks a deadline and a liveness condition
/// every so often, and fails after [`STALL`] without progress.
struct Waiter {
    spins: u32,
    idle_since: Option<Instant>,
}

impl Waiter {
    fn new() -> Self {
        Self {
            spins: 0,
            idle_since: None,
        }
    }

    fn progress(&mut self) {
        self.spins = 0;
        self.idle_since = None;
    }

    fn idle(&mut self, what: &str, alive: &mut dyn FnMut() -> Result<(), String>) -> Result<(), String> {
        self.spins += 1;
        if self.spins < 64 {
            std::hint::spin_loop();
            return Ok(());
        }
        std::thread::yield_now();
        if self.spins % 128 == 0 {
            let now = Instant::now();
            let since = *self.idle_since.get_or_insert(now);
            if now.duration_since(since) > STALL {
                return Err(format!("no progress for {STALL:?} while {what}"));
            }
            alive()?;
        }
        Ok(())
    }
}

/// Kills and reaps the child if the test ends without having done so.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Re-executes this test binary running only `test`, as child `role` on segment `name`.
fn spawn_child(test: &str, role: &str, name: &str) -> ChildGuard {
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, format!("{role}:{}:{name}", std::process::id()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    ChildGuard(child)
}

/// In a child test: the segment name if this process is child `role`, else `None`.
fn child_role(role: &str) -> Option<(u32, String)> {
    let v = std::env::var(CHILD_VAR).ok()?;
    let mut parts = v.splitn(3, ':');
    if parts.next()? != role {
        return None;
    }
    let parent = parts.next()?.parse().ok()?;
    Some((parent, parts.next()?.to_owned()))
}

/// In a child: fails once the parent that spawned it is gone.
fn parent_alive(parent: u32) -> impl FnMut() -> Result<(), String> {
    move || {
        if std::os::unix::process::parent_id() == parent {
            Ok(())
        } else {
            Err("the parent test process went away".to_owned())
        }
    }
}

/// In the parent: fails as soon as the child has exited.
fn child_running(child: &mut ChildGuard) -> impl FnMut() -> Result<(), String> + '_ {
    move || match child.0.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(format!("the child exited early ({status}){}", drain_output(child))),
        Err(e) => Err(format!("try_wait: {e}")),
    }
}

/// The child's stdout and stderr (after it exited), for failure messages.
fn drain_output(child: &mut ChildGuard) -> String {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.0.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.0.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    format!("\n--- child stdout ---\n{out}\n--- child stderr ---\n{err}")
}

/// Waits (with a deadline) for the child to exit; returns its stdout. Panics with the child's
/// output if it failed.
fn finish_child(child: &mut ChildGuard) -> String {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            start.elapsed() < STALL,
            "the child did not exit within {STALL:?}{}",
            drain_output(child)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    if !status.success() {
        panic!("child failed ({status}):{}{}", out, drain_output(child));
    }
    out
}

/// The `RESULT count=<n> hash=<h>` line a child printed.
fn parse_result(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no RESULT line in child output:\n{out}"));
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    (field("count="), field("hash="))
}

/// Runs a child's body: prints its verdict, and fails the child test (non-zero exit) on error.
fn child_main(body: impl FnOnce() -> Result<(u64, Hash), String>) {
    match body() {
        Ok((count, hash)) => println!("\nRESULT count={count} hash={}", hash.0),
        Err(e) => {
            println!("\nFAIL {e}");
            panic!("child failed: {e}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// Records
// ------------------------------------------------------------------------------------------

/// A 48-byte record like a movement record: a sequence number, some payload, a checksum.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Move {
    seq: u64,
    uuid: [u8; 16],
    x: u32,
    y: u32,
    tick: u64,
    /// `checksum` of the other fields.
    check: u64,
}

const _: () = assert!(std::mem::size_of::<Move>() == 48);

impl Move {
    fn new(seq: u64) -> Self {
        let a = mix(seq);
        let b = mix(a);
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&a.to_le_bytes());
        uuid[8..].copy_from_slice(&b.to_le_bytes());
        let mut m = Self {
            seq,
            uuid,
            x: b as u32,
            y: (b >> 32) as u32,
            tick: seq / 100,
            check: 0,
        };
        m.check = m.checksum();
        m
    }

    fn checksum(&self) -> u64 {
        let u0 = u64::from_le_bytes(self.uuid[..8].try_into().unwrap());
        let u1 = u64::from_le_bytes(self.uuid[8..].try_into().unwrap());
        let xy = u64::from(self.x) | (u64::from(self.y) << 32);
        mix(self.seq ^ mix(u0 ^ mix(u1 ^ mix(xy ^ mix(self.tick)))))
    }

    fn hash_into(&self, h: &mut Hash) {
        for w in <[u64; 6]>::read_from_bytes(self.as_bytes()).unwrap() {
            h.add(w);
        }
    }
}

/// The record of `m`'s bytes, as the move ring carries it.
fn as_record(m: &Move) -> MoveRecord {
    MoveRecord::read_from_bytes(m.as_bytes()).unwrap()
}

/// Move frames, the movement fast path the runtime uses: ticks of one record (a frame each,
/// the smallest frame the host writes) or of up to 1024 records in one frame, written with
/// `fastpath::write_frame` and read in place in the child with `fastpath::parse`.
#[test]
fn move_frames_between_processes() {
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("xproc-moves");
    let seg = Segment::create(&name, "xproc-moves", &[RingSpec::frames(MOVES_CAPACITY)]).unwrap();
    let region = seg.ring_region(0).unwrap();
    let mut tx = frame::Producer::attach(region.clone()).unwrap();
    let mut child = spawn_child("child_move_consumer", "moves", &name);

    let mut rng = Rng(RECORD_SEED);
    let mut hash = Hash::START;
    let mut waiter = Waiter::new();
    let mut batch: Vec<MoveRecord> = Vec::with_capacity(1024);
    let (mut seq, mut tick, mut batches, mut singles) = (0u64, 0u64, 0u64, 0u64);
    while seq < RECORDS {
        let r = rng.next();
        let n = if r % 4 == 0 {
            singles += 1;
            1
        } else {
            batches += 1;
            match (r >> 8) % 8 {
                0..=3 => 1 + (r >> 16) % 16,
                4..=6 => 1 + (r >> 16) % 256,
                _ => 1 + (r >> 16) % 1024,
            }
            .min(RECORDS - seq)
        };
        batch.clear();
        batch.extend((seq..seq + n).map(|s| as_record(&Move::new(s))));
        loop {
            match fastpath::write_frame(&mut tx, tick, 0, &batch) {
                Ok(1) => break,
                Ok(k) => panic!("a tick of {n} records took {k} frames"),
                Err(frame::ReserveError::Full { .. }) => {
                    waiter
                        .idle("writing a move frame", &mut child_running(&mut child))
                        .unwrap();
                }
                Err(e) => panic!("write_frame: {e}"),
            }
        }
        waiter.progress();
        for s in seq..seq + n {
            Move::new(s).hash_into(&mut hash);
        }
        seq += n;
        tick += 1;
    }
    assert!(singles > 0 && batches > 0);

    let out = finish_child(&mut child);
    let (count, child_hash) = parse_result(&out);
    assert_eq!(count, RECORDS, "child counted a different number of records");
    assert_eq!(child_hash, hash.0, "child's running hash differs from the parent's");
    // Everything was released by the consumer, and it detached cleanly.
    let (head, tail) = ring::positions(&region);
    assert_eq!(head, tail, "the child left frames unreleased");
    assert_eq!(seg.header().shared.state.load(Ordering::Acquire), STATE_DETACHED);
    assert_eq!(seg.header().shared.attacher_pid.load(Ordering::Acquire), 0);
}

#[test]
fn child_move_consumer() {
    let Some((parent, name)) = child_role("moves") else {
        return;
    };
    child_main(|| {
        let seg = Segment::open(&name).map_err(|e| e.to_string())?;
        let d = seg.rings()[0];
        if RingKind::from_u32(d.kind) != Some(RingKind::Frame) || d.capacity != MOVES_CAPACITY {
            return Err(format!("unexpected ring descriptor {d:?}"));
        }
        let mut rx = frame::Consumer::attach(seg.frame_region(0).unwrap()).map_err(|e| e.to_string())?;
        let mut alive = parent_alive(parent);
        let mut waiter = Waiter::new();
        let mut hash = Hash::START;
        let (mut next, mut tick) = (0u64, 0u64);
        while next < RECORDS {
            let Some(f) = rx.try_read().map_err(|e| format!("read at {next}: {e}"))? else {
                waiter.idle("waiting for move frames", &mut alive)?;
                continue;
            };
            waiter.progress();
            if f.kind() != fastpath::KIND_MOVES {
                return Err(format!("frame of kind {} at record {next}", f.kind()));
            }
            let (header, records) = fastpath::parse(f.payload()).map_err(|e| format!("at record {next}: {e}"))?;
            if header.tick != tick || header.flags != 0 || records.is_empty() {
                return Err(format!("expected tick {tick}, got {header:?}"));
            }
            for r in records {
                let m = Move::ref_from_bytes(r.as_bytes()).map_err(|e| e.to_string())?;
                if m.seq != next {
                    return Err(format!("expected record {next}, got {} (lost or duplicated)", m.seq));
                }
                if m.check != m.checksum() {
                    return Err(format!("record {next} has a bad checksum: {m:?}"));
                }
                m.hash_into(&mut hash);
                next += 1;
            }
            tick += 1;
        }
        // The parent wrote exactly RECORDS and nothing more: the ring must now be empty.
        if !rx.is_empty().map_err(|e| e.to_string())? {
            return Err("frames beyond the last record".into());
        }
        Ok((next, hash))
    });
}

// ------------------------------------------------------------------------------------------
// Frames
// ------------------------------------------------------------------------------------------

/// How frame `seq` is written; both sides draw it from the same generator.
struct FramePlan {
    len: usize,
    kind: u32,
    /// 0: try_push; 1: reserve exactly and commit; 2: reserve more, commit_len(len).
    path: u64,
    extra: usize,
}

fn plan(rng: &mut Rng) -> FramePlan {
    let len = 1 + rng.below(FRAME_MAX_LEN) as usize;
    // Any kind but 0 and PADDING.
    let kind = 1 + rng.below(u64::from(frame::PADDING - 1)) as u32;
    let path = rng.below(3);
    let extra = rng.below(64) as usize;
    FramePlan { len, kind, path, extra }
}

/// The payload of frame `seq`: 8-byte words derived from the sequence number.
fn fill_payload(seq: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = mix(seq.wrapping_mul(0x1_0000_0001) ^ i as u64);
        chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
    }
}

fn hash_frame(h: &mut Hash, seq: u64, kind: u32, payload: &[u8]) {
    h.add(seq);
    h.add(u64::from(kind) << 32 | payload.len() as u64);
    let head = payload.len().min(8);
    let mut w = [0u8; 8];
    w[..head].copy_from_slice(&payload[..head]);
    h.add(u64::from_le_bytes(w));
    let tail = &payload[payload.len() - head..];
    w = [0u8; 8];
    w[..head].copy_from_slice(tail);
    h.add(u64::from_le_bytes(w));
}

#[test]
fn frames_between_processes() {
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("xproc-frames");
    let seg = Segment::create(&name, "xproc-frames", &[RingSpec::frames(FRAME_CAPACITY)]).unwrap();
    let region = seg.ring_region(0).unwrap();
    let mut tx = frame::Producer::attach(region.clone()).unwrap();
    assert!(tx.max_payload() >= FRAME_MAX_LEN as usize + 64);
    let mut child = spawn_child("child_frame_consumer", "frames", &name);

    let mut rng = Rng(FRAME_SEED);
    let mut hash = Hash::START;
    let mut waiter = Waiter::new();
    let mut scratch = vec![0u8; FRAME_MAX_LEN as usize];
    let mut paths = [0u64; 3];
    let mut bytes = 0u64;
    for seq in 0..FRAMES {
        let p = plan(&mut rng);
        let payload = &mut scratch[..p.len];
        fill_payload(seq, payload);
        hash_frame(&mut hash, seq, p.kind, payload);
        loop {
            let r = match p.path {
                0 => tx.try_push(p.kind, payload),
                1 => tx.try_reserve(p.len).map(|mut g| {
                    fill_payload(seq, g.bytes_mut());
                    g.commit(p.kind);
                }),
                _ => tx.try_reserve(p.len + p.extra).map(|mut g| {
                    let b = g.bytes_mut();
                    fill_payload(seq, &mut b[..p.len]);
                    b[p.len..].fill(0xEE);
                    g.commit_len(p.kind, p.len);
                }),
            };
            match r {
                Ok(()) => break,
                Err(frame::ReserveError::Full { .. }) => {
                    waiter.idle("pushing a frame", &mut child_running(&mut child)).unwrap();
                }
                Err(e) => panic!("frame {seq}: {e}"),
            }
        }
        waiter.progress();
        paths[p.path as usize] += 1;
        bytes += p.len as u64;
    }
    assert!(paths.iter().all(|&n| n > 0), "every write path used: {paths:?}");
    assert!(bytes > FRAMES * 1024, "frames should average about 2 KiB");

    let out = finish_child(&mut child);
    let (count, child_hash) = parse_result(&out);
    assert_eq!(count, FRAMES, "child counted a different number of frames");
    assert_eq!(child_hash, hash.0, "child's running hash differs from the parent's");
    let (head, tail) = ring::positions(&region);
    assert_eq!(head, tail, "the child left frames unreleased");
    assert!(tail > FRAMES * 1024, "tail {tail} does not account for the bytes sent");
    assert_eq!(seg.header().shared.state.load(Ordering::Acquire), STATE_DETACHED);
}

#[test]
fn child_frame_consumer() {
    let Some((parent, name)) = child_role("frames") else {
        return;
    };
    child_main(|| {
        let seg = Segment::open(&name).map_err(|e| e.to_string())?;
        let d = seg.rings()[0];
        if RingKind::from_u32(d.kind) != Some(RingKind::Frame) || d.capacity != FRAME_CAPACITY {
            return Err(format!("unexpected ring descriptor {d:?}"));
        }
        let mut rx = frame::Consumer::attach(seg.ring_region(0).unwrap()).map_err(|e| e.to_string())?;
        let mut alive = parent_alive(parent);
        let mut waiter = Waiter::new();
        let mut hash = Hash::START;
        let mut rng = Rng(FRAME_SEED);
        let mut expected = vec![0u8; FRAME_MAX_LEN as usize];
        let mut seq = 0u64;
        while seq < FRAMES {
            let Some(f) = rx.try_read().map_err(|e| format!("read of frame {seq}: {e}"))? else {
                waiter.idle("waiting for frames", &mut alive)?;
                continue;
            };
            waiter.progress();
            let p = plan(&mut rng);
            if f.kind() != p.kind || f.payload().len() != p.len {
                return Err(format!(
                    "frame {seq}: kind {} len {}, expected kind {} len {}",
                    f.kind(),
                    f.payload().len(),
                    p.kind,
                    p.len
                ));
            }
            let want = &mut expected[..p.len];
            fill_payload(seq, want);
            if f.payload() != &want[..] {
                let at = f.payload().iter().zip(want.iter()).position(|(a, b)| a != b);
                return Err(format!("frame {seq}: payload differs at byte {at:?}"));
            }
            if f.payload().as_ptr() as usize % 8 != 0 {
                return Err(format!("frame {seq}: payload not 8-aligned"));
            }
            hash_frame(&mut hash, seq, f.kind(), f.payload());
            seq += 1;
        }
        // The parent wrote exactly FRAMES frames: nothing may follow.
        if let Some(f) = rx.try_read().map_err(|e| e.to_string())? {
            return Err(format!("an extra frame of kind {} after the last one", f.kind()));
        }
        Ok((seq, hash))
    });
}
