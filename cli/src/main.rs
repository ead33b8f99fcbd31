//! The `plugbus` command: the demo (default), the load test, the side-by-side comparison,
//! inspection and cleanup of segments. See `plugbus --help`.

mod chaos;
mod compare;
mod demo;
mod floor;
mod inspect;
mod load_plugin;
mod loadtest;
mod metrics_http;
mod plot;
mod replay;
mod sim;
mod soak;
mod wire;

// The example plugins, compiled into this binary so that `plugbus demo` can launch them
// (`plugbus plugin chat-filter`, `plugbus plugin move-counter`) without a separate build.
// Their `main` functions are unused here.
#[allow(dead_code)]
#[path = "../../examples/chat_filter.rs"]
mod chat_filter;
#[allow(dead_code)]
#[path = "../../examples/move_counter.rs"]
mod move_counter;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::{Parser, Subcommand};
use plugbus::plugin::WaitStrategy;

/// Counts heap allocations per thread, so the load test can report the tick thread's
/// allocations per event. One thread-local increment per allocation.
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every method forwards to the System allocator with the caller's arguments unchanged;
// the thread-local counter is const-initialized, so touching it never allocates or recurses.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; the caller upholds GlobalAlloc::alloc's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; ptr came from this allocator (which is System's).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; ptr came from this allocator (which is System's).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations made by the calling thread so far.
pub fn alloc_count() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Set by Ctrl-C: the running command stops cleanly (plugins shut down, segments removed).
/// A mutex rather than an atomic: its constructor is `const` in every build, including the
/// `cfg(loom)` one where plugbus's atomics are loom's.
static STOP: Mutex<bool> = Mutex::new(false);

/// Whether Ctrl-C was pressed.
pub fn stopping() -> bool {
    *STOP.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pins the calling thread to one CPU (best effort; reported, never fatal).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, zero-initialized then filled by CPU_SET; sched_setaffinity
    // reads it for the calling thread (pid 0) and keeps no pointer.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("cannot pin to cpu {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

/// "CPU model, N cpus" of this machine.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {n} cpus")
}

