//! The host and plugin runtimes meeting: the handshake (hello both ways, commands, actions), the
//! refusals (a wrong api_version, a segment of another layout version), bad configurations, and
//! the restart policy. Plugins are real processes: this test binary re-executed as
//! `common::plugin_child` (see `tests/common/mod.rs`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use plugbus::host::{ConfigError, Host, HostConfig, Notice, SlotState};
use plugbus::plugin::{Plugin, PluginError};
use plugbus::proto::{self, action};
use plugbus::segment::{LAYOUT_VERSION, SegmentOpenError};
use plugbus::transport::ConnectError;
use plugbus::transport::shm::ShmPluginLink;

#[test]
fn handshake_hello_commands_and_actions() {
    init_logging();
    let dir = Scratch::new("handshake");
    let report = dir.file("hs.txt");
    let mut host = Host::start(config(vec![
        child_plugin("hs", "handler", &report)
            .env(SUBSCRIBE, "COMMAND")
            .env(COMMAND, "ping")
            .required(true),
    ]))
    .expect("the host starts and the required plugin says hello");

    // Host side: ready, with the plugin's hello.
    assert!(host.is_ready("hs"));
    assert_eq!(state_of(&host, "hs"), SlotState::Ready);
    let notices: Vec<Notice> = host.drain_notices().collect();
    assert!(
        notices.contains(&Notice::Ready {
            id: "hs".into(),
            name: format!("{CHILD_NAME} {CHILD_VERSION}"),
        }),
        "{notices:?}"
    );
    let hello = host.hello_of("hs").expect("hello kept").clone();
    assert_eq!(
        (hello.name.as_str(), hello.version.as_str()),
        (CHILD_NAME, CHILD_VERSION)
    );
    assert_eq!(hello.api_version, proto::API_VERSION);
    assert_eq!(
        hello.commands.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["ping"]
    );
    assert!(host.pid_of("hs").is_some());
    // A launched plugin's segment is a memfd, named only in /proc (no name in /dev/shm).
    assert!(
        host.address_of("hs")
            .is_some_and(|s| s.starts_with("shm:memfd:plugbus."))
    );

    // At once after `start`: a required plugin's subscriptions are in effect (it sends them
    // before its hello). A command it registered: it answers and sends two actions, which reach
    // the host in order, tagged with the plugin's id, before its answer.
    let mut tick = host.begin_tick();
    let pending = tick.dispatch(&mut command("player-1", "ping"));
    tick.end();
    let outcome = host.wait(&pending, Instant::now() + STALL);
    assert_eq!(outcome.answered, ["hs"]);
    assert!(outcome.late.is_empty() && !outcome.cancelled && outcome.mutation.is_none());
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(actions.iter().all(|a| a.plugin == "hs"));
    match &actions[0].action.kind {
        Some(action::Kind::SendChat(c)) => {
            assert_eq!((c.target_uuid.as_str(), c.message.as_str()), ("player-1", "pong"))
        }
        other => panic!("expected a chat action first, got {other:?}"),
    }
    assert!(matches!(&actions[1].action.kind, Some(action::Kind::Teleport(t)) if t.player_uuid == "player-1"));
    assert_eq!(host.metrics().host.actions, 2);

    // Plugin side: the host's hello carries the api version and this host's boot id.
    wait_started(&mut host, &[&report]);
    let start = read_lines(&report)
        .into_iter()
        .find(|l| l.starts_with("start"))
        .expect("start line");
    assert_eq!(start, format!("start {} {}", proto::API_VERSION, host.boot_id()));

    // A clean shutdown: the plugin hears the reason and its loop ends with Ok.
    host.shutdown("test over");
    assert!(matches!(state_of(&host, "hs"), SlotState::Disconnected(r) if r.contains("test over")));
    let lines = read_lines(&report);
    assert!(lines.contains(&"shutdown test over".to_owned()), "{lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("result ok"), "{lines:?}");
}

#[test]
fn wrong_api_version_is_refused_on_both_sides() {
    init_logging();
    let dir = Scratch::new("api-version");
    let report = dir.file("old.txt");
    let mut host = Host::start(config(vec![
        child_plugin("old", "handler", &report)
            .env(API_VERSION, "v0")
            .env(SUBSCRIBE, "CHAT"),
    ]))
    .expect("the plugin is not required: the host starts");

    let notices = wait_until(&mut host, "the refusal", |h| {
        matches!(state_of(h, "old"), SlotState::Disabled(_))
    });
    let SlotState::Disabled(reason) = state_of(&host, "old") else {
        unreachable!()
    };
    assert!(reason.contains("api_version") && reason.contains("v0"), "{reason}");
    assert!(
        notices
            .iter()
            .any(|n| matches!(n, Notice::Disabled { id, reason } if id == "old" && reason.contains("api_version"))),
        "{notices:#?}"
    );
    assert!(
        notices.iter().any(
            |n| matches!(n, Notice::Disconnected { id, reason, .. } if id == "old" && reason.contains("api_version"))
        ),
        "{notices:#?}"
    );
    assert!(
        !notices
            .iter()
            .any(|n| matches!(n, Notice::Ready { .. } | Notice::Restarted { .. }))
    );
    assert_eq!(host.metrics().plugins["old"].disconnects.get("refused"), Some(&1));

    // The plugin learns why: its connect fails with `Refused`, naming the api_version.
    let deadline = Instant::now() + STALL;
    let result = loop {
        if let Some(l) = read_lines(&report).into_iter().find(|l| l.starts_with("result")) {
            break l;
        }
        assert!(Instant::now() < deadline, "the refused plugin reported nothing");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        result.starts_with("result err Refused(") && result.contains("api_version"),
        "{result}"
    );
    // Disabled plugins get no events (nothing is even encoded for them).
    let mut tick = host.begin_tick();
    tick.publish(&mut chat("p", "hello"));
    tick.end();
    assert_eq!(host.metrics().host.filtered, 1);
}

/// The version field of the segment header (after the 8-byte magic).
const VERSION_OFFSET: u64 = 8;

#[test]
fn segment_of_another_layout_version_is_refused() {
    use std::os::unix::fs::FileExt;
    init_logging();
    let mut host = Host::start(config(vec![plugbus::host::PluginConfig::attached("vers")])).expect("host starts");
    let name = host
        .address_of("vers")
        .expect("segment")
        .trim_start_matches("shm:")
        .to_owned();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/shm/{name}"))
        .expect("segment file");
    let mut v = [0u8; 4];
    file.read_exact_at(&mut v, VERSION_OFFSET).unwrap();
    assert_eq!(
        u32::from_ne_bytes(v),
        LAYOUT_VERSION,
        "offset 8 holds the layout version"
    );
    file.write_all_at(&(LAYOUT_VERSION + 1).to_ne_bytes(), VERSION_OFFSET)
        .unwrap();

    match ShmPluginLink::open(&name) {
        Err(SegmentOpenError::WrongVersion {
            name: n,
            found,
            expected,
        }) => {
            assert_eq!(
                (n.as_str(), found, expected),
                (name.as_str(), LAYOUT_VERSION + 1, LAYOUT_VERSION)
            );
        }
        other => panic!("expected WrongVersion, got {other:?}"),
    }
    let err = Plugin::builder(&name, "vers")
        .hello_timeout(Duration::from_secs(1))
        .connect()
        .expect_err("a segment of another layout version");
    assert!(
        matches!(&err, PluginError::Connect(ConnectError::Refused { reason, .. }) if reason.contains("layout version")),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&name) && msg.contains(&format!("layout version {}", LAYOUT_VERSION + 1)),
        "{msg}"
    );
    // The host is unaffected: it still waits for a plugin to attach.
    host.poll();
    assert_eq!(state_of(&host, "vers"), SlotState::Connecting);
}

