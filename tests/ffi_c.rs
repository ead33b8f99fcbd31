//! The C example plugins (`ffi/examples/*.c`), compiled with
//! `gcc -std=c11 -Wall -Wextra -Werror` against the `libplugbus.so` that `cargo test` builds
//! beside this test binary, each run by a real host: once natively with exact checks, once under
//! valgrind memcheck (zero errors, no definite leaks, exit status 0).
//!
//! The examples write a one-line summary to `PLUGBUS_SUMMARY_FILE` on exit; their stdout reaches
//! the host's log, which these tests capture with a tracing subscriber (so does the host's line
//! with each plugin's exit status).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use plugbus::fastpath::MoveRecord;
use plugbus::host::{Host, HostConfig, Outcome, PluginConfig};
use plugbus::proto::{
    ChatEvent, ChatMutation, CommandEvent, EventEnvelope, action, event_envelope::Payload, event_result,
};

/// Longest wait for anything natively.
const STALL: Duration = Duration::from_secs(30);
/// Longest wait for anything under valgrind (20-50x slower, on a loaded 2-core machine).
const VALGRIND_STALL: Duration = Duration::from_secs(180);

// ------------------------------------------------------------------------------------------
// Building the C plugins
// ------------------------------------------------------------------------------------------

/// How a C example links the library.
#[derive(Clone, Copy)]
enum Link {
    /// `-lplugbus`: the cdylib, found at run time through the rpath (and `LD_LIBRARY_PATH`,
    /// which the tests set for the plugin: cargo points it at `target/<profile>/` for test runs,
    /// where an older copy of the library may sit).
    Dynamic,
    /// `-l:libplugbus.a -lpthread -ldl -lm`: the staticlib, linked into the executable.
    Static,
}

/// Compiles `ffi/<dir>/<name>.c` into the test's temp dir; returns the executable.
fn compile(dir: &str, name: &str, link: Link) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-c");
    std::fs::create_dir_all(&out_dir).expect("create the output dir");
    let exe = out_dir.join(name);
    let lib = common::lib_dir();
    let mut gcc = Command::new("gcc");
    gcc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(root.join("ffi"))
        .arg(root.join("ffi").join(dir).join(format!("{name}.c")))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib);
    match link {
        Link::Dynamic => gcc.arg("-lplugbus").arg(format!("-Wl,-rpath,{}", lib.display())),
        Link::Static => gcc.args(["-l:libplugbus.a", "-lpthread", "-ldl", "-lm"]),
    };
    let out = gcc.output().expect("run gcc (is it installed?)");
    assert!(
        out.status.success(),
        "gcc failed on ffi/{dir}/{name}.c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The two examples, compiled once per test binary: chat_filter against the shared library,
/// move_counter against the static one (so both ways of linking are exercised).
fn examples() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        (
            compile("examples", "chat_filter", Link::Dynamic),
            compile("examples", "move_counter", Link::Static),
        )
    })
}

/// The environment a C plugin runs with: its summary file, and the library directory first.
fn plugin_env(plugin: PluginConfig, summary: &Path) -> PluginConfig {
    plugin
        .env("PLUGBUS_SUMMARY_FILE", summary.to_str().expect("UTF-8 temp path"))
        .env(
            "LD_LIBRARY_PATH",
            common::lib_dir().to_str().expect("UTF-8 target path"),
        )
}

fn valgrind() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("valgrind"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!(
            "valgrind is not installed: this test runs the C plugins under memcheck. Install it \
             (apt-get install valgrind; .ci/run does) and run again."
        )
    })
}

/// A plugin config running `exe` under memcheck, its report in `log`.
fn under_valgrind(id: &str, exe: &Path, log: &Path) -> PluginConfig {
    PluginConfig::launch(id, valgrind()).args([
        "--leak-check=full".to_owned(),
        "--errors-for-leak-kinds=definite".to_owned(),
        "--error-exitcode=99".to_owned(),
        format!("--log-file={}", log.display()),
        exe.display().to_string(),
    ])
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

static LOG: Mutex<String> = Mutex::new(String::new());

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

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| Capture)
            .try_init();
    });
}

