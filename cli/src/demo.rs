//! `plugbus demo` (what `cargo run --release` runs): a simulated server with 100 players at
//! 50 ticks/s for 10 s, launching the example plugins, with a live progress line and a summary.

use std::io::Write;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};

use crate::loadtest::{self, LoadSpec, Progress};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated players.
    #[arg(long, default_value_t = 100)]
    pub players: usize,
    /// Ticks per second.
    #[arg(long, default_value_t = 50)]
    pub tps: u32,
    /// Duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Record every tick's moves and events to this file (the input of `plugbus replay`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<std::path::PathBuf>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            players: 100,
            tps: 50,
            seconds: 10.0,
            metrics_addr: None,
            record: None,
        }
    }
}

static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// A log writer that prints above the progress line instead of through it.
#[derive(Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BAR.get() {
            Some(pb) if !pb.is_finished() => pb.suspend(|| std::io::stderr().write_all(buf))?,
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The progress line shared by the demo and the load test.
pub fn progress_bar(seconds: f64, tps: u32) -> ProgressBar {
    let pb = ProgressBar::new((seconds * f64::from(tps)).ceil() as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} tick {pos}/{len} [{bar:30}] {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let _ = BAR.set(pb.clone());
    pb
}

/// Updates the progress line.
pub fn show_progress(pb: &ProgressBar, p: &Progress<'_>) {
    pb.set_position(p.tick);
    let ready = p
        .host
        .plugins()
        .iter()
        .filter(|(_, s)| *s == plugbus::host::SlotState::Ready)
        .count();
    pb.set_message(format!(
        "{:>9.0} events/s | reply p50 {:>6.1} µs | {ready} plugins ready",
        p.events_per_s,
        p.rtt_p50_ns as f64 / 1000.0
    ));
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    crate::on_ctrl_c();
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    let metrics = crate::metrics_http::serve(args.metrics_addr.as_deref())?;
    let spec = LoadSpec {
        players: args.players,
        tps: args.tps,
        seconds: args.seconds,
        warmup_s: (args.seconds * 0.1).min(1.0),
        pin: false,
        plugins: vec![
            (exe.clone(), vec!["plugin".into(), "chat-filter".into()]),
            (exe, vec!["plugin".into(), "move-counter".into()]),
        ],
        reports: false,
        metrics,
        seed: 7,
        busy_pacing: false,
        wake_thread: true,
        kill_one_at: None,
        record: args.record.clone(),
        transport: "shm".into(),
        chaos: None,
        lean: false,
        sample_resources: false,
    };
    println!(
        "plugbus demo: {} players at {} ticks/s for {} s, plugins chat_filter and move_counter ({})",
        spec.players,
        spec.tps,
        spec.seconds,
        crate::machine()
    );
    let pb = progress_bar(spec.seconds, spec.tps);
    let (report, host) = loadtest::run(&spec, |p| show_progress(&pb, p))?;
    pb.finish_and_clear();
    let m = host.metrics();
    let us = |ns: u64| format!("{:.1}", ns as f64 / 1000.0);
    println!();
    println!("summary ({} ticks, {} overruns)", report.ticks, report.tick_overruns);
    println!(
        "  server: {} moves and {} other events offered, {} filtered by subscription (never encoded)",
        m.host.moves_offered,
        report.events_offered - m.host.moves_offered,
        m.host.filtered
    );
    println!(
        "  chat: {} cancelled, {} rewritten by the chat filter; {} actions from plugins",
        report.cancelled, report.mutated, m.host.actions
    );
    println!(
        "  host cost per tick: p50 {} µs, p99 {} µs; reply round trip p50 {} µs, p99 {} µs",
        us(report.host_tick_ns.p50),
        us(report.host_tick_ns.p99),
        us(report.reply_rtt_ns.p50),
        us(report.reply_rtt_ns.p99)
    );
    println!();
    println!(
        "  {:<10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>6} {:>12} {:>12}",
        "plugin", "events", "moves", "conflated", "frames", "replies", "late", "reply p50 µs", "reply p99 µs"
    );
    for (id, p) in &m.plugins {
        let name = match id.as_str() {
            "load-0" => "chat",
            "load-1" => "moves",
            other => other,
        };
        println!(
            "  {:<10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>6} {:>12} {:>12}",
            name,
            p.events_sent,
            p.moves_sent,
            p.moves_conflated,
            p.frames_sent,
            p.replies,
            p.late_replies,
            us(p.reply_latency_ns.quantile(0.5)),
            us(p.reply_latency_ns.quantile(0.99))
        );
    }
    drop(host);
    println!();
    println!("segments removed, plugins stopped. Next: `plugbus loadtest --help`, `plugbus compare`.");
    Ok(())
}
