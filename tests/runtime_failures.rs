//! Processes dying: a plugin SIGKILLed mid-stream while another keeps receiving everything, the
//! host SIGKILLed under a running plugin, and the stale segments a killed host leaves behind.
//! Plugins and hosts are real processes: this test binary re-executed as `common::plugin_child`
//! or `common::host_child` (see `tests/common/mod.rs`).
//!
//! Every `Host::start` removes the stale segments of every dead host on the machine, so these
//! tests run one at a time ([`SERIAL`]): one test's killed host must not be cleaned up by
//! another test's host before it has looked.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use plugbus::host::{Host, Notice, PluginConfig, SlotState};
use plugbus::segment::stale;
use plugbus::transport::QueueSizes;
use plugbus::transport::shm::ShmHostLink;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn sigkill_of_one_plugin_leaves_the_other_receiving_everything() {
    let _serial = serial();
    init_logging();
    let dir = Scratch::new("sigkill");
    let (ra, rb) = (dir.file("a.txt"), dir.file("b.txt"));
    let plugin = |id: &str, report: &std::path::Path| {
        child_plugin(id, "handler", report)
            .env(SUBSCRIBE, "PLAYER_MOVE,CHAT,PLAYER_JUMP")
            .env(RECORD_MOVES, "1")
            .required(true)
    };
    let mut cfg = config(vec![plugin("a", &ra), plugin("b", &rb)]);
    cfg.host.restart_max = 0;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&ra, &rb]);

    const PLAYERS: u64 = 20;
    const TICKS: u64 = 60;
    const KILL_AFTER: u64 = 20;
    let mut ticks = Vec::new();
    let mut tags = Vec::new();
    let mut killed_at = None;
    let mut notices = Vec::new();
    for t in 1..=TICKS {
        let mut tick = host.begin_tick();
        ticks.push(tick.number());
        tick.publish_moves(&moves_for_tick(tick.number(), PLAYERS, |_| true));
        tick.publish(&mut chat(&format!("c{t}"), "hello"));
        tick.publish(&mut jump(&format!("j{t}")));
        tags.extend([format!("c{t}"), format!("j{t}")]);
        tick.end();
        notices.extend(host.drain_notices());
        if t == KILL_AFTER {
            let pid = host.pid_of("a").expect("a is running");
            killed_at = Some(Instant::now());
            // SAFETY: kill(2) takes a pid and a signal number and touches no memory of ours;
            // the pid is our own unreaped child, so it cannot have been reused.
            assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        }
        // A game's pace: the kill lands mid-stream.
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = killed_at.expect("killed");
    notices.extend(wait_until(&mut host, "a's disconnection", |h| {
        matches!(state_of(h, "a"), SlotState::Disabled(_))
    }));
    let Some(Notice::Disconnected {
        reason, detected_at, ..
    }) = notices
        .iter()
        .find(|n| matches!(n, Notice::Disconnected { id, .. } if id == "a"))
    else {
        panic!("no Disconnected notice for a: {notices:#?}")
    };
    assert!(reason.contains("signal 9"), "{reason}");
    assert!(*detected_at >= killed_at && *detected_at <= Instant::now());
    assert_eq!(host.metrics().plugins["a"].disconnects.get("killed"), Some(&1));
    assert!(
        !notices
            .iter()
            .any(|n| matches!(n, Notice::Disconnected { id, .. } if id == "b"))
    );

    // b got every event and every tick's moves.
    wait_delivered(&mut host, "b", 2 * TICKS, PLAYERS * TICKS);
    let m = host.metrics();
    assert_eq!(m.plugins["b"].moves_conflated, 0);
    assert!(host.is_ready("b"));
    host.shutdown("done");
    let lines = read_lines(&rb);
    let seen: Vec<String> = events_of(&lines).into_iter().map(|e| e.1).collect();
    assert_eq!(seen, tags, "b saw every event, in order");
    let frames = move_frames_of(&lines);
    assert_eq!(
        frames,
        ticks.iter().map(|t| (*t, PLAYERS as usize)).collect::<Vec<_>>(),
        "one frame per tick"
    );
    let positions = positions_of(&lines);
    let last_tick = *ticks.last().unwrap();
    assert_eq!(positions.len(), PLAYERS as usize);
    for p in 0..PLAYERS {
        assert_eq!(positions[&p], position(p, last_tick));
    }
    assert_eq!(lines.last().map(String::as_str), Some("result ok"));

    // a saw a prefix of the same stream before it died.
    let seen_a: Vec<String> = events_of(&read_lines(&ra)).into_iter().map(|e| e.1).collect();
    assert!(tags.starts_with(&seen_a), "a saw events in order, none skipped");
}