fn log_text() -> String {
    LOG.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Waits until the log has a line with every one of `parts` (ticking `host` meanwhile).
fn wait_log_line(mut host: Option<&mut Host>, parts: &[&str], stall: Duration) -> String {
    let deadline = Instant::now() + stall;
    loop {
        if let Some(l) = log_text().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?}; the log:\n{}",
            log_text()
        );
        match host.as_deref_mut() {
            Some(h) => h.begin_tick().end(),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn host_config(plugin: PluginConfig, stall: Duration) -> HostConfig {
    let mut c = HostConfig::new(vec![plugin.required(true)]);
    c.host.hello_timeout_ms = stall.as_millis() as u64;
    c.host.response_timeout_ms = stall.as_millis() as u64;
    c.host.shutdown_grace_ms = stall.as_millis() as u64;
    c
}

fn chat(player: &str, message: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: player.to_owned(),
            name: format!("{player}-name"),
            message: message.to_owned(),
        })),
        ..Default::default()
    }
}

/// Command `command` (without the slash) typed by `player`; `name` is the player's name.
fn command(player: &str, command: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Command(CommandEvent {
            player_uuid: player.to_owned(),
            name: format!("{player}-name"),
            raw: format!("/{command}"),
            command: command.to_owned(),
            args: Vec::new(),
        })),
        ..Default::default()
    }
}

fn dispatch(host: &mut Host, mut env: EventEnvelope, stall: Duration) -> Outcome {
    let mut tick = host.begin_tick();
    let p = tick.dispatch(&mut env);
    tick.end();
    host.wait(&p, Instant::now() + stall)
}

/// The chats sent by plugin actions since the last call: (target, message).
fn chats_sent(host: &mut Host) -> Vec<(String, String)> {
    host.drain_actions()
        .map(|a| match a.action.kind {
            Some(action::Kind::SendChat(c)) => (c.target_uuid, c.message),
            other => panic!("expected only SendChat actions, got {other:?}"),
        })
        .collect()
}

/// Whether plugin `id` has read everything in its moves and control rings.
fn consumed(host: &Host, id: &str) -> bool {
    let name = host
        .address_of(id)
        .expect("configured plugin")
        .trim_start_matches("shm:");
    let rings = plugbus::segment::stale::inspect(name).rings;
    rings.len() == 3 && rings[..2].iter().all(|(_, head, tail)| head == tail)
}

/// Asserts the host logged plugin `id`'s exit with status 0 (during `shutdown`).
fn assert_exited_cleanly(id: &str, stall: Duration) {
    let line = wait_log_line(None, &[id, "plugin exited with status"], stall);
    assert!(line.contains("plugin exited with status 0"), "{line}");
}

/// Drives the C chat_filter: the same checks as the Rust example's test.
fn exercise_chat_filter(host: &mut Host, id: &str, stall: Duration) {
    let hello = host.hello_of(id).expect("hello").clone();
    assert_eq!(hello.name, "chat_filter");
    let commands: Vec<&str> = hello.commands.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        commands,
        ["filterstats"],
        "the registered command is announced in the hello"
    );

    // Until its subscriptions are in, an event reaches nobody: probe with a command the filter
    // ignores.
    let deadline = Instant::now() + stall;
    while dispatch(host, command("probe", "probe"), stall).answered != [id] {
        assert!(Instant::now() < deadline, "chat_filter never subscribed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(chats_sent(host).is_empty());

    let rewritten = |text: &str| {
        Some(event_result::Update::Chat(ChatMutation {
            message: Some(text.to_owned()),
        }))
    };
    let o = dispatch(host, chat("p1", "hello there"), stall);
    assert_eq!(o.answered, [id]);
    assert!(!o.cancelled && o.mutation.is_none(), "passes unchanged: {o:?}");
    let o = dispatch(host, chat("p1", "what the HECK, heck"), stall);
    assert!(!o.cancelled);
    assert_eq!(
        o.mutation,
        rewritten("what the h*ck, h*ck"),
        "case-insensitive, every occurrence"
    );
    assert!(chats_sent(host).is_empty(), "no action for passed or rewritten chat");

    let o = dispatch(host, chat("p2", "oh Darn it"), stall);
    assert!(o.cancelled && o.mutation.is_none(), "{o:?}");
    let sent = chats_sent(host);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, "p2", "the sender is told");
    assert!(sent[0].1.contains("blocked"), "{sent:?}");

    let o = dispatch(host, command("p3", "filterstats"), stall);
    assert_eq!(o.answered, [id]);
    assert_eq!(
        chats_sent(host),
        [(
            "p3".to_owned(),
            "chat filter: 1 blocked, 1 rewritten, 1 passed".to_owned()
        )]
    );
}

