//! The SIGBUS guard in real processes: it recovers every truncated segment (one after another,
//! the process working on), and nothing else. A SIGBUS outside any segment, or sent by a
//! process, still kills, or reaches the handler the program installed before ours.
//!
//! Each scenario runs in a child process (this test binary re-executed with [`ROLE`] set),
//! since the signal disposition is process-wide and some scenarios end in death by SIGBUS.

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Output};

use plugbus::ring::frame;
use plugbus::segment::{RingSpec, Segment, unique_name};
use plugbus::sync::{AtomicU32, AtomicUsize, Ordering};

/// The scenario a child runs.
const ROLE: &str = "PLUGBUS_TEST_SIGBUS_ROLE";

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Runs child test `test` in scenario `role`.
fn run_child(test: &str, role: &str) -> Output {
    let exe = std::env::current_exe().expect("path of the test binary");
    Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .output()
        .expect("run the child")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{line}").unwrap();
    out.flush().unwrap();
}

/// A child that is meant to die by SIGBUS leaves no core file behind.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

fn truncate(name: &str, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/dev/shm/{name}"))
        .expect("open the segment file")
        .set_len(len)
        .expect("truncate");
}

/// Truncates `seg` under this process and writes to its ring: the guard must catch the fault
/// and mark that segment (and no other) broken.
fn truncate_and_touch(seg: &Segment, others: &[&Segment]) {
    let mut tx = frame::Producer::attach(seg.frame_region(0).unwrap()).unwrap();
    tx.try_push(7, &[1; 100]).unwrap();
    assert!(!seg.is_broken());
    truncate(seg.name(), 0);
    let r = tx.try_push(7, &[2; 100]);
    assert!(
        seg.is_broken(),
        "the guard did not notice the truncation (push gave {r:?})"
    );
    for o in others {
        assert!(!o.is_broken(), "{} marked broken by another segment's fault", o.name());
    }
}

/// A segment still usable end to end.
fn round_trip(seg: &Segment) {
    let region = seg.frame_region(0).unwrap();
    let mut tx = frame::Producer::attach(region.clone()).unwrap();
    let mut rx = frame::Consumer::attach(region).unwrap();
    tx.try_push(9, b"still working").unwrap();
    let f = rx.try_read().unwrap().expect("a frame");
    assert_eq!((f.kind(), f.payload()), (9, &b"still working"[..]));
    assert!(!seg.is_broken());
}

/// A page of a file that is then truncated to nothing: touching it is a SIGBUS (BUS_ADRERR)
/// outside every segment.
struct TruncatedFile {
    ptr: *mut u8,
    _file: std::fs::File,
}

impl TruncatedFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("plugbus-sigbus-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(4096).unwrap();
        // SAFETY: mapping a 4096-byte file shared, read-write; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        file.set_len(0).unwrap();
        Self {
            ptr: p.cast(),
            _file: file,
        }
    }

    /// Reads the first byte (past the end of the file now: SIGBUS).
    fn touch(&self) -> u8 {
        // SAFETY: the page is mapped (the file behind it is gone, which is the point).
        unsafe { self.ptr.read_volatile() }
    }
}

// ------------------------------------------------------------------------------------------
// The child scenarios
// ------------------------------------------------------------------------------------------

/// Child: two segments truncated one after the other are both recovered; a third and a new
/// one keep working.
#[test]
fn child_two_truncations() {
    if role().as_deref() != Some("two") {
        return;
    }
    let spec = [RingSpec::frames(1 << 16)];
    let a = Segment::create(&unique_name("guard-a"), "a", &spec).unwrap();
    let b = Segment::create(&unique_name("guard-b"), "b", &spec).unwrap();
    let c = Segment::create(&unique_name("guard-c"), "c", &spec).unwrap();
    truncate_and_touch(&a, &[&b, &c]);
    truncate_and_touch(&b, &[&c]);
    assert!(a.is_broken() && b.is_broken());
    round_trip(&c);
    drop((a, b));
    let d = Segment::create(&unique_name("guard-d"), "d", &spec).unwrap();
    round_trip(&d);
    truncate_and_touch(&d, &[&c]);
    say("RECOVERED 3");
}

/// Child: a fault in a truncated file that is no segment must kill the process.
#[test]
fn child_foreign_fault() {
    if role().as_deref() != Some("fault") {
        return;
    }
    no_core_dumps();
    let _seg = Segment::create(&unique_name("guard-f"), "f", &[RingSpec::frames(64)]).unwrap();
    let file = TruncatedFile::new();
    let v = file.touch();
    say(&format!("SURVIVED {v}"));
}

