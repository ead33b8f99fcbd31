//! Named shared-memory segments: creation, names, permissions, every check `open` makes on an
//! untrusted header, attachment between live processes, unlinking, and stale-segment cleanup.
//!
//! Corrupt segments are made by writing to `/dev/shm/<name>` (a normal file on Linux) at the
//! offsets of the public header types. Tests that need a second process re-execute this test
//! binary (`--exact <child test>`) with the role in [`CHILD_VAR`].

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::mem::{offset_of, size_of};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plugbus::segment::header::{Fixed, STATE_ATTACHED, STATE_DETACHED, STATE_READY};
use plugbus::segment::{
    Header, LAYOUT_VERSION, MAGIC, MAX_NAME, MAX_RINGS, RingDesc, RingKind, RingSpec, Segment, SegmentCreateError,
    SegmentOpenError, Side, stale, unique_name, valid_name,
};
use plugbus::sync::Ordering;

/// `<role>:<segment name>` for a child process; absent in the parent.
const CHILD_VAR: &str = "PLUGBUS_SEGMENT_CHILD";
/// How long the parent waits for a child to say something or exit.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

fn shm_path(name: &str) -> PathBuf {
    PathBuf::from("/dev/shm").join(name)
}

/// A segment with two frame rings of different sizes, and its size.
fn two_rings(tag: &str) -> (Segment, u64) {
    let name = unique_name(tag);
    let seg = Segment::create(&name, tag, &[RingSpec::frames(4096), RingSpec::frames(512)]).unwrap();
    let size = seg.len() as u64;
    // The untouched segment opens: whatever fails later is the corruption's doing.
    Segment::open_unattached(&name).expect("a fresh segment opens");
    (seg, size)
}

/// Overwrites bytes of segment `name` at byte offset `off`, through the file system.
fn write_at(name: &str, off: usize, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(shm_path(name)).unwrap();
    f.write_all_at(bytes, off as u64).unwrap();
}

/// Byte offset of a field of `Fixed` in the segment (the fixed part starts the header).
fn fixed(field: usize) -> usize {
    offset_of!(Header, fixed) + field
}

/// Byte offset of a field of ring descriptor `i`.
fn desc(i: usize, field: usize) -> usize {
    fixed(offset_of!(Fixed, rings)) + i * size_of::<RingDesc>() + field
}

fn open_err(name: &str) -> SegmentOpenError {
    match Segment::open_unattached(name) {
        Ok(_) => panic!("segment {name} opened despite the corruption"),
        Err(e) => e,
    }
}

