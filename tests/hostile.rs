//! Hostile and broken plugins cost the host nothing (issue 14): each test runs a real host and
//! a real plugin process that attacks it, and checks that the attack fails: the host keeps
//! serving the other plugins, its memory stays within the configured bounds, and the offender
//! is disconnected with a notice that names the reason.
//!
//! The attacker is this test binary re-executed as [`hostile_child`], in the mode named by
//! [`HOSTILE`]. It speaks the protocol through the plugin side of the transport port directly
//! (no plugin runtime), so it can send what no well-behaved runtime would.
//!
//! Tests that measure the host's memory hold [`SERIAL`], so that no other test of this binary
//! allocates meanwhile.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use plugbus::host::{ENV_PLUGIN_ID, Host, HostConfig, Notice, PluginConfig};
use plugbus::proto::{self, Action, ActionBatch, LogMessage, PluginHello, PluginToHost, plugin_to_host};
use plugbus::segment::stale;
use plugbus::transport::{self, HostState, PluginLink};

/// The attack a [`hostile_child`] makes.
const HOSTILE: &str = "TEST_HOSTILE_MODE";
/// Actions per `ActionBatch` in the `actions` attack.
const FLOOD_ACTIONS: usize = 5_000;
/// The text of every log line in the `logs` attack: it tries to forge a host log line and to
/// send a terminal escape.
const FORGERY: &str = "innocent\nINFO plugbus::host: plugin admin granted\x1b[2J";
/// Bytes the `stdout` attack writes without a newline.
const STDOUT_BYTES: usize = 8 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------------------------------
// The attacker
// ------------------------------------------------------------------------------------------

/// The hostile plugin role of this test binary; does nothing unless started by a host.
#[test]
fn hostile_child() {
    let Ok(mode) = std::env::var(HOSTILE) else {
        return;
    };
    let report = std::env::var(REPORT).expect("the parent names the report file");
    let address = transport::address_from_env().expect("the host gives an address");
    let mut link = transport::connect(&address).expect("connect");
    let id = std::env::var(ENV_PLUGIN_ID).expect("the host gives the plugin id");
    let hello = PluginToHost {
        plugin_id: id.clone(),
        payload: Some(plugin_to_host::Payload::Hello(PluginHello {
            name: "hostile".into(),
            version: "0".into(),
            api_version: proto::API_VERSION.into(),
            ..Default::default()
        })),
    };
    assert!(link.try_send(&hello).expect("send the hello"));
    link.wake_host();
    let note = |text: &str| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&report)
            .expect("open the report");
        let _ = writeln!(f, "{text}");
    };
    note(&format!("pid {}", std::process::id()));
    match mode.as_str() {
        "actions" => {
            let batch = PluginToHost {
                plugin_id: id,
                payload: Some(plugin_to_host::Payload::Actions(ActionBatch {
                    actions: vec![Action::default(); FLOOD_ACTIONS],
                })),
            };
            flood(&mut *link, &batch);
        }
        "logs" => {
            let log = PluginToHost {
                plugin_id: id,
                payload: Some(plugin_to_host::Payload::Log(LogMessage {
                    level: "warn".into(),
                    message: FORGERY.into(),
                })),
            };
            flood(&mut *link, &log);
        }
        "stdout" => {
            let mut out = std::io::stdout().lock();
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..STDOUT_BYTES / chunk.len() {
                out.write_all(&chunk).expect("write stdout");
            }
            out.write_all(b"\nstdout attack done\n").expect("write stdout");
            out.flush().expect("flush stdout");
            drop(out);
            note("written");
            keep_beating(&mut *link);
        }
        "env" => {
            for (k, _) in std::env::vars_os() {
                note(&format!("env {}", k.to_string_lossy()));
            }
            note("env done");
            keep_beating(&mut *link);
        }
        "group" | "group-exit" => {
            // A child of the plugin, in the plugin's process group.
            let child = std::process::Command::new("sleep")
                .arg("1000")
                .spawn()
                .expect("spawn sleep");
            note(&format!("grandchild {}", child.id()));
            std::mem::forget(child);
            if mode == "group-exit" {
                std::process::exit(3);
            }
            keep_beating(&mut *link);
        }
        "sleeper" => {
            // Said hello, then stops: no heartbeat, no reads, and it never looks at its host.
            note("sleeping");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        other => panic!("unknown hostile mode {other}"),
    }
    std::process::exit(0);
}

