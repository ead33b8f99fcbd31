//! The plugin the load test launches (`plugbus plugin load`): subscribed to everything, it
//! answers every event that expects a response, touches every move record, and records when it
//! observed each tick's move frame and each critical event (CLOCK_MONOTONIC, the same clock as
//! the host's), writing a report file at shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;

use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::plugin::{Context, Handler, Plugin, Reply, WaitStrategy};
use plugbus::proto::{EventEnvelope, EventType};
use plugbus::segment::monotonic_ns;
use serde::{Deserialize, Serialize};

/// Most observations kept per kind (bounds memory on long runs).
const MAX_SAMPLES: usize = 2_000_000;

/// What a load plugin reports.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PluginReport {
    pub plugin_id: String,
    /// Events observed, by event type number.
    pub counts: BTreeMap<i32, u64>,
    /// Move records observed.
    pub moves: u64,
    /// `[tick, observed_ns, records]` per move frame.
    pub move_frames: Vec<[u64; 3]>,
    /// `[event_id, observed_ns]` per critical event (every event with `PLUGBUS_RECORD=all`,
    /// none with `none`), in arrival order.
    pub critical: Vec<[u64; 2]>,
    /// Critical events observed (all of them, recorded in `critical` or not).
    #[serde(default)]
    pub critical_seen: u64,
    /// When the last thing was observed.
    pub last_ns: u64,
    /// Sum of positions (keeps the reads real).
    pub checksum: f64,
}

/// Which events a load plugin records individually.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Record {
    Critical,
    All,
    None,
}

impl PluginReport {
    /// Writes the report atomically (temp file, then rename).
    pub fn write(&self, path: &std::path::Path) {
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            eprintln!("cannot write the load report {}: {e}", path.display());
        }
    }

    /// Reads a report.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| format!("no readable plugin report {}: {e}", path.display()))
    }
}

struct LoadPlugin {
    report: PluginReport,
    path: Option<PathBuf>,
    record: Record,
    /// `PLUGBUS_CRITICAL_LOG`: each critical event id observed, one line each, written at once
    /// (unbuffered, appended), so that what a plugin saw before it was killed is known. A
    /// system call in the handler: the load test asks for it only when it kills plugins.
    critical_log: Option<std::fs::File>,
}

impl Handler for LoadPlugin {
    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let tick = frame.tick;
        let now = monotonic_ns();
        self.report.last_ns = now;
        if self.record != Record::None && self.report.move_frames.len() < MAX_SAMPLES {
            self.report.move_frames.push([tick, now, moves.len() as u64]);
        }
        self.report.moves += moves.len() as u64;
        self.report.checksum += moves.iter().map(|m| m.x + m.z).sum::<f64>();
    }

    fn on_event(&mut self, _ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        let now = monotonic_ns();
        self.report.last_ns = now;
        if event.r#type == EventType::PlayerMove as i32 {
            // A move as an event (gRPC to a plugin without packed moves): its id is
            // "<tick>.<i>", so it counts like a one-record move frame of that tick.
            if let Some(tick) = event.event_id.split_once('.').and_then(|(t, _)| t.parse().ok()) {
                if self.record != Record::None && self.report.move_frames.len() < MAX_SAMPLES {
                    self.report.move_frames.push([tick, now, 1]);
                }
            }
            *self.report.counts.entry(event.r#type).or_default() += 1;
            return Reply::Ack;
        }
        *self.report.counts.entry(event.r#type).or_default() += 1;
        let critical = crate::sim::is_critical(event.r#type);
        let keep = match self.record {
            Record::All => true,
            Record::Critical => critical,
            Record::None => false,
        };
        if critical {
            self.report.critical_seen += 1;
        }
        if keep && self.report.critical.len() < MAX_SAMPLES {
            if let Ok(id) = event.event_id.parse() {
                self.report.critical.push([id, now]);
            }
        }
        if let Some(f) = &mut self.critical_log {
            if critical {
                use std::io::Write as _;
                let _ = f.write_all(format!("{}\n", event.event_id).as_bytes());
            }
        }
        Reply::Ack
    }

    fn on_shutdown(&mut self, _reason: &str) {
        if let Some(path) = &self.path {
            self.report.write(path);
        }
    }
}

/// Entry point of `plugbus plugin load`.
pub fn run(wait: WaitStrategy) -> Result<(), String> {
    if let Ok(cpu) = std::env::var("PLUGBUS_PIN_CPU") {
        if let Ok(cpu) = cpu.parse::<usize>() {
            crate::pin_current_thread(cpu);
        }
    }
    let path = std::env::var_os("PLUGBUS_REPORT").map(PathBuf::from);
    let record = match std::env::var("PLUGBUS_RECORD").as_deref() {
        Ok("all") => Record::All,
        Ok("none") => Record::None,
        _ => Record::Critical,
    };
    let critical_log = match std::env::var_os("PLUGBUS_CRITICAL_LOG") {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| format!("cannot open {}: {e}", PathBuf::from(&p).display()))?,
        ),
        None => None,
    };
    let mut plugin = LoadPlugin {
        report: PluginReport::default(),
        path,
        record,
        critical_log,
    };
    let builder = Plugin::from_env().map_err(|e| e.to_string())?;
    plugin.report.plugin_id = std::env::var(plugbus::host::ENV_PLUGIN_ID).unwrap_or_default();
    builder
        .name("load")
        .version(env!("CARGO_PKG_VERSION"))
        .subscribe([EventType::All])
        .wait(wait)
        .run(&mut plugin)
        .map_err(|e| e.to_string())
}
