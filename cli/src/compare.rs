//! `plugbus compare`: the same workload over plugbus and over the old design's transport, in
//! one run.
//!
//! The baseline is what the Dragonfly bridge does per event, minus gRPC's own overhead: every
//! event (every player's move included) is one `HostToPlugin { event }` prost message, length
//! delimited, written to a Unix socket with one `write` each; the plugin reads and decodes each
//! one. plugbus runs the same world through its host: moves as packed frames, other events as
//! envelopes batched per tick, immediate ones at once. Two more columns run the same host over
//! its gRPC adapter (a Unix socket): `grpc` with a plugin that declares nothing, so it gets one
//! message per event as from the df.plugin host (the seed as it ships), and `grpc_batched` with
//! per-tick batches and packed moves (the seed's batching proposal).
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
    /// CPU time of the host process (every thread: the tick's, the gRPC adapter's) per event
    /// at saturation, ns.
    pub host_cpu_ns_per_event: f64,
    /// Messages (frames, for shared memory) per second on the wire at saturation.
    pub messages_per_s: f64,
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
    /// The host over gRPC, one message per event (the df.plugin host's way).
    pub grpc: Side,
    /// The host over gRPC with per-tick batches and packed moves.
    pub grpc_batched: Side,
    /// plugbus events/s over baseline events/s.
    pub throughput_ratio: f64,
    /// Baseline p99 over plugbus p99.
    pub p99_ratio: f64,
}

fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The publishing side of one transport.
trait Transport {
    /// Publishes one tick; records publish times when `times` is given (move: per tick; other
    /// events: per event id). Returns events sent.
    fn tick(&mut self, tick: u64, out: &mut TickOutput, times: Option<&mut Times>) -> Result<u64, String>;
    /// Ends the run and returns the plugin's report and the messages sent (`None`: one per
    /// event delivered).
    fn finish(self: Box<Self>) -> Result<(PluginReport, Option<u64>), String>;
}

#[derive(Default)]
struct Times {
    ticks: HashMap<u64, u64>,
    events: HashMap<u64, u64>,
}

struct Plugbus {
    host: Host,
    report: PathBuf,
    /// One message per event on the wire (a gRPC plugin that declared nothing).
    per_event: bool,
}

/// Which of plugbus's transports a column runs over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Over {
    Shm,
    Grpc,
    GrpcBatched,
}

impl Plugbus {
    fn start(dir: &Path, record: &str, phase: &str, wait: &str, over: Over) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let tag = match over {
            Over::Shm => "shm",
            Over::Grpc => "grpc",
            Over::GrpcBatched => "grpcb",
        };
        let report = dir.join(format!("plugbus-{tag}-{phase}.json"));
        let mut cfg = PluginConfig::launch("compare", exe)
            .args(["plugin", "load", "--wait", wait])
            .env("PLUGBUS_REPORT", &report.display().to_string())
            .env("PLUGBUS_RECORD", record)
            .required(true);
        if over != Over::Shm {
            cfg.transport = "grpc".into();
        }
        if over == Over::Grpc {
            cfg = cfg.env(plugbus::transport::grpc::ENV_CAPABILITIES, "none");
        }
        let mut config = HostConfig::new(vec![cfg]);
        if over != Over::Shm {
            config.host.listen = vec![format!("unix://{}", dir.join(format!("{tag}-{phase}.sock")).display())];
        }
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
        Ok(Self {
            host,
            report,
            per_event: over == Over::Grpc,
        })
    }
}