#[derive(Parser)]
#[command(
    name = "plugbus",
    version,
    about = "Shared-memory event bus between a game server and its plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// A simulated server (100 players, 50 ticks/s, 10 s) running the example plugins (default).
    Demo(demo::DemoArgs),
    /// The simulated server at scale against load plugins; reports delivery, latency, cost.
    Loadtest(LoadArgs),
    /// The load test for a long time (1,000 players x 20 tps x 4 plugins, 10 minutes), sampling
    /// the host's RSS and open fds every second; fails if RSS grew 5 % or more after warm-up,
    /// fds grew, a critical event was lost or a segment or memfd was left behind.
    Soak(SoakArgs),
    /// The same workload over plugbus and over the old design's transport, side by side.
    Compare(CompareArgs),
    /// Feeds a plugin (or several) recorded or hand-written moves and events, and writes what
    /// they decided: a test bench for any plugin.
    Replay(ReplayArgs),
    /// Lists the plugbus segments on this machine.
    Inspect,
    /// Removes segments whose creator is dead.
    Cleanup,
    /// Runs a built-in plugin (launched by the host; not for direct use).
    #[command(hide = true)]
    Plugin {
        /// load, chat-filter or move-counter.
        name: String,
        /// Plugin arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct LoadArgs {
    /// Simulated players.
    #[arg(long, default_value_t = 100)]
    players: usize,
    /// Ticks per second.
    #[arg(long, default_value_t = 50)]
    tps: u32,
    /// Plugin processes, each subscribed to every event.
    #[arg(long, default_value_t = 2)]
    plugins: usize,
    /// Duration in seconds (the first second is warm-up, left out of the figures).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Plugin wait strategy: spin, park, spin-then-park, paced.
    #[arg(long, default_value = "spin-then-park")]
    wait: String,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency distributions (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Pin the host's tick thread to CPU 0 and plugin i to CPU (1 + i) mod N.
    #[arg(long)]
    pin: bool,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Spin between ticks instead of sleeping: the tick thread never idles, so its caches stay
    /// warm (what a busy server's tick thread looks like). Default: sleep.
    #[arg(long)]
    busy_pacing: bool,
    /// Who wakes sleeping plugins: `thread` (the host's wake thread, awake around each
    /// expected tick end, so the tick thread makes no system call) or `inline` (the tick
    /// thread itself). The host's `wake_thread` setting.
    #[arg(long, default_value = "thread", value_parser = ["thread", "inline"])]
    wake: String,
    /// Kill the first plugin with SIGKILL this many seconds into the run (from another thread,
    /// as an external `kill -9` would); the host detects it and restarts it. The report then
    /// gives each plugin's lost critical events apart.
    #[arg(long, value_name = "SECONDS")]
    kill_one_at: Option<f64>,
    /// Record every tick's moves and events to this file (the input of `plugbus replay`).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// How the plugins connect: `shm` (shared memory) or `grpc` (df.plugin over a Unix socket).
    #[arg(long, default_value = "shm", value_parser = ["shm", "grpc"])]
    transport: String,
    /// Chaos: at random intervals (see --chaos-every), a random ready plugin is killed with
    /// SIGKILL, stopped with SIGSTOP for 50..400 ms (kept below the heartbeat timeout) then
    /// continued, or killed by the host (`Host::kill_plugin`); each is restarted. Reports the
    /// actions, restarts, and critical events lost by surviving plugins (must be 0).
    #[arg(long)]
    chaos: bool,
    /// Mean time between chaos actions, ms (each gap uniform in 0.5x..1.5x).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    chaos_every: u64,
    /// Seed of the simulated world and of chaos (same seed, same choices).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// After the run, measure this machine's floor with no plugbus code (about 5 s): a thread
    /// paced like the tick thread copies one move frame per plugin into rings of the same size
    /// after each tick's sleep, and a thread spinning on another CPU waits for its store. The
    /// tick's writes and any hand-off to a spinning plugin cannot beat these.
    #[arg(long)]
    floor: bool,
}

#[derive(clap::Args, Debug, Clone)]
struct SoakArgs {
    /// Simulated players.
    #[arg(long, default_value_t = 1000)]
    players: usize,
    /// Ticks per second.
    #[arg(long, default_value_t = 20)]
    tps: u32,
    /// Plugin processes.
    #[arg(long, default_value_t = 4)]
    plugins: usize,
    /// Duration in seconds, warm-up included.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// Warm-up, seconds: RSS and fds are compared with their values at its end.
    #[arg(long, default_value_t = 30.0)]
    warmup: f64,
    /// RSS growth after warm-up (end vs end of warm-up), percent, at or above which the soak fails.
    #[arg(long, default_value_t = 5.0)]
    max_growth: f64,
    /// Plugin wait strategy: spin, park, spin-then-park, paced.
    #[arg(long, default_value = "spin-then-park")]
    wait: String,
    /// Seed of the simulated world.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the summary, the load report and the samples as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct ReplayArgs {
    /// The host configuration: the plugins to run (TOML, as for an embedded host).
    #[arg(long)]
    config: PathBuf,
    /// The moves and events to feed, JSON Lines (what `--record` writes).
    #[arg(long)]
    events: PathBuf,
    /// Where to write what the plugins decided, JSON Lines (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Ticks per second.
    #[arg(long, default_value_t = 20)]
    tps: u32,
    /// After the last line, keep ticking this long to collect late actions and logs.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
}

#[derive(clap::Args, Debug, Clone)]
struct CompareArgs {
    /// Seconds per transport.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The plugbus plugin's wait strategy: spin, park, spin-then-park, paced (the baseline's plugin
    /// blocks in read, as a gRPC stream reader does).
    #[arg(long, default_value = "spin-then-park")]
    wait: String,
    /// Write the comparison as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLUGBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(demo::LogWriter::default)
        .with_target(false)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            init_logging("info");
            demo::run(&demo::DemoArgs::default())
        }
        Some(Cmd::Demo(args)) => {
            init_logging("info");
            demo::run(&args)
        }
        Some(Cmd::Loadtest(args)) => {
            init_logging("warn");
            loadtest_cmd(&args)
        }
        Some(Cmd::Soak(args)) => {
            init_logging("warn");
            soak_cmd(&args)
        }
        Some(Cmd::Compare(args)) => {
            init_logging("warn");
            compare::run(args.seconds, &args.wait, args.json.as_deref()).map(|_| ())
        }
        Some(Cmd::Replay(a)) => {
            init_logging("warn");
            replay::run(&replay::ReplaySpec {
                config: &a.config,
                events: &a.events,
                out: a.out.as_deref(),
                tps: a.tps,
                settle: std::time::Duration::from_millis(a.settle_ms),
            })
        }
        Some(Cmd::Inspect) => inspect::inspect(),
        Some(Cmd::Cleanup) => inspect::cleanup(),
        Some(Cmd::Plugin { name, args }) => run_plugin(&name, args),
    };
    if let Err(e) = result {
        eprintln!("plugbus: {e}");
        std::process::exit(1);
    }
}

fn run_plugin(name: &str, args: Vec<String>) -> Result<(), String> {
    match name {
        "load" => {
            let mut wait = WaitStrategy::default();
            let mut it = args.into_iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--wait" => wait = it.next().unwrap_or_default().parse()?,
                    other => return Err(format!("unknown argument {other:?}")),
                }
            }
            load_plugin::run(wait)
        }
        "baseline" => compare::baseline_plugin(),
        "chat-filter" => chat_filter::run(args),
        "move-counter" => move_counter::run(args),
        other => Err(format!(
            "no built-in plugin {other:?} (load, chat-filter, move-counter)"
        )),
    }
}

/// Installs the Ctrl-C handler (once).
pub fn on_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        let already = std::mem::replace(&mut *STOP.lock().unwrap_or_else(|p| p.into_inner()), true);
        if already {
            // Second Ctrl-C: give up waiting.
            std::process::exit(130);
        }
        eprintln!("\nstopping (Ctrl-C again to abort)...");
    });
}

