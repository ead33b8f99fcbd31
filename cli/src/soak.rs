//! `plugbus soak`: the load test for a long time (1,000 players x 20 tps x 4 plugins by default)
//! while a thread samples the host process's memory and open file descriptors every second; and
//! the leak check every load test ends with (segments in /dev/shm, memfds still open).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One sample of the host process's resources.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ResourceSample {
    /// Seconds since the first tick.
    pub t_s: f64,
    /// `VmRSS` of /proc/self/status, KiB (anonymous + file + shared memory mapped and touched).
    pub rss_kib: u64,
    /// `RssAnon`, KiB (the heap and stacks: where a leak of the host's own data shows).
    pub rss_anon_kib: u64,
    /// Entries of /proc/self/fd (the directory handle of the count itself included: constant).
    pub fds: u64,
    /// Of those, the ones that are memfds (`/memfd:` links).
    pub memfds: u64,
}

/// `VmRSS` and `RssAnon` of this process, KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Open file descriptors of this process and how many of them are memfds.
pub fn open_fds() -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return (0, 0);
    };
    let mut fds = 0;
    let mut memfds = 0;
    for entry in dir.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")) {
            memfds += 1;
        }
    }
    (fds, memfds)
}

fn sample(started: Instant) -> ResourceSample {
    let (rss_kib, rss_anon_kib) = memory_kib();
    let (fds, memfds) = open_fds();
    ResourceSample {
        t_s: started.elapsed().as_secs_f64(),
        rss_kib,
        rss_anon_kib,
        fds,
        memfds,
    }
}

/// A thread sampling the process every `every` from `started` until [`Sampler::finish`], which
/// takes one last sample.
pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<ResourceSample>>,
}

impl Sampler {
    pub fn start(started: Instant, every: Duration) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("plugbus-sampler".into())
            .spawn(move || {
                let mut samples = Vec::with_capacity(4096);
                let mut k = 0u32;
                loop {
                    samples.push(sample(started));
                    k += 1;
                    let next = started + every * k;
                    match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                samples.push(sample(started));
                samples
            })
            .expect("spawn the sampler thread");
        Self { stop, thread }
    }

    /// Stops the thread and returns its samples (the last one taken now).
    pub fn finish(self) -> Vec<ResourceSample> {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}

/// What a host left behind once shut down and dropped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Leaks {
    /// Names in /dev/shm made by this process (`plugbus.<pid>.*`).
    pub segments_left: Vec<String>,
    /// memfds this process still holds (no plugin runs any more, so any is a leak).
    pub memfds_left: u64,
}

/// Looks for what this process's hosts (all dropped by now) left; teardown may finish on other
/// threads, so it looks again for up to 2 s while anything is left.
pub fn leaks() -> Leaks {
    let prefix = format!("{}{}.", plugbus::segment::PREFIX, std::process::id());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let segments_left: Vec<String> = plugbus::segment::stale::list_names()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        let memfds_left = open_fds().1;
        let leaks = Leaks {
            segments_left,
            memfds_left,
        };
        if (leaks.segments_left.is_empty() && leaks.memfds_left == 0) || Instant::now() > deadline {
            return leaks;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The soak's verdict over the samples taken after warm-up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakSummary {
    pub seconds: f64,
    pub warmup_s: f64,
    /// RSS at the end of warm-up, the highest after it, and at the end, KiB.
    pub rss_warmup_kib: u64,
    pub rss_max_kib: u64,
    pub rss_end_kib: u64,
    /// (end - end of warm-up) / end of warm-up, percent: the gate (< `max_growth_pct`).
    pub rss_growth_pct: f64,
    /// (max - end of warm-up) / end of warm-up, percent.
    pub rss_max_growth_pct: f64,
    /// The same for `RssAnon` (the host's heap), percent.
    pub rss_anon_growth_pct: f64,
    /// Open fds at the end of warm-up, lowest and highest after it, at the end.
    pub fds_warmup: u64,
    pub fds_min: u64,
    pub fds_max: u64,
    pub fds_end: u64,
    pub max_growth_pct: f64,
    /// Why the soak failed (empty: passed): RSS growth, fds at the end above the end of
    /// warm-up, critical events lost, leaks.
    pub failures: Vec<String>,
}

/// Summarizes `samples` (taken every second from the first tick) after `warmup_s`.
pub fn summarize(samples: &[ResourceSample], warmup_s: f64, max_growth_pct: f64) -> SoakSummary {
    let after: Vec<&ResourceSample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    let (Some(first), Some(last)) = (after.first(), after.last()) else {
        return SoakSummary {
            failures: vec![format!("no sample after the {warmup_s} s warm-up")],
            ..Default::default()
        };
    };
    let pct = |a: u64, b: u64| (b as f64 - a as f64) / (a.max(1) as f64) * 100.0;
    let rss_max = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let mut s = SoakSummary {
        seconds: last.t_s,
        warmup_s,
        rss_warmup_kib: first.rss_kib,
        rss_max_kib: rss_max,
        rss_end_kib: last.rss_kib,
        rss_growth_pct: pct(first.rss_kib, last.rss_kib),
        rss_max_growth_pct: pct(first.rss_kib, rss_max),
        rss_anon_growth_pct: pct(first.rss_anon_kib, last.rss_anon_kib),
        fds_warmup: first.fds,
        fds_min: after.iter().map(|s| s.fds).min().unwrap_or(0),
        fds_max: after.iter().map(|s| s.fds).max().unwrap_or(0),
        fds_end: last.fds,
        max_growth_pct,
        failures: Vec::new(),
    };
    if s.rss_growth_pct >= max_growth_pct {
        s.failures.push(format!(
            "RSS grew {:.2} % after warm-up ({} -> {} KiB; limit {max_growth_pct} %)",
            s.rss_growth_pct, s.rss_warmup_kib, s.rss_end_kib
        ));
    }
    if s.fds_end > s.fds_warmup {
        s.failures.push(format!(
            "open fds grew after warm-up ({} -> {})",
            s.fds_warmup, s.fds_end
        ));
    }
    s
}

/// Prints the soak's summary.
pub fn print(s: &SoakSummary) {
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    println!(
        "  soak                      {:.0} s after a {:.0} s warm-up",
        s.seconds - s.warmup_s,
        s.warmup_s
    );
    println!(
        "  host RSS                  end of warm-up {}  max {}  end {}: growth {:.2} % (max {:.2} %, heap {:.2} %)",
        mib(s.rss_warmup_kib),
        mib(s.rss_max_kib),
        mib(s.rss_end_kib),
        s.rss_growth_pct,
        s.rss_max_growth_pct,
        s.rss_anon_growth_pct
    );
    println!(
        "  host open fds             end of warm-up {}  min {}  max {}  end {}",
        s.fds_warmup, s.fds_min, s.fds_max, s.fds_end
    );
    if s.failures.is_empty() {
        println!("  verdict                   pass");
    } else {
        for f in &s.failures {
            println!("  FAIL                      {f}");
        }
    }
}