impl Transport for Plugbus {
    fn tick(&mut self, _tick: u64, out: &mut TickOutput, mut times: Option<&mut Times>) -> Result<u64, String> {
        // At saturation, publish no faster than the plugin takes: nothing left waiting in the
        // host from the last tick (as the baseline's blocking write waits for its socket).
        while self.host.backlog("compare").unwrap_or(0) > 0 {
            if !self.host.is_ready("compare") {
                return Err("the plugin was disconnected".into());
            }
            // An empty tick sends what waits, as far as the link has room.
            self.host.begin_tick().end();
            std::thread::yield_now();
        }
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

    fn finish(mut self: Box<Self>) -> Result<(PluginReport, Option<u64>), String> {
        let frames = self.host.metrics().plugins.get("compare").map(|p| p.frames_sent);
        self.host.shutdown("compare phase done");
        Ok((PluginReport::read(&self.report)?, frames.filter(|_| !self.per_event)))
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

    fn finish(mut self: Box<Self>) -> Result<(PluginReport, Option<u64>), String> {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("baseline plugin failed: {status}"));
        }
        Ok((PluginReport::read(&self.report)?, None))
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

/// What one phase gave: events offered, the plugin's report, messages sent (`None`: one per
/// event), the host process's CPU ns, and the monotonic time of the first publish.
type PhaseResult = (u64, PluginReport, Option<u64>, u64, u64);

/// Runs one phase.
fn phase(
    mut transport: Box<dyn Transport>,
    ticks: &mut [TickOutput],
    seconds: f64,
    paced: bool,
    mut times: Option<&mut Times>,
) -> Result<PhaseResult, String> {
    let tick_len = Duration::from_secs_f64(1.0 / f64::from(TPS));
    let start = monotonic_ns();
    let started = Instant::now();
    let mut next = Instant::now() + tick_len;
    let mut offered = 0;
    let cpu0 = process_cpu_ns();
    let mut tick = 0u64;
    while started.elapsed().as_secs_f64() < seconds && !crate::stopping() {
        let out = &mut ticks[tick as usize % ticks.len()];
        tick += 1;
        offered += transport.tick(tick, out, times.as_deref_mut())?;
        if paced {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += tick_len;
        }
    }
    // The host's work ends with the plugin's last observation: the adapter's threads included.
    let (report, messages) = transport.finish()?;
    let cpu = process_cpu_ns() - cpu0;
    Ok((offered, report, messages, cpu, start))
}

fn delivered(r: &PluginReport) -> u64 {
    r.counts.values().sum::<u64>() + r.moves
}

fn side(which: &str, seconds: f64, dir: &Path, wait: &str) -> Result<Side, String> {
    let make = |record: &str, phase: &str| -> Result<Box<dyn Transport>, String> {
        Ok(match which {
            "plugbus" => Box::new(Plugbus::start(dir, record, phase, wait, Over::Shm)?),
            "grpc" => Box::new(Plugbus::start(dir, record, phase, wait, Over::Grpc)?),
            "grpc_batched" => Box::new(Plugbus::start(dir, record, phase, wait, Over::GrpcBatched)?),
            _ => Box::new(Baseline::start(dir, record, phase)?),
        })
    };
    let mut ticks = replay();
    // Latency at the real pace.
    let mut times = Times::default();
    let (_, r, _, _, _) = phase(make("all", "latency")?, &mut ticks, seconds, true, Some(&mut times))?;
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
    let (offered, r, messages, cpu, start) = phase(make("none", "throughput")?, &mut ticks, seconds, false, None)?;
    let got = delivered(&r);
    let elapsed = r.last_ns.saturating_sub(start).max(1);
    Ok(Side {
        events_per_s: got as f64 / (elapsed as f64 / 1e9),
        messages_per_s: messages.unwrap_or(got) as f64 / (elapsed as f64 / 1e9),
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
    let grpc = side("grpc", per_phase, &dir, wait)?;
    let grpc_batched = side("grpc_batched", per_phase, &dir, wait)?;
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
        grpc,
        grpc_batched,
    };
    let row = |name: &str, s: &Side| {
        println!(
            "  {name:<13} {:>14.0} {:>14.0} {:>12.2} {:>12.2} {:>12.2} {:>16.0}   ({} of {} delivered)",
            s.events_per_s,
            s.messages_per_s,
            s.p50_ns as f64 / 1000.0,
            s.p99_ns as f64 / 1000.0,
            s.p999_ns as f64 / 1000.0,
            s.host_cpu_ns_per_event,
            s.delivered,
            s.offered
        );
    };
    println!(
        "  {:<13} {:>14} {:>14} {:>12} {:>12} {:>12} {:>16}",
        "", "events/s", "messages/s", "p50 µs", "p99 µs", "p99.9 µs", "host CPU ns/ev"
    );
    row("plugbus", &c.plugbus);
    row("baseline", &c.baseline);
    row("grpc", &c.grpc);
    row("grpc_batched", &c.grpc_batched);
    println!(
        "  plugbus: {:.1}x the throughput, {:.1}x lower p99 than the baseline; {:.1}x / {:.1}x the throughput of gRPC per event / batched",
        c.throughput_ratio,
        c.p99_ratio,
        c.plugbus.events_per_s / c.grpc.events_per_s.max(1e-9),
        c.plugbus.events_per_s / c.grpc_batched.events_per_s.max(1e-9)
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