#[test]
fn the_plugin_loop_ends_with_host_died_when_the_host_is_killed() {
    let _serial = serial();
    let dir = Scratch::new("host-killed");
    let (host_report, plugin_report) = (dir.file("host.txt"), dir.file("plugin.txt"));
    let mut host = spawn_host_child("killed", &host_report, &[]);
    // Wait for the host's report, start the plugin at its segment, wait for its handshake.
    let deadline = Instant::now() + STALL;
    let lines = loop {
        let lines = read_lines(&host_report);
        if lines.iter().any(|l| l == "ready") {
            break lines;
        }
        assert!(!lines.iter().any(|l| l.starts_with("error")), "{lines:?}");
        assert!(Instant::now() < deadline, "the child host did not start: {lines:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let seg = lines
        .iter()
        .find_map(|l| l.strip_prefix("seg "))
        .unwrap_or_else(|| panic!("no seg in {lines:?}"))
        .to_owned();
    let _segments = SegmentGuard(vec![seg.clone()]);
    let mut plugin_proc = spawn_attached_plugin(&format!("shm:{seg}"), "orphan", &plugin_report);
    let plugin_pid = plugin_proc.0.as_ref().expect("spawned").id();
    let plugin = PidGuard(plugin_pid);
    while !read_lines(&plugin_report).iter().any(|l| l.starts_with("start")) {
        assert!(Instant::now() < deadline, "the attached plugin did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(plugin.alive());
    // Let the plugin receive some ticks, then kill the host under it.
    let until = Instant::now() + STALL;
    while !read_lines(&plugin_report).iter().any(|l| l.starts_with("mv ")) {
        assert!(Instant::now() < until, "the plugin never received a tick");
        std::thread::sleep(Duration::from_millis(5));
    }
    host.kill();

    let until = Instant::now() + STALL;
    let result = loop {
        if let Some(l) = read_lines(&plugin_report).into_iter().find(|l| l.starts_with("result")) {
            break l;
        }
        assert!(
            Instant::now() < until,
            "the plugin's loop did not end after its host died"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(result.starts_with("result err HostDied"), "{result}");
    let until = Instant::now() + STALL;
    loop {
        let exited = plugin_proc.0.as_mut().expect("spawned").try_wait().expect("wait");
        if exited.is_some() {
            break;
        }
        assert!(Instant::now() < until, "the plugin process did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a child host with two segments, checks them live, SIGKILLs it, and returns their
/// names if both are still there, listed as stale (`None` if another process's host cleaned
/// them up first: every `Host::start` on the machine removes stale segments).
fn killed_host_segments(dir: &Scratch, attempt: u32) -> Option<(Vec<String>, SegmentGuard)> {
    let report = dir.file(&format!("host-{attempt}.txt"));
    let mut child = spawn_host_child("stale", &report, &[]);
    let deadline = Instant::now() + STALL;
    let names: Vec<String> = loop {
        let lines = read_lines(&report);
        if lines.iter().any(|l| l == "ready") {
            break lines
                .iter()
                .filter_map(|l| l.strip_prefix("seg "))
                .map(str::to_owned)
                .collect();
        }
        assert!(!lines.iter().any(|l| l.starts_with("error")), "{lines:?}");
        assert!(Instant::now() < deadline, "the child host did not start");
        std::thread::sleep(Duration::from_millis(5));
    };
    let guard = SegmentGuard(names.clone());
    assert_eq!(names.len(), 2);
    // A segment removed between `list`'s listing and its inspection comes back with an error
    // (and no header): count it as gone.
    let infos = || -> Vec<Option<stale::SegmentInfo>> {
        let all = stale::list().unwrap();
        names
            .iter()
            .map(|n| all.iter().find(|i| i.name == *n && i.error.is_none()).cloned())
            .collect()
    };
    for i in infos() {
        let i = i.expect("a live host's segment exists");
        assert!(!i.is_stale(), "a live host's segment is not stale: {i:?}");
        assert!(i.tag.starts_with("stale_"), "tagged with the plugin id: {i:?}");
    }
    child.kill();
    let infos = infos();
    if infos.iter().any(Option::is_none) {
        return None;
    }
    for i in infos.into_iter().flatten() {
        assert!(i.is_stale(), "its creator is dead: {i:?}");
    }
    Some((names, guard))
}

#[test]
fn a_new_host_removes_the_segments_of_a_killed_one() {
    let _serial = serial();
    init_logging();
    let dir = Scratch::new("stale");
    let (names, _cleanup) = (1..=10)
        .find_map(|attempt| killed_host_segments(&dir, attempt))
        .expect("a killed host's segments stay behind (unless another host on the machine removes them)");
    // A segment of a live creator (this process) must survive the cleanup.
    let live_name = plugbus::segment::unique_name("live");
    let _live = ShmHostLink::create(&live_name, "live", &QueueSizes::default()).expect("create");

    let host = Host::start(config(vec![PluginConfig::attached("fresh")])).expect("host starts");
    let names_now = stale::list_names().unwrap();
    for n in &names {
        assert!(!names_now.contains(n), "{n} was removed");
    }
    assert!(names_now.contains(&live_name), "a live creator's segment is kept");
    let fresh = host
        .address_of("fresh")
        .expect("segment")
        .trim_start_matches("shm:")
        .to_owned();
    assert!(names_now.contains(&fresh));
    drop(host);
    assert!(
        !stale::list_names().unwrap().contains(&fresh),
        "a host removes its own segments when dropped"
    );
}
