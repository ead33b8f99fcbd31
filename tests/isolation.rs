//! Isolation of launched plugins' segments (issue 14, holes 3 and 5), with real processes and
//! real shared memory:
//! - a launched plugin's segment is a sealed memfd it inherits as fd 3: no `plugbus.*` name
//!   exists in `/dev/shm` that another process could open (or create first), the plugin closes
//!   the descriptor once it has mapped it, cannot resize the segment, and a restart gets a fresh
//!   memfd (the old one is released);
//! - an unsealed memory file is refused as a segment;
//! - a planted 256 MiB file with a bad header is refused by open, inspect and cleanup without
//!   being mapped: neither this process's memory nor the file's allocation grows;
//! - attach mode keeps its named segment.

mod common;

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use common::*;
use plugbus::host::{Host, Notice, PluginConfig};
use plugbus::proto::EventType;
use plugbus::segment::{Segment, SegmentOpenError, stale};
use plugbus::transport::{self, ConnectError, INHERITED_FD};

/// Names in `/dev/shm` whose segment belongs to one of `ids` (by the name, which carries the
/// plugin id, or by the tag in the header).
fn shm_names_of(ids: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for name in stale::list_names().expect("list /dev/shm") {
        let info = stale::inspect(&name);
        if ids
            .iter()
            .any(|id| name.contains(&format!(".{id}.")) || info.tag == *id)
        {
            found.push(name);
        }
    }
    found
}

/// Targets of the descriptors process `pid` holds open.
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the plugin's fd directory")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// Whether process `pid` maps the memfd whose segment name is `segment` (`memfd:plugbus...`).
fn maps(pid: u32, segment: &str) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .any(|l| l.contains(&format!("/{segment} ")) || l.ends_with(&format!("/{segment}")))
}

/// The segment name of a launched plugin's address (`shm:memfd:plugbus...`).
fn segment_of(host: &Host, id: &str) -> String {
    let address = host.address_of(id).expect("configured plugin");
    let segment = address.strip_prefix("shm:").unwrap_or(address);
    assert!(
        segment.starts_with("memfd:plugbus."),
        "a launched plugin's segment is a memfd: {address}"
    );
    segment.to_owned()
}

