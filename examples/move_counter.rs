//! A plugin that counts moves per player and logs a summary every second.
//!
//! Started by a plugbus host (which sets `PLUGBUS_ADDRESS` and `PLUGBUS_PLUGIN_ID`); see the
//! README. Moves arrive as `&[MoveRecord]` straight from shared memory.
//!
//! Options: `--wait spin|park|spin-then-park`, `--exit-after N` (stop after N summaries).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::plugin::{Context, Handler, Plugin, WaitStrategy};
use plugbus::proto::{EventType, HostHello};

#[derive(Default)]
struct MoveCounter {
    per_player: HashMap<[u8; 16], u64>,
    total: u64,
    frames: u64,
    last_tick: u64,
    window_moves: u64,
    last_summary: Option<Instant>,
    summaries: u64,
    exit_after: Option<u64>,
}

impl MoveCounter {
    fn maybe_summary(&mut self) {
        let now = Instant::now();
        let last = *self.last_summary.get_or_insert(now);
        if now.duration_since(last) < Duration::from_secs(1) {
            return;
        }
        self.last_summary = Some(now);
        self.summaries += 1;
        let busiest = self.per_player.values().max().copied().unwrap_or(0);
        // Plain stdout: the host forwards it into its log, tagged with this plugin's id.
        println!(
            "moves: {} in the last second, {} total from {} players in {} frames (busiest player {}), tick {}",
            self.window_moves,
            self.total,
            self.per_player.len(),
            self.frames,
            busiest,
            self.last_tick
        );
        self.window_moves = 0;
        if self.exit_after.is_some_and(|n| self.summaries >= n) {
            std::process::exit(0);
        }
    }
}

impl Handler for MoveCounter {
    fn on_start(&mut self, _ctx: &mut Context<'_>, hello: &HostHello) {
        println!("move_counter connected (host boot {})", hello.boot_id);
    }

    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        self.frames += 1;
        self.last_tick = frame.tick;
        for m in moves {
            *self.per_player.entry(m.uuid).or_default() += 1;
        }
        self.total += moves.len() as u64;
        self.window_moves += moves.len() as u64;
        self.maybe_summary();
    }

    fn on_idle(&mut self, _ctx: &mut Context<'_>) {
        self.maybe_summary();
    }

    fn on_shutdown(&mut self, reason: &str) {
        println!(
            "move_counter stopping ({reason}): {} moves from {} players",
            self.total,
            self.per_player.len()
        );
    }
}

/// Runs the plugin with command-line style arguments (also used by `plugbus demo`).
pub fn run(args: Vec<String>) -> Result<(), String> {
    let mut wait = WaitStrategy::default();
    let mut counter = MoveCounter::default();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--wait" => wait = args.next().unwrap_or_default().parse()?,
            "--exit-after" => counter.exit_after = args.next().and_then(|n| n.parse().ok()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Plugin::from_env()
        .and_then(|b| {
            b.name("move_counter")
                .version(env!("CARGO_PKG_VERSION"))
                .subscribe([EventType::PlayerMove])
                .wait(wait)
                .run(&mut counter)
        })
        .map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("move_counter: {e}");
        std::process::exit(1);
    }
}
