//! Conformance with the df.plugin protocol as a real server fills it. The seed Go host
//! (secmc/plugin, `plugin/adapters/plugin/player_events.go`) builds every player event with
//! `PlayerUuid: p.UUID().String(), Name: p.Name()`: `name` is the PLAYER's name, for a command
//! too, whose own name is in `command` (without the slash), the whole line typed in `raw`
//! (`"/" + cmd`, then `" " + args joined by spaces` when there are arguments) and the arguments
//! in `args`. The [`seed`] builders fill join, quit, chat and command events exactly so, and
//! these tests check that what reads them reads the intended field:
//! - the C accessors (`plugbus_event_join` / `_quit` / `_chat` / `_command` /
//!   `_command_arg`), driven through the C API against a real in-process `Host`;
//! - the Rust example `chat_filter` (`target/<profile>/examples/chat_filter`) and the C example
//!   `ffi/examples/chat_filter.c` (compiled with gcc), each run as a real process by a real host:
//!   both answer a seed command `/filterstats` from player "Steve" with their stats, sent as a
//!   chat to the player's UUID, and neither answers a player NAMED "filterstats" typing
//!   `/probe`;
//! - the test helpers (`tests/common`): their event builders fill the fields as the seed does,
//!   and the child plugin answers its command by `command`, not by `name`.

mod common;

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use common::*;
use plugbus::ffi::*;
use plugbus::host::{Host, HostConfig, Outcome, PluginConfig};
use plugbus::proto::{EventEnvelope, action, event_envelope::Payload};

/// Events built as the seed host builds them (`EmitPlayerJoin`, `EmitPlayerQuit`, `EmitChat`,
/// `EmitCommand` in secmc/plugin's `plugin/adapters/plugin/player_events.go`).
mod seed {
    use plugbus::proto::{
        ChatEvent, CommandEvent, EventEnvelope, EventType, PlayerJoinEvent, PlayerQuitEvent, WorldRef,
        event_envelope::Payload,
    };

    /// A player's UUID as the seed sends it (`p.UUID().String()`).
    pub const UUID: &str = "8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10";
    /// A player's name (`p.Name()`).
    pub const PLAYER: &str = "Steve";

    fn envelope(ty: EventType, payload: Payload) -> EventEnvelope {
        EventEnvelope {
            r#type: ty as i32,
            payload: Some(payload),
            ..Default::default()
        }
    }

    /// `PlayerJoinEvent{PlayerUuid, Name: p.Name(), World: playerWorldRef(p)}`.
    pub fn join(uuid: &str, player: &str) -> EventEnvelope {
        envelope(
            EventType::PlayerJoin,
            Payload::PlayerJoin(PlayerJoinEvent {
                player_uuid: uuid.to_owned(),
                name: player.to_owned(),
                world: Some(WorldRef {
                    name: "World".into(),
                    dimension: "overworld".into(),
                    id: "0xc000123456".into(),
                }),
            }),
        )
    }

    /// `PlayerQuitEvent{PlayerUuid, Name: p.Name()}`.
    pub fn quit(uuid: &str, player: &str) -> EventEnvelope {
        envelope(
            EventType::PlayerQuit,
            Payload::PlayerQuit(PlayerQuitEvent {
                player_uuid: uuid.to_owned(),
                name: player.to_owned(),
            }),
        )
    }

    /// `ChatEvent{PlayerUuid, Name: p.Name(), Message}`.
    pub fn chat(uuid: &str, player: &str, message: &str) -> EventEnvelope {
        envelope(
            EventType::Chat,
            Payload::Chat(ChatEvent {
                player_uuid: uuid.to_owned(),
                name: player.to_owned(),
                message: message.to_owned(),
            }),
        )
    }

