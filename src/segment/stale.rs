//! Finding plugbus segments on this machine, telling whether their processes are alive, and
//! removing the ones whose creator is dead.
//!
//! **Liveness.** A pid alone proves little: pids are recycled, and a segment in `/dev/shm` may
//! have been made by a host in another pid namespace (another container sharing the same
//! `/dev/shm`). So [`pid_alive`] takes a pidfd for the pid first (where the kernel has them),
//! then reads the process's start time from `/proc` and compares it with the one the creator
//! wrote in the header (`creator_start`), then checks that the pidfd has not signalled an exit:
//! the start time read belongs to the process the pidfd holds, not to a newcomer with the same
//! pid. The creator also records its pid namespace (`creator_pidns`): a creator in another
//! namespace (a host in another container sharing `/dev/shm`) wrote a pid that means nothing
//! here, so its segment counts as alive while its heartbeat is recent
//! ([`FOREIGN_HEARTBEAT_FRESH`]), and is removed only after the heartbeat stopped. So does a
//! creator of unknown namespace whose pid does not exist for us.
//!
//! Cleanup never unlinks a segment whose creator is alive, and checks just before unlinking
//! that the name still designates the file it inspected.

use std::path::Path;

use super::header::{self, Header};
use super::{PREFIX, RingDesc, Segment, SegmentOpenError, valid_name};
use crate::sync::Ordering;

/// Where Linux exposes POSIX shared memory.
const SHM_DIR: &str = "/dev/shm";

/// A process's start time in clock ticks after boot (field 22 of `/proc/<pid>/stat`), and
/// whether it is a zombie.
///
/// Allocates nothing: the host checks its plugins' liveness from the tick thread (and a plugin
/// its host's), where steady state must not allocate. The path is formatted on the stack (and
/// `File::open` copies a short path to a stack C string), and the first 1 KiB of the file is
/// read into a stack buffer: field 22 ends well before that (a command name of at most 64 bytes
/// and 21 numeric fields of at most 20 digits).
fn proc_stat(pid: u32) -> Option<(u64, bool)> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::ffi::OsStrExt as _;

    const PATH_MAX: usize = 32;
    let mut path = [0u8; PATH_MAX];
    let path_len = {
        let mut w: &mut [u8] = &mut path;
        write!(w, "/proc/{pid}/stat").ok()?;
        PATH_MAX - w.len()
    };
    let path = Path::new(std::ffi::OsStr::from_bytes(&path[..path_len]));
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let stat = &buf[..len];
    // The command name (field 2) is in parentheses and may contain spaces (or any bytes): split
    // after it; the fields after it are ASCII.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 2..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// The start time of `pid` (clock ticks after boot), if it is running.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(start, _)| start)
}

/// What this process can tell about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A running process with that pid (and that start time, if one was given).
    Alive,
    /// The process exited (a zombie counts), or the pid now belongs to another process (another
    /// start time).
    Dead,
    /// No process has that pid in this pid namespace: it exited, or it lives in another
    /// namespace (a host in another container sharing `/dev/shm`).
    NotVisible,
}

/// Whether the pidfd has signalled its process's exit (readable), without waiting.
fn pidfd_exited(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        match poll(&mut fds, Some(&zero)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => {}
            // Cannot tell: the /proc reading stands.
            Err(_) => return false,
        }
    }
}

/// What can be told of `pid`; if `start_ticks` is non-zero, the process must also have that
/// start time to be [`Liveness::Alive`]. Allocates nothing (see [`proc_stat`]).
pub fn liveness(pid: u32, start_ticks: u64) -> Liveness {
    let Some(raw) = rustix::process::Pid::from_raw(pid as i32).filter(|_| pid <= i32::MAX as u32) else {
        return Liveness::Dead;
    };
    // The pidfd first: it holds this very process, so a pid recycled while we read /proc is
    // seen (the pidfd of an exited process is readable).
    let pidfd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::SRCH) => return Liveness::NotVisible,
        // No pidfds here (ENOSYS before Linux 5.3), or not allowed: /proc alone.
        Err(_) => None,
    };
    let (start, zombie) = match proc_stat(pid) {
        Some(s) => s,
        // Gone between the two calls, or no /proc: the pidfd (if any) decides.
        // A live pidfd without a readable /proc entry (hidepid) cannot have its start time
        // checked: count it alive, since a live host's segment must never be removed.
        None => {
            return match &pidfd {
                Some(fd) if pidfd_exited(fd) => Liveness::Dead,
                Some(_) => Liveness::Alive,
                None => Liveness::NotVisible,
            };
        }
    };
    if zombie || (start_ticks != 0 && start != start_ticks) {
        return Liveness::Dead;
    }
    match &pidfd {
        // It exited after we read its start time: a newer process may have the pid now.
        Some(fd) if pidfd_exited(fd) => Liveness::Dead,
        _ => Liveness::Alive,
    }
}

