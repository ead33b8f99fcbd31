//! Shared by the runtime tests (`tests/runtime_*.rs`): the child plugin and child host that the
//! tests launch as real processes, the guards that clean up after them, and waiting helpers.
//!
//! **Child processes.** Every test binary that says `mod common;` contains the two tests
//! [`plugin_child`] and [`host_child`]; both return at once in a normal run. A test makes a
//! plugin by re-executing its own binary (`--exact common::plugin_child`) through a
//! [`PluginConfig`] built by [`child_plugin`]; the host sets `PLUGBUS_ADDRESS`, and the child
//! then connects with the plugin runtime and behaves as the `TEST_PLUGIN_*` variables say.
//! [`spawn_host_child`] does the same for a whole host (`--exact common::host_child`), for the
//! tests that kill a host.
//!
//! **Observations.** The host forwards plugin stdout and stderr into its log, so a child plugin
//! reports what it saw by appending lines to the file named by [`REPORT`]:
//! - `start <api_version> <boot_id>` once the handshake is done (flushed at once);
//! - `ev <event type number> <tag>` per event (the tag is the payload's `player_uuid`);
//! - `mv <tick> <count>` per move frame (when [`RECORD_MOVES`] is set);
//! - `mp <tick> <flags> <player>@<tick published> ...` per move frame (when [`RECORD_PLAYERS`]
//!   is set): which record of which player, for order tests;
//! - `shutdown <reason>`, then `pos <player> <x> <y> <z>` (f64 bits, hex) for the last position
//!   of every player it saw move;
//! - `result ok` or `result err <PluginError as Debug>` when its loop ends;
//! - `silent <host state>` when a silent plugin stops.
//!
//! Lines are buffered and flushed when the plugin is idle and when it stops; readers use
//! complete lines only.
//!
//! Every wait has a deadline, so a bug fails a test instead of hanging it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::host::{Host, HostConfig, Notice, PluginConfig, QueueSizes, SlotState};
use plugbus::plugin::{Context, Handler, Plugin, PluginBuilder, PluginError, Reply};
use plugbus::proto::{
    ChatEvent, CommandEvent, CommandSpec, EventEnvelope, EventType, HostHello, PlayerJoinEvent, PlayerJumpEvent,
    PlayerQuitEvent, event_envelope::Payload,
};
use plugbus::segment::{Segment, stale};
use plugbus::transport::ENV_ADDRESS;
use plugbus::transport::{HostState, PluginLink};

// ------------------------------------------------------------------------------------------
// What the parent tells a child plugin
// ------------------------------------------------------------------------------------------

/// `handler` (default): run a [`Recorder`]; `silent`: connect, then never read or answer
/// (until the host shuts down); `exit`: connect, then exit with status 7.
pub const MODE: &str = "TEST_PLUGIN_MODE";
/// The observation file (appended to).
pub const REPORT: &str = "TEST_PLUGIN_REPORT";
/// Event types to subscribe to: comma-separated proto names (`CHAT,PLAYER_JOIN`).
pub const SUBSCRIBE: &str = "TEST_PLUGIN_SUBSCRIBE";
/// The default answer to an event: `ack`, `cancel`, or `mutate:<new chat text>`.
pub const REPLY: &str = "TEST_PLUGIN_REPLY";
/// Answers chosen by the chat text, first match wins: `needle=>reply;needle=>reply`.
pub const RULES: &str = "TEST_PLUGIN_RULES";
/// Milliseconds to sleep in each `on_moves` (a plugin that lags).
pub const MOVE_SLEEP_MS: &str = "TEST_PLUGIN_MOVE_SLEEP_MS";
/// Milliseconds to sleep on the first event (to make the host queue behind it).
pub const FIRST_EVENT_SLEEP_MS: &str = "TEST_PLUGIN_FIRST_EVENT_SLEEP_MS";
/// Set to record move frames (`mv` lines) and last positions (`pos` lines).
pub const RECORD_MOVES: &str = "TEST_PLUGIN_RECORD_MOVES";
/// Set to record every record of every move frame (`mp` lines).
pub const RECORD_PLAYERS: &str = "TEST_PLUGIN_RECORD_PLAYERS";
/// The wait strategy (`spin`, `park`, `spin-then-park`, `paced`; default: the library's).
pub const WAIT: &str = "TEST_PLUGIN_WAIT";
/// The api_version to claim (default: the real one).
pub const API_VERSION: &str = "TEST_PLUGIN_API_VERSION";
/// A command to register; on that command the plugin sends a chat action `pong` back to the
/// player, and a teleport.
pub const COMMAND: &str = "TEST_PLUGIN_COMMAND";

