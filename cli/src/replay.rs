//! `plugbus replay`: a test bench for any plugin. Starts the host with the configured plugins,
//! feeds it the moves and events of a JSON Lines file (the format `--record` writes), and writes
//! what the plugins decided as JSON Lines.
//!
//! Input lines (see [`plugbus::jsonl`]): `{"tick": N, "event": E}` or `{"tick": N, "moves":
//! [...]}`; a line without `tick` is a tick of its own; the lines of one tick go out in one
//! tick, gaps between tick numbers are replayed as empty ticks. The whole file is read and
//! checked before the host starts: a malformed line stops the run, naming its line and field.
//!
//! Output lines, each with the `tick` (the input's tick number) in which the host saw it:
//! - per event that expects a response: `{"tick", "eventId", "type", "cancelled", "result",
//!   "answered", "late", "elapsedUs"}` (`result`: the merged `EventResult`, or null);
//! - per action: `{"tick", "plugin", "action"}`; per plugin log line: `{"tick", "plugin",
//!   "log": {"level", "message"}}`; per host notice: `{"tick", "notice": {"kind", "plugin", ...}}`.
//!
//! Only `elapsedUs` and `slow` notices depend on timing: replaying a file twice against a
//! deterministic plugin gives the same lines otherwise.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use plugbus::host::{Host, HostConfig, Notice, Outcome, Pending};
use plugbus::jsonl::{self, InputItem, InputLine};
use plugbus::proto::{EventResult, EventType};
use serde_json::{Value, json};

/// What to replay.
pub struct ReplaySpec<'a> {
    pub config: &'a Path,
    pub events: &'a Path,
    pub out: Option<&'a Path>,
    pub tps: u32,
    pub settle: Duration,
}

/// The input, grouped by tick: `(tick number, lines)`, ticks ascending.
fn group(lines: Vec<InputLine>) -> Result<Vec<(u64, Vec<InputItem>)>, String> {
    let mut ticks: Vec<(u64, Vec<InputItem>)> = Vec::new();
    let mut last: Option<u64> = None;
    for l in lines {
        let tick = match (l.tick, last) {
            (Some(t), Some(prev)) if t < prev => {
                return Err(format!(
                    "line {}: field `tick`: {t} goes back (the line before is at tick {prev}); ticks must not decrease",
                    l.line
                ));
            }
            (Some(t), _) => t,
            // A line without a tick is a tick of its own.
            (None, Some(prev)) => prev + 1,
            (None, None) => 1,
        };
        match ticks.last_mut() {
            Some((t, items)) if *t == tick => items.push(l.item),
            _ => ticks.push((tick, vec![l.item])),
        }
        last = Some(tick);
    }
    Ok(ticks)
}

/// Gaps longer than this (in ticks) are not replayed tick by tick: the replay goes on at the
/// next tick with input (and says so).
const MAX_GAP: u64 = 100_000;