/// The `Corrupt` reason, or a panic naming what came instead.
fn corrupt_reason(e: SegmentOpenError) -> String {
    match e {
        SegmentOpenError::Corrupt { reason, .. } => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// Header checks
// ------------------------------------------------------------------------------------------

#[test]
fn wrong_magic() {
    let (seg, _) = two_rings("magic");
    let bad = u64::from_le_bytes(*b"PLUGBUS\x02");
    write_at(seg.name(), fixed(offset_of!(Fixed, magic)), &bad.to_ne_bytes());
    match open_err(seg.name()) {
        SegmentOpenError::NotPlugbus { name, found } => {
            assert_eq!(name, seg.name());
            assert_eq!(found, bad);
        }
        other => panic!("expected NotPlugbus, got {other:?}"),
    }
    // A segment whose creator has not published the magic yet looks the same.
    write_at(seg.name(), fixed(offset_of!(Fixed, magic)), &0u64.to_ne_bytes());
    assert!(matches!(
        open_err(seg.name()),
        SegmentOpenError::NotPlugbus { found: 0, .. }
    ));
    // And so does the attacher's open.
    assert!(matches!(
        Segment::open(seg.name()),
        Err(SegmentOpenError::NotPlugbus { .. })
    ));
}

#[test]
fn wrong_version() {
    let (seg, _) = two_rings("version");
    write_at(
        seg.name(),
        fixed(offset_of!(Fixed, version)),
        &(LAYOUT_VERSION + 1).to_ne_bytes(),
    );
    match open_err(seg.name()) {
        SegmentOpenError::WrongVersion { found, expected, .. } => {
            assert_eq!((found, expected), (LAYOUT_VERSION + 1, LAYOUT_VERSION));
        }
        other => panic!("expected WrongVersion, got {other:?}"),
    }
}

#[test]
fn wrong_header_size() {
    let (seg, _) = two_rings("hdrsize");
    let bad = size_of::<Header>() as u32 + 128;
    write_at(seg.name(), fixed(offset_of!(Fixed, header_size)), &bad.to_ne_bytes());
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("header size"), "{reason}");
}

#[test]
fn truncated_below_the_header() {
    let (seg, _) = two_rings("trunc-hdr");
    for len in [0u64, 8, size_of::<Header>() as u64 - 1] {
        OpenOptions::new()
            .write(true)
            .open(shm_path(seg.name()))
            .unwrap()
            .set_len(len)
            .unwrap();
        match open_err(seg.name()) {
            SegmentOpenError::Truncated { expected, actual, .. } => {
                assert_eq!((expected, actual), (size_of::<Header>() as u64, len));
            }
            other => panic!("expected Truncated at {len} bytes, got {other:?}"),
        }
    }
    // `seg` never touches its mapping again; dropping it only unlinks the name.
}

#[test]
fn truncated_below_the_segment_size() {
    let (seg, size) = two_rings("trunc-seg");
    let len = size - 4096;
    OpenOptions::new()
        .write(true)
        .open(shm_path(seg.name()))
        .unwrap()
        .set_len(len)
        .unwrap();
    match open_err(seg.name()) {
        SegmentOpenError::Truncated { expected, actual, .. } => assert_eq!((expected, actual), (size, len)),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn longer_than_the_header_says() {
    let (seg, size) = two_rings("longer");
    OpenOptions::new()
        .write(true)
        .open(shm_path(seg.name()))
        .unwrap()
        .set_len(size + 4096)
        .unwrap();
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("segment size"), "{reason}");
}

#[test]
fn segment_size_field_larger_than_the_file() {
    let (seg, size) = two_rings("size-field");
    write_at(
        seg.name(),
        fixed(offset_of!(Fixed, segment_size)),
        &(size * 2).to_ne_bytes(),
    );
    match open_err(seg.name()) {
        SegmentOpenError::Truncated { expected, actual, .. } => assert_eq!((expected, actual), (size * 2, size)),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn too_many_rings() {
    let (seg, _) = two_rings("count");
    write_at(
        seg.name(),
        fixed(offset_of!(Fixed, ring_count)),
        &(MAX_RINGS as u32 + 1).to_ne_bytes(),
    );
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("rings"), "{reason}");
}

// ------------------------------------------------------------------------------------------
// Ring descriptor checks
// ------------------------------------------------------------------------------------------

#[test]
fn ring_offset_beyond_the_end() {
    let (seg, size) = two_rings("ring-end");
    let d = seg.rings()[1];
    let ring_len = d.capacity + plugbus::ring::CONTROL_SIZE as u64;
    write_at(seg.name(), desc(1, offset_of!(RingDesc, offset)), &size.to_ne_bytes());
    // The header's segment size matches the file; the ring claims bytes past it. `open`
    // reports that as "shorter than the header says", naming the byte the ring needs.
    match open_err(seg.name()) {
        SegmentOpenError::Truncated { expected, actual, .. } => {
            assert_eq!((expected, actual), (size + ring_len, size));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn ring_running_past_the_end() {
    let (seg, size) = two_rings("ring-past");
    // In bounds at its start, past the end by its length.
    write_at(
        seg.name(),
        desc(1, offset_of!(RingDesc, offset)),
        &(size - 256).to_ne_bytes(),
    );
    assert!(matches!(open_err(seg.name()), SegmentOpenError::Truncated { .. }));
}

#[test]
fn ring_size_overflows() {
    let (seg, _) = two_rings("ring-overflow");
    // A frame ring's capacity counts bytes: its size overflows only with an offset as large.
    write_at(
        seg.name(),
        desc(1, offset_of!(RingDesc, capacity)),
        &(1u64 << 63).to_ne_bytes(),
    );
    write_at(
        seg.name(),
        desc(1, offset_of!(RingDesc, offset)),
        &(1u64 << 63).to_ne_bytes(),
    );
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("overflow"), "{reason}");
    let (seg, _) = two_rings("ring-overflow2");
    write_at(
        seg.name(),
        desc(0, offset_of!(RingDesc, offset)),
        &(u64::MAX - 127).to_ne_bytes(),
    );
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("overflow"), "{reason}");
}

#[test]
fn ring_capacity_not_a_power_of_two() {
    for cap in [0u64, 3, 3000, 4097] {
        let (seg, _) = two_rings("ring-pow2");
        write_at(seg.name(), desc(0, offset_of!(RingDesc, capacity)), &cap.to_ne_bytes());
        let reason = corrupt_reason(open_err(seg.name()));
        assert!(reason.contains("power of two"), "capacity {cap}: {reason}");
    }
}

#[test]
fn overlapping_rings() {
    let (seg, _) = two_rings("overlap");
    let first = seg.rings()[0].offset;
    // Ring 1 moved into ring 0's data area (still aligned and inside the segment).
    write_at(
        seg.name(),
        desc(1, offset_of!(RingDesc, offset)),
        &(first + 1024).to_ne_bytes(),
    );
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("overlap"), "{reason}");
    // Both descriptors at the same place.
    let (seg, _) = two_rings("overlap2");
    let first = seg.rings()[0].offset;
    write_at(seg.name(), desc(1, offset_of!(RingDesc, offset)), &first.to_ne_bytes());
    let reason = corrupt_reason(open_err(seg.name()));
    assert!(reason.contains("overlap"), "{reason}");
}

#[test]
fn ring_offset_misplaced() {
    // Not on a 128-byte line, and inside the header.
    for off in [4096u64 + 8, 0, 128] {
        let (seg, _) = two_rings("misplaced");
        write_at(seg.name(), desc(0, offset_of!(RingDesc, offset)), &off.to_ne_bytes());
        let reason = corrupt_reason(open_err(seg.name()));
        assert!(reason.contains("misplaced"), "offset {off}: {reason}");
    }
}

#[test]
fn ring_kind_and_unit() {
    let cases: [(usize, usize, u32, &str); 5] = [
        (0, offset_of!(RingDesc, kind), 0, "kind"),
        (1, offset_of!(RingDesc, kind), 7, "kind"),
        // Kind 1 was the record ring, which plugbus no longer has.
        (1, offset_of!(RingDesc, kind), 1, "kind"),
        (0, offset_of!(RingDesc, unit), 16, "unit"),
        (1, offset_of!(RingDesc, unit), 0, "unit"),
    ];
    for (ring, field, value, word) in cases {
        let (seg, _) = two_rings("kind-unit");
        write_at(seg.name(), desc(ring, field), &value.to_ne_bytes());
        let reason = corrupt_reason(open_err(seg.name()));
        assert!(reason.contains(word), "ring {ring} field {field} = {value}: {reason}");
    }
}

/// What `open` hands out is exactly what `create` wrote.
#[test]
fn descriptors_round_trip() {
    let (seg, size) = two_rings("round-trip");
    let other = Segment::open_unattached(seg.name()).unwrap();
    assert_eq!(other.rings(), seg.rings());
    assert_eq!(other.len() as u64, size);
    assert_eq!(other.side(), Side::Attacher);
    assert_eq!(seg.side(), Side::Creator);
    let d = seg.rings();
    assert_eq!(d.len(), 2);
    assert_eq!(
        (RingKind::from_u32(d[0].kind), d[0].capacity, d[0].unit),
        (Some(RingKind::Frame), 4096, 8)
    );
    assert_eq!(
        (RingKind::from_u32(d[1].kind), d[1].capacity, d[1].unit),
        (Some(RingKind::Frame), 512, 8)
    );
    assert_eq!(other.header().fixed.magic.load(Ordering::Acquire), MAGIC);
    assert_eq!(other.header().fixed.creator_pid, std::process::id());
    assert_eq!(other.header().shared.state.load(Ordering::Acquire), STATE_READY);
    assert!(other.peer_alive(), "the creator (this process) is alive");
    let tag = &other.header().fixed.tag;
    assert_eq!(&tag[..b"round-trip".len()], b"round-trip");
}

// ------------------------------------------------------------------------------------------
// Names, collisions, permissions, unlinking
// ------------------------------------------------------------------------------------------

#[test]
fn name_collision() {
    let name = unique_name("collide");
    let _seg = Segment::create(&name, "first", &[RingSpec::frames(64)]).unwrap();
    match Segment::create(&name, "second", &[RingSpec::frames(64)]) {
        Err(SegmentCreateError::AlreadyExists(n)) => assert_eq!(n, name),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The loser did not unlink the winner's segment.
    let first = Segment::open_unattached(&name).unwrap();
    assert_eq!(&first.header().fixed.tag[..5], b"first");
}

#[test]
fn permissions_are_0600_whatever_the_umask() {
    // The umask is per process; no other test in this binary creates files with a mode that
    // depends on it (segments get an explicit fchmod), so changing it here is contained.
    for mask in [0o000, 0o022, 0o077] {
        // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
        let old = unsafe { libc::umask(mask) };
        let name = unique_name("perm");
        let seg = Segment::create(&name, "perm", &[RingSpec::frames(64)]);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let seg = seg.unwrap();
        let mode = std::fs::metadata(shm_path(seg.name())).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600, "umask {mask:o}: mode {mode:o}");
    }
}

#[test]
fn invalid_names() {
    let long = format!("plugbus.{}", "x".repeat(MAX_NAME + 1 - "plugbus.".len()));
    assert_eq!(long.len(), MAX_NAME + 1);
    let bad = [
        "",
        "plugbus.",
        "plugbus",
        "other.segment",
        "/plugbus.x",
        "plugbus.a/b",
        "plugbus.a b",
        "plugbus.é",
        "plugbus.a\0b",
        "plugbus.a:b",
        long.as_str(),
    ];
    for name in bad {
        assert!(!valid_name(name), "{name:?}");
        match Segment::create(name, "t", &[RingSpec::frames(64)]) {
            Err(SegmentCreateError::InvalidName(n)) => assert_eq!(n, name),
            other => panic!("create {name:?}: expected InvalidName, got {other:?}"),
        }
        assert!(
            matches!(Segment::open(name), Err(SegmentOpenError::InvalidName(ref n)) if n == name),
            "open {name:?}"
        );
        assert!(
            matches!(Segment::open_unattached(name), Err(SegmentOpenError::InvalidName(_))),
            "open_unattached {name:?}"
        );
    }
    // The longest legal name works.
    let base = unique_name("max");
    let longest = format!("{base}{}", "y".repeat(MAX_NAME - base.len()));
    assert_eq!(longest.len(), MAX_NAME);
    let seg = Segment::create(&longest, "max", &[RingSpec::frames(64)]).unwrap();
    Segment::open_unattached(seg.name()).unwrap();
}

#[test]
fn bad_ring_specs_are_refused_at_creation() {
    let spec = |kind, unit, capacity| RingSpec { kind, unit, capacity };
    let cases = [
        vec![spec(RingKind::Frame, 8, 100)],
        vec![spec(RingKind::Frame, 8, 32)],
        vec![spec(RingKind::Frame, 8, 0)],
        vec![spec(RingKind::Frame, 8, 1 << 62)],
        vec![RingSpec::frames(64); MAX_RINGS + 1],
    ];
    for rings in cases {
        let name = unique_name("badspec");
        match Segment::create(&name, "t", &rings) {
            Err(SegmentCreateError::BadRing { .. }) => {}
            other => panic!("{rings:?}: expected BadRing, got {other:?}"),
        }
        assert!(!shm_path(&name).exists(), "a refused creation left {name} behind");
    }
}

#[test]
fn missing_segment() {
    let name = unique_name("missing");
    assert!(matches!(Segment::open(&name), Err(SegmentOpenError::NotFound(ref n)) if *n == name));
    assert!(stale::is_not_found(&Segment::open_unattached(&name).unwrap_err()));
}

#[test]
fn unlinked_when_the_creator_drops() {
    let name = unique_name("drop");
    let seg = Segment::create(&name, "drop", &[RingSpec::frames(64)]).unwrap();
    assert!(shm_path(&name).exists());
    // An attacher dropping does not unlink.
    drop(Segment::open(&name).unwrap());
    assert!(shm_path(&name).exists());
    drop(seg);
    assert!(
        !shm_path(&name).exists(),
        "{name} still exists after the creator dropped"
    );
    assert!(matches!(Segment::open(&name), Err(SegmentOpenError::NotFound(_))));
}

#[test]
fn leaked_name_outlives_the_creator() {
    let name = unique_name("leak");
    let mut seg = Segment::create(&name, "leak", &[RingSpec::frames(64)]).unwrap();
    seg.leak_name();
    drop(seg);
    let _cleanup = Unlink(name.clone());
    assert!(shm_path(&name).exists());
    // The memory is intact: it still validates.
    Segment::open_unattached(&name).unwrap();
}

/// Unlinks a segment name when dropped (for names no live `Segment` will unlink).
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = Segment::unlink(&self.0);
    }
}

// ------------------------------------------------------------------------------------------
// Child processes
// ------------------------------------------------------------------------------------------

/// A child test process: killed and reaped when dropped; its stdout lines arrive on a channel.
struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    fn spawn(test: &str, role: &str, name: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_VAR, format!("{role}:{name}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The rest of the first line containing `tag` (lines of the test harness are skipped).
    fn expect(&self, tag: &str) -> String {
        let deadline = std::time::Instant::now() + CHILD_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once(tag) {
                        return rest.trim().to_owned();
                    }
                }
                Err(e) => panic!("child {} never printed {tag:?}: {e:?}", self.child.id()),
            }
        }
    }

    /// Closes the child's stdin (its signal to finish) and waits for a successful exit.
    fn finish(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + CHILD_DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child {} did not exit",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "child {} failed: {status}", self.child.id());
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGKILL without reaping: the child stays a zombie until [`ChildProc::kill`] or drop.
    fn kill_unreaped(&mut self) {
        self.child.kill().unwrap();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// In a child test: the segment name if this process plays `role`.
fn child_role(role: &str) -> Option<String> {
    let v = std::env::var(CHILD_VAR).ok()?;
    let (r, name) = v.split_once(':')?;
    (r == role).then(|| name.to_owned())
}

/// Blocks until the parent closes our stdin (or goes away).
fn wait_for_parent() {
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{line}").unwrap();
    out.flush().unwrap();
}

/// Child: attaches to the segment (or reports why not), holds it until stdin closes, detaches.
#[test]
fn child_attacher() {
    let Some(name) = child_role("attacher") else {
        return;
    };
    match Segment::open(&name) {
        Ok(seg) => {
            say(&format!("ATTACHED {}", std::process::id()));
            wait_for_parent();
            drop(seg);
            say("DETACHED");
        }
        Err(SegmentOpenError::AlreadyAttached { pid, .. }) => say(&format!("REFUSED {pid}")),
        Err(e) => say(&format!("ERROR {e}")),
    }
}

/// Child: creates a segment, leaks its name, reports it, and waits to be killed.
#[test]
fn child_stale_creator() {
    let Some(tag) = child_role("stale") else {
        return;
    };
    let name = unique_name(&tag);
    let mut seg = Segment::create(&name, &tag, &[RingSpec::frames(64)]).unwrap();
    seg.leak_name();
    say(&format!("NAME {name}"));
    wait_for_parent();
}

#[test]
fn second_live_attacher_is_refused() {
    let name = unique_name("attach");
    let seg = Segment::create(&name, "attach", &[RingSpec::frames(64)]).unwrap();
    let shared = &seg.header().shared;
    assert!(!seg.peer_alive(), "no attacher yet");

    // A attaches; we (alive, not A) are refused, with A's pid.
    let mut a = ChildProc::spawn("child_attacher", "attacher", &name);
    assert_eq!(a.expect("ATTACHED "), a.pid().to_string());
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), a.pid());
    assert_eq!(shared.state.load(Ordering::Acquire), STATE_ATTACHED);
    assert!(seg.peer_alive());
    match Segment::open(&name) {
        Err(SegmentOpenError::AlreadyAttached { pid, .. }) => assert_eq!(pid, a.pid()),
        other => panic!("expected AlreadyAttached, got {other:?}"),
    }
    // Inspection does not need the slot.
    Segment::open_unattached(&name).unwrap();

    // A detaches cleanly: the slot is free and the state says so.
    a.finish();
    assert_eq!(a.expect("DETACHED"), "");
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), 0);
    assert_eq!(shared.state.load(Ordering::Acquire), STATE_DETACHED);
    assert!(!seg.peer_alive());

    // B attaches and is killed without detaching: its dead pid no longer holds the slot.
    let mut b = ChildProc::spawn("child_attacher", "attacher", &name);
    assert_eq!(b.expect("ATTACHED "), b.pid().to_string());
    b.kill();
    assert_eq!(
        shared.attacher_pid.load(Ordering::Acquire),
        b.pid(),
        "a killed attacher cannot clean up"
    );
    assert!(!seg.peer_alive());
    let mine = Segment::open(&name).expect("a dead attacher's slot is reclaimed");
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), std::process::id());

    // Now we hold it: a third process is refused, with our pid.
    let mut c = ChildProc::spawn("child_attacher", "attacher", &name);
    assert_eq!(c.expect("REFUSED "), std::process::id().to_string());
    c.finish();
    drop(mine);
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), 0);
}