    /// `CommandEvent{PlayerUuid, Name: p.Name(), Raw: raw, Command: cmdName, Args: norm}` with
    /// `raw := "/" + cmdName`, plus `" " + strings.Join(norm, " ")` when there are arguments.
    pub fn command(uuid: &str, player: &str, command: &str, args: &[&str]) -> EventEnvelope {
        let mut raw = format!("/{command}");
        if !args.is_empty() {
            raw.push(' ');
            raw.push_str(&args.join(" "));
        }
        envelope(
            EventType::Command,
            Payload::Command(CommandEvent {
                player_uuid: uuid.to_owned(),
                name: player.to_owned(),
                raw,
                command: command.to_owned(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
            }),
        )
    }
}

use seed::{PLAYER, UUID};

/// Dispatches `env` in a tick and waits for its outcome.
fn dispatch(host: &mut Host, mut env: EventEnvelope) -> Outcome {
    let mut tick = host.begin_tick();
    let p = tick.dispatch(&mut env);
    tick.end();
    host.wait(&p, Instant::now() + STALL)
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

/// A host running `plugin` (required), with generous timeouts for a loaded machine.
fn host_with(plugin: PluginConfig) -> Host {
    let mut c: HostConfig = config(vec![plugin.required(true)]);
    c.host.response_timeout_ms = STALL.as_millis() as u64;
    Host::start(c).expect("the host starts the plugin")
}

// ------------------------------------------------------------------------------------------
// The C accessors
// ------------------------------------------------------------------------------------------

/// What the C callback read: per event, its type and the fields in accessor order (or the
/// failing call's status).
#[derive(Default)]
struct Read {
    events: Vec<(i32, Vec<String>)>,
}

fn text(s: plugbus_str) -> String {
    // SAFETY: filled by plugbus during the current callback.
    unsafe { s.as_str() }.to_owned()
}

fn status_text(what: &str, rc: plugbus_status) -> String {
    // SAFETY: plugbus_status_name returns a static NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(plugbus_status_name(rc)) };
    format!("{what} failed: {}", name.to_string_lossy())
}

/// Reads each event through its accessor, as a C plugin would.
unsafe extern "C" fn read_event(user: *mut c_void, ev: *mut plugbus_event) {
    // SAFETY: `user` is the `Read` the test passed; nothing else touches it during the poll.
    let read = unsafe { &mut *user.cast::<Read>() };
    let s = plugbus_str::default;
    let (mut a, mut b, mut c, mut d, mut n, mut ty) = (s(), s(), s(), s(), 0usize, 0i32);
    // SAFETY (the calls below): `ev` is valid during this callback; out pointers are locals.
    let fields = unsafe {
        let rc = plugbus_event_type(ev, &mut ty);
        if rc != PLUGBUS_OK {
            vec![status_text("plugbus_event_type", rc)]
        } else if ty == PLUGBUS_EVENT_PLAYER_JOIN {
            match plugbus_event_join(ev, &mut a, &mut b) {
                PLUGBUS_OK => vec![text(a), text(b)],
                rc => vec![status_text("plugbus_event_join", rc)],
            }
        } else if ty == PLUGBUS_EVENT_PLAYER_QUIT {
            match plugbus_event_quit(ev, &mut a, &mut b) {
                PLUGBUS_OK => vec![text(a), text(b)],
                rc => vec![status_text("plugbus_event_quit", rc)],
            }
        } else if ty == PLUGBUS_EVENT_CHAT {
            match plugbus_event_chat(ev, &mut a, &mut b, &mut c) {
                PLUGBUS_OK => vec![text(a), text(b), text(c)],
                rc => vec![status_text("plugbus_event_chat", rc)],
            }
        } else if ty == PLUGBUS_EVENT_COMMAND {
            match plugbus_event_command(ev, &mut a, &mut b, &mut c, &mut d, &mut n) {
                PLUGBUS_OK => {
                    let mut v = vec![text(a), text(b), text(c), text(d), n.to_string()];
                    for i in 0..n {
                        let mut arg = s();
                        v.push(match plugbus_event_command_arg(ev, i, &mut arg) {
                            PLUGBUS_OK => text(arg),
                            rc => status_text("plugbus_event_command_arg", rc),
                        });
                    }
                    v
                }
                rc => vec![status_text("plugbus_event_command", rc)],
            }
        } else {
            vec![format!("unexpected event type {ty}")]
        }
    };
    read.events.push((ty, fields));
}

/// A raw pointer moved to the thread that connects (the handle is used by one thread at a time).
struct SendPtr(*mut plugbus_plugin);
// SAFETY: the handle is used by exactly one thread at a time, as the C API requires.
unsafe impl Send for SendPtr {}

#[test]
fn c_accessors_return_the_fields_the_seed_fills() {
    let mut config = HostConfig::new(vec![PluginConfig::attached("conf")]);
    config.host.response_timeout_ms = STALL.as_millis() as u64;
    config.host.shutdown_grace_ms = 100;
    let mut host = Host::start(config).expect("host starts");
    let segment = std::ffi::CString::new(host.address_of("conf").expect("segment")).unwrap();
    let mut p = null_mut();
    // SAFETY (the calls below): valid C strings, arrays and out pointers; a live handle.
    unsafe {
        assert_eq!(plugbus_open(segment.as_ptr(), c"conf".as_ptr(), &mut p), PLUGBUS_OK);
        assert_eq!(plugbus_hello(p, c"conformance".as_ptr(), c"1.0.0".as_ptr()), PLUGBUS_OK);
        let types = [
            PLUGBUS_EVENT_PLAYER_JOIN,
            PLUGBUS_EVENT_PLAYER_QUIT,
            PLUGBUS_EVENT_CHAT,
            PLUGBUS_EVENT_COMMAND,
        ];
        assert_eq!(plugbus_subscribe(p, types.as_ptr(), types.len()), PLUGBUS_OK);
        assert_eq!(plugbus_set_wait(p, PLUGBUS_WAIT_PARK), PLUGBUS_OK);
        assert_eq!(plugbus_set_hello_timeout(p, 20_000), PLUGBUS_OK);
    }
    // Connect on another thread: connect waits for the host's hello, sent from its poll here.
    let handle = SendPtr(p);
    let connecting = std::thread::spawn(move || {
        let h = handle;
        // SAFETY: live handle, used only by this thread until it is joined.
        unsafe { plugbus_connect(h.0) }
    });
    assert!(host.wait_ready(Duration::from_secs(20)), "the plugin connects");
    assert_eq!(connecting.join().unwrap(), PLUGBUS_OK);

    let read = Box::into_raw(Box::new(Read::default()));
    let cb = plugbus_callbacks {
        user: read.cast(),
        on_moves: None,
        on_event: Some(read_event),
        on_action_result: None,
    };
    // SAFETY: `read` lives until the end of the test; no callback runs while this reference
    // is used (only between polls).
    let seen = || unsafe { &(*read).events };

    // "Steve" joins, chats, types `/filterstats a b`, and leaves.
    let mut tick = host.begin_tick();
    tick.publish(&mut seed::join(UUID, PLAYER));
    let chat = tick.dispatch(&mut seed::chat(UUID, PLAYER, "hello there"));
    let command = tick.dispatch(&mut seed::command(UUID, PLAYER, "filterstats", &["a", "b"]));
    tick.publish(&mut seed::quit(UUID, PLAYER));
    tick.end();
    let deadline = Instant::now() + STALL;
    let mut outcomes = [None, None];
    while seen().len() < 4 || outcomes.iter().any(Option::is_none) {
        // SAFETY: live handle, valid callbacks.
        assert_eq!(unsafe { plugbus_poll(p, &cb, 1) }, PLUGBUS_OK);
        for (o, pending) in outcomes.iter_mut().zip([&chat, &command]) {
            if o.is_none() {
                *o = host.poll_outcome(pending);
            }
        }
        assert!(Instant::now() < deadline, "read so far: {:?}", seen());
    }
    for o in outcomes.into_iter().flatten() {
        assert_eq!(o.answered, ["conf"], "{o:?}");
    }

    let fields = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        seen(),
        &[
            // join: player_uuid, player_name
            (PLUGBUS_EVENT_PLAYER_JOIN, fields(&[UUID, PLAYER])),
            // chat: player_uuid, player_name, message
            (PLUGBUS_EVENT_CHAT, fields(&[UUID, PLAYER, "hello there"])),
            // command: player_uuid, player_name, command, raw, arg_count, the arguments
            (
                PLUGBUS_EVENT_COMMAND,
                fields(&[UUID, PLAYER, "filterstats", "/filterstats a b", "2", "a", "b"])
            ),
            // quit: player_uuid, player_name
            (PLUGBUS_EVENT_PLAYER_QUIT, fields(&[UUID, PLAYER])),
        ]
    );

    host.shutdown("test over");
    // SAFETY (the calls below): live handle until closed.
    unsafe {
        let deadline = Instant::now() + Duration::from_secs(10);
        while plugbus_poll(p, &cb, 10) == PLUGBUS_OK {
            assert!(Instant::now() < deadline, "the plugin never heard the shutdown");
        }
        assert_eq!(plugbus_close(p), PLUGBUS_OK);
        // SAFETY: made by Box::into_raw above; no callback can run any more.
        drop(Box::from_raw(read));
    }
}

// ------------------------------------------------------------------------------------------
// The examples
// ------------------------------------------------------------------------------------------

/// The path of Rust example `name`, built by `cargo test` beside this test binary.
fn rust_example(name: &str) -> PathBuf {
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

/// Compiles `ffi/examples/<name>.c` against the shared library, as `tests/ffi_c.rs` does.
fn c_example(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-c");
    std::fs::create_dir_all(&out_dir).expect("create the output dir");
    let exe = out_dir.join(name);
    let lib = lib_dir();
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(root.join("ffi"))
        .arg(root.join("ffi/examples").join(format!("{name}.c")))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lplugbus")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .expect("run gcc (is it installed?)");
    assert!(
        out.status.success(),
        "gcc failed on ffi/examples/{name}.c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Drives a chat_filter (Rust or C) with seed-style events.
fn chat_filter_reads_the_seed_fields(host: &mut Host, id: &str) {
    let hello = host.hello_of(id).expect("hello").clone();
    assert_eq!(
        hello.commands.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["filterstats"]
    );

    // A player NAMED "filterstats" typing `/probe`: answered (once its subscriptions are in),
    // but not with the stats: the filter matches on `command`, not on the player's name.
    let deadline = Instant::now() + STALL;
    while dispatch(host, seed::command(UUID, "filterstats", "probe", &[])).answered != [id] {
        assert!(Instant::now() < deadline, "{id} never subscribed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = chats_sent(host);
    assert!(
        sent.is_empty(),
        "a player named filterstats is not a /filterstats command: {sent:?}"
    );

    // A blocked chat: the sender is told, by UUID.
    let o = dispatch(host, seed::chat(UUID, PLAYER, "oh darn it"));
    assert_eq!(o.answered, [id]);
    assert!(o.cancelled, "{o:?}");
    let sent = chats_sent(host);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, UUID, "told by the player's UUID, not the name");
    assert!(sent[0].1.contains("blocked"), "{sent:?}");

    // "Steve" types /filterstats: answered with the stats, as a chat to his UUID.
    let o = dispatch(host, seed::command(UUID, PLAYER, "filterstats", &[]));
    assert_eq!(o.answered, [id]);
    assert!(!o.cancelled && o.mutation.is_none(), "{o:?}");
    assert_eq!(
        chats_sent(host),
        [(
            UUID.to_owned(),
            "chat filter: 1 blocked, 0 rewritten, 0 passed".to_owned()
        )]
    );

    // With arguments (`raw` "/filterstats now"): still its command.
    let o = dispatch(host, seed::command(UUID, PLAYER, "filterstats", &["now"]));
    assert_eq!(o.answered, [id]);
    assert_eq!(
        chats_sent(host),
        [(
            UUID.to_owned(),
            "chat filter: 1 blocked, 0 rewritten, 0 passed".to_owned()
        )]
    );
}

#[test]
fn rust_chat_filter_answers_a_seed_filterstats_command() {
    init_logging();
    let mut host = host_with(PluginConfig::launch("chat", rust_example("chat_filter")));
    chat_filter_reads_the_seed_fields(&mut host, "chat");
    host.shutdown("test over");
}

#[test]
fn c_chat_filter_answers_a_seed_filterstats_command() {
    init_logging();
    let plugin = PluginConfig::launch("cchat", c_example("chat_filter"))
        .env("LD_LIBRARY_PATH", lib_dir().to_str().expect("UTF-8 target path"));
    let mut host = host_with(plugin);
    chat_filter_reads_the_seed_fields(&mut host, "cchat");
    host.shutdown("test over");
}

// ------------------------------------------------------------------------------------------
// The test helpers
// ------------------------------------------------------------------------------------------

/// The payload of an envelope (the helpers leave the type to the host, which sets it).
fn payload(env: EventEnvelope) -> Payload {
    env.payload.expect("a payload")
}

#[test]
fn test_helpers_build_events_as_the_seed_does() {
    // tests/common's builders use the player name "player".
    let mut join = payload(seed::join("t1", "player"));
    if let Payload::PlayerJoin(j) = &mut join {
        j.world = None;
    }
    assert_eq!(payload(common::join("t1")), join);
    assert_eq!(payload(common::quit("t1")), payload(seed::quit("t1", "player")));
    assert_eq!(
        payload(common::chat("t1", "hi")),
        payload(seed::chat("t1", "player", "hi"))
    );
    assert_eq!(
        payload(common::command("t1", "spawn")),
        payload(seed::command("t1", "player", "spawn", &[]))
    );
}

#[test]
fn test_child_plugin_answers_its_command_by_command_not_name() {
    init_logging();
    let dir = Scratch::new("conformance-child");
    let report = dir.file("child.txt");
    let mut host = host_with(
        child_plugin("child", "handler", &report)
            .env(SUBSCRIBE, "COMMAND")
            .env(COMMAND, "filterstats"),
    );
    // `start` returned after the hello, and the subscriptions come before it.
    let o = dispatch(&mut host, seed::command(UUID, "filterstats", "probe", &[]));
    assert_eq!(o.answered, ["child"]);
    assert!(
        host.drain_actions().next().is_none(),
        "a player named filterstats is not the command"
    );
    let o = dispatch(&mut host, seed::command(UUID, PLAYER, "filterstats", &[]));
    assert_eq!(o.answered, ["child"]);
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 2, "a chat and a teleport: {actions:?}");
    match &actions[0].action.kind {
        Some(action::Kind::SendChat(c)) => assert_eq!((c.target_uuid.as_str(), c.message.as_str()), (UUID, "pong")),
        other => panic!("expected the pong chat, got {other:?}"),
    }
    host.shutdown("test over");
}