/// Whether `pid` is a live (non-zombie) process in this pid namespace; if `start_ticks` is
/// non-zero, it must also have that start time (so a recycled pid does not count as alive).
pub fn pid_alive(pid: u32, start_ticks: u64) -> bool {
    liveness(pid, start_ticks) == Liveness::Alive
}

/// How recent the creator's heartbeat must be for a creator whose pid this process cannot see
/// (a host in another pid namespace) to count as alive. Hosts beat every tick.
pub const FOREIGN_HEARTBEAT_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// The inode of this process's pid namespace (`/proc/self/ns/pid`), 0 if unknown. Two
/// processes see the same pids exactly when these are equal. Read once.
pub fn own_pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    static NS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NS.get_or_init(|| std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()))
}

/// Whether a segment's creator counts as alive, from its header: its pid and start time if it
/// lives in our pid namespace; its heartbeat if it lives in another one (the pid it wrote
/// means nothing here), or if its namespace is unknown and its pid is not visible here.
fn creator_alive(pid: u32, start_ticks: u64, pidns: u64, heartbeat: u64, now: u64) -> bool {
    let ours = own_pid_namespace();
    let same_ns = pidns != 0 && pidns == ours;
    if pidns != 0 && ours != 0 && !same_ns {
        return fresh(heartbeat, now);
    }
    match liveness(pid, start_ticks) {
        Liveness::Alive => true,
        Liveness::Dead => false,
        // In our namespace: gone. Unknown namespace: perhaps another container's host, alive
        // while it beats.
        Liveness::NotVisible => !same_ns && fresh(heartbeat, now),
    }
}

/// Whether a heartbeat (CLOCK_MONOTONIC ns) was written within [`FOREIGN_HEARTBEAT_FRESH`] of
/// `now` (either way: a clock a little ahead is still fresh; 0 means never).
fn fresh(heartbeat: u64, now: u64) -> bool {
    heartbeat != 0 && now.abs_diff(heartbeat) < FOREIGN_HEARTBEAT_FRESH.as_nanos() as u64
}

/// What `plugbus inspect` shows of one segment.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Segment name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The creator's free-text tag (the plugin id).
    pub tag: String,
    /// Creator pid (0 if unreadable).
    pub creator_pid: u32,
    /// Whether the creator is alive.
    pub creator_alive: bool,
    /// The creator's pid namespace (inode; 0 if unknown): `creator_pid` is a pid there.
    pub creator_pidns: u64,
    /// Attacher pid, 0 if none.
    pub attacher_pid: u32,
    /// Whether the attacher is alive.
    pub attacher_alive: bool,
    /// The state word.
    pub state: u32,
    /// Nanoseconds since the creator's last heartbeat.
    pub creator_heartbeat_age_ns: u64,
    /// Nanoseconds since the attacher's last heartbeat (`u64::MAX` if never).
    pub attacher_heartbeat_age_ns: u64,
    /// Per ring: descriptor, head, tail.
    pub rings: Vec<(RingDesc, u64, u64)>,
    /// Creator counters.
    pub creator_counters: [u64; header::COUNTERS],
    /// Attacher counters.
    pub attacher_counters: [u64; header::COUNTERS],
    /// Why the header could not be validated, if it could not.
    pub error: Option<String>,
}

impl SegmentInfo {
    /// A segment is stale when its creator is dead.
    pub fn is_stale(&self) -> bool {
        !self.creator_alive
    }
}

/// Names of every plugbus segment on this machine.
pub fn list_names() -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(Path::new(SHM_DIR))? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(PREFIX) && valid_name(name) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Reads what can be read of one segment without attaching.
pub fn inspect(name: &str) -> SegmentInfo {
    let mut info = SegmentInfo {
        name: name.to_owned(),
        size: 0,
        tag: String::new(),
        creator_pid: 0,
        creator_alive: false,
        creator_pidns: 0,
        attacher_pid: 0,
        attacher_alive: false,
        state: 0,
        creator_heartbeat_age_ns: u64::MAX,
        attacher_heartbeat_age_ns: u64::MAX,
        rings: Vec::new(),
        creator_counters: [0; header::COUNTERS],
        attacher_counters: [0; header::COUNTERS],
        error: None,
    };
    match Segment::open_unattached(name) {
        Ok(seg) => fill(&mut info, &seg),
        Err(e) => {
            // An unvalidated segment: still read the creator pid if the header is there, so a
            // segment whose creator died mid-creation can be cleaned up.
            info.creator_pid = raw_creator_pid(name).unwrap_or(0);
            info.creator_alive = if info.creator_pid == 0 {
                // No pid written yet: possibly a creator between shm_open and its header write.
                // Count it as alive while it is young, so cleanup never races a creation.
                young(name)
            } else {
                match liveness(info.creator_pid, 0) {
                    Liveness::Alive => true,
                    Liveness::Dead => false,
                    // Another namespace's creator (or a dead one): alive while the file is young.
                    Liveness::NotVisible => young(name),
                }
            };
            info.error = Some(e.to_string());
        }
    }
    info
}

