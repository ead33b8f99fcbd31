//! `plugbus compare`: the same workload over plugbus and over the old design's transport, in
//! one run.
//!
//! The baseline is what the Dragonfly bridge does per event, minus gRPC's own overhead: every
//! event (every player's move included) is one `HostToPlugin { event }` prost message, length
//! delimited, written to a Unix socket with one `write` each; the plugin reads and decodes each
//! one. plugbus runs the same world through its host: moves as packed frames, other events as
//! envelopes batched per tick, immediate ones at once.
//!
//! Each transport runs two phases with a fresh plugin process:
//! - latency: the world at its real pace (100 players, 50 ticks/s); every event's
//!   publish-to-observe time (a move's publish is its tick's publish);
//! - throughput: the world as fast as the host can publish; events per second from the first
//!   publish to the plugin's last observation, and the host thread's CPU time per event.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plugbus::host::{Hist, Host, HostConfig, PluginConfig};
use plugbus::proto::{EventEnvelope, EventType, HostToPlugin, event_envelope::Payload, host_to_plugin};
use plugbus::segment::monotonic_ns;
use prost::Message;
use serde::Serialize;

use crate::load_plugin::PluginReport;
use crate::sim::{TickOutput, World};

const PLAYERS: usize = 100;
const TPS: u32 = 50;

/// One transport's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    /// Events delivered per second at saturation.
    pub events_per_s: f64,
    /// Publish-to-observe latency at the real pace, ns.
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    /// CPU time of the host's publishing thread per event at saturation, ns.
    pub host_cpu_ns_per_event: f64,
    /// Events offered and delivered in the throughput phase.
    pub offered: u64,
    pub delivered: u64,
}

/// The comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    pub workload: String,
    pub machine: String,
    pub seconds_per_phase: f64,
    /// The plugbus plugin's wait strategy (the baseline plugin blocks in `read`).
    pub plugbus_wait: String,
    pub plugbus: Side,
    pub baseline: Side,
    /// plugbus events/s over baseline events/s.
    pub throughput_ratio: f64,
    /// Baseline p99 over plugbus p99.
    pub p99_ratio: f64,
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The publishing side of one transport.
trait Transport {
    /// Publishes one tick; records publish times when `times` is given (move: per tick; other
    /// events: per event id). Returns events sent.
    fn tick(&mut self, tick: u64, out: &mut TickOutput, times: Option<&mut Times>) -> Result<u64, String>;
    /// Ends the run and returns the plugin's report.
    fn finish(self: Box<Self>) -> Result<PluginReport, String>;
}

#[derive(Default)]
struct Times {
    ticks: HashMap<u64, u64>,
    events: HashMap<u64, u64>,
}

struct Plugbus {
    host: Host,
    report: PathBuf,
}

impl Plugbus {
    fn start(dir: &Path, record: &str, phase: &str, wait: &str) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let report = dir.join(format!("plugbus-{phase}.json"));
        let cfg = PluginConfig::launch("compare", exe)
            .args(["plugin", "load", "--wait", wait])
            .env("PLUGBUS_REPORT", &report.display().to_string())
            .env("PLUGBUS_RECORD", record)
            .required(true);
        let mut config = HostConfig::new(vec![cfg]);
        config.host.hello_timeout_ms = 10_000;
        let mut host = Host::start(config).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !host.is_subscribed("compare", EventType::PlayerMove) {
            if Instant::now() > deadline {
                return Err("plugin did not subscribe".into());
            }
            host.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self { host, report })
    }
}

impl Transport for Plugbus {
    fn tick(&mut self, _tick: u64, out: &mut TickOutput, mut times: Option<&mut Times>) -> Result<u64, String> {
        let mut t = self.host.begin_tick();
        let tick_no = t.number();
        let published = monotonic_ns();
        t.publish_moves(&out.moves);
        for env in out.events.iter_mut().chain(out.requests.iter_mut()) {
            let at = monotonic_ns();
            t.publish(env);
            if let Some(times) = times.as_deref_mut() {
                if let Ok(id) = env.event_id.parse() {
                    times.events.insert(id, at);
                }
            }
        }
        t.end();
        if let Some(times) = times {
            times.ticks.insert(tick_no, published);
        }
        Ok((out.moves.len() + out.events.len() + out.requests.len()) as u64)
    }

    fn finish(mut self: Box<Self>) -> Result<PluginReport, String> {
        self.host.shutdown("compare phase done");
        PluginReport::read(&self.report)
    }
}

struct Baseline {
    stream: UnixStream,
    child: Child,
    report: PathBuf,
    next_id: u64,
    buf: Vec<u8>,
    env: EventEnvelope,
}