/// Drives the C move_counter: publishes `players` moves a tick for a bit over a second, waits
/// for a summary and for every frame to be read; returns the records the host delivered.
fn exercise_move_counter(host: &mut Host, id: &str, players: u8, stall: Duration) -> u64 {
    assert_eq!(host.hello_of(id).map(|h| h.name.as_str()), Some("move_counter"));
    let boot = host.boot_id().to_owned();
    wait_log_line(Some(host), &[id, "move_counter connected (host boot ", &boot], stall);
    let started = Instant::now();
    let mut first_sent: Option<Instant> = None;
    loop {
        let mut tick = host.begin_tick();
        let t = tick.number();
        for p in 0..players {
            let pos = [f64::from(p), 64.0, t as f64];
            tick.publish_move(MoveRecord::new([p + 1; 16], pos, 90.0, 0.0));
        }
        tick.end();
        if first_sent.is_none() && host.metrics().plugins[id].moves_sent > 0 {
            first_sent = Some(Instant::now());
        }
        if first_sent.is_some_and(|f| f.elapsed() > Duration::from_millis(1300)) {
            break;
        }
        assert!(started.elapsed() < stall, "move_counter never subscribed to moves");
        std::thread::sleep(Duration::from_millis(10));
    }
    let summary = wait_log_line(Some(host), &[id, "moves: ", " in the last second, "], stall);
    assert!(summary.contains(&format!("from {players} players")), "{summary}");
    let deadline = Instant::now() + stall;
    while !consumed(host, id) {
        assert!(Instant::now() < deadline, "move_counter never read every frame");
        host.begin_tick().end();
        std::thread::sleep(Duration::from_millis(5));
    }
    host.metrics().plugins[id].moves_sent
}

fn summary_file(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-c");
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn read_summary(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "the plugin wrote no summary to {}: {e}\nthe log:\n{}",
            path.display(),
            log_text()
        )
    })
}

// ------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------

#[test]
fn header_compiles_as_strict_c_and_cpp() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-c");
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let src = dir.join("header_only.c");
    std::fs::write(
        &src,
        "#include \"plugbus.h\"\n#include \"plugbus.h\"\nint main(void) { return 0; }\n",
    )
    .expect("write the source");
    for (compiler, std) in [("gcc", "-std=c11"), ("gcc", "-std=c17"), ("g++", "-std=c++11")] {
        let mut cmd = Command::new(compiler);
        cmd.args([std, "-Wall", "-Wextra", "-Werror", "-Wpedantic", "-fsyntax-only", "-I"])
            .arg(root.join("ffi"));
        if compiler == "g++" {
            cmd.args(["-x", "c++"]);
        }
        let out = cmd.arg(&src).output().unwrap_or_else(|e| panic!("run {compiler}: {e}"));
        assert!(
            out.status.success(),
            "{compiler} {std} rejects ffi/plugbus.h:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn readme_c_example_compiles_and_links() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("ffi/README.md")).expect("ffi/README.md");
    let code = readme
        .split("```c\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```c block in ffi/README.md");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-c");
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let src = dir.join("readme_example.c");
    std::fs::write(&src, code).expect("write the source");
    let lib = common::lib_dir();
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("ffi"))
        .arg(&src)
        .arg("-o")
        .arg(dir.join("readme_example"))
        .arg("-L")
        .arg(&lib)
        .arg("-lplugbus")
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "the README's C example does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_chat_filter_cancels_rewrites_and_answers_its_command() {
    init_logging();
    let summary = summary_file("chat_filter.summary");
    let plugin = plugin_env(PluginConfig::launch("c_chat", &examples().0), &summary);
    let mut host = Host::start(host_config(plugin, STALL)).expect("the host starts the C chat_filter");
    exercise_chat_filter(&mut host, "c_chat", STALL);
    host.shutdown("test over");
    wait_log_line(
        None,
        &[
            "c_chat",
            "chat_filter stopping (test over): 1 blocked, 1 rewritten, 1 passed",
        ],
        STALL,
    );
    assert_eq!(
        read_summary(&summary).trim(),
        "end=shutdown cancelled=1 rewritten=1 passed=1 errors=0"
    );
    assert_exited_cleanly("c_chat", STALL);
}