/// Child: a SIGBUS sent by a process (`raise`: si_code SI_TKILL) must kill the process, with
/// Rust's own SIGBUS handler installed before ours (`rust`) or the default action (`default`).
#[test]
fn child_sent_signal() {
    let Some(r) = role() else { return };
    let Some(previous) = r.strip_prefix("raise-") else {
        return;
    };
    no_core_dumps();
    if previous == "default" {
        // SAFETY: setting the default action with a zeroed sigaction.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            assert_eq!(libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()), 0);
        }
    }
    let seg = Segment::create(&unique_name("guard-r"), "r", &[RingSpec::frames(64)]).unwrap();
    // SAFETY: raise with a valid signal number.
    unsafe { libc::raise(libc::SIGBUS) };
    say(&format!("SURVIVED broken={}", seg.is_broken()));
}

/// What the program's own handler saw.
static OWN_CALLS: AtomicUsize = AtomicUsize::new(0);
static OWN_LAST_CODE: AtomicU32 = AtomicU32::new(0);

/// The program's own SIGBUS handler: counts, and for a fault maps a zero page over the faulting
/// page so the access succeeds when retried.
extern "C" fn own_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Relaxed: read by the same thread after the handler returns.
    OWN_CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    OWN_LAST_CODE.store(code as u32, Ordering::Relaxed);
    if code == libc::BUS_ADRERR {
        // SAFETY: replaces the one faulting page (of a mapping the test made) with a zero page.
        unsafe {
            libc::mmap(
                (addr & !4095) as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        }
    }
}

/// Child: with a SIGBUS handler of its own installed first, a sent SIGBUS and a fault outside
/// the segments reach that handler; a segment's truncation does not.
#[test]
fn child_own_handler() {
    if role().as_deref() != Some("own") {
        return;
    }
    no_core_dumps();
    // SAFETY: installs own_handler (SA_SIGINFO signature) with an empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = own_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()), 0);
    }
    let spec = [RingSpec::frames(1 << 16)];
    let seg = Segment::create(&unique_name("guard-o"), "o", &spec).unwrap();
    let other = Segment::create(&unique_name("guard-p"), "p", &spec).unwrap();

    // SAFETY: raise with a valid signal number.
    unsafe { libc::raise(libc::SIGBUS) };
    assert_eq!(
        OWN_CALLS.load(Ordering::Relaxed),
        1,
        "the sent SIGBUS did not reach our handler"
    );
    assert_eq!(OWN_LAST_CODE.load(Ordering::Relaxed) as i32, libc::SI_TKILL);

    let file = TruncatedFile::new();
    assert_eq!(file.touch(), 0);
    assert_eq!(
        OWN_CALLS.load(Ordering::Relaxed),
        2,
        "the foreign fault did not reach our handler"
    );
    assert_eq!(OWN_LAST_CODE.load(Ordering::Relaxed) as i32, libc::BUS_ADRERR);
    assert!(!seg.is_broken() && !other.is_broken());

    truncate_and_touch(&seg, &[&other]);
    assert_eq!(
        OWN_CALLS.load(Ordering::Relaxed),
        2,
        "a segment's fault went to the program's handler"
    );
    round_trip(&other);
    // And again, after all that.
    // SAFETY: raise with a valid signal number.
    unsafe { libc::raise(libc::SIGBUS) };
    assert_eq!(OWN_CALLS.load(Ordering::Relaxed), 3);
    say("OWN 3");
}

// ------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------

#[test]
fn recovers_segments_truncated_one_after_another() {
    if role().is_some() {
        return;
    }
    let out = run_child("child_two_truncations", "two");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("RECOVERED 3"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_fault_outside_every_segment_still_kills() {
    if role().is_some() {
        return;
    }
    let out = run_child("child_foreign_fault", "fault");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("SURVIVED"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_sent_sigbus_still_kills() {
    if role().is_some() {
        return;
    }
    for previous in ["rust", "default"] {
        let out = run_child("child_sent_signal", &format!("raise-{previous}"));
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "previous handler {previous}: {}",
            describe(&out)
        );
    }
}

#[test]
fn foreign_sigbus_reaches_the_programs_own_handler() {
    if role().is_some() {
        return;
    }
    let out = run_child("child_own_handler", "own");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OWN 3"),
        "{}",
        describe(&out)
    );
}
