//! The two example plugins, each run as a real process by a real host: `chat_filter` (cancels,
//! rewrites, answers its command) and `move_counter` (counts moves, logs a summary every
//! second). `cargo test` builds the examples next to the test binaries
//! (`target/<profile>/examples/`); their output reaches the host's log, which these tests
//! capture with a tracing subscriber.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use plugbus::host::{Host, PluginConfig};
use plugbus::proto::{ChatMutation, action, event_result};

/// The path of example `name`, built by `cargo test` beside this test binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --examples` with the same profile)",
        path.display()
    );
    path
}

/// Waits until the captured log has a line with every one of `parts`; returns that line.
fn wait_log_line(host: Option<&mut Host>, parts: &[&str]) -> String {
    let deadline = Instant::now() + STALL;
    let mut host = host;
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

#[test]
fn chat_filter_cancels_rewrites_and_answers_its_command() {
    init_logging();
    let mut host = Host::start(config(vec![
        PluginConfig::launch("chat", example("chat_filter")).required(true),
    ]))
    .expect("the host starts chat_filter");
    let hello = host.hello_of("chat").expect("hello").clone();
    assert_eq!(hello.name, "chat_filter");
    let commands: Vec<&str> = hello.commands.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        commands,
        ["filterstats"],
        "the registered command is announced in the hello"
    );

    // `start` returned once its hello was in, and its subscriptions come before it: a command
    // the filter ignores (it counts only chats) reaches it at once.
    let mut tick = host.begin_tick();
    let p = tick.dispatch(&mut command("probe", "probe"));
    tick.end();
    assert_eq!(host.wait(&p, Instant::now() + STALL).answered, ["chat"]);
    assert!(host.drain_actions().next().is_none());

    let say = |host: &mut Host, player: &str, text: &str| {
        let mut tick = host.begin_tick();
        let p = tick.dispatch(&mut chat(player, text));
        tick.end();
        let o = host.wait(&p, Instant::now() + STALL);
        assert_eq!(o.answered, ["chat"], "{o:?}");
        o
    };
    let rewritten = |text: &str| {
        Some(event_result::Update::Chat(ChatMutation {
            message: Some(text.to_owned()),
        }))
    };

    let o = say(&mut host, "p1", "hello there");
    assert!(!o.cancelled && o.mutation.is_none(), "passes unchanged: {o:?}");
    let o = say(&mut host, "p1", "what the heck");
    assert!(!o.cancelled);
    assert_eq!(o.mutation, rewritten("what the h*ck"));
    let o = say(&mut host, "p1", "HECK, heck");
    assert_eq!(
        o.mutation,
        rewritten("h*ck, h*ck"),
        "case-insensitive, every occurrence"
    );
    assert!(
        host.drain_actions().next().is_none(),
        "no action for passed or rewritten chat"
    );

    let o = say(&mut host, "p2", "oh darn it");
    assert!(o.cancelled && o.mutation.is_none(), "{o:?}");
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    match &actions[0].action.kind {
        Some(action::Kind::SendChat(c)) => {
            assert_eq!(c.target_uuid, "p2", "the sender is told");
            assert!(c.message.contains("blocked"), "{c:?}");
        }
        other => panic!("expected a chat to the sender, got {other:?}"),
    }

    // Its command: answered with the counts so far, as a chat to the player who asked.
    let mut tick = host.begin_tick();
    let p = tick.dispatch(&mut command("p3", "filterstats"));
    tick.end();
    let o = host.wait(&p, Instant::now() + STALL);
    assert_eq!(o.answered, ["chat"]);
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0].plugin, "chat");
    match &actions[0].action.kind {
        Some(action::Kind::SendChat(c)) => {
            assert_eq!(c.target_uuid, "p3");
            assert_eq!(c.message, "chat filter: 1 blocked, 2 rewritten, 1 passed");
        }
        other => panic!("expected the stats as a chat, got {other:?}"),
    }

    host.shutdown("test over");
    wait_log_line(
        None,
        &["chat_filter stopping (test over): 1 blocked, 2 rewritten, 1 passed"],
    );
}

#[test]
fn move_counter_counts_moves_and_logs_a_summary_every_second() {
    move_counter_over("shm", "mc-shm");
}

/// The same plugin, unchanged, launched over gRPC: moves reach it as packed frames.
#[test]
fn move_counter_counts_moves_over_grpc() {
    move_counter_over("grpc", "mc-grpc");
}

fn move_counter_over(transport: &str, id: &str) {
    init_logging();
    let mut p = PluginConfig::launch(id, example("move_counter")).required(true);
    p.transport = transport.into();
    let mut cfg = config(vec![p]);
    if transport == "grpc" {
        cfg.host.listen = vec!["tcp://127.0.0.1:0".into()];
    }
    let mut host = Host::start(cfg).expect("the host starts move_counter");
    let mc = id;
    assert_eq!(host.hello_of(mc).map(|h| h.name.as_str()), Some("move_counter"));
    let boot = host.boot_id().to_owned();
    wait_log_line(Some(&mut host), &["move_counter connected (host boot ", &boot]);

    const PLAYERS: u64 = 50;
    // Publish at a game's pace for a bit over a second (the summary's period). `start`
    // returned after the hello, so the plugin is subscribed from the first tick.
    let started = Instant::now();
    let mut offered = 0;
    while started.elapsed() < Duration::from_millis(1300) {
        let mut tick = host.begin_tick();
        let t = tick.number();
        tick.publish_moves(&moves_for_tick(t, PLAYERS, |_| true));
        tick.end();
        offered += PLAYERS;
        std::thread::sleep(Duration::from_millis(10));
    }
    let summary = wait_log_line(Some(&mut host), &[mc, "moves: ", " in the last second, "]);
    assert!(summary.contains(&format!("from {PLAYERS} players")), "{summary}");

    // Everything is delivered and read before the shutdown, so the final count is exact: every
    // record sent (if it lagged, conflated records were never sent, and are not counted).
    wait_delivered(&mut host, mc, 0, offered);
    let sent = host.metrics().plugins[mc].moves_sent;
    assert!(sent > 0);
    host.shutdown("test over");
    wait_log_line(
        None,
        &[&format!(
            "move_counter stopping (test over): {sent} moves from {PLAYERS} players"
        )],
    );
}