#[test]
fn c_move_counter_counts_every_move() {
    init_logging();
    let summary = summary_file("move_counter.summary");
    let plugin = plugin_env(PluginConfig::launch("c_moves", &examples().1), &summary);
    let mut host = Host::start(host_config(plugin, STALL)).expect("the host starts the C move_counter");
    let sent = exercise_move_counter(&mut host, "c_moves", 50, STALL);
    assert_eq!(host.metrics().plugins["c_moves"].moves_conflated, 0);
    host.shutdown("test over");
    wait_log_line(
        None,
        &[
            "c_moves",
            &format!("move_counter stopping (test over): {sent} moves from 50 players"),
        ],
        STALL,
    );
    let s = read_summary(&summary);
    assert!(s.starts_with(&format!("end=shutdown moves={sent} players=50 ")), "{s}");
    assert_exited_cleanly("c_moves", STALL);
}

#[test]
fn c_chat_filter_under_valgrind_is_clean() {
    init_logging();
    let summary = summary_file("chat_filter.vg.summary");
    let report = summary_file("chat_filter.vg.log");
    let plugin = plugin_env(under_valgrind("vg_chat", &examples().0, &report), &summary);
    let mut host =
        Host::start(host_config(plugin, VALGRIND_STALL)).expect("the host starts chat_filter under valgrind");
    exercise_chat_filter(&mut host, "vg_chat", VALGRIND_STALL);
    host.shutdown("test over");
    assert_exited_cleanly("vg_chat", VALGRIND_STALL);
    assert_eq!(
        read_summary(&summary).trim(),
        "end=shutdown cancelled=1 rewritten=1 passed=1 errors=0"
    );
    common::assert_memcheck_clean(&report);
}

#[test]
fn c_move_counter_under_valgrind_is_clean() {
    init_logging();
    let summary = summary_file("move_counter.vg.summary");
    let report = summary_file("move_counter.vg.log");
    let plugin = plugin_env(under_valgrind("vg_moves", &examples().1, &report), &summary);
    let mut host =
        Host::start(host_config(plugin, VALGRIND_STALL)).expect("the host starts move_counter under valgrind");
    let sent = exercise_move_counter(&mut host, "vg_moves", 20, VALGRIND_STALL);
    host.shutdown("test over");
    assert_exited_cleanly("vg_moves", VALGRIND_STALL);
    let s = read_summary(&summary);
    assert!(s.starts_with(&format!("end=shutdown moves={sent} players=20 ")), "{s}");
    common::assert_memcheck_clean(&report);
}

