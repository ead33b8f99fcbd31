//! Finding plugbus segments on this machine, telling whether their processes are alive, and
//! removing the ones whose creator is dead.

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

/// Whether `pid` is a live (non-zombie) process; if `start_ticks` is non-zero, it must also have
/// that start time (so a recycled pid does not count as alive).
pub fn pid_alive(pid: u32, start_ticks: u64) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    match proc_stat(pid) {
        Some((start, zombie)) => !zombie && (start_ticks == 0 || start == start_ticks),
        None => false,
    }
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
                pid_alive(info.creator_pid, 0)
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
    info.creator_alive = pid_alive(f.creator_pid, f.creator_start);
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
    for info in list()? {
        if info.is_stale() && Segment::unlink(&info.name).is_ok() {
            removed.push(info.name);
        }
    }
    Ok(removed)
}

/// `true` if `e` means "no such segment".
pub fn is_not_found(e: &SegmentOpenError) -> bool {
    matches!(e, SegmentOpenError::NotFound(_))
}