fn loadtest_cmd(a: &LoadArgs) -> Result<(), String> {
    let wait: WaitStrategy = a.wait.parse()?;
    if a.plugins == 0 || a.tps == 0 || a.seconds.is_nan() || a.seconds <= 0.0 {
        return Err("--tps, --plugins and --seconds must be positive (--players 0 measures idle plugins)".into());
    }
    if a.kill_one_at.is_some_and(|t| !(t >= 0.0 && t < a.seconds)) {
        return Err("--kill-one-at must be within the run (0 <= SECONDS < --seconds)".into());
    }
    on_ctrl_c();
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    let metrics = metrics_http::serve(a.metrics_addr.as_deref())?;
    let spec = loadtest::LoadSpec {
        players: a.players,
        tps: a.tps,
        seconds: a.seconds,
        warmup_s: (a.seconds * 0.1).min(1.0),
        pin: a.pin,
        plugins: (0..a.plugins)
            .map(|_| {
                (
                    exe.clone(),
                    vec!["plugin".into(), "load".into(), "--wait".into(), a.wait.clone()],
                )
            })
            .collect(),
        reports: true,
        metrics,
        seed: a.seed,
        busy_pacing: a.busy_pacing,
        wake_thread: a.wake == "thread",
        kill_one_at: a.kill_one_at,
        record: a.record.clone(),
        transport: a.transport.clone(),
        chaos: a.chaos.then(|| chaos::ChaosSpec {
            seed: a.seed,
            every_ms: a.chaos_every.max(1),
            stop_ms: (50, 400),
        }),
        lean: false,
        sample_resources: false,
    };
    let (mut report, _) = run_and_count_leaks(&spec)?;
    report.wait = format!("{wait:?}");
    if a.floor && !stopping() {
        report.machine_floor = Some(floor::measure(&floor::FloorSpec {
            bytes: loadtest::move_frame_bytes(a.players) as usize,
            copies: a.plugins,
            ring: loadtest::moves_ring_bytes(a.players) as usize,
            tick_len: std::time::Duration::from_secs_f64(1.0 / f64::from(a.tps)),
            ticks: (a.tps as usize * 5).clamp(50, 500),
        }));
    }
    loadtest::print(&report);
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  json                      {}", path.display());
    }
    if let Some(path) = &a.plot {
        plot::latency(&report, path)?;
        println!("  plot                      {}", path.display());
    }
    Ok(())
}

/// Runs the load with a progress line, shuts the host down, and records in the report what the
/// host left behind (segments in /dev/shm, memfds still open); returns that too.
fn run_and_count_leaks(spec: &loadtest::LoadSpec) -> Result<(loadtest::LoadReport, soak::Leaks), String> {
    let pb = demo::progress_bar(spec.seconds, spec.tps);
    let (mut report, host) = loadtest::run(spec, |p| demo::show_progress(&pb, p))?;
    pb.finish_and_clear();
    drop(host);
    let leaks = soak::leaks();
    report.segments_left = Some(leaks.segments_left.len() as u64);
    report.memfds_left = Some(leaks.memfds_left);
    Ok((report, leaks))
}

fn soak_cmd(a: &SoakArgs) -> Result<(), String> {
    let wait: WaitStrategy = a.wait.parse()?;
    if a.plugins == 0
        || a.tps == 0
        || a.seconds.is_nan()
        || a.seconds <= a.warmup + 1.0
        || a.warmup.is_nan()
        || a.warmup < 0.0
    {
        return Err("--tps and --plugins must be positive, and --seconds more than --warmup + 1".into());
    }
    on_ctrl_c();
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    let spec = loadtest::LoadSpec {
        players: a.players,
        tps: a.tps,
        seconds: a.seconds,
        warmup_s: a.warmup,
        pin: false,
        plugins: (0..a.plugins)
            .map(|_| {
                (
                    exe.clone(),
                    vec!["plugin".into(), "load".into(), "--wait".into(), a.wait.clone()],
                )
            })
            .collect(),
        reports: true,
        metrics: None,
        seed: a.seed,
        busy_pacing: false,
        wake_thread: true,
        kill_one_at: None,
        record: None,
        transport: "shm".into(),
        chaos: None,
        lean: true,
        sample_resources: true,
    };
    let (mut report, leaks) = run_and_count_leaks(&spec)?;
    report.wait = format!("{wait:?}");
    let mut summary = soak::summarize(&report.resource_samples, a.warmup, a.max_growth);
    if report.critical_lost > 0 {
        summary
            .failures
            .push(format!("{} critical events lost", report.critical_lost));
    }
    if !leaks.segments_left.is_empty() || leaks.memfds_left > 0 {
        summary.failures.push(format!(
            "left behind: segments {:?}, {} memfd(s)",
            leaks.segments_left, leaks.memfds_left
        ));
    }
    loadtest::print(&report);
    soak::print(&summary);
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({ "soak": summary, "load": report }))
            .map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  json                      {}", path.display());
    }
    if summary.failures.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", summary.failures.join("; ")))
    }
}