/// The seed host's command event as a replay input line (player "Steve" types `/filterstats`:
/// `name` is the player's name, `command` the command), read by the replay's own parser and
/// dispatched by a host: the C chat filter answers with its stats message. (`plugbus replay`
/// itself runs this file's Rust twin in cli/tests/replay.rs.)
#[test]
fn c_chat_filter_answers_filterstats_from_a_replay_line() {
    let line = "{\"tick\": 1, \"event\": {\"eventId\": \"cmd\", \"type\": \"COMMAND\", \"expectsResponse\": true, \"command\": {\"playerUuid\": \"7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01\", \"name\": \"Steve\", \"raw\": \"/filterstats\", \"command\": \"filterstats\"}}}";
    let parsed = plugbus::jsonl::parse_line(line, 1)
        .expect("a valid replay line")
        .expect("not blank");
    let plugbus::jsonl::InputItem::Event(env) = parsed.item else {
        panic!("an event line")
    };
    let summary = summary_file("chat_filter.replay.summary");
    let plugin = plugin_env(
        PluginConfig::launch("c_chat_cmd", &examples().0).required(true),
        &summary,
    );
    let mut host = Host::start(host_config(plugin, STALL)).expect("the host starts chat_filter");
    let o = dispatch(&mut host, env, STALL);
    assert_eq!(o.answered, ["c_chat_cmd"], "{o:?}");
    assert!(!o.cancelled, "{o:?}");
    let deadline = Instant::now() + STALL;
    let mut sent = Vec::new();
    while sent.is_empty() && Instant::now() < deadline {
        host.begin_tick().end();
        sent = chats_sent(&mut host);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        sent,
        [(
            "7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01".to_owned(),
            "chat filter: 0 blocked, 0 rewritten, 0 passed".to_owned()
        )],
        "the stats, sent to the player who typed the command"
    );
    host.shutdown("test over");
}

// ------------------------------------------------------------------------------------------
// Wrong, stale and made-up handles (ffi/tests/handle_kinds.c)
// ------------------------------------------------------------------------------------------

/// ffi/tests/handle_kinds.c, compiled once per test binary.
fn handle_kinds() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| compile("tests", "handle_kinds", Link::Dynamic))
}

/// Lets the C plugin run its checks: a chat with "probe" until it answers (it cancels the chat
/// once every check inside the callback passed), then a shutdown; its summary must count no
/// failure.
fn exercise_handle_kinds(mut host: Host, id: &str, summary: &Path, stall: Duration) {
    let o = dispatch(&mut host, chat("p1", "probe"), stall);
    assert_eq!(o.answered, [id], "{o:?}");
    assert!(
        o.cancelled,
        "the plugin cancels the probe only when its checks passed: {o:?}\n{}",
        log_text()
    );
    // A few more ticks: the plugin checks the saved event and the shut-down host after its poll.
    wait_log_line(Some(&mut host), &[id, "handle_kinds probed"], stall);
    host.shutdown("test over");
    let line = wait_log_line(None, &[id, "handle_kinds stopping"], stall);
    assert!(line.contains(", 0 failures"), "{line}\n{}", log_text());
    assert_exited_cleanly(id, stall);
    let s = read_summary(summary);
    assert!(
        s.starts_with("end=shutdown checks=") && s.trim_end().ends_with(" failures=0"),
        "{s}\n{}",
        log_text()
    );
}

#[test]
fn c_wrong_stale_and_made_up_handles_are_errors() {
    init_logging();
    let summary = summary_file("handle_kinds.summary");
    let plugin = plugin_env(PluginConfig::launch("c_kinds", handle_kinds()), &summary);
    let host = Host::start(host_config(plugin, STALL)).expect("the host starts handle_kinds");
    exercise_handle_kinds(host, "c_kinds", &summary, STALL);
}

#[test]
fn c_wrong_stale_and_made_up_handles_under_valgrind_are_clean() {
    init_logging();
    let summary = summary_file("handle_kinds.vg.summary");
    let report = summary_file("handle_kinds.vg.log");
    let plugin = plugin_env(under_valgrind("vg_kinds", handle_kinds(), &report), &summary);
    let host = Host::start(host_config(plugin, VALGRIND_STALL)).expect("the host starts handle_kinds under valgrind");
    exercise_handle_kinds(host, "vg_kinds", &summary, VALGRIND_STALL);
    common::assert_memcheck_clean(&report);
}