// ------------------------------------------------------------------------------------------
// Configuration errors
// ------------------------------------------------------------------------------------------

/// Parses `text` from a file and expects an error naming that file, `plugin` and `field`.
fn bad_config(dir: &Scratch, file: &str, text: &str, plugin: Option<&str>, field: Option<&str>) -> ConfigError {
    let path = dir.file(file);
    std::fs::write(&path, text).unwrap();
    let e = HostConfig::from_file(&path).expect_err(text);
    assert_eq!(e.file.as_deref(), Some(path.as_path()), "{e}");
    assert_eq!(e.plugin.as_deref(), plugin, "{e}");
    assert_eq!(e.field.as_deref(), field, "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("{}: ", path.display())), "{shown}");
    if let Some(p) = plugin {
        assert!(shown.contains(&format!("plugin `{p}`")), "{shown}");
    }
    if let Some(f) = field {
        assert!(shown.contains(&format!("field `{f}`")), "{shown}");
    }
    // The same text without a file: the same error, without a file name.
    let e2 = HostConfig::from_toml(text).expect_err(text);
    assert_eq!(
        (e2.file, e2.plugin.as_deref(), e2.field.as_deref()),
        (None, plugin, field)
    );
    e
}

#[test]
fn bad_configs_name_the_file_the_plugin_and_the_field() {
    let dir = Scratch::new("config");
    let good =
        "[host]\nresponse_timeout_ms = 100\n\n[[plugin]]\nid = \"chat\"\ncommand = \"/bin/true\"\npriority = 3\n";
    let c = HostConfig::from_toml(good).expect("a good config");
    assert_eq!((c.host.response_timeout_ms, c.plugins[0].priority), (100, 3));

    let e = bad_config(
        &dir,
        "missing.toml",
        "[[plugin]]\nid = \"chat\"\n",
        Some("chat"),
        Some("command"),
    );
    assert!(e.message.contains("missing"), "{e}");

    let e = bad_config(
        &dir,
        "unknown.toml",
        "[[plugin]]\nid = \"chat\"\ncommand = \"x\"\nprioritty = 3\n",
        Some("chat"),
        Some("prioritty"),
    );
    assert!(e.message.contains("unknown field"), "{e}");

    let e = bad_config(
        &dir,
        "type.toml",
        "[[plugin]]\nid = \"chat\"\ncommand = \"x\"\npriority = \"high\"\n",
        Some("chat"),
        Some("priority"),
    );
    assert!(e.message.contains("invalid type"), "{e}");

    let e = bad_config(
        &dir,
        "queues.toml",
        "[[plugin]]\nid = \"moves\"\ncommand = \"x\"\n[plugin.queues]\nmoves = 100000\n",
        Some("moves"),
        Some("queues.moves"),
    );
    assert!(e.message.contains("power of two"), "{e}");

    bad_config(
        &dir,
        "queue-field.toml",
        "[[plugin]]\nid = \"moves\"\ncommand = \"x\"\n[plugin.queues]\nmvoes = 65536\n",
        Some("moves"),
        Some("queues.mvoes"),
    );

    // The second plugin has no id: it is named by its position.
    bad_config(
        &dir,
        "no-id.toml",
        "[[plugin]]\nid = \"a\"\ncommand = \"x\"\n\n[[plugin]]\ncommand = \"y\"\n",
        Some("plugin[1]"),
        Some("id"),
    );

    bad_config(
        &dir,
        "bad-id.toml",
        "[[plugin]]\nid = \"has space\"\ncommand = \"x\"\n",
        Some("has space"),
        Some("id"),
    );

    bad_config(
        &dir,
        "duplicate.toml",
        "[[plugin]]\nid = \"a\"\ncommand = \"x\"\n\n[[plugin]]\nid = \"a\"\ncommand = \"y\"\n",
        Some("a"),
        Some("id"),
    );

    bad_config(
        &dir,
        "attach.toml",
        "[[plugin]]\nid = \"a\"\ncommand = \"x\"\nattach = true\n",
        Some("a"),
        Some("attach"),
    );

    let e = bad_config(
        &dir,
        "host.toml",
        "[host]\nresponse_timeout_ms = \"soon\"\n",
        None,
        Some("host.response_timeout_ms"),
    );
    assert!(e.message.contains("invalid type"), "{e}");

    bad_config(
        &dir,
        "host-unknown.toml",
        "[host]\nhello_timeout = 5\n",
        None,
        Some("host.hello_timeout"),
    );

    bad_config(
        &dir,
        "occupancy.toml",
        "[host]\nslow_occupancy = 1.5\n",
        None,
        Some("host.slow_occupancy"),
    );

    // Not TOML at all: the file is still named.
    let path = dir.file("syntax.toml");
    std::fs::write(&path, "[[plugin]\nid = ").unwrap();
    let e = HostConfig::from_file(&path).expect_err("a syntax error");
    assert_eq!(e.file.as_deref(), Some(path.as_path()));
    assert!(e.to_string().starts_with(&path.display().to_string()), "{e}");

    // A file that is not there.
    let path = dir.file("absent.toml");
    let e = HostConfig::from_file(&path).expect_err("no such file");
    assert_eq!(e.file.as_deref(), Some(path.as_path()));
    assert!(e.message.contains("cannot read"), "{e}");

    // Host::from_config_file passes the error on unchanged.
    let path = dir.file("missing.toml");
    match Host::from_config_file(&path) {
        Err(plugbus::host::HostError::Config(e)) => {
            assert_eq!(
                (e.file.as_deref(), e.plugin.as_deref()),
                (Some(path.as_path()), Some("chat"))
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// Restart policy
// ------------------------------------------------------------------------------------------

#[test]
fn a_crashing_plugin_is_restarted_three_times_then_disabled() {
    init_logging();
    let dir = Scratch::new("restart");
    let report = dir.file("crash.txt");
    let mut host = Host::start(config(vec![
        child_plugin("crash", "exit", &report).env(SUBSCRIBE, "CHAT"),
    ]))
    .expect("host starts");
    assert_eq!(host.settings().restart_max, 3, "the default");

    let notices = wait_until(&mut host, "the plugin to be disabled", |h| {
        matches!(state_of(h, "crash"), SlotState::Disabled(_))
    });
    let attempts: Vec<usize> = notices
        .iter()
        .filter_map(|n| match n {
            Notice::Restarted { id, attempt } if id == "crash" => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2, 3], "{notices:#?}");
    let exits: Vec<&String> = notices
        .iter()
        .filter_map(|n| match n {
            Notice::Disconnected { id, reason, .. } if id == "crash" => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        exits.len(),
        4,
        "the first launch and three restarts each exit: {notices:#?}"
    );
    assert!(exits.iter().all(|r| r.contains("exited with status 7")), "{exits:?}");
    // The order: each exit is followed by a restart, the last by the end of the budget.
    let kinds: Vec<&str> = notices
        .iter()
        .filter_map(|n| match n {
            Notice::Disconnected { .. } => Some("exit"),
            Notice::Restarted { .. } => Some("restart"),
            Notice::Disabled { .. } => Some("disabled"),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "exit", "restart", "exit", "restart", "exit", "restart", "exit", "disabled"
        ]
    );
    let Some(Notice::Disabled { reason, .. }) = notices.iter().find(|n| matches!(n, Notice::Disabled { .. })) else {
        unreachable!()
    };
    assert!(reason.contains("restarted 3 times"), "{reason}");
    let m = host.metrics();
    assert_eq!(m.plugins["crash"].restarts, 3);
    assert_eq!(m.plugins["crash"].disconnects.values().sum::<u64>(), 4);
    // Every launch connected before it exited (each appended its start line).
    assert_eq!(read_lines(&report).iter().filter(|l| *l == "start").count(), 4);
    // Disabled for good: nothing restarts it later.
    host.poll();
    assert!(host.drain_notices().next().is_none());
    assert!(host.pid_of("crash").is_none());
}