impl Baseline {
    fn start(dir: &Path, record: &str, phase: &str) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let sock = dir.join(format!("baseline-{phase}.sock"));
        let report = dir.join(format!("baseline-{phase}.json"));
        let listener = UnixListener::bind(&sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
        let child = Command::new(exe)
            .args(["plugin", "baseline"])
            .env("PLUGBUS_SOCKET", &sock)
            .env("PLUGBUS_REPORT", &report)
            .env("PLUGBUS_RECORD", record)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the baseline plugin: {e}"))?;
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&sock);
        Ok(Self {
            stream,
            child,
            report,
            next_id: 1,
            buf: Vec::new(),
            env: EventEnvelope::default(),
        })
    }

    fn send(&mut self, env: &EventEnvelope) -> Result<(), String> {
        // What the old bridge does per event: wrap, marshal into a fresh buffer, one write.
        let msg = HostToPlugin {
            plugin_id: String::new(),
            payload: Some(host_to_plugin::Payload::Event(env.clone())),
        };
        self.buf = msg.encode_length_delimited_to_vec();
        self.stream
            .write_all(&self.buf)
            .map_err(|e| format!("baseline write: {e}"))
    }
}

impl Transport for Baseline {
    fn tick(&mut self, tick: u64, out: &mut TickOutput, mut times: Option<&mut Times>) -> Result<u64, String> {
        let published = monotonic_ns();
        for (i, m) in out.moves.iter().enumerate() {
            let mut env = std::mem::take(&mut self.env);
            env.event_id = format!("{tick}.{i}");
            env.r#type = EventType::PlayerMove as i32;
            env.payload = Some(Payload::PlayerMove(m.to_move_event("", "overworld")));
            self.send(&env)?;
            self.env = env;
        }
        for env in out.events.iter_mut().chain(out.requests.iter_mut()) {
            let id = self.next_id;
            self.next_id += 1;
            env.event_id = id.to_string();
            env.r#type = env.payload.as_ref().map_or(0, |p| p.event_type() as i32);
            let at = monotonic_ns();
            self.send(env)?;
            if let Some(times) = times.as_deref_mut() {
                times.events.insert(id, at);
            }
        }
        if let Some(times) = times {
            times.ticks.insert(tick, published);
        }
        Ok((out.moves.len() + out.events.len() + out.requests.len()) as u64)
    }

    fn finish(mut self: Box<Self>) -> Result<PluginReport, String> {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("baseline plugin failed: {status}"));
        }
        PluginReport::read(&self.report)
    }
}

/// Ticks of the world generated up front and replayed, so that the simulation's own cost does
/// not limit or blur what is measured: only the transport's work is timed.
const REPLAY_TICKS: usize = 250;

fn replay() -> Vec<TickOutput> {
    let mut world = World::new(PLAYERS, TPS, 99);
    (0..REPLAY_TICKS)
        .map(|_| {
            let mut out = TickOutput::default();
            world.step(&mut out);
            out
        })
        .collect()
}

/// Runs one phase; returns (events offered, the plugin's report, host thread CPU ns spent in
/// the transport, monotonic time of the first publish).
fn phase(
    mut transport: Box<dyn Transport>,
    ticks: &mut [TickOutput],
    seconds: f64,
    paced: bool,
    mut times: Option<&mut Times>,
) -> Result<(u64, PluginReport, u64, u64), String> {
    let tick_len = Duration::from_secs_f64(1.0 / f64::from(TPS));
    let start = monotonic_ns();
    let started = Instant::now();
    let mut next = Instant::now() + tick_len;
    let mut offered = 0;
    let mut cpu = 0;
    let mut tick = 0u64;
    while started.elapsed().as_secs_f64() < seconds && !crate::stopping() {
        let out = &mut ticks[tick as usize % ticks.len()];
        tick += 1;
        let cpu0 = thread_cpu_ns();
        offered += transport.tick(tick, out, times.as_deref_mut())?;
        cpu += thread_cpu_ns() - cpu0;
        if paced {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += tick_len;
        }
    }
    let report = transport.finish()?;
    Ok((offered, report, cpu, start))
}

fn delivered(r: &PluginReport) -> u64 {
    r.counts.values().sum::<u64>() + r.moves
}

fn side(which: &str, seconds: f64, dir: &Path, wait: &str) -> Result<Side, String> {
    let make = |record: &str, phase: &str| -> Result<Box<dyn Transport>, String> {
        Ok(match which {
            "plugbus" => Box::new(Plugbus::start(dir, record, phase, wait)?),
            _ => Box::new(Baseline::start(dir, record, phase)?),
        })
    };
    let mut ticks = replay();
    // Latency at the real pace.
    let mut times = Times::default();
    let (_, r, _, _) = phase(make("all", "latency")?, &mut ticks, seconds, true, Some(&mut times))?;
    let mut hist = Hist::default();
    for [tick, seen, count] in &r.move_frames {
        if let Some(p) = times.ticks.get(tick) {
            for _ in 0..*count {
                hist.record(seen.saturating_sub(*p));
            }
        }
    }
    for [id, seen] in &r.critical {
        if let Some(p) = times.events.get(id) {
            hist.record(seen.saturating_sub(*p));
        }
    }
    // Throughput at saturation.
    let (offered, r, cpu, start) = phase(make("none", "throughput")?, &mut ticks, seconds, false, None)?;
    let got = delivered(&r);
    let elapsed = r.last_ns.saturating_sub(start).max(1);
    Ok(Side {
        events_per_s: got as f64 / (elapsed as f64 / 1e9),
        p50_ns: hist.quantile(0.5),
        p99_ns: hist.quantile(0.99),
        p999_ns: hist.quantile(0.999),
        host_cpu_ns_per_event: cpu as f64 / offered.max(1) as f64,
        offered,
        delivered: got,
    })
}

