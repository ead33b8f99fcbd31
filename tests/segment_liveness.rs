//! Whose segment is whose: stale cleanup and the attach-mode fixed name never remove a live
//! host's segment (a creator in another process, or in another pid namespace that still
//! beats), and do remove the segments of dead creators and of recycled pids.
//!
//! These tests remove only the segments they name ([`stale::remove_if_stale`], the per-name
//! step of `remove_stale`), so they do not disturb other tests' segments.

use std::io::{BufRead as _, BufReader, Write as _};
use std::mem::offset_of;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use plugbus::segment::header::{Fixed, Header};
use plugbus::segment::stale::{self, Liveness};
use plugbus::segment::{RingSpec, Segment, monotonic_ns, unique_name};
use plugbus::sync::Ordering;
use plugbus::transport::shm::ShmAcceptor;
use plugbus::transport::{Acceptor, LinkRequest, QueueSizes};

/// `creator:<name>,<name>...`: the child creates those segments and waits.
const ROLE: &str = "PLUGBUS_TEST_LIVENESS_ROLE";

fn shm_path(name: &str) -> PathBuf {
    Path::new("/dev/shm").join(name)
}

/// Writes `bytes` at `field` of the segment's fixed header (which starts the segment).
fn write_fixed(name: &str, field: usize, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(shm_path(name)).unwrap();
    f.write_all_at(bytes, (offset_of!(Header, fixed) + field) as u64)
        .unwrap();
}

/// A pid no process has in this namespace.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (2..max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

/// A child process of this test binary (or a plain command), killed and reaped on drop.
struct ChildProc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl ChildProc {
    /// A child that creates segments `names` and holds them until killed.
    fn creator(names: &[&str]) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "child_creator", "--nocapture", "--test-threads=1"])
            .env(ROLE, format!("creator:{}", names.join(",")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut c = Self { child, out };
        c.expect("CREATED");
        c
    }

    fn sleeper() -> Self {
        let mut child = Command::new("sleep").arg("600").stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line starting with `prefix`; returns the rest.
    fn expect(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "the child ended before saying {prefix:?}");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// SIGKILL and reap: the child cannot unlink anything.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Unlinks a name at the end of a test, whatever happened.
struct Unlink(Vec<String>);

impl Drop for Unlink {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Segment::unlink(n);
        }
    }
}

/// Child: creates the segments it is told to, keeps them, and waits to be killed.
#[test]
fn child_creator() {
    let Some(names) = std::env::var(ROLE)
        .ok()
        .and_then(|r| r.strip_prefix("creator:").map(str::to_owned))
    else {
        return;
    };
    let segs: Vec<Segment> = names
        .split(',')
        .map(|n| Segment::create(n, "liveness", &[RingSpec::frames(64)]).unwrap())
        .collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nCREATED").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    drop(segs);
}

fn open_fixed(name: &str) -> Result<Box<dyn plugbus::transport::HostLink>, String> {
    let queues = QueueSizes {
        moves: 1 << 16,
        control: 1 << 16,
        replies: 1 << 16,
    };
    let address = format!("shm:{name}");
    ShmAcceptor
        .open(&LinkRequest {
            plugin_id: "fixed",
            attach: true,
            address: Some(&address),
            queues: &queues,
        })
        .map(|o| o.link)
        .map_err(|e| e.to_string())
}

#[test]
fn a_live_creator_in_another_process_is_kept_until_it_dies() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let (kept, taken) = (unique_name("live-kept"), unique_name("live-taken"));
    let _cleanup = Unlink(vec![kept.clone(), taken.clone()]);
    let mut child = ChildProc::creator(&[&kept, &taken]);

    // Alive: cleanup leaves both alone, and the fixed name is refused, naming the owner.
    for name in [&kept, &taken] {
        let info = stale::inspect(name);
        assert_eq!(info.creator_pid, child.pid());
        assert!(info.creator_alive && !info.is_stale(), "{info:?}");
        assert!(!stale::remove_if_stale(name), "removed a live creator's segment");
        assert!(shm_path(name).exists());
        assert_eq!(stale::live_owner(name), Some(child.pid()));
    }
    let err = open_fixed(&taken)
        .err()
        .expect("a live host's fixed name was taken over");
    assert!(
        err.contains(&child.pid().to_string()),
        "the refusal does not name the pid: {err}"
    );
    assert!(
        stale::inspect(&taken).creator_alive,
        "the refused open touched the segment"
    );

    // Dead (and reaped: its pid is gone from our namespace, the one its header names, so no
    // heartbeat grace): cleanup removes one, the fixed name takes the other over.
    child.kill();
    for name in [&kept, &taken] {
        let info = stale::inspect(name);
        assert!(!info.creator_alive && info.is_stale(), "{info:?}");
    }
    assert_eq!(stale::live_owner(&kept), None);
    assert!(stale::remove_if_stale(&kept));
    assert!(!shm_path(&kept).exists());
    assert!(!stale::remove_if_stale(&kept), "nothing left to remove");
    let link = open_fixed(&taken).expect("a dead host's fixed name is taken over");
    let info = stale::inspect(&taken);
    assert_eq!(info.creator_pid, std::process::id());
    assert!(info.creator_alive);
    drop(link);
    assert!(!shm_path(&taken).exists(), "the new link unlinks its name when dropped");
}

#[test]
fn a_fixed_name_of_this_process_is_taken_over() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let name = unique_name("own-fixed");
    let _cleanup = Unlink(vec![name.clone()]);
    // The previous incarnation of this plugin's link, still held.
    let mut old = Segment::create(&name, "old", &[RingSpec::frames(64)]).unwrap();
    old.leak_name();
    assert_eq!(stale::live_owner(&name), None, "our own segment is not a foreign owner");
    let link = open_fixed(&name).expect("our own earlier segment is replaced");
    assert_eq!(stale::inspect(&name).tag, "fixed");
    drop(old);
    drop(link);
}