/// Name and version every child plugin says hello with.
pub const CHILD_NAME: &str = "runtime-test";
/// See [`CHILD_NAME`].
pub const CHILD_VERSION: &str = "1.2.3";

/// The role of a child host: `stale` or `killed` (see [`host_child`]).
pub const HOST_ROLE: &str = "TEST_HOST_ROLE";
/// The child host's observation file.
pub const HOST_REPORT: &str = "TEST_HOST_REPORT";
/// The report file of the plugin a `killed` child host launches.
pub const HOST_PLUGIN_REPORT: &str = "TEST_HOST_PLUGIN_REPORT";

/// How long any single wait in these tests may take before the test fails. Generous: a loaded
/// two-core machine may take a while to start a process.
pub const STALL: Duration = Duration::from_secs(30);

/// A plugin that re-executes this test binary as [`plugin_child`], in `mode`, reporting to
/// `report`. Chain `.env(...)` for the rest of its behaviour.
pub fn child_plugin(id: &str, mode: &str, report: &Path) -> PluginConfig {
    let exe = std::env::current_exe().expect("path of the test binary");
    PluginConfig::launch(id, exe)
        .args(["--exact", "common::plugin_child", "--nocapture", "--test-threads=1"])
        .env(MODE, mode)
        .env(REPORT, report.to_str().expect("UTF-8 temp path"))
}

/// A host configuration for tests: a generous hello timeout (a loaded machine is slow to start
/// a process) and a short shutdown grace (children exit at once when asked).
pub fn config(plugins: Vec<PluginConfig>) -> HostConfig {
    let mut c = HostConfig::new(plugins);
    c.host.hello_timeout_ms = STALL.as_millis() as u64;
    c.host.shutdown_grace_ms = 5_000;
    c
}

// ------------------------------------------------------------------------------------------
// The child plugin
// ------------------------------------------------------------------------------------------

/// The plugin role of this test binary; does nothing unless started by a host.
#[test]
fn plugin_child() {
    if std::env::var_os(ENV_ADDRESS).is_none() {
        return;
    }
    let path = std::env::var(REPORT).expect("the parent names the report file");
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the report file");
    let mut out = BufWriter::new(file);
    let result = run_plugin(&mut out);
    match &result {
        Ok(()) => line(&mut out, "result ok"),
        Err(e) => line(&mut out, &format!("result err {e:?}")),
    }
    let _ = out.flush();
    // Leave before the test harness prints anything more: its output would go to the host's
    // log, or to a closed pipe if the host died.
    std::process::exit(0);
}

fn line(out: &mut impl Write, text: &str) {
    let _ = writeln!(out, "{text}");
}