/// Sends `msg` as fast as the link takes it, until the host disconnects us.
fn flood(link: &mut dyn PluginLink, msg: &PluginToHost) {
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        if link.host_state() != HostState::Running {
            return;
        }
        match link.try_send(msg) {
            Ok(true) => link.wake_host(),
            Ok(false) => {
                link.heartbeat();
                link.wake_host();
                std::thread::yield_now();
            }
            Err(_) => return,
        }
    }
}

/// Behaves as a live, idle plugin (reads and beats) until the host goes.
fn keep_beating(link: &mut dyn PluginLink) {
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until && link.host_state() == HostState::Running {
        link.heartbeat();
        if link.poll(256, &mut |_| {}).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hostile(id: &str, mode: &str, report: &Path) -> PluginConfig {
    let exe = std::env::current_exe().expect("path of the test binary");
    PluginConfig::launch(id, exe)
        .args(["--exact", "hostile_child", "--nocapture", "--test-threads=1"])
        .env(HOSTILE, mode)
        .env(REPORT, report.to_str().expect("UTF-8 temp path"))
}

/// The number after `key ` in the report's first such line, waiting for it.
fn wait_report_number(report: &Path, key: &str) -> u32 {
    let deadline = Instant::now() + STALL;
    loop {
        if let Some(n) = read_lines(report)
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{key} ")).and_then(|v| v.parse().ok()))
        {
            return n;
        }
        assert!(Instant::now() < deadline, "no `{key}` line in {}", report.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

fn wait_dead(pid: u32, what: &str) {
    let deadline = Instant::now() + STALL;
    while stale::pid_alive(pid, 0) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `pid` when dropped, if it still runs (a process these tests did not spawn directly).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if stale::pid_alive(self.0, 0) {
            // SAFETY: kill(2) takes a pid and a signal number and touches no memory of ours.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A well-behaved plugin that records every chat it gets.
fn calm(report: &Path) -> PluginConfig {
    child_plugin("calm", "handler", report).env(SUBSCRIBE, "CHAT")
}

/// Ticks at about 20 tps, publishing one chat per tick for the calm plugin (tags `c<n>`,
/// counting on from `chats`), until `done` says so (or [`STALL`]). Returns the notices.
fn tick_until(host: &mut Host, chats: &mut u64, what: &str, done: impl FnMut(&[Notice]) -> bool) -> Vec<Notice> {
    tick_until_timed(host, chats, what, &mut Vec::new(), done)
}

/// [`tick_until`], recording how long each `Tick::end` (which reads every plugin's messages)
/// took, in µs.
fn tick_until_timed(
    host: &mut Host,
    chats: &mut u64,
    what: &str,
    ends: &mut Vec<u64>,
    mut done: impl FnMut(&[Notice]) -> bool,
) -> Vec<Notice> {
    let deadline = Instant::now() + STALL;
    let mut notices = Vec::new();
    loop {
        let mut tick = host.begin_tick();
        tick.publish(&mut chat(&format!("c{chats}"), "hello"));
        let started = Instant::now();
        tick.end();
        ends.push(started.elapsed().as_micros() as u64);
        *chats += 1;
        notices.extend(host.drain_notices());
        if done(&notices) {
            return notices;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; notices {notices:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disconnected_for<'a>(notices: &'a [Notice], id: &str, needle: &str) -> Option<&'a str> {
    notices.iter().find_map(|n| match n {
        Notice::Disconnected { id: i, reason, .. } if i == id && reason.contains(needle) => Some(reason.as_str()),
        _ => None,
    })
}

/// Every chat published reached the calm plugin, in order.
fn assert_calm_got_all(host: &mut Host, report: &Path, chats: u64) {
    let deadline = Instant::now() + STALL;
    loop {
        host.poll();
        let got: Vec<String> = events_of(&read_lines(report)).into_iter().map(|(_, tag)| tag).collect();
        if got.len() as u64 >= chats {
            let want: Vec<String> = (0..chats).map(|c| format!("c{c}")).collect();
            assert_eq!(got, want, "the calm plugin's chats");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the calm plugin got {} of {chats} chats",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn host_config(plugins: Vec<PluginConfig>) -> HostConfig {
    let mut c = config(plugins);
    // Restarted offenders do not outlive the test by much.
    c.host.shutdown_grace_ms = 1_000;
    c
}

// ------------------------------------------------------------------------------------------
// Hole 1: an action flood
// ------------------------------------------------------------------------------------------

#[test]
fn an_action_flood_is_cut_off_and_the_host_memory_stays_bounded() {
    let _serial = serial();
    init_logging();
    let dir = Scratch::new("hostile-actions");
    let (calm_report, flood_report) = (dir.file("calm.txt"), dir.file("flood.txt"));
    let mut host = Host::start(host_config(vec![
        calm(&calm_report),
        hostile("flood", "actions", &flood_report),
    ]))
    .expect("host starts");
    wait_started(&mut host, &[&calm_report]);
    let limit = host_config(vec![]).host.max_queued_actions;
    let before = rss_bytes();
    // The server never takes its actions: the worst case for the host's memory.
    let mut chats = 0;
    let mut ends = Vec::new();
    let notices = tick_until_timed(&mut host, &mut chats, "the flood to be cut off", &mut ends, |n| {
        disconnected_for(n, "flood", "quota exceeded").is_some()
    });
    let reason = disconnected_for(&notices, "flood", "quota exceeded").unwrap();
    assert!(reason.contains("max_queued_actions"), "{reason}");
    // It is restarted, floods again, and is cut off again: the queue still holds at most the
    // limit per plugin.
    let mut ticks = 0;
    tick_until_timed(&mut host, &mut chats, "a few more ticks", &mut ends, |_| {
        ticks += 1;
        ticks == 20
    });
    let grown = rss_bytes().saturating_sub(before);
    let held = host.drain_actions().filter(|a| a.plugin == "flood").count();
    // For the record (not asserted: timing): what the flood cost the tick.
    ends.sort_unstable();
    eprintln!(
        "action flood: Tick::end median {} us, max {} us over {} ticks; resident memory +{} MiB; {held} actions held",
        ends[ends.len() / 2],
        ends[ends.len() - 1],
        ends.len(),
        grown >> 20
    );
    assert!(held <= limit, "{held} actions held, limit {limit}");
    assert!(held > 0, "the flood's first actions were kept for the server");
    assert!(
        grown < 64 << 20,
        "the host grew by {} MiB under an action flood",
        grown >> 20
    );
    assert_calm_got_all(&mut host, &calm_report, chats);
    host.shutdown("done");
}

#[test]
fn actions_taken_every_tick_keep_a_busy_plugin_connected() {
    let dir = Scratch::new("hostile-actions-drained");
    let report = dir.file("flood.txt");
    let mut cfg = host_config(vec![hostile("busy", "actions", &report)]);
    cfg.host.max_queued_actions = 2 * FLOOD_ACTIONS;
    let mut host = Host::start(cfg).expect("host starts");
    let mut taken = 0usize;
    let mut notices = Vec::new();
    let deadline = Instant::now() + STALL;
    // The server takes its actions every tick: the per-poll budget paces the plugin, and it
    // is never over its queue.
    while taken < 20 * FLOOD_ACTIONS {
        host.begin_tick().end();
        taken += host.drain_actions().count();
        notices.extend(host.drain_notices());
        assert!(
            disconnected_for(&notices, "busy", "").is_none(),
            "disconnected: {notices:#?}"
        );
        assert!(Instant::now() < deadline, "only {taken} actions arrived");
    }
    let budget = HostConfig::default().host.poll_max_actions;
    assert!(
        budget < 2 * FLOOD_ACTIONS,
        "the test relies on a per-poll budget below two batches"
    );
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Holes 2 and 10: output without newlines, log lines that forge host lines
// ------------------------------------------------------------------------------------------

#[test]
fn a_line_without_end_on_stdout_is_cut_and_marked() {
    let _serial = serial();
    init_logging();
    let dir = Scratch::new("hostile-stdout");
    let report = dir.file("out.txt");
    let mut host = Host::start(host_config(vec![hostile("noisy", "stdout", &report)])).expect("host starts");
    let before = rss_bytes();
    wait_until(&mut host, "the attack's last line in the log", |_| {
        log_text().contains("stdout attack done")
    });
    let grown = rss_bytes().saturating_sub(before);
    let log = log_text();
    let max = HostConfig::default().host.max_output_line;
    let cut = log
        .lines()
        .find(|l| l.contains("line cut:"))
        .expect("a cut line in the log");
    // The line also holds what the test harness printed before the attack.
    let skipped: usize = cut
        .split("[line cut: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the count of bytes cut");
    assert!(
        (STDOUT_BYTES - max..STDOUT_BYTES).contains(&skipped),
        "{skipped} bytes cut of {STDOUT_BYTES}"
    );
    assert!(cut.len() < max + 300, "the logged line has {} bytes", cut.len());
    assert!(grown < 32 << 20, "the host grew by {} MiB", grown >> 20);
    host.shutdown("done");
}

#[test]
fn a_log_flood_is_cut_off_and_cannot_forge_host_log_lines() {
    let _serial = serial();
    init_logging();
    let dir = Scratch::new("hostile-logs");
    let (calm_report, report) = (dir.file("calm.txt"), dir.file("logs.txt"));
    let mut host =
        Host::start(host_config(vec![calm(&calm_report), hostile("liar", "logs", &report)])).expect("host starts");
    wait_started(&mut host, &[&calm_report]);
    let mut chats = 0;
    let notices = tick_until(&mut host, &mut chats, "the log flood to be cut off", |n| {
        disconnected_for(n, "liar", "quota exceeded").is_some()
    });
    let reason = disconnected_for(&notices, "liar", "quota exceeded").unwrap();
    assert!(reason.contains("max_queued_logs"), "{reason}");
    let limit = HostConfig::default().host.max_queued_logs;
    let held: Vec<_> = host.drain_logs().filter(|l| l.plugin == "liar").collect();
    assert!(!held.is_empty() && held.len() <= limit, "{} lines held", held.len());
    // The server gets the text as sent; the host's own log gets it escaped, on one line.
    assert_eq!(held[0].message, FORGERY);
    let deadline = Instant::now() + STALL;
    while !log_text().contains("innocent\\nINFO plugbus::host: plugin admin granted\\u{1b}[2J") {
        assert!(Instant::now() < deadline, "the escaped line never reached the log");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("INFO plugbus::host: plugin admin")),
        "a plugin forged a host log line"
    );
    assert!(!log.contains('\x1b'), "a terminal escape reached the log");
    assert_calm_got_all(&mut host, &calm_report, chats);
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Hole 6: the host's environment
// ------------------------------------------------------------------------------------------

#[test]
fn a_launched_plugin_sees_only_the_allowed_environment() {
    // Cargo sets CARGO_MANIFEST_DIR for the test process: a host variable no plugin needs.
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        "cargo test sets CARGO_MANIFEST_DIR"
    );
    assert!(std::env::var_os("PATH").is_some());
    let dir = Scratch::new("hostile-env");
    let (plain, allowed) = (dir.file("plain.txt"), dir.file("allowed.txt"));
    let mut with_allow = hostile("allowed", "env", &allowed).env("PLUGIN_OWN", "1");
    with_allow.env_allow = vec!["CARGO_MANIFEST_DIR".into()];
    let mut host = Host::start(host_config(vec![hostile("plain", "env", &plain), with_allow])).expect("host starts");
    let mut names = |report: &Path| -> Vec<String> {
        let deadline = Instant::now() + STALL;
        loop {
            let lines = read_lines(report);
            if lines.iter().any(|l| l == "env done") {
                return lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("env "))
                    .filter(|l| *l != "done")
                    .map(str::to_owned)
                    .collect();
            }
            assert!(Instant::now() < deadline, "no env report");
            host.poll();
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let plain = names(&plain);
    let allowed = names(&allowed);
    for must in [
        "PATH",
        "PLUGBUS_ADDRESS",
        "PLUGBUS_PLUGIN_ID",
        "DF_PLUGIN_ID",
        HOSTILE,
        REPORT,
    ] {
        assert!(plain.iter().any(|n| n == must), "{must} missing from {plain:?}");
    }
    assert!(
        !plain.iter().any(|n| n == "CARGO_MANIFEST_DIR"),
        "a host variable leaked: {plain:?}"
    );
    for n in &plain {
        let known = plugbus::host::ENV_ALLOWLIST.contains(&n.as_str())
            || n.starts_with("PLUGBUS_")
            || n.starts_with("DF_")
            || n.starts_with("TEST_");
        assert!(known, "unexpected variable {n} in a plugin's environment");
    }
    assert!(
        allowed.iter().any(|n| n == "CARGO_MANIFEST_DIR"),
        "env_allow did not pass it"
    );
    assert!(
        allowed.iter().any(|n| n == "PLUGIN_OWN"),
        "the plugin's own env is missing"
    );
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Hole 7: children of plugins, and plugins of a dead host
// ------------------------------------------------------------------------------------------

#[test]
fn killing_a_plugin_kills_its_process_group() {
    let dir = Scratch::new("hostile-group");
    let (kept, left) = (dir.file("kept.txt"), dir.file("left.txt"));
    let mut cfg = host_config(vec![
        hostile("parent", "group", &kept),
        hostile("leaver", "group-exit", &left),
    ]);
    cfg.host.restart_max = 0;
    let mut host = Host::start(cfg).expect("host starts");
    let deadline = Instant::now() + STALL;
    while !(read_lines(&kept).iter().any(|l| l.starts_with("grandchild"))
        && read_lines(&left).iter().any(|l| l.starts_with("grandchild")))
    {
        assert!(Instant::now() < deadline, "no grandchild reports");
        host.poll();
        std::thread::sleep(Duration::from_millis(10));
    }
    let (plugin, grandchild) = (
        wait_report_number(&kept, "pid"),
        wait_report_number(&kept, "grandchild"),
    );
    let orphan = wait_report_number(&left, "grandchild");
    let _guards = [KillOnDrop(grandchild), KillOnDrop(orphan)];
    // A plugin that exits leaves no child behind.
    wait_until(&mut host, "the leaver's child to be killed", |_| {
        !stale::pid_alive(orphan, 0)
    });
    // A killed plugin takes its children with it.
    assert!(stale::pid_alive(grandchild, 0));
    assert!(host.kill_plugin("parent"));
    wait_until(&mut host, "the plugin and its child to die", |_| {
        !stale::pid_alive(plugin, 0) && !stale::pid_alive(grandchild, 0)
    });
    host.shutdown("done");
}

/// A host, in a process of its own, whose plugin never looks at its host: only the kernel
/// (`PR_SET_PDEATHSIG`) can stop that plugin when the host dies.
#[test]
fn hostile_host_child() {
    let Ok(report) = std::env::var("TEST_HOSTILE_HOST_REPORT") else {
        return;
    };
    let plugin = hostile("deaf", "sleeper", Path::new(&report));
    let mut cfg = host_config(vec![plugin]);
    cfg.host.heartbeat_timeout_ms = 600_000;
    let mut host = Host::start(cfg).expect("host starts");
    loop {
        host.poll();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn plugins_die_with_their_host() {
    let dir = Scratch::new("hostile-pdeathsig");
    let report = dir.file("deaf.txt");
    let exe = std::env::current_exe().expect("path of the test binary");
    let child = std::process::Command::new(exe)
        .args(["--exact", "hostile_host_child", "--nocapture", "--test-threads=1"])
        .env("TEST_HOSTILE_HOST_REPORT", &report)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child host");
    let mut host = ChildGuard(Some(child));
    let plugin = wait_report_number(&report, "pid");
    let _guard = KillOnDrop(plugin);
    let deadline = Instant::now() + STALL;
    while !read_lines(&report).iter().any(|l| l == "sleeping") {
        assert!(Instant::now() < deadline, "the plugin never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(stale::pid_alive(plugin, 0));
    host.kill();
    wait_dead(plugin, "the plugin of a host killed with SIGKILL");
}

// ------------------------------------------------------------------------------------------
// Hole 11: a wedged plugin
// ------------------------------------------------------------------------------------------

#[test]
fn a_wedged_plugin_is_disconnected_and_restarted() {
    let dir = Scratch::new("hostile-wedged");
    let (calm_report, report) = (dir.file("calm.txt"), dir.file("wedged.txt"));
    let mut cfg = host_config(vec![calm(&calm_report), hostile("wedged", "sleeper", &report)]);
    cfg.host.heartbeat_timeout_ms = 1_000;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&calm_report]);
    let pid = wait_report_number(&report, "pid");
    let _guard = KillOnDrop(pid);
    let mut chats = 0;
    let notices = tick_until(
        &mut host,
        &mut chats,
        "the wedged plugin's disconnection and restart",
        |n| {
            disconnected_for(n, "wedged", "wedged").is_some()
                && n.iter()
                    .any(|x| matches!(x, Notice::Restarted { id, .. } if id == "wedged"))
        },
    );
    let reason = disconnected_for(&notices, "wedged", "wedged").unwrap();
    assert!(reason.contains("while its process is alive"), "{reason}");
    // The calm plugin is never taken for wedged: it beats.
    assert!(disconnected_for(&notices, "calm", "").is_none(), "{notices:#?}");
    wait_dead(pid, "the wedged incarnation");
    assert_calm_got_all(&mut host, &calm_report, chats);
    host.shutdown("done");
}