#[test]
fn launched_plugins_have_no_name_keep_no_descriptor_and_restart_on_a_fresh_memfd() {
    init_logging();
    let dir = Scratch::new("iso-launched");
    let ids = ["iso_a", "iso_b"];
    let reports: Vec<_> = ids.iter().map(|id| dir.file(&format!("{id}.txt"))).collect();
    let plugins = ids
        .iter()
        .zip(&reports)
        .map(|(id, r)| child_plugin(id, "handler", r).env(SUBSCRIBE, "CHAT").required(true))
        .collect();
    let mut host = Host::start(config(plugins)).expect("host starts");
    wait_started(&mut host, &[&reports[0], &reports[1]]);

    // No name exists: nothing in /dev/shm belongs to these plugins.
    assert_eq!(shm_names_of(&ids), Vec::<String>::new());
    let segments: Vec<String> = ids.iter().map(|id| segment_of(&host, id)).collect();
    assert_ne!(segments[0], segments[1]);
    for (id, segment) in ids.iter().zip(&segments) {
        let pid = host.pid_of(id).expect("launched");
        // The plugin maps its memfd (so the checks below look at the right process) ...
        assert!(maps(pid, segment), "{id} maps {segment}");
        // ... and holds no descriptor to it, nor to any memfd: nothing to reopen through /proc.
        let files = open_files(pid);
        assert!(
            !files.iter().any(|f| f.contains("memfd:")),
            "{id} keeps a memfd open: {files:?}"
        );
    }
    // The host holds no descriptor to them either (only the mappings).
    assert!(
        !open_files(std::process::id())
            .iter()
            .any(|f| segments.iter().any(|s| f.contains(s.as_str())))
    );

    // The plugins work.
    chat_reaches(&mut host, "c1", &reports);

    // A restart gets a fresh memfd; the old one is released (the host drops its mapping).
    let old_pid = host.pid_of("iso_a").expect("launched");
    assert!(host.kill_plugin("iso_a"));
    let notices = wait_until(&mut host, "iso_a to be relaunched and ready", |h| {
        h.is_ready("iso_a") && h.pid_of("iso_a").is_some_and(|p| p != old_pid)
    });
    assert!(
        notices
            .iter()
            .any(|n| matches!(n, Notice::Restarted { id, .. } if id == "iso_a")),
        "{notices:?}"
    );
    let fresh = segment_of(&host, "iso_a");
    assert_ne!(fresh, segments[0], "a restart makes a new memfd");
    let new_pid = host.pid_of("iso_a").expect("relaunched");
    assert!(maps(new_pid, &fresh) && !maps(new_pid, &segments[0]));
    assert!(!open_files(new_pid).iter().any(|f| f.contains("memfd:")));
    let me = std::process::id();
    wait_until(&mut host, "the host to release the old memfd", |_| {
        !maps(me, &segments[0])
    });
    assert!(maps(me, &fresh) && maps(me, &segments[1]));
    assert_eq!(shm_names_of(&ids), Vec::<String>::new());

    chat_reaches(&mut host, "c2", &reports);
    host.shutdown("test over");
    drop(host);
    // Gone with the host's links: nothing mapped, nothing named.
    let deadline = std::time::Instant::now() + STALL;
    while maps(me, &fresh) || maps(me, &segments[1]) {
        assert!(std::time::Instant::now() < deadline, "the host keeps its memfds mapped");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Publishes a chat tagged `tag` and waits until every report records it.
fn chat_reaches(host: &mut Host, tag: &str, reports: &[std::path::PathBuf]) {
    let mut tick = host.begin_tick();
    tick.publish(&mut chat(tag, "hello"));
    tick.end();
    wait_until(host, &format!("every plugin to record chat {tag}"), |_| {
        reports
            .iter()
            .all(|r| events_of(&read_lines(r)).iter().any(|(_, t)| t == tag))
    });
}

// ------------------------------------------------------------------------------------------
// A launched plugin that probes its inherited descriptor before and after connecting
// ------------------------------------------------------------------------------------------

const PROBE_REPORT: &str = "TEST_ISOLATION_PROBE_REPORT";

fn fd_flags(fd: i32) -> i32 {
    // SAFETY: F_GETFD takes no argument and only reads the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) }
}

/// Child role: started by `a_launched_plugin_cannot_resize_its_segment_and_closes_it`.
#[test]
fn probe_child() {
    let Ok(report) = std::env::var(PROBE_REPORT) else {
        return;
    };
    let mut lines = Vec::new();
    let fd = INHERITED_FD;
    let flags = fd_flags(fd);
    lines.push(format!(
        "cloexec {}",
        if flags < 0 { -1 } else { flags & libc::FD_CLOEXEC }
    ));
    // SAFETY: F_GET_SEALS takes no argument.
    lines.push(format!("seals {}", unsafe { libc::fcntl(fd, libc::F_GET_SEALS) }));
    let size = std::fs::metadata(format!("/proc/self/fd/{fd}")).map_or(0, |m| m.len());
    for (what, len) in [("shrink", 0), ("grow", (size * 2) as libc::off_t)] {
        // SAFETY: ftruncate takes a descriptor and a length; it touches no memory of ours.
        let r = unsafe { libc::ftruncate(fd, len) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        lines.push(format!("{what} {} {}", r, if r == 0 { 0 } else { errno }));
    }
    let plugin =
        plugbus::plugin::Plugin::from_env().and_then(|b| b.subscribe([EventType::Chat]).hello_timeout(STALL).connect());
    lines.push(format!("connected {}", plugin.is_ok()));
    lines.push(format!("after {}", fd_flags(fd)));
    std::fs::write(&report, lines.join("\n") + "\n").expect("write the probe report");
    if let Ok(p) = plugin {
        struct Idle;
        impl plugbus::plugin::Handler for Idle {}
        let _ = p.run(&mut Idle);
    }
    std::process::exit(0);
}

#[test]
fn a_launched_plugin_cannot_resize_its_segment_and_closes_it() {
    init_logging();
    let dir = Scratch::new("iso-probe");
    let report = dir.file("probe.txt");
    let exe = std::env::current_exe().unwrap();
    let cfg = PluginConfig::launch("iso_probe", exe)
        .args(["--exact", "probe_child", "--nocapture", "--test-threads=1"])
        .env(PROBE_REPORT, report.to_str().unwrap())
        .required(true);
    let mut host = Host::start(config(vec![cfg])).expect("host starts");
    wait_until(&mut host, "the probe's report", |_| {
        read_lines(&report).iter().any(|l| l.starts_with("after"))
    });
    let lines = read_lines(&report);
    let field = |k: &str| -> i64 {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Inherited without close-on-exec, sealed against shrink, grow and further seals.
    assert_eq!(field("cloexec"), 0, "{lines:?}");
    let want = i64::from(libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL);
    assert_eq!(field("seals") & want, want, "{lines:?}");
    // Resizing is refused (EPERM: the seals).
    for what in ["shrink", "grow"] {
        assert!(
            lines.contains(&format!("{what} -1 {}", libc::EPERM)),
            "{what} must fail with EPERM: {lines:?}"
        );
    }
    // Connected, and the descriptor is closed once mapped.
    assert!(lines.contains(&"connected true".to_owned()), "{lines:?}");
    assert_eq!(field("after"), -1, "fd 3 is closed after connecting: {lines:?}");
    assert!(host.is_ready("iso_probe"));
    assert!(host.drain_notices().all(|n| !matches!(n, Notice::Disconnected { .. })));
    host.shutdown("test over");
}

// ------------------------------------------------------------------------------------------
// Unsealed memory files
// ------------------------------------------------------------------------------------------

/// A memory file of `len` bytes with `seals` added (0: none).
fn memfd(len: u64, seals: i32) -> OwnedFd {
    // SAFETY: a valid C string; flags are memfd_create's.
    let fd = unsafe { libc::memfd_create(c"iso-test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(len).unwrap();
    if seals != 0 {
        // SAFETY: F_ADD_SEALS takes an int argument; the descriptor is open.
        assert_eq!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0);
    }
    file.into()
}

#[test]
fn an_unsealed_memory_file_is_refused() {
    // A real segment's bytes in an unsealed file: refused for the seals alone.
    let (seg, sealed) = Segment::create_memfd("iso_unsealed", &[plugbus::segment::RingSpec::frames(4096)]).unwrap();
    let len = seg.len() as u64;
    let unsealed = memfd(len, 0);
    let bytes = std::fs::read(format!("/proc/self/fd/{}", sealed.as_raw_fd())).unwrap();
    std::fs::write(format!("/proc/self/fd/{}", unsealed.as_raw_fd()), &bytes).unwrap();
    match Segment::open_fd(unsealed) {
        Err(SegmentOpenError::Unsealed { reason, .. }) => assert!(reason.contains("seals 0x0"), "{reason}"),
        other => panic!("expected Unsealed, got {other:?}"),
    }
    // Sealed against shrinking only: still refused (it could grow, and be resealed).
    match Segment::open_fd(memfd(len, libc::F_SEAL_SHRINK)) {
        Err(SegmentOpenError::Unsealed { .. }) => {}
        other => panic!("expected Unsealed, got {other:?}"),
    }
    // Not a memory file at all.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert!(matches!(
        Segment::open_fd(file.into()),
        Err(SegmentOpenError::Unsealed { .. })
    ));
    // Through the plugin's connector: refused, and the descriptor is left alone (not taken).
    let unsealed = memfd(len, 0);
    let raw = unsealed.as_raw_fd();
    match transport::connect(&format!("shm:fd:{raw}")) {
        Err(ConnectError::Refused { reason, .. }) => assert!(reason.contains("sealed"), "{reason}"),
        other => panic!("expected Refused, got {:?}", other.map(|_| "a link")),
    }
    assert!(fd_flags(raw) >= 0, "a refused descriptor stays open");
    drop(unsealed);
    // The control: the sealed original opens, as the plugin would open it.
    let opened = Segment::open_fd(sealed).expect("the host's sealed memfd opens");
    assert_eq!(opened.rings(), seg.rings());
    assert!(opened.name().starts_with("memfd:plugbus."), "{}", opened.name());
}

// ------------------------------------------------------------------------------------------
// A planted file with a bad header
// ------------------------------------------------------------------------------------------

const PLANT_CHILD: &str = "TEST_ISOLATION_PLANTED";
const PLANTED_SIZE: u64 = 256 << 20;
const LIMIT: u64 = 16 << 20;

/// `VmRSS` and `VmHWM` of this process, bytes.
fn rss_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
    };
    (kb("VmRSS:") * 1024, kb("VmHWM:") * 1024)
}

/// Bytes of memory the file really holds.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Child role (a fresh process, so its peak memory is its own): opens, inspects and cleans up
/// around the planted file named by `PLANT_CHILD`, then prints `ok` if nothing grew.
#[test]
fn planted_child() {
    let Ok(name) = std::env::var(PLANT_CHILD) else {
        return;
    };
    let path = Path::new("/dev/shm").join(&name);
    let (rss0, peak0) = rss_and_peak();
    let file0 = allocated(&path);

    match Segment::open(&name) {
        Err(SegmentOpenError::NotPlugbus { .. }) => {}
        other => panic!("open: expected NotPlugbus, got {other:?}"),
    }
    assert!(matches!(
        Segment::open_unattached(&name),
        Err(SegmentOpenError::NotPlugbus { .. })
    ));
    let info = stale::inspect(&name);
    assert!(info.error.is_some(), "inspect reports it unreadable: {info:?}");
    assert!(
        stale::list()
            .unwrap()
            .iter()
            .any(|i| i.name == name && i.error.is_some())
    );
    match transport::connect(&format!("shm:{name}")) {
        Err(ConnectError::Refused { .. }) => {}
        other => panic!("connect: expected Refused, got {:?}", other.map(|_| "a link")),
    }
    let (rss1, peak1) = rss_and_peak();
    let file1 = allocated(&path);
    // Cleanup (what every host does at start) inspects it too (and keeps it: its creator lives).
    let _ = stale::remove_stale();
    let (rss2, peak2) = rss_and_peak();
    println!("rss {rss0} {rss1} {rss2} peak {peak0} {peak1} {peak2} file {file0} {file1}");
    assert!(rss1.max(rss2) < rss0 + LIMIT, "RSS grew: {rss0} -> {rss1} -> {rss2}");
    assert!(peak2 < peak0 + LIMIT, "peak RSS grew: {peak0} -> {peak2}");
    assert!(
        file1 < file0 + LIMIT,
        "the file was populated: {file0} -> {file1} bytes"
    );
    println!("planted ok");
}

#[test]
fn a_planted_256_mib_file_with_a_bad_header_is_never_mapped() {
    let name = format!("plugbus.iso-planted.{}", std::process::id());
    let path = Path::new("/dev/shm").join(&name);
    let _guard = SegmentGuard(vec![name.clone()]);
    {
        let f = std::fs::File::create(&path).expect("plant the file");
        use std::io::Write as _;
        let mut header = [0xAB; 4096];
        // A live creator (this process), so that no host's cleanup on this machine removes the
        // file before the child has tried it: only the magic (and the rest) is wrong.
        let at = std::mem::offset_of!(plugbus::segment::header::Fixed, creator_pid);
        header[at..at + 4].copy_from_slice(&std::process::id().to_ne_bytes());
        (&f).write_all(&header).unwrap();
        f.set_len(PLANTED_SIZE).unwrap();
    }
    assert!(allocated(&path) < LIMIT, "the planted file starts sparse");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "planted_child", "--nocapture", "--test-threads=1"])
        .env(PLANT_CHILD, &name)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("planted ok"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // It never became 256 MiB of memory.
    assert!(allocated(&path) < LIMIT);
}

// ------------------------------------------------------------------------------------------
// Attach mode keeps its name
// ------------------------------------------------------------------------------------------

#[test]
fn an_attached_plugin_still_gets_a_named_segment() {
    let host = Host::start(config(vec![PluginConfig::attached("iso_attached")])).expect("host starts");
    let address = host.address_of("iso_attached").expect("configured").to_owned();
    let name = address.strip_prefix("shm:").expect("shm address");
    assert!(name.starts_with("plugbus."), "{address}");
    assert!(stale::list_names().unwrap().contains(&name.to_owned()));
    // And a plugin connects to it by that name.
    let link = transport::connect(&address).expect("connects by name");
    assert!(link.host_pid() == std::process::id());
    drop(link);
    drop(host);
    assert!(!stale::list_names().unwrap().contains(&name.to_owned()));
}