fn env_ms(key: &str) -> Duration {
    Duration::from_millis(std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn builder() -> Result<PluginBuilder, PluginError> {
    let mut b = Plugin::from_env()?.name(CHILD_NAME).version(CHILD_VERSION);
    if let Ok(v) = std::env::var(API_VERSION) {
        b = b.api_version(&v);
    }
    if let Ok(w) = std::env::var(WAIT) {
        b = b.wait(w.parse().expect("a wait strategy"));
    }
    if let Ok(name) = std::env::var(COMMAND) {
        b = b.command(CommandSpec {
            name,
            description: "test command".into(),
            ..Default::default()
        });
    }
    let subs: Vec<EventType> = std::env::var(SUBSCRIBE)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| EventType::from_str_name(s).unwrap_or_else(|| panic!("unknown event type {s}")))
        .collect();
    Ok(b.subscribe(subs).hello_timeout(STALL))
}

fn run_plugin(out: &mut BufWriter<File>) -> Result<(), PluginError> {
    let mode = std::env::var(MODE).unwrap_or_default();
    match mode.as_str() {
        "silent" => {
            let mut plugin = builder()?.connect()?;
            let hello = plugin.host_hello().clone();
            line(out, &format!("start {} {}", hello.api_version, hello.boot_id));
            let _ = out.flush();
            // Never read, never answer: only watch the host's state word.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let state = plugin.link().host_state();
                if state != HostState::Running || Instant::now() >= deadline {
                    line(out, &format!("silent {state:?}"));
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        "exit" => {
            let _plugin = builder()?.connect()?;
            line(out, "start");
            let _ = out.flush();
            std::process::exit(7);
        }
        _ => {
            let mut rec = Recorder::from_env(out);
            let result = builder()?.run(&mut rec);
            rec.finish();
            result
        }
    }
}

/// What a rule or the default says to answer.
#[derive(Clone)]
enum Answer {
    Ack,
    Cancel,
    Mutate(String),
}

fn parse_answer(s: &str) -> Answer {
    match s {
        "" | "ack" => Answer::Ack,
        "cancel" => Answer::Cancel,
        m => Answer::Mutate(
            m.strip_prefix("mutate:")
                .unwrap_or_else(|| panic!("bad answer {m:?}"))
                .to_owned(),
        ),
    }
}

/// The child plugin's handler: records what arrives, answers as configured.
struct Recorder<'a> {
    out: &'a mut BufWriter<File>,
    default: Answer,
    rules: Vec<(String, Answer)>,
    move_sleep: Duration,
    first_event_sleep: Duration,
    record_moves: bool,
    record_players: bool,
    command: Option<String>,
    last_pos: BTreeMap<u64, [f64; 3]>,
}

impl<'a> Recorder<'a> {
    fn from_env(out: &'a mut BufWriter<File>) -> Self {
        let rules = std::env::var(RULES)
            .unwrap_or_default()
            .split(';')
            .filter(|r| !r.is_empty())
            .map(|r| {
                let (needle, answer) = r.split_once("=>").expect("rule is needle=>answer");
                (needle.to_owned(), parse_answer(answer))
            })
            .collect();
        Self {
            out,
            default: parse_answer(&std::env::var(REPLY).unwrap_or_default()),
            rules,
            move_sleep: env_ms(MOVE_SLEEP_MS),
            first_event_sleep: env_ms(FIRST_EVENT_SLEEP_MS),
            record_moves: std::env::var_os(RECORD_MOVES).is_some(),
            record_players: std::env::var_os(RECORD_PLAYERS).is_some(),
            command: std::env::var(COMMAND).ok(),
            last_pos: BTreeMap::new(),
        }
    }

    fn finish(&mut self) {
        let _ = self.out.flush();
    }
}

/// The `player_uuid` of the payloads the tests publish.
pub fn tag_of(env: &EventEnvelope) -> &str {
    match &env.payload {
        Some(Payload::PlayerJoin(e)) => &e.player_uuid,
        Some(Payload::PlayerQuit(e)) => &e.player_uuid,
        Some(Payload::Chat(e)) => &e.player_uuid,
        Some(Payload::Command(e)) => &e.player_uuid,
        Some(Payload::PlayerJump(e)) => &e.player_uuid,
        _ => "-",
    }
}

impl Handler for Recorder<'_> {
    fn on_start(&mut self, _ctx: &mut Context<'_>, hello: &HostHello) {
        line(self.out, &format!("start {} {}", hello.api_version, hello.boot_id));
        let _ = self.out.flush();
    }

    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let tick = frame.tick;
        if self.record_players {
            let mut l = format!("mp {tick} {}", frame.flags);
            for m in moves {
                let _ = write!(l, " {}@{}", player_of(&m.uuid), tick_of(m));
            }
            line(self.out, &l);
        }
        if self.record_moves {
            line(self.out, &format!("mv {tick} {}", moves.len()));
            for m in moves {
                self.last_pos.insert(player_of(&m.uuid), [m.x, m.y, m.z]);
            }
        }
        if !self.move_sleep.is_zero() {
            std::thread::sleep(self.move_sleep);
        }
    }

    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        if !self.first_event_sleep.is_zero() {
            std::thread::sleep(std::mem::take(&mut self.first_event_sleep));
        }
        let tag = tag_of(event);
        line(self.out, &format!("ev {} {tag}", event.r#type));
        if let Some(Payload::Command(c)) = &event.payload {
            if Some(&c.command) == self.command.as_ref() {
                ctx.send_chat(&c.player_uuid, "pong");
                ctx.teleport(&c.player_uuid, [1.0, 2.0, 3.0], 90.0, 0.0);
            }
        }
        let text = match &event.payload {
            Some(Payload::Chat(c)) => c.message.as_str(),
            _ => "",
        };
        let answer = self
            .rules
            .iter()
            .find(|(needle, _)| text.contains(needle.as_str()))
            .map_or(&self.default, |(_, a)| a);
        match answer {
            Answer::Ack => Reply::Ack,
            Answer::Cancel => Reply::Cancel,
            Answer::Mutate(m) => Reply::chat_message(m.clone()),
        }
    }

    fn on_idle(&mut self, _ctx: &mut Context<'_>) {
        let _ = self.out.flush();
    }

    fn on_shutdown(&mut self, reason: &str) {
        line(self.out, &format!("shutdown {reason}"));
        for (p, [x, y, z]) in &self.last_pos {
            line(
                self.out,
                &format!("pos {p} {:x} {:x} {:x}", x.to_bits(), y.to_bits(), z.to_bits()),
            );
        }
        let _ = self.out.flush();
    }
}

// ------------------------------------------------------------------------------------------
// The child host
// ------------------------------------------------------------------------------------------

/// The host role of this test binary; does nothing unless [`HOST_ROLE`] is set.
///
/// - `stale`: starts a host with two attached plugins (no process), reports `seg <name>` for
///   each segment, and idles until killed;
/// - `killed`: starts a host with one attached plugin slot (`orphan`; the test starts the
///   plugin with [`spawn_attached_plugin`]), reports `seg <name>`, and publishes a tick every
///   5 ms until killed.
///
/// Either gives up by itself after two minutes, so it never outlives a broken test for long.
#[test]
fn host_child() {
    let Ok(role) = std::env::var(HOST_ROLE) else {
        return;
    };
    let report = std::env::var(HOST_REPORT).expect("the parent names the report file");
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
        .expect("open the host report");
    let plugins = match role.as_str() {
        "stale" => vec![PluginConfig::attached("stale_a"), PluginConfig::attached("stale_b")],
        // Attached, so that its process is the test's child, not the host's: a plugin the host
        // launched would be killed by the kernel with its host (PR_SET_PDEATHSIG) before its
        // loop could see the host die. The test starts it with [`spawn_attached_plugin`].
        "killed" => vec![PluginConfig::attached("orphan")],
        other => panic!("unknown host role {other}"),
    };
    let ids: Vec<String> = plugins.iter().map(|p| p.id.clone()).collect();
    let mut host = match Host::start(config(plugins)) {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(out, "error {e}");
            std::process::exit(1);
        }
    };
    for id in &ids {
        let _ = writeln!(
            out,
            "seg {}",
            host.address_of(id)
                .expect("configured plugin")
                .trim_start_matches("shm:")
        );
        if let Some(pid) = host.pid_of(id) {
            let _ = writeln!(out, "pid {pid}");
        }
    }
    let _ = writeln!(out, "ready");
    let until = Instant::now() + Duration::from_secs(120);
    let mut t = 0u64;
    while Instant::now() < until {
        if role == "killed" {
            t += 1;
            let mut tick = host.begin_tick();
            tick.publish_moves(&moves_for_tick(t, 10, |_| true));
            tick.publish(&mut jump(&format!("j{t}")));
            tick.end();
            std::thread::sleep(Duration::from_millis(5));
        } else {
            host.poll();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::process::exit(2);
}

/// Starts this test binary as a child plugin (`handler` mode, recording moves) attached at
/// `address`, reporting into `report`: a process of this test, not of the host.
pub fn spawn_attached_plugin(address: &str, id: &str, report: &Path) -> ChildGuard {
    let exe = std::env::current_exe().expect("path of the test binary");
    let child = Command::new(exe)
        .args(["--exact", "common::plugin_child", "--nocapture", "--test-threads=1"])
        .env(ENV_ADDRESS, address)
        .env(plugbus::host::ENV_PLUGIN_ID, id)
        .env(MODE, "handler")
        .env(REPORT, report)
        .env(SUBSCRIBE, "PLAYER_MOVE,PLAYER_JUMP")
        .env(RECORD_MOVES, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the attached plugin");
    ChildGuard(Some(child))
}

/// Starts this test binary as a child host in `role`, reporting into `report`.
pub fn spawn_host_child(role: &str, report: &Path, env: &[(&str, &str)]) -> ChildGuard {
    let exe = std::env::current_exe().expect("path of the test binary");
    let child = Command::new(exe)
        .args(["--exact", "common::host_child", "--nocapture", "--test-threads=1"])
        .env(HOST_ROLE, role)
        .env(HOST_REPORT, report)
        .envs(env.iter().copied())
        .env_remove(ENV_ADDRESS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child host");
    ChildGuard(Some(child))
}

// ------------------------------------------------------------------------------------------
// Guards
// ------------------------------------------------------------------------------------------

/// A child process that is killed and reaped when the guard goes, whatever happened.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// SIGKILLs the child and reaps it now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process this test did not spawn directly (a plugin orphaned by a killed host): SIGKILLed
/// when the guard goes if it is still a child plugin of this test binary.
pub struct PidGuard(pub u32);

impl PidGuard {
    /// Whether the process is alive (and not a zombie).
    pub fn alive(&self) -> bool {
        stale::pid_alive(self.0, 0)
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains("common::plugin_child");
        if ours && self.alive() {
            // SAFETY: kill(2) takes a pid and a signal number and touches no memory of ours.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Segment names to unlink when the guard goes (left behind by a killed host).
pub struct SegmentGuard(pub Vec<String>);

impl Drop for SegmentGuard {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Segment::unlink(name);
        }
    }
}

/// A scratch directory, removed when the guard goes (kept if the test failed, for a look).
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory for test `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("plugbus-rt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }

    /// A path inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Reports
// ------------------------------------------------------------------------------------------

/// The complete lines of a report file (none if it does not exist yet).
pub fn read_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// The `ev` lines of a report as `(event type, tag)`.
pub fn events_of(lines: &[String]) -> Vec<(i32, String)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ev "))
        .map(|l| {
            let (ty, tag) = l.split_once(' ').expect("ev <type> <tag>");
            (ty.parse().expect("event type number"), tag.to_owned())
        })
        .collect()
}

/// The `mv` lines of a report as `(tick, count)`.
pub fn move_frames_of(lines: &[String]) -> Vec<(u64, usize)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("mv "))
        .map(|l| {
            let (t, n) = l.split_once(' ').expect("mv <tick> <count>");
            (t.parse().expect("tick"), n.parse().expect("count"))
        })
        .collect()
}

/// The `pos` lines of a report: each player's last position.
pub fn positions_of(lines: &[String]) -> HashMap<u64, [f64; 3]> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("pos "))
        .map(|l| {
            let v: Vec<&str> = l.split(' ').collect();
            let f = |s: &str| f64::from_bits(u64::from_str_radix(s, 16).expect("f64 bits"));
            (v[0].parse().expect("player"), [f(v[1]), f(v[2]), f(v[3])])
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Events and moves
// ------------------------------------------------------------------------------------------

/// A chat from player `tag` saying `message`.
pub fn chat(tag: &str, message: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: tag.to_owned(),
            name: "player".into(),
            message: message.to_owned(),
        })),
        ..Default::default()
    }
}

/// A join of player `tag`.
pub fn join(tag: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::PlayerJoin(PlayerJoinEvent {
            player_uuid: tag.to_owned(),
            name: "player".into(),
            world: None,
        })),
        ..Default::default()
    }
}

/// A quit of player `tag`.
pub fn quit(tag: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::PlayerQuit(PlayerQuitEvent {
            player_uuid: tag.to_owned(),
            name: "player".into(),
        })),
        ..Default::default()
    }
}

/// Command `command` (its name, without the slash) run by player `tag`, as a df.plugin host
/// fills it: `name` is the player's name, `raw` the line typed.
pub fn command(tag: &str, command: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Command(CommandEvent {
            player_uuid: tag.to_owned(),
            name: "player".into(),
            raw: format!("/{command}"),
            command: command.to_owned(),
            args: Vec::new(),
        })),
        ..Default::default()
    }
}

/// A jump of player `tag` (an event that is batched, not sent at once).
pub fn jump(tag: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::PlayerJump(PlayerJumpEvent {
            player_uuid: tag.to_owned(),
            name: "player".into(),
            world: "overworld".into(),
            position: None,
        })),
        ..Default::default()
    }
}

/// The UUID of player number `p`.
pub fn uuid_of(p: u64) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&p.to_le_bytes());
    u[8] = 0xAB;
    u
}

/// The player number of a UUID made by [`uuid_of`].
pub fn player_of(uuid: &[u8; 16]) -> u64 {
    u64::from_le_bytes(uuid[..8].try_into().expect("8 bytes"))
}

/// The tick at which a record made by [`position`] was published.
pub fn tick_of(m: &MoveRecord) -> u64 {
    (m.x - 0.25) as u64
}

/// Where player `p` is at tick `t` (distinct for every pair).
pub fn position(p: u64, t: u64) -> [f64; 3] {
    [t as f64 + 0.25, p as f64 * 2.0, (t * 100_000 + p) as f64 * 0.5]
}

/// The moves of tick `t`: each of `players` players for which `moved(p)` holds.
pub fn moves_for_tick(t: u64, players: u64, moved: impl Fn(u64) -> bool) -> Vec<MoveRecord> {
    (0..players)
        .filter(|p| moved(*p))
        .map(|p| MoveRecord::new(uuid_of(p), position(p, t), (t % 360) as f32, 0.0))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Waiting
// ------------------------------------------------------------------------------------------

/// Polls `host` (ending empty ticks, as a game loop would) until `done` holds; panics with
/// `what` and the notices seen after [`STALL`]. Returns the notices seen meanwhile.
pub fn wait_until(host: &mut Host, what: &str, mut done: impl FnMut(&mut Host) -> bool) -> Vec<Notice> {
    let deadline = Instant::now() + STALL;
    let mut notices = Vec::new();
    loop {
        host.begin_tick().end();
        notices.extend(host.drain_notices());
        if done(host) {
            return notices;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; plugins {:?}; notices {notices:#?}",
            host.plugins()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until each report has its `start` line, then polls once more. The plugin flushes its
/// hello and subscriptions before it waits for `HostHello`, and writes `start` after: so once
/// `start` is in the file, that poll has applied the subscriptions.
pub fn wait_started(host: &mut Host, reports: &[&Path]) -> Vec<Notice> {
    let notices = wait_until(host, "every plugin's start line", |_| {
        reports
            .iter()
            .all(|r| read_lines(r).iter().any(|l| l.starts_with("start")))
    });
    host.poll();
    notices
}

/// Head and tail of each ring of plugin `id`'s segment (moves, control, replies).
pub fn ring_positions(host: &Host, id: &str) -> Vec<(u64, u64)> {
    let name = host
        .address_of(id)
        .expect("configured plugin")
        .trim_start_matches("shm:");
    stale::inspect(name).rings.iter().map(|(_, h, t)| (*h, *t)).collect()
}

/// Whether plugin `id` has read everything written into its moves and control rings (always
/// true for a plugin on another transport).
pub fn consumed(host: &Host, id: &str) -> bool {
    if !host.address_of(id).is_some_and(|a| a.starts_with("shm:")) {
        // Another transport's buffers cannot be inspected; what was sent is read before the
        // host's shutdown message, which comes last in the plugin's stream.
        return true;
    }
    let r = ring_positions(host, id);
    r.len() == 3 && r[0].0 == r[0].1 && r[1].0 == r[1].1
}

/// Waits until plugin `id` has been sent `events` events and `moves` move records (counting
/// those conflated away) and has read them all.
pub fn wait_delivered(host: &mut Host, id: &str, events: u64, moves: u64) -> Vec<Notice> {
    wait_until(
        host,
        &format!("{id} to receive {events} events and {moves} moves"),
        |h| {
            let m = h.metrics();
            let s = &m.plugins[id];
            s.events_sent == events && s.moves_sent + s.moves_conflated == moves && consumed(h, id)
        },
    )
}

/// The state of plugin `id`.
pub fn state_of(host: &Host, id: &str) -> SlotState {
    host.plugins()
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, s)| s)
        .expect("configured plugin")
}

/// Small rings for plugins that should fall behind quickly.
pub fn small_rings(moves: u64, control: u64) -> QueueSizes {
    QueueSizes {
        moves,
        control,
        ..QueueSizes::default()
    }
}

// ------------------------------------------------------------------------------------------
// Host log capture
// ------------------------------------------------------------------------------------------

static LOG: Mutex<String> = Mutex::new(String::new());

/// Appends every log line to [`LOG`], and prints it (captured by the test harness, shown for
/// failing tests).
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        LOG.lock().unwrap_or_else(|p| p.into_inner()).push_str(&s);
        print!("{s}");
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a tracing subscriber that keeps the host's log, including
/// the plugins' forwarded stdout and stderr, readable through [`log_text`].
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| Capture)
            .try_init();
    });
}

/// Everything logged so far in this test binary.
pub fn log_text() -> String {
    LOG.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

// ------------------------------------------------------------------------------------------
// C libraries and valgrind
// ------------------------------------------------------------------------------------------

/// The directory of the `libplugbus.so` (the cdylib) built with this test binary: `cargo test`
/// leaves it in `target/<profile>/deps/` beside the test (`cargo build` also copies it up to
/// `target/<profile>/`, but a test run does not refresh that copy).
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let deps = exe.parent().expect("target/<profile>/deps/<test>").to_path_buf();
    assert!(
        deps.join("libplugbus.so").exists(),
        "{} has no libplugbus.so: the crate's [lib] crate-type must include \"cdylib\"",
        deps.display()
    );
    deps
}

/// Asserts that the memcheck report in `log` has no error and no definite leak.
pub fn assert_memcheck_clean(log: &Path) {
    let report =
        std::fs::read_to_string(log).unwrap_or_else(|e| panic!("no valgrind report at {}: {e}", log.display()));
    assert!(
        report.contains("ERROR SUMMARY: 0 errors"),
        "memcheck found errors:\n{report}"
    );
    let definite = report.lines().find(|l| l.contains("definitely lost:"));
    assert!(
        definite.is_none_or(|l| l.contains("definitely lost: 0 bytes")),
        "memcheck found a definite leak:\n{report}"
    );
}