fn fill(info: &mut SegmentInfo, seg: &Segment) {
    let h: &Header = seg.header();
    let now = super::monotonic_ns();
    let f = &h.fixed;
    info.size = seg.len() as u64;
    let tag_end = f.tag.iter().position(|&b| b == 0).unwrap_or(f.tag.len());
    info.tag = String::from_utf8_lossy(&f.tag[..tag_end]).into_owned();
    info.creator_pid = f.creator_pid;
    info.creator_pidns = f.creator_pidns;
    info.creator_alive = creator_alive(
        f.creator_pid,
        f.creator_start,
        f.creator_pidns,
        h.creator_heartbeat.load(Ordering::Relaxed),
        now,
    );
    info.attacher_pid = h.shared.attacher_pid.load(Ordering::Acquire);
    info.attacher_alive = pid_alive(info.attacher_pid, 0);
    info.state = h.shared.state.load(Ordering::Acquire);
    let age = |t: u64| if t == 0 { u64::MAX } else { now.saturating_sub(t) };
    info.creator_heartbeat_age_ns = age(h.creator_heartbeat.load(Ordering::Relaxed));
    info.attacher_heartbeat_age_ns = age(h.attacher_heartbeat.load(Ordering::Relaxed));
    for (i, d) in seg.rings().iter().enumerate() {
        let (head, tail) = seg.ring_region(i).map(|r| crate::ring::positions(&r)).unwrap_or((0, 0));
        info.rings.push((*d, head, tail));
    }
    for i in 0..header::COUNTERS {
        info.creator_counters[i] = h.creator_counters[i].load(Ordering::Relaxed);
        info.attacher_counters[i] = h.attacher_counters[i].load(Ordering::Relaxed);
    }
}

/// Whether the segment file was modified in the last 10 seconds.
fn young(name: &str) -> bool {
    std::fs::metadata(Path::new(SHM_DIR).join(name))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age < std::time::Duration::from_secs(10))
}

fn raw_creator_pid(name: &str) -> Option<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(Path::new(SHM_DIR).join(name)).ok()?;
    let mut buf = [0u8; std::mem::offset_of!(header::Fixed, creator_pid) + 4];
    f.read_exact(&mut buf).ok()?;
    let off = std::mem::offset_of!(header::Fixed, creator_pid);
    Some(u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?))
}

/// Every plugbus segment on this machine, inspected.
pub fn list() -> std::io::Result<Vec<SegmentInfo>> {
    Ok(list_names()?.iter().map(|n| inspect(n)).collect())
}

/// Removes every plugbus segment whose creator is dead; returns the names removed. Segments of
/// live creators are never touched.
pub fn remove_stale() -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list_names()? {
        if remove_if_stale(&name) {
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Removes segment `name` if its creator is dead (see [`inspect`]); returns whether it did.
/// The name is unlinked only if it still designates the file inspected, so a segment a live
/// host has just created under the same name is left alone.
pub fn remove_if_stale(name: &str) -> bool {
    let Some(before) = file_id(name) else {
        return false;
    };
    if !inspect(name).is_stale() {
        return false;
    }
    file_id(name) == Some(before) && Segment::unlink(name).is_ok()
}

/// The (device, inode) of segment `name`'s file.
fn file_id(name: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(Path::new(SHM_DIR).join(name)).ok()?;
    Some((m.dev(), m.ino()))
}

/// Who holds segment `name`, for a creator about to take the name over (an attach-mode host
/// reusing its fixed name): `Some(pid)` if the segment exists and its creator is a live process
/// other than this one (`Some(0)` for a file without a pid yet, made moments ago: a creator
/// between `shm_open` and its header). `None` if there is no such segment, or its creator is
/// dead, or it is this process (an earlier incarnation of the same plugin's link).
pub fn live_owner(name: &str) -> Option<u32> {
    file_id(name)?;
    let info = inspect(name);
    let mine = info.creator_pid == std::process::id()
        && (info.creator_pidns == 0 || info.creator_pidns == own_pid_namespace());
    (info.creator_alive && !mine).then_some(info.creator_pid)
}

/// `true` if `e` means "no such segment".
pub fn is_not_found(e: &SegmentOpenError) -> bool {
    matches!(e, SegmentOpenError::NotFound(_))
}