/// `remove_stale` removes every stale segment on the machine, so the tests that make one of
/// this process's segments look stale must not run beside it.
static STALE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn stale_segment_of_a_killed_creator() {
    let _lock = STALE.lock().unwrap_or_else(|p| p.into_inner());
    let mine = Segment::create(&unique_name("live"), "live", &[RingSpec::frames(64)]).unwrap();
    let mut child = ChildProc::spawn("child_stale_creator", "stale", "stale-test");
    let name = child.expect("NAME ");
    let _cleanup = Unlink(name.clone());
    assert!(valid_name(&name), "{name:?}");

    let find = |n: &str| stale::list().unwrap().into_iter().find(|i| i.name == n);
    let info = find(&name).expect("the child's segment is listed");
    assert_eq!(info.creator_pid, child.pid());
    assert!(info.creator_alive && !info.is_stale(), "{info:?}");
    assert_eq!(info.tag, "stale-test");
    assert_eq!(info.error, None);
    assert_eq!(info.state, STATE_READY);
    let own = find(mine.name()).expect("our segment is listed");
    assert!(own.creator_alive && !own.is_stale(), "{own:?}");
    // While its creator lives, cleanup leaves it alone.
    let removed = stale::remove_stale().unwrap();
    assert!(!removed.contains(&name), "removed a live creator's segment");
    assert!(shm_path(&name).exists());

    // SIGKILL: the child cannot unlink anything. Until it is reaped it is a zombie, which
    // already counts as dead (wait for the kernel to get it there, with a deadline).
    child.kill_unreaped();
    let deadline = std::time::Instant::now() + CHILD_DEADLINE;
    loop {
        let info = find(&name).expect("still listed after the creator was killed");
        if info.is_stale() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a killed, unreaped creator still counts as alive: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill();
    let info = find(&name).expect("still listed after the creator was reaped");
    assert!(!info.creator_alive && info.is_stale(), "{info:?}");
    assert!(!find(mine.name()).unwrap().is_stale());

    let removed = stale::remove_stale().unwrap();
    assert!(removed.contains(&name), "{name} not removed: {removed:?}");
    assert!(!removed.iter().any(|n| n == mine.name()), "removed our live segment");
    // Whatever else was removed was someone else's stale segment, never one of ours.
    let ours = format!("plugbus.{}.", std::process::id());
    assert!(!removed.iter().any(|n| n.starts_with(&ours)), "{removed:?}");
    assert!(!shm_path(&name).exists());
    assert!(shm_path(mine.name()).exists());
    assert!(find(&name).is_none());
}

#[test]
fn pid_liveness() {
    let me = std::process::id();
    let start = stale::process_start_ticks(me).expect("our own start time");
    assert!(stale::pid_alive(me, 0));
    assert!(stale::pid_alive(me, start));
    // Same pid, another start time: a recycled pid, not our process.
    assert!(!stale::pid_alive(me, start + 1));
    assert!(!stale::pid_alive(0, 0));
    assert!(!stale::pid_alive(u32::MAX, 0));
}

/// A live pid with the wrong start time is a recycled pid: the segment is stale.
#[test]
fn recycled_creator_pid_is_stale() {
    let _lock = STALE.lock().unwrap_or_else(|p| p.into_inner());
    let name = unique_name("recycled");
    let seg = Segment::create(&name, "recycled", &[RingSpec::frames(64)]).unwrap();
    let info = stale::inspect(&name);
    assert!(info.creator_alive && !info.is_stale(), "{info:?}");
    let start = seg.header().fixed.creator_start;
    assert_eq!(Some(start), stale::process_start_ticks(std::process::id()));
    write_at(
        &name,
        fixed(offset_of!(Fixed, creator_start)),
        &(start + 1).to_ne_bytes(),
    );
    let info = stale::inspect(&name);
    assert_eq!(info.creator_pid, std::process::id());
    assert!(!info.creator_alive && info.is_stale(), "{info:?}");
}

/// Inspecting a segment (`open_unattached`, `stale::inspect`) from the process that is
/// attached to it must not give up that attachment when the inspection handle drops.
#[test]
fn inspection_keeps_the_attachment() {
    let name = unique_name("inspect");
    let seg = Segment::create(&name, "inspect", &[RingSpec::frames(64)]).unwrap();
    let shared = &seg.header().shared;
    let attached = Segment::open(&name).unwrap();
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), std::process::id());
    drop(Segment::open_unattached(&name).unwrap());
    let info = stale::inspect(&name);
    assert_eq!(info.attacher_pid, std::process::id(), "{info:?}");
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), std::process::id());
    assert_eq!(shared.state.load(Ordering::Acquire), STATE_ATTACHED);
    // The real attachment still detaches normally.
    drop(attached);
    assert_eq!(shared.attacher_pid.load(Ordering::Acquire), 0);
    assert_eq!(shared.state.load(Ordering::Acquire), STATE_DETACHED);
}