#[test]
fn a_creator_in_another_pid_namespace_is_kept_while_it_beats() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let ours = stale::own_pid_namespace();
    assert_ne!(ours, 0, "this process knows its pid namespace");
    let pid = unused_pid();
    assert_eq!(stale::liveness(pid, 0), Liveness::NotVisible);
    // Another namespace (whatever its pid says), and an unknown one with a pid we cannot see.
    for (what, pidns, creator_pid) in [
        ("another namespace, a pid we cannot see", ours ^ 1, pid),
        ("another namespace, a pid that is ours", ours ^ 1, std::process::id()),
        ("unknown namespace, a pid we cannot see", 0, pid),
    ] {
        let name = unique_name("foreign-ns");
        let seg = Segment::create(&name, "foreign", &[RingSpec::frames(64)]).unwrap();
        let _cleanup = Unlink(vec![name.clone()]);
        assert_eq!(seg.header().fixed.creator_pidns, ours);
        write_fixed(&name, offset_of!(Fixed, creator_pid), &creator_pid.to_ne_bytes());
        write_fixed(&name, offset_of!(Fixed, creator_pidns), &pidns.to_ne_bytes());

        // A heartbeat of just now: another container's live host.
        seg.beat();
        let info = stale::inspect(&name);
        assert_eq!(info.creator_pid, creator_pid);
        assert!(info.creator_alive && !info.is_stale(), "{what}: {info:?}");
        assert!(
            !stale::remove_if_stale(&name),
            "{what}: removed a beating host's segment"
        );
        assert_eq!(stale::live_owner(&name), Some(creator_pid), "{what}");
        assert!(
            open_fixed(&name).is_err(),
            "{what}: took over a beating host's fixed name"
        );

        // A far-future heartbeat is no proof of life.
        seg.header().creator_heartbeat.store(u64::MAX, Ordering::Relaxed);
        assert!(stale::inspect(&name).is_stale(), "{what}");
        // Its heartbeat stopped long ago: dead, removed.
        let old = monotonic_ns().saturating_sub(10 * stale::FOREIGN_HEARTBEAT_FRESH.as_nanos() as u64);
        seg.header().creator_heartbeat.store(old.max(1), Ordering::Relaxed);
        let info = stale::inspect(&name);
        assert!(!info.creator_alive && info.is_stale(), "{what}: {info:?}");
        assert!(stale::remove_if_stale(&name), "{what}");
        assert!(!shm_path(&name).exists(), "{what}");
    }
    // In our own namespace, a pid we cannot see is a dead creator, heartbeat or not.
    let name = unique_name("gone");
    let seg = Segment::create(&name, "gone", &[RingSpec::frames(64)]).unwrap();
    let _cleanup = Unlink(vec![name.clone()]);
    write_fixed(&name, offset_of!(Fixed, creator_pid), &pid.to_ne_bytes());
    seg.beat();
    assert!(stale::inspect(&name).is_stale());
    assert!(stale::remove_if_stale(&name));
}

#[test]
fn an_alive_pid_with_another_start_time_is_removed() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let mut sleeper = ChildProc::sleeper();
    let pid = sleeper.pid();
    let start = stale::process_start_ticks(pid).expect("the child's start time");
    assert_eq!(stale::liveness(pid, start), Liveness::Alive);
    assert_eq!(stale::liveness(pid, start + 1), Liveness::Dead);

    let name = unique_name("recycled");
    let seg = Segment::create(&name, "recycled", &[RingSpec::frames(64)]).unwrap();
    let _cleanup = Unlink(vec![name.clone()]);
    write_fixed(&name, offset_of!(Fixed, creator_pid), &pid.to_ne_bytes());
    write_fixed(&name, offset_of!(Fixed, creator_start), &start.to_ne_bytes());
    // The real creator (pid and start time): alive, kept, its fixed name refused.
    assert!(stale::inspect(&name).creator_alive);
    assert!(!stale::remove_if_stale(&name));
    assert_eq!(stale::live_owner(&name), Some(pid));

    // The same pid with another start time: the creator died and its pid went to the sleeper.
    write_fixed(&name, offset_of!(Fixed, creator_start), &(start + 1).to_ne_bytes());
    seg.beat();
    let info = stale::inspect(&name);
    assert!(!info.creator_alive && info.is_stale(), "{info:?}");
    assert_eq!(stale::live_owner(&name), None);
    assert!(stale::remove_if_stale(&name));
    assert!(!shm_path(&name).exists());
    sleeper.kill();
}

#[test]
fn liveness_of_zombies_and_killed_processes() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let me = std::process::id();
    let start = stale::process_start_ticks(me).unwrap();
    assert_eq!(stale::liveness(me, 0), Liveness::Alive);
    assert_eq!(stale::liveness(me, start), Liveness::Alive);
    assert_eq!(stale::liveness(0, 0), Liveness::Dead);
    assert_eq!(stale::liveness(u32::MAX, 0), Liveness::Dead);

    let mut sleeper = ChildProc::sleeper();
    let pid = sleeper.pid();
    // Killed but not reaped: a zombie, already dead (the kernel gets it there shortly).
    // SAFETY: kill with a valid pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stale::liveness(pid, 0) != Liveness::Dead {
        assert!(
            std::time::Instant::now() < deadline,
            "a killed child still counts as alive"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    sleeper.kill();
    assert_eq!(stale::liveness(pid, 0), Liveness::NotVisible);
}