/// `plugbus compare`.
pub fn run(seconds: f64, wait: &str, json: Option<&Path>) -> Result<Comparison, String> {
    let _: plugbus::plugin::WaitStrategy = wait.parse()?;
    crate::on_ctrl_c();
    let dir = std::env::temp_dir().join(format!("plugbus-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let per_phase = (seconds / 2.0).max(0.5);
    println!(
        "plugbus compare: {PLAYERS} players at {TPS} ticks/s, {per_phase:.1} s latency + {per_phase:.1} s throughput per transport, plugbus plugin wait {wait} ({})",
        crate::machine()
    );
    let plugbus = side("plugbus", per_phase, &dir, wait)?;
    let baseline = side("baseline", per_phase, &dir, wait)?;
    let _ = std::fs::remove_dir_all(&dir);
    let c = Comparison {
        workload: format!("{PLAYERS} players x {TPS} tps, 1 plugin subscribed to everything"),
        machine: crate::machine(),
        seconds_per_phase: per_phase,
        plugbus_wait: wait.to_owned(),
        throughput_ratio: plugbus.events_per_s / baseline.events_per_s.max(1e-9),
        p99_ratio: baseline.p99_ns as f64 / plugbus.p99_ns.max(1) as f64,
        plugbus,
        baseline,
    };
    let row = |name: &str, s: &Side| {
        println!(
            "  {name:<9} {:>14.0} {:>12.2} {:>12.2} {:>12.2} {:>16.0}   ({} of {} delivered)",
            s.events_per_s,
            s.p50_ns as f64 / 1000.0,
            s.p99_ns as f64 / 1000.0,
            s.p999_ns as f64 / 1000.0,
            s.host_cpu_ns_per_event,
            s.delivered,
            s.offered
        );
    };
    println!(
        "  {:<9} {:>14} {:>12} {:>12} {:>12} {:>16}",
        "", "events/s", "p50 µs", "p99 µs", "p99.9 µs", "host CPU ns/ev"
    );
    row("plugbus", &c.plugbus);
    row("baseline", &c.baseline);
    println!(
        "  plugbus: {:.1}x the throughput, {:.1}x lower p99",
        c.throughput_ratio, c.p99_ratio
    );
    if let Some(path) = json {
        let s = serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?;
        std::fs::write(path, s).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(c)
}

/// The baseline plugin (`plugbus plugin baseline`): reads length-delimited `HostToPlugin`
/// messages from the Unix socket, decodes each, and records what it saw.
pub fn baseline_plugin() -> Result<(), String> {
    let sock = std::env::var_os("PLUGBUS_SOCKET").ok_or("PLUGBUS_SOCKET not set")?;
    let report_path = std::env::var_os("PLUGBUS_REPORT")
        .map(PathBuf::from)
        .ok_or("PLUGBUS_REPORT not set")?;
    let record = std::env::var("PLUGBUS_RECORD").unwrap_or_default() == "all";
    let stream = UnixStream::connect(&sock).map_err(|e| format!("connect: {e}"))?;
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut report = PluginReport::default();
    let mut buf = Vec::new();
    loop {
        match crate::wire::read_message(&mut reader, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(e) => return Err(format!("read: {e}")),
        }
        let msg = HostToPlugin::decode(buf.as_slice()).map_err(|e| format!("decode: {e}"))?;
        let now = monotonic_ns();
        report.last_ns = now;
        let Some(host_to_plugin::Payload::Event(env)) = msg.payload else {
            continue;
        };
        match &env.payload {
            Some(Payload::PlayerMove(m)) => {
                report.moves += 1;
                report.checksum += m.position.map_or(0.0, |p| p.x + p.z);
                if record {
                    if let Some(tick) = env.event_id.split('.').next().and_then(|t| t.parse().ok()) {
                        report.move_frames.push([tick, now, 1]);
                    }
                }
            }
            _ => {
                *report.counts.entry(env.r#type).or_default() += 1;
                if record {
                    if let Ok(id) = env.event_id.parse() {
                        report.critical.push([id, now]);
                    }
                }
            }
        }
    }
    report.write(&report_path);
    Ok(())
}