pub fn run(spec: &ReplaySpec<'_>) -> Result<(), String> {
    let file = std::fs::File::open(spec.events).map_err(|e| format!("cannot read {}: {e}", spec.events.display()))?;
    let lines =
        jsonl::parse_input(std::io::BufReader::new(file)).map_err(|e| format!("{}: {e}", spec.events.display()))?;
    let ticks = group(lines).map_err(|e| format!("{}: {e}", spec.events.display()))?;
    let config = HostConfig::from_file(spec.config).map_err(|e| e.to_string())?;
    let mut out: Box<dyn Write> = match spec.out {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let mut host = Host::start(config).map_err(|e| e.to_string())?;
    let mut emit = Emitter { out: &mut *out };
    let tick_len = Duration::from_secs_f64(1.0 / f64::from(spec.tps.max(1)));
    let mut next = Instant::now();
    let mut label = ticks.first().map_or(1, |t| t.0);
    let mut pendings: Vec<(Pending, String, i32)> = Vec::new();
    emit.drained(&mut host, label)?;
    for (tick, items) in ticks {
        // Empty ticks for a gap in the tick numbers, so that a plugin's timers see the time.
        if tick > label + 1 && tick - label <= MAX_GAP {
            for t in label + 1..tick {
                pace(&mut next, tick_len);
                host.begin_tick().end();
                emit.drained(&mut host, t)?;
            }
        }
        label = tick;
        pace(&mut next, tick_len);
        let mut t = host.begin_tick();
        for item in items {
            match item {
                InputItem::Moves(moves) => t.publish_moves(&moves),
                InputItem::Event(mut env) => {
                    let id = env.event_id.clone();
                    if env.expects_response {
                        let ty = env.payload.as_ref().map_or(env.r#type, |p| p.event_type() as i32);
                        let p = t.dispatch(&mut env);
                        pendings.push((p, id, ty));
                    } else {
                        t.publish(&mut env);
                    }
                }
            }
        }
        t.end();
        // The game waits for the answers it asked for, in order, within the response timeout.
        for (p, id, ty) in pendings.drain(..) {
            let outcome = host.wait(&p, Instant::now() + host.settings().response_timeout());
            emit.outcome(label, &p, &id, ty, &outcome)?;
        }
        emit.drained(&mut host, label)?;
    }
    // Late actions and logs: keep ticking for the settle time.
    let settle_until = Instant::now() + spec.settle;
    while Instant::now() < settle_until {
        label += 1;
        pace(&mut next, tick_len);
        host.begin_tick().end();
        emit.drained(&mut host, label)?;
    }
    host.shutdown("replay finished");
    emit.drained(&mut host, label)?;
    out.flush().map_err(|e| format!("cannot write the output: {e}"))
}

/// Sleeps until the next tick is due.
fn pace(next: &mut Instant, tick_len: Duration) {
    let now = Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    }
    *next = (*next).max(now) + tick_len;
}

struct Emitter<'a> {
    out: &'a mut dyn Write,
}

impl Emitter<'_> {
    fn line(&mut self, v: &Value) -> Result<(), String> {
        serde_json::to_writer(&mut *self.out, v).map_err(|e| format!("cannot write the output: {e}"))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| format!("cannot write the output: {e}"))
    }

    fn outcome(&mut self, tick: u64, p: &Pending, id: &str, ty: i32, o: &Outcome) -> Result<(), String> {
        // The input's event id when it has one (the host numbers events its own way).
        let id = if id.is_empty() {
            p.event_id().to_string()
        } else {
            id.to_owned()
        };
        let result = o.mutation.as_ref().map(|u| {
            jsonl::message_json(
                &EventResult {
                    event_id: id.clone(),
                    cancel: None,
                    update: Some(u.clone()),
                },
                "df.plugin.EventResult",
            )
        });
        self.line(&json!({
            "tick": tick,
            "eventId": id,
            "type": EventType::try_from(ty).map_or_else(|_| ty.to_string(), |t| t.as_str_name().to_owned()),
            "cancelled": o.cancelled,
            "result": result,
            "answered": o.answered,
            "late": o.late,
            "elapsedUs": o.elapsed.as_micros() as u64,
        }))
    }

    /// Actions, logs and notices the host has gathered.
    fn drained(&mut self, host: &mut Host, tick: u64) -> Result<(), String> {
        let actions: Vec<_> = host.drain_actions().collect();
        for a in actions {
            self.line(&json!({
                "tick": tick,
                "plugin": a.plugin,
                "action": jsonl::message_json(&a.action, "df.plugin.Action"),
            }))?;
        }
        let logs: Vec<_> = host.drain_logs().collect();
        for l in logs {
            self.line(&json!({
                "tick": tick,
                "plugin": l.plugin,
                "log": {"level": l.level, "message": l.message},
            }))?;
        }
        let notices: Vec<_> = host.drain_notices().collect();
        for n in notices {
            let v = match n {
                Notice::Ready { id, name } => json!({"kind": "ready", "plugin": id, "name": name}),
                Notice::Disconnected {
                    id,
                    reason,
                    undelivered,
                    ..
                } => json!({"kind": "disconnected", "plugin": id, "reason": reason, "undelivered": undelivered}),
                Notice::Restarted { id, attempt } => json!({"kind": "restarted", "plugin": id, "attempt": attempt}),
                Notice::Disabled { id, reason } => json!({"kind": "disabled", "plugin": id, "reason": reason}),
                Notice::Slow { id, what } => json!({"kind": "slow", "plugin": id, "what": what}),
            };
            self.line(&json!({"tick": tick, "notice": v}))?;
        }
        Ok(())
    }
}
