//! `plugbus inspect` and `plugbus cleanup`.

use plugbus::segment::header::{STATE_ATTACHED, STATE_DETACHED, STATE_INIT, STATE_READY, STATE_SHUTDOWN};
use plugbus::segment::stale;
use plugbus::transport::shm::counters;

fn age(ns: u64) -> String {
    if ns == u64::MAX {
        "never".into()
    } else if ns < 1_000_000_000 {
        format!("{} ms", ns / 1_000_000)
    } else {
        format!("{:.1} s", ns as f64 / 1e9)
    }
}

fn state(s: u32) -> &'static str {
    match s {
        STATE_INIT => "init",
        STATE_READY => "waiting for plugin",
        STATE_ATTACHED => "attached",
        STATE_DETACHED => "detached",
        STATE_SHUTDOWN => "shutting down",
        _ => "?",
    }
}

/// Prints every named plugbus segment on this machine. Launched plugins' segments are memfds,
/// with no name to list or open: only attach-mode segments show here.
pub fn inspect() -> Result<(), String> {
    let list = stale::list().map_err(|e| format!("cannot list /dev/shm: {e}"))?;
    if list.is_empty() {
        println!("no named plugbus segments (launched plugins' segments are memfds: not listed)");
        return Ok(());
    }
    for s in &list {
        let alive = |a: bool| if a { "alive" } else { "dead" };
        println!("{}  ({} bytes)", s.name, s.size);
        if let Some(e) = &s.error {
            println!("  unreadable: {e}");
            println!("  creator pid {} ({})", s.creator_pid, alive(s.creator_alive));
            continue;
        }
        println!(
            "  plugin {:<20} host pid {} ({}{})  plugin pid {} ({})  state {}",
            s.tag,
            s.creator_pid,
            alive(s.creator_alive),
            if s.is_stale() { ", STALE" } else { "" },
            s.attacher_pid,
            if s.attacher_pid == 0 {
                "none"
            } else {
                alive(s.attacher_alive)
            },
            state(s.state)
        );
        println!(
            "  heartbeat age: host {}  plugin {}",
            age(s.creator_heartbeat_age_ns),
            age(s.attacher_heartbeat_age_ns)
        );
        for (i, (d, head, tail)) in s.rings.iter().enumerate() {
            let name = ["moves", "control", "replies"].get(i).copied().unwrap_or("ring");
            let bytes = d.data_bytes();
            let used = tail.saturating_sub(*head);
            println!(
                "  {name:<8} {:>6.1}% full ({used} of {bytes} bytes), {} bytes through",
                used as f64 * 100.0 / bytes.max(1) as f64,
                tail
            );
        }
        let c = &s.creator_counters;
        let a = &s.attacher_counters;
        println!(
            "  host:   {} events, {} moves, {} conflated, {} overflowed frames, {} frames",
            c[counters::EVENTS],
            c[counters::MOVES],
            c[counters::CONFLATED],
            c[counters::OVERFLOWED],
            c[counters::FRAMES]
        );
        println!(
            "  plugin: {} events, {} move frames, {} replies",
            a[counters::PLUGIN_EVENTS],
            a[counters::PLUGIN_MOVE_FRAMES],
            a[counters::PLUGIN_REPLIES]
        );
    }
    Ok(())
}

/// Removes segments whose creator is dead.
pub fn cleanup() -> Result<(), String> {
    let removed = stale::remove_stale().map_err(|e| format!("cannot list /dev/shm: {e}"))?;
    if removed.is_empty() {
        println!("no stale segments");
    }
    for name in removed {
        println!("removed {name}");
    }
    Ok(())
}
