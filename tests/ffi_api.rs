//! The C API called from Rust, as a C plugin would call it: every error path (NULL pointers,
//! bad lengths, bad arguments, calls in the wrong state, closed handles) returns its status and
//! sets `plugbus_last_error`; and the whole API against an in-process host (an attached plugin
//! driven on the test's thread): moves in place, event accessors, reply helpers, sends from
//! inside and outside callbacks, raw messages, re-entrancy, shutdown.

use std::ffi::{CStr, c_char, c_void};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use plugbus::fastpath::MoveRecord;
use plugbus::ffi::*;
use plugbus::host::{Host, HostConfig, Outcome, PluginConfig};
use plugbus::proto::{
    self, ChatEvent, ChatMutation, CommandEvent, EventEnvelope, PlayerJoinEvent, PlayerQuitEvent, PluginToHost, action,
    event_envelope::Payload, event_result, plugin_to_host,
};
use prost::Message as _;

fn last_error() -> String {
    // SAFETY: plugbus_last_error returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(plugbus_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `status` is `expected` and, for an error, that the last error mentions `needle`.
#[track_caller]
fn expect(status: plugbus_status, expected: plugbus_status, needle: &str) {
    // SAFETY: plugbus_status_name returns a static NUL-terminated string.
    let name = |s| {
        unsafe { CStr::from_ptr(plugbus_status_name(s)) }
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(name(status), name(expected), "last error: {}", last_error());
    if expected < 0 {
        let e = last_error();
        assert!(e.contains(needle), "last error {e:?} should mention {needle:?}");
    }
}

fn open(segment: &CStr, id: &CStr) -> *mut plugbus_plugin {
    let mut p = null_mut();
    // SAFETY: valid C strings and out pointer.
    expect(
        unsafe { plugbus_open(segment.as_ptr(), id.as_ptr(), &mut p) },
        PLUGBUS_OK,
        "",
    );
    assert!(!p.is_null());
    p
}

// ------------------------------------------------------------------------------------------
// Without a host
// ------------------------------------------------------------------------------------------

#[test]
fn null_pointers_are_errors() {
    let mut p = null_mut();
    // SAFETY (all calls in this test): every pointer is NULL or valid.
    unsafe {
        expect(plugbus_open_env(null_mut()), PLUGBUS_ERR_NULL_POINTER, "out is NULL");
        expect(
            plugbus_open(null(), c"id".as_ptr(), &mut p),
            PLUGBUS_ERR_NULL_POINTER,
            "address",
        );
        assert!(p.is_null(), "out is NULL after a failed open");
        expect(
            plugbus_open(c"seg".as_ptr(), null(), &mut p),
            PLUGBUS_ERR_NULL_POINTER,
            "plugin_id",
        );
        expect(
            plugbus_open(c"seg".as_ptr(), c"id".as_ptr(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "out",
        );

        expect(
            plugbus_hello(null_mut(), c"n".as_ptr(), c"v".as_ptr()),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_register_command(null_mut(), c"c".as_ptr(), null()),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_subscribe(null_mut(), null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_set_wait(null_mut(), PLUGBUS_WAIT_PARK),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_set_hello_timeout(null_mut(), 10),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(plugbus_connect(null_mut()), PLUGBUS_ERR_NULL_POINTER, "handle");
        expect(
            plugbus_host_boot_id(null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        let cb = plugbus_callbacks {
            user: null_mut(),
            on_moves: None,
            on_event: None,
            on_action_result: None,
        };
        expect(plugbus_poll(null_mut(), &cb, 0), PLUGBUS_ERR_NULL_POINTER, "handle");
        expect(
            plugbus_shutdown_reason(null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_send_chat(null_mut(), null(), 0, null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_log(null_mut(), c"info".as_ptr(), null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );
        expect(
            plugbus_send_raw(null_mut(), null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "handle",
        );

        let mut s = plugbus_str::default();
        let mut t = 0i32;
        let mut b = false;
        let mut data = null();
        let mut len = 0usize;
        expect(plugbus_event_id(null_mut(), &mut s), PLUGBUS_ERR_NULL_POINTER, "event");
        expect(
            plugbus_event_type(null_mut(), &mut t),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_expects_response(null_mut(), &mut b),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_bytes(null_mut(), &mut data, &mut len),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_chat(null_mut(), null_mut(), null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_command(null_mut(), null_mut(), null_mut(), null_mut(), null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_command_arg(null_mut(), 0, &mut s),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_join(null_mut(), null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(
            plugbus_event_quit(null_mut(), null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );
        expect(plugbus_reply_ack(null_mut()), PLUGBUS_ERR_NULL_POINTER, "event");
        expect(plugbus_reply_cancel(null_mut()), PLUGBUS_ERR_NULL_POINTER, "event");
        expect(
            plugbus_reply_set_chat_message(null_mut(), null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "event",
        );

        // Pointer arguments of a live handle.
        let p = open(c"plugbus.nowhere", c"nulls");
        expect(
            plugbus_hello(p, null(), c"v".as_ptr()),
            PLUGBUS_ERR_NULL_POINTER,
            "name",
        );
        expect(
            plugbus_hello(p, c"n".as_ptr(), null()),
            PLUGBUS_ERR_NULL_POINTER,
            "version",
        );
        expect(
            plugbus_register_command(p, null(), null()),
            PLUGBUS_ERR_NULL_POINTER,
            "name",
        );
        expect(plugbus_subscribe(p, null(), 2), PLUGBUS_ERR_NULL_POINTER, "types");
        expect(plugbus_poll(p, null(), 0), PLUGBUS_ERR_NULL_POINTER, "callbacks");
        expect(plugbus_log(p, null(), null(), 0), PLUGBUS_ERR_NULL_POINTER, "level");
        expect(plugbus_host_boot_id(p, null_mut()), PLUGBUS_ERR_NULL_POINTER, "out");
        expect(
            plugbus_shutdown_reason(p, null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "reason",
        );
        // A description may be NULL.
        expect(plugbus_register_command(p, c"cmd".as_ptr(), null()), PLUGBUS_OK, "");
        expect(plugbus_close(p), PLUGBUS_OK, "");
    }
}

#[test]
fn bad_arguments_and_lengths_are_errors() {
    let p = open(c"plugbus.nowhere", c"args");
    // SAFETY (all calls): pointers are valid for the lengths the functions accept; the lengths
    // they must reject are paired with dangling pointers that are never read.
    unsafe {
        let dangling = std::ptr::NonNull::<i32>::dangling().as_ptr();
        expect(
            plugbus_subscribe(p, dangling, 1025),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "exceeds 1024",
        );
        expect(
            plugbus_subscribe(p, dangling, usize::MAX),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "exceeds 1024",
        );
        let types = [PLUGBUS_EVENT_CHAT, 9999];
        expect(
            plugbus_subscribe(p, types.as_ptr(), 2),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "unknown event type 9999",
        );
        let types = [0];
        expect(
            plugbus_subscribe(p, types.as_ptr(), 1),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "unknown event type 0",
        );
        let types = [PLUGBUS_EVENT_CHAT, PLUGBUS_EVENT_COMMAND];
        expect(plugbus_subscribe(p, types.as_ptr(), 2), PLUGBUS_OK, "");
        expect(plugbus_subscribe(p, null(), 0), PLUGBUS_OK, "");
        expect(
            plugbus_set_wait(p, 7),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "unknown wait strategy 7",
        );
        for w in [
            PLUGBUS_WAIT_SPIN,
            PLUGBUS_WAIT_SPIN_THEN_PARK,
            PLUGBUS_WAIT_PARK,
            PLUGBUS_WAIT_PACED,
        ] {
            expect(plugbus_set_wait(p, w), PLUGBUS_OK, "");
        }
        expect(plugbus_set_hello_timeout(p, 0), PLUGBUS_ERR_INVALID_ARGUMENT, "outside");
        expect(
            plugbus_set_hello_timeout(p, 3_600_001),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "outside",
        );
        let not_utf8 = [0xffu8, 0xfe, 0];
        expect(
            plugbus_hello(p, not_utf8.as_ptr().cast::<c_char>(), c"1".as_ptr()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "not UTF-8",
        );
        expect(
            plugbus_register_command(p, c"".as_ptr(), null()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "empty",
        );
        expect(
            plugbus_register_command(p, c"two words".as_ptr(), null()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "whitespace",
        );
        expect(
            plugbus_log(p, c"loud".as_ptr(), null(), 0),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "unknown log level",
        );

        let mut out = null_mut();
        expect(
            plugbus_open(c"".as_ptr(), c"id".as_ptr(), &mut out),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "empty",
        );
        assert!(out.is_null());
        expect(plugbus_close(p), PLUGBUS_OK, "");
    }
}

#[test]
fn calls_in_the_wrong_state_are_errors() {
    let p = open(c"plugbus.ffi-api-no-such-segment", c"state");
    // SAFETY (all calls): valid pointers; the dangling ones go with lengths that are refused
    // before any read.
    unsafe {
        let cb = plugbus_callbacks {
            user: null_mut(),
            on_moves: None,
            on_event: None,
            on_action_result: None,
        };
        expect(plugbus_poll(p, &cb, 0), PLUGBUS_ERR_BAD_STATE, "plugbus_connect first");
        let mut s = plugbus_str::default();
        expect(
            plugbus_shutdown_reason(p, &mut s),
            PLUGBUS_ERR_BAD_STATE,
            "not connected",
        );
        expect(plugbus_host_boot_id(p, &mut s), PLUGBUS_ERR_BAD_STATE, "not connected");
        expect(
            plugbus_send_chat(p, null(), 0, c"hi".as_ptr(), 2),
            PLUGBUS_ERR_BAD_STATE,
            "not connected",
        );
        expect(plugbus_send_raw(p, null(), 0), PLUGBUS_ERR_BAD_STATE, "not connected");
        expect(
            plugbus_log(p, c"info".as_ptr(), c"x".as_ptr(), 1),
            PLUGBUS_ERR_BAD_STATE,
            "not connected",
        );

        // No such segment: NOT_FOUND, and the handle stays configurable.
        expect(plugbus_connect(p), PLUGBUS_ERR_NOT_FOUND, "no segment named");
        expect(plugbus_hello(p, c"n".as_ptr(), c"1".as_ptr()), PLUGBUS_OK, "");
        expect(plugbus_connect(p), PLUGBUS_ERR_NOT_FOUND, "no segment named");
        expect(plugbus_close(p), PLUGBUS_OK, "");

        // Not started by a host: no environment.
        if std::env::var_os("PLUGBUS_ADDRESS").is_none() && std::env::var_os("PLUGBUS_SEGMENT").is_none() {
            let mut out = null_mut();
            expect(
                plugbus_open_env(&mut out),
                PLUGBUS_ERR_NOT_FOUND,
                "PLUGBUS_ADDRESS is not set",
            );
            assert!(out.is_null());
        }
    }
}

#[test]
fn closed_handles_are_errors_and_close_accepts_null() {
    // SAFETY (all calls): the handle pointer is either live or was closed (never dereferenced
    // then: the registry refuses it first).
    unsafe {
        expect(plugbus_close(null_mut()), PLUGBUS_OK, "");
        let p = open(c"plugbus.nowhere", c"closed");
        expect(plugbus_close(p), PLUGBUS_OK, "");
        expect(plugbus_close(p), PLUGBUS_ERR_CLOSED, "already closed");
        expect(
            plugbus_hello(p, c"n".as_ptr(), c"1".as_ptr()),
            PLUGBUS_ERR_CLOSED,
            "already closed",
        );
        expect(plugbus_connect(p), PLUGBUS_ERR_CLOSED, "already closed");
        let cb = plugbus_callbacks {
            user: null_mut(),
            on_moves: None,
            on_event: None,
            on_action_result: None,
        };
        expect(plugbus_poll(p, &cb, 0), PLUGBUS_ERR_CLOSED, "already closed");
        expect(
            plugbus_send_chat(p, null(), 0, null(), 0),
            PLUGBUS_ERR_CLOSED,
            "already closed",
        );
        // A pointer that was never a handle.
        let mut not_a_handle = [0u64; 16];
        let fake = not_a_handle.as_mut_ptr().cast::<plugbus_plugin>();
        expect(
            plugbus_set_wait(fake, PLUGBUS_WAIT_PARK),
            PLUGBUS_ERR_CLOSED,
            "never returned by plugbus_open",
        );
        let fake_event = not_a_handle.as_mut_ptr().cast::<plugbus_event>();
        expect(
            plugbus_reply_cancel(fake_event),
            PLUGBUS_ERR_CLOSED,
            "not a plugbus event",
        );
    }
}

#[test]
fn status_names_and_last_error() {
    // SAFETY: plugbus_status_name returns static NUL-terminated strings.
    let name = |s| {
        unsafe { CStr::from_ptr(plugbus_status_name(s)) }
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(name(PLUGBUS_OK), "PLUGBUS_OK");
    assert_eq!(name(PLUGBUS_SHUTDOWN), "PLUGBUS_SHUTDOWN");
    assert_eq!(name(PLUGBUS_ERR_HOST_DIED), "PLUGBUS_ERR_HOST_DIED");
    assert_eq!(name(PLUGBUS_ERR_INTERNAL), "PLUGBUS_ERR_INTERNAL");
    assert_eq!(name(12345), "PLUGBUS_UNKNOWN");
    let codes = [
        PLUGBUS_ERR_NULL_POINTER,
        PLUGBUS_ERR_INVALID_ARGUMENT,
        PLUGBUS_ERR_BAD_STATE,
        PLUGBUS_ERR_CLOSED,
        PLUGBUS_ERR_NOT_FOUND,
        PLUGBUS_ERR_REFUSED,
        PLUGBUS_ERR_TIMEOUT,
        PLUGBUS_ERR_HOST_DIED,
        PLUGBUS_ERR_LINK,
        PLUGBUS_ERR_PROTOCOL,
        PLUGBUS_ERR_HOST_NOT_READING,
        PLUGBUS_ERR_IO,
        PLUGBUS_ERR_INTERNAL,
    ];
    for c in codes {
        assert!(c < 0 && name(c).starts_with("PLUGBUS_ERR_"), "{c}");
    }

    // The message is per thread and survives successful calls.
    // SAFETY: a NULL handle is refused.
    expect(
        unsafe { plugbus_connect(null_mut()) },
        PLUGBUS_ERR_NULL_POINTER,
        "handle is NULL",
    );
    assert_eq!(name(PLUGBUS_OK), "PLUGBUS_OK");
    assert!(last_error().contains("handle is NULL"));
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "", "another thread has its own (empty) last error");
}

// ------------------------------------------------------------------------------------------
// Against a host
// ------------------------------------------------------------------------------------------

/// What the callbacks saw and did.
struct Recorder {
    plugin: *mut plugbus_plugin,
    moves: Vec<(u64, Vec<plugbus_move_record>)>,
    /// (type, id, expects_response, summary of the fields read through the accessors).
    events: Vec<(i32, String, bool, String)>,
    /// Statuses of calls made from inside callbacks that must fail, with their names.
    inside: Vec<(&'static str, plugbus_status)>,
    /// The last event pointer, kept past its callback (to check it is refused then).
    saved: *mut plugbus_event,
    action_results: Vec<proto::ActionResult>,
}

fn text(s: plugbus_str) -> String {
    // SAFETY: filled by plugbus during the current callback.
    unsafe { s.as_str() }.to_owned()
}

unsafe extern "C" fn on_moves(
    user: *mut c_void,
    tick: u64,
    _flags: u32,
    records: *const plugbus_move_record,
    count: usize,
) {
    // SAFETY: `user` is the Recorder the test passed; the records are valid for the call.
    let (r, records) = unsafe {
        (
            &mut *user.cast::<Recorder>(),
            std::slice::from_raw_parts(records, count),
        )
    };
    r.moves.push((tick, records.to_vec()));
}

unsafe extern "C" fn on_event(user: *mut c_void, ev: *mut plugbus_event) {
    // SAFETY: `user` is the Recorder the test passed.
    let r = unsafe { &mut *user.cast::<Recorder>() };
    r.saved = ev;
    // SAFETY (the rest): `ev` is valid during this callback; out pointers are valid locals.
    unsafe {
        let (mut ty, mut id, mut expects) = (0, plugbus_str::default(), false);
        assert_eq!(plugbus_event_type(ev, &mut ty), PLUGBUS_OK);
        assert_eq!(plugbus_event_id(ev, &mut id), PLUGBUS_OK);
        assert_eq!(plugbus_event_expects_response(ev, &mut expects), PLUGBUS_OK);
        let (mut data, mut len) = (null(), 0usize);
        assert_eq!(plugbus_event_bytes(ev, &mut data, &mut len), PLUGBUS_OK);
        let env = EventEnvelope::decode(std::slice::from_raw_parts(data, len)).expect("the bytes are an EventEnvelope");
        assert_eq!(env.event_id, text(id));
        assert_eq!(env.payload.as_ref().map(|p| p.event_type() as i32), Some(ty));

        let (mut a, mut b, mut c) = (plugbus_str::default(), plugbus_str::default(), plugbus_str::default());
        let fields = match ty {
            PLUGBUS_EVENT_CHAT => {
                assert_eq!(plugbus_event_chat(ev, &mut a, &mut b, &mut c), PLUGBUS_OK);
                let message = text(c);
                if message.contains("cancel") {
                    assert_eq!(plugbus_reply_set_chat_message(ev, c"x".as_ptr(), 1), PLUGBUS_OK);
                    assert_eq!(plugbus_reply_cancel(ev), PLUGBUS_OK, "the last reply wins");
                } else if message.contains("rewrite") {
                    let new = "rewritten by C";
                    assert_eq!(
                        plugbus_reply_set_chat_message(ev, new.as_ptr().cast(), new.len()),
                        PLUGBUS_OK
                    );
                    let answer = "noted";
                    let status = plugbus_send_chat(r.plugin, a.ptr, a.len, answer.as_ptr().cast(), answer.len());
                    assert_eq!(status, PLUGBUS_OK, "{}", last_error());
                } else {
                    assert_eq!(plugbus_reply_ack(ev), PLUGBUS_OK);
                }
                // Only chat has a chat accessor; the others refuse it.
                r.inside.push((
                    "command accessor on a chat",
                    plugbus_event_command(ev, null_mut(), null_mut(), null_mut(), null_mut(), null_mut()),
                ));
                format!("{} {} {}", text(a), text(b), message)
            }
            PLUGBUS_EVENT_COMMAND => {
                let (mut n, mut raw) = (0usize, plugbus_str::default());
                assert_eq!(
                    plugbus_event_command(ev, &mut a, &mut b, &mut c, &mut raw, &mut n),
                    PLUGBUS_OK
                );
                let mut args = Vec::new();
                for i in 0..n {
                    let mut arg = plugbus_str::default();
                    assert_eq!(plugbus_event_command_arg(ev, i, &mut arg), PLUGBUS_OK);
                    args.push(text(arg));
                }
                let mut arg = plugbus_str::default();
                r.inside
                    .push(("command arg out of range", plugbus_event_command_arg(ev, n, &mut arg)));
                r.inside.push((
                    "set_chat_message on a command",
                    plugbus_reply_set_chat_message(ev, c"x".as_ptr(), 1),
                ));
                // Calls that need the handle itself are refused inside a callback.
                let cb = plugbus_callbacks {
                    user: null_mut(),
                    on_moves: None,
                    on_event: None,
                    on_action_result: None,
                };
                r.inside
                    .push(("poll inside a callback", plugbus_poll(r.plugin, &cb, 0)));
                r.inside.push(("close inside a callback", plugbus_close(r.plugin)));
                r.inside.push((
                    "hello inside a callback",
                    plugbus_hello(r.plugin, c"n".as_ptr(), c"1".as_ptr()),
                ));
                r.inside.push(("connect inside a callback", plugbus_connect(r.plugin)));
                // A raw action with a correlation id: its result comes back to on_action_result.
                let msg = PluginToHost {
                    plugin_id: String::new(),
                    payload: Some(plugin_to_host::Payload::Actions(proto::ActionBatch {
                        actions: vec![proto::Action {
                            correlation_id: Some("q1".into()),
                            kind: Some(action::Kind::Kick(proto::KickAction {
                                player_uuid: text(a),
                                reason: "asked".into(),
                            })),
                        }],
                    })),
                }
                .encode_to_vec();
                assert_eq!(
                    plugbus_send_raw(r.plugin, msg.as_ptr(), msg.len()),
                    PLUGBUS_OK,
                    "{}",
                    last_error()
                );
                // uuid, player name, command, raw line, arguments.
                format!("{} {} {} {} {}", text(a), text(b), text(c), text(raw), args.join(","))
            }
            PLUGBUS_EVENT_PLAYER_JOIN => {
                assert_eq!(plugbus_event_join(ev, &mut a, &mut b), PLUGBUS_OK);
                r.inside.push((
                    "quit accessor on a join",
                    plugbus_event_quit(ev, null_mut(), null_mut()),
                ));
                format!("{} {}", text(a), text(b))
            }
            PLUGBUS_EVENT_PLAYER_QUIT => {
                assert_eq!(plugbus_event_quit(ev, &mut a, null_mut()), PLUGBUS_OK);
                r.inside.push((
                    "join accessor on a quit",
                    plugbus_event_join(ev, null_mut(), null_mut()),
                ));
                r.inside.push((
                    "chat accessor on a quit",
                    plugbus_event_chat(ev, null_mut(), null_mut(), null_mut()),
                ));
                text(a)
            }
            _ => String::new(),
        };
        r.events.push((ty, text(id), expects, fields));
    }
}

unsafe extern "C" fn on_action_result(user: *mut c_void, data: *const u8, len: usize) {
    // SAFETY: `user` is the Recorder; the bytes are valid for the call.
    let (r, bytes) = unsafe { (&mut *user.cast::<Recorder>(), std::slice::from_raw_parts(data, len)) };
    r.action_results
        .push(proto::ActionResult::decode(bytes).expect("an ActionResult"));
}

/// A raw pointer moved to the thread that connects (the handle is used by one thread at a time).
struct SendPtr(*mut plugbus_plugin);
// SAFETY: the handle is used by exactly one thread at a time, as the C API requires.
unsafe impl Send for SendPtr {}

/// Polls the plugin and the host alternately until `pending`'s outcome is in.
fn settle(host: &mut Host, p: *mut plugbus_plugin, cb: &plugbus_callbacks, pending: plugbus::host::Pending) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // SAFETY: live handle, valid callbacks.
        let rc = unsafe { plugbus_poll(p, cb, 1) };
        assert_eq!(rc, PLUGBUS_OK, "{}", last_error());
        if let Some(o) = host.poll_outcome(&pending) {
            return o;
        }
        assert!(Instant::now() < deadline, "no outcome");
    }
}

/// Polls the plugin and the host until `done`.
fn pump(host: &mut Host, p: *mut plugbus_plugin, cb: &plugbus_callbacks, mut done: impl FnMut(&mut Host) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // SAFETY: live handle, valid callbacks.
        let rc = unsafe { plugbus_poll(p, cb, 1) };
        assert_eq!(rc, PLUGBUS_OK, "{}", last_error());
        host.poll();
        if done(host) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out");
    }
}

#[test]
fn the_whole_api_against_an_in_process_host() {
    let mut config = HostConfig::new(vec![PluginConfig::attached("capi")]);
    config.host.response_timeout_ms = 30_000;
    config.host.shutdown_grace_ms = 100;
    let mut host = Host::start(config).expect("host starts");
    let segment = std::ffi::CString::new(host.address_of("capi").expect("segment").trim_start_matches("shm:")).unwrap();
    let p = open(&segment, c"capi");

    // Configure and connect (on another thread: connect waits for the host's hello, which the
    // host sends from its poll on this thread).
    // SAFETY (the calls below): live handle, valid C strings and arrays.
    unsafe {
        expect(
            plugbus_hello(p, c"capi-test".as_ptr(), c"9.9.9".as_ptr()),
            PLUGBUS_OK,
            "",
        );
        expect(
            plugbus_register_command(p, c"stats".as_ptr(), c"Shows stats".as_ptr()),
            PLUGBUS_OK,
            "",
        );
        let types = [
            PLUGBUS_EVENT_PLAYER_MOVE,
            PLUGBUS_EVENT_CHAT,
            PLUGBUS_EVENT_COMMAND,
            PLUGBUS_EVENT_PLAYER_JOIN,
            PLUGBUS_EVENT_PLAYER_QUIT,
        ];
        expect(plugbus_subscribe(p, types.as_ptr(), types.len()), PLUGBUS_OK, "");
        expect(plugbus_set_wait(p, PLUGBUS_WAIT_PARK), PLUGBUS_OK, "");
        expect(plugbus_set_hello_timeout(p, 20_000), PLUGBUS_OK, "");
    }
    let handle = SendPtr(p);
    let connecting = std::thread::spawn(move || {
        let h = handle;
        // SAFETY: live handle, used only by this thread until it is joined.
        let rc = unsafe { plugbus_connect(h.0) };
        (rc, last_error())
    });
    assert!(host.wait_ready(Duration::from_secs(20)), "the plugin connects");
    let (rc, err) = connecting.join().unwrap();
    assert_eq!(rc, PLUGBUS_OK, "{err}");
    let hello = host.hello_of("capi").unwrap();
    assert_eq!((hello.name.as_str(), hello.version.as_str()), ("capi-test", "9.9.9"));
    assert_eq!(
        hello.commands.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["stats"]
    );

    // SAFETY (the calls below): live handle and valid pointers.
    unsafe {
        let mut boot = plugbus_str::default();
        expect(plugbus_host_boot_id(p, &mut boot), PLUGBUS_OK, "");
        assert_eq!(boot.as_str(), host.boot_id());
        // Configuration is over once connected (the wait strategy may still change).
        expect(
            plugbus_hello(p, c"n".as_ptr(), c"1".as_ptr()),
            PLUGBUS_ERR_BAD_STATE,
            "already connected",
        );
        expect(
            plugbus_register_command(p, c"x".as_ptr(), null()),
            PLUGBUS_ERR_BAD_STATE,
            "already connected",
        );
        expect(
            plugbus_set_hello_timeout(p, 100),
            PLUGBUS_ERR_BAD_STATE,
            "already connected",
        );
        expect(plugbus_connect(p), PLUGBUS_ERR_BAD_STATE, "already connected");
        expect(plugbus_set_wait(p, PLUGBUS_WAIT_SPIN_THEN_PARK), PLUGBUS_OK, "");
        let mut s = plugbus_str::default();
        expect(
            plugbus_shutdown_reason(p, &mut s),
            PLUGBUS_ERR_BAD_STATE,
            "has not shut down",
        );
    }

    // The callbacks write the recorder through `user`; the test reads it only between polls,
    // through short-lived references (`rec()`).
    let rp = Box::into_raw(Box::new(Recorder {
        plugin: p,
        moves: Vec::new(),
        events: Vec::new(),
        inside: Vec::new(),
        saved: null_mut(),
        action_results: Vec::new(),
    }));
    // SAFETY: `rp` is valid until the end of the test; no callback runs while a reference made
    // here is alive (each is used within one expression, between polls).
    let rec = || unsafe { &*rp };
    let cb = plugbus_callbacks {
        user: rp.cast(),
        on_moves: Some(on_moves),
        on_event: Some(on_event),
        on_action_result: Some(on_action_result),
    };

    // Idle: a poll with a timeout returns OK after waiting.
    let t = Instant::now();
    // SAFETY: live handle, valid callbacks.
    expect(unsafe { plugbus_poll(p, &cb, 30) }, PLUGBUS_OK, "");
    assert!(t.elapsed() >= Duration::from_millis(25), "waited {:?}", t.elapsed());

    // Moves, in place, with the exact bytes published.
    let records: Vec<MoveRecord> = (0..3u8)
        .map(|i| {
            MoveRecord::new(
                [i + 1; 16],
                [f64::from(i), 64.5, -f64::from(i)],
                90.0 + f32::from(i),
                -5.0,
            )
        })
        .collect();
    let mut tick = host.begin_tick();
    let tick_no = tick.number();
    tick.publish_moves(&records);
    let mut join = EventEnvelope {
        payload: Some(Payload::PlayerJoin(PlayerJoinEvent {
            player_uuid: "u-join".into(),
            name: "Joiner".into(),
            world: None,
        })),
        ..Default::default()
    };
    tick.publish(&mut join);
    tick.end();
    pump(&mut host, p, &cb, |_| rec_done(rec(), 1));
    assert_eq!(rec().moves.len(), 1);
    assert_eq!(rec().moves[0].0, tick_no);
    let expected: Vec<plugbus_move_record> = records.iter().map(|&m| m.into()).collect();
    assert_eq!(rec().moves[0].1, expected);
    assert_eq!(rec().events[0].0, PLUGBUS_EVENT_PLAYER_JOIN);
    assert!(!rec().events[0].2, "a published join does not expect a response");
    assert_eq!(rec().events[0].3, "u-join Joiner");

    // A chat the plugin cancels (after first setting a message: the last reply wins).
    let chat = |player: &str, message: &str| EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: player.into(),
            name: format!("{player}-name"),
            message: message.into(),
        })),
        ..Default::default()
    };
    let pending = host.dispatch(&mut chat("u1", "please cancel this"));
    let o = settle(&mut host, p, &cb, pending);
    assert!(o.cancelled && o.mutation.is_none(), "{o:?}");
    let last = rec().events.last().unwrap();
    assert_eq!((last.0, last.2), (PLUGBUS_EVENT_CHAT, true));
    assert_eq!(last.1, pending.event_id().to_string());
    assert_eq!(last.3, "u1 u1-name please cancel this");

    // A chat the plugin rewrites, sending a chat from inside the callback.
    let pending = host.dispatch(&mut chat("u2", "please rewrite this"));
    let o = settle(&mut host, p, &cb, pending);
    assert!(!o.cancelled);
    assert_eq!(
        o.mutation,
        Some(event_result::Update::Chat(ChatMutation {
            message: Some("rewritten by C".into())
        }))
    );
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
    match &actions[0].action.kind {
        Some(action::Kind::SendChat(c)) => assert_eq!((c.target_uuid.as_str(), c.message.as_str()), ("u2", "noted")),
        other => panic!("{other:?}"),
    }
    // A plain chat: acked.
    let pending = host.dispatch(&mut chat("u3", "hello"));
    let o = settle(&mut host, p, &cb, pending);
    assert!(!o.cancelled && o.mutation.is_none() && o.answered == ["capi"], "{o:?}");

    // The saved event pointer is refused after its callback.
    // SAFETY: the pointer stays valid memory while the handle lives; it is refused, not used.
    unsafe {
        expect(
            plugbus_reply_cancel(rec().saved),
            PLUGBUS_ERR_BAD_STATE,
            "only during its on_event callback",
        );
        let mut s = plugbus_str::default();
        expect(
            plugbus_event_id(rec().saved, &mut s),
            PLUGBUS_ERR_BAD_STATE,
            "only during",
        );
        expect(
            plugbus_reply_set_chat_message(rec().saved, c"x".as_ptr(), 1),
            PLUGBUS_ERR_BAD_STATE,
            "only during",
        );
    }

    // A command with arguments; the callback also tries the calls refused inside a callback and
    // sends a raw action with a correlation id.
    let mut cmd = EventEnvelope {
        payload: Some(Payload::Command(CommandEvent {
            player_uuid: "u4".into(),
            name: "Alex".into(),
            raw: "/stats a b".into(),
            command: "stats".into(),
            args: vec!["a".into(), "b".into()],
        })),
        ..Default::default()
    };
    let pending = host.dispatch(&mut cmd);
    let o = settle(&mut host, p, &cb, pending);
    assert_eq!(o.answered, ["capi"]);
    assert_eq!(rec().events.last().unwrap().3, "u4 Alex stats /stats a b a,b");
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].action.correlation_id.as_deref(), Some("q1"));
    assert!(matches!(&actions[0].action.kind, Some(action::Kind::Kick(k)) if k.player_uuid == "u4"));
    assert!(host.send_action_result(
        "capi",
        proto::ActionResult {
            correlation_id: "q1".into(),
            ..Default::default()
        }
    ));
    pump(&mut host, p, &cb, |_| true);
    assert_eq!(rec().action_results.len(), 1);
    assert_eq!(rec().action_results[0].correlation_id, "q1");

    // A quit, and the statuses of everything refused inside callbacks.
    let mut quit = EventEnvelope {
        payload: Some(Payload::PlayerQuit(PlayerQuitEvent {
            player_uuid: "u-quit".into(),
            name: "Quitter".into(),
        })),
        ..Default::default()
    };
    let n = rec().events.len();
    host.publish(&mut quit);
    host.begin_tick().end();
    pump(&mut host, p, &cb, |_| rec_done(rec(), n + 1));
    assert_eq!(rec().events.last().unwrap().3, "u-quit");
    let inside: Vec<(&str, &str)> = rec()
        .inside
        .iter()
        // SAFETY: static NUL-terminated strings.
        .map(|(what, s)| {
            (
                *what,
                unsafe { CStr::from_ptr(plugbus_status_name(*s)) }.to_str().unwrap(),
            )
        })
        .collect();
    let want = [
        ("quit accessor on a join", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("command accessor on a chat", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("command accessor on a chat", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("command accessor on a chat", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("command arg out of range", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("set_chat_message on a command", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("poll inside a callback", "PLUGBUS_ERR_BAD_STATE"),
        ("close inside a callback", "PLUGBUS_ERR_BAD_STATE"),
        ("hello inside a callback", "PLUGBUS_ERR_BAD_STATE"),
        ("connect inside a callback", "PLUGBUS_ERR_BAD_STATE"),
        ("join accessor on a quit", "PLUGBUS_ERR_INVALID_ARGUMENT"),
        ("chat accessor on a quit", "PLUGBUS_ERR_INVALID_ARGUMENT"),
    ];
    assert_eq!(inside, want);

    // Sends outside callbacks go out at once; bad ones are refused and nothing is sent.
    // SAFETY (the calls below): live handle; dangling pointers only with refused lengths.
    unsafe {
        let msg = "to everyone";
        expect(
            plugbus_send_chat(p, null(), 0, msg.as_ptr().cast(), msg.len()),
            PLUGBUS_OK,
            "",
        );
        expect(
            plugbus_log(p, c"info".as_ptr(), c"from the C API test".as_ptr(), 19),
            PLUGBUS_OK,
            "",
        );
        let bad = [0xffu8, 0xfe];
        expect(
            plugbus_send_chat(p, null(), 0, bad.as_ptr().cast(), bad.len()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "not UTF-8",
        );
        expect(
            plugbus_send_chat(p, null(), 5, null(), 0),
            PLUGBUS_ERR_NULL_POINTER,
            "target_uuid",
        );
        let dangling = std::ptr::NonNull::<u8>::dangling().as_ptr();
        expect(
            plugbus_send_chat(p, null(), 0, dangling.cast(), usize::MAX),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "exceeds the limit",
        );
        let big = vec![b'a'; 1 << 20];
        expect(
            plugbus_send_chat(p, null(), 0, big.as_ptr().cast(), big.len()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "exceeds the limit",
        );
        expect(
            plugbus_send_raw(p, dangling, usize::MAX),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "exceeds the limit",
        );
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f];
        expect(
            plugbus_send_raw(p, garbage.as_ptr(), garbage.len()),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "not a df.plugin PluginToHost",
        );
        expect(
            plugbus_send_raw(p, null(), 0),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "no payload",
        );
        let kick = PluginToHost {
            plugin_id: "someone-else".into(),
            payload: Some(plugin_to_host::Payload::Actions(proto::ActionBatch {
                actions: vec![proto::Action {
                    correlation_id: None,
                    kind: Some(action::Kind::Kick(proto::KickAction {
                        player_uuid: "u9".into(),
                        reason: "raw".into(),
                    })),
                }],
            })),
        }
        .encode_to_vec();
        expect(plugbus_send_raw(p, kick.as_ptr(), kick.len()), PLUGBUS_OK, "");
    }
    pump(&mut host, p, &cb, |h| h.metrics().host.actions >= 4);
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(actions.iter().all(|a| a.plugin == "capi"), "sent as this plugin");
    assert!(
        matches!(&actions[0].action.kind, Some(action::Kind::SendChat(c)) if c.target_uuid.is_empty() && c.message == "to everyone")
    );
    assert!(matches!(&actions[1].action.kind, Some(action::Kind::Kick(k)) if k.player_uuid == "u9"));
    assert!(
        host.is_ready("capi"),
        "the host still talks to the plugin after the refused sends"
    );

    // Subscriptions change after connect: chat only.
    // SAFETY: live handle, valid array.
    unsafe {
        let types = [PLUGBUS_EVENT_CHAT];
        expect(plugbus_subscribe(p, types.as_ptr(), 1), PLUGBUS_OK, "");
    }
    host.poll();
    let n = rec().events.len();
    host.publish(&mut quit);
    let pending = host.dispatch(&mut chat("u5", "after resubscribing"));
    host.begin_tick().end();
    let o = settle(&mut host, p, &cb, pending);
    assert_eq!(o.answered, ["capi"]);
    assert_eq!(rec().events.len(), n + 1, "the quit is no longer delivered");
    assert_eq!(rec().events[n].0, PLUGBUS_EVENT_CHAT);

    // Shutdown: PLUGBUS_SHUTDOWN with the reason, again on later polls; sends are refused.
    host.shutdown("test over");
    // SAFETY (the calls below): live handle until closed; then only refused.
    unsafe {
        let deadline = Instant::now() + Duration::from_secs(10);
        let rc = loop {
            let rc = plugbus_poll(p, &cb, 10);
            if rc != PLUGBUS_OK || Instant::now() > deadline {
                break rc;
            }
        };
        expect(rc, PLUGBUS_SHUTDOWN, "");
        let mut reason = plugbus_str::default();
        expect(plugbus_shutdown_reason(p, &mut reason), PLUGBUS_OK, "");
        assert_eq!(reason.as_str(), "test over");
        expect(plugbus_poll(p, &cb, 10), PLUGBUS_SHUTDOWN, "");
        expect(
            plugbus_send_chat(p, null(), 0, c"x".as_ptr(), 1),
            PLUGBUS_ERR_BAD_STATE,
            "shut down",
        );
        expect(plugbus_close(p), PLUGBUS_OK, "");
        expect(plugbus_close(p), PLUGBUS_ERR_CLOSED, "");
        expect(plugbus_reply_ack(rec().saved), PLUGBUS_ERR_CLOSED, "handle was closed");
    }
    // SAFETY: made by Box::into_raw above; no callback can run any more.
    drop(unsafe { Box::from_raw(rp) });
}

fn rec_done(rec: &Recorder, events: usize) -> bool {
    rec.events.len() >= events && !rec.moves.is_empty()
}

/// Set in the environment of this test binary when it runs as the host of `host_death_*`.
const HOST_CHILD: &str = "PLUGBUS_FFI_API_HOST_CHILD";

/// The host role of this binary: does nothing unless started by `host_death_is_reported`.
/// Starts a host with one attached plugin, writes its segment name to the file named by
/// `HOST_CHILD`, and ticks until killed (or for a minute).
#[test]
fn host_child_role() {
    let Some(report) = std::env::var_os(HOST_CHILD) else {
        return;
    };
    let mut host = Host::start(HostConfig::new(vec![PluginConfig::attached("orphan")])).expect("host starts");
    let name = host
        .address_of("orphan")
        .expect("segment")
        .trim_start_matches("shm:")
        .to_owned();
    let tmp = std::path::PathBuf::from(&report).with_extension("tmp");
    std::fs::write(&tmp, name).expect("write the segment name");
    std::fs::rename(&tmp, &report).expect("publish the segment name");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        host.begin_tick().end();
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn host_death_is_reported_by_poll() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-api");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report = dir.join(format!("host-child-{}", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "host_child_role", "--nocapture", "--test-threads=1"])
        .env(HOST_CHILD, &report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the host child");
    let deadline = Instant::now() + Duration::from_secs(30);
    let segment = loop {
        if let Ok(s) = std::fs::read_to_string(&report) {
            break s;
        }
        assert!(Instant::now() < deadline, "the host child never published its segment");
        std::thread::sleep(Duration::from_millis(5));
    };
    let p = open(&std::ffi::CString::new(segment.clone()).unwrap(), c"orphan");
    let cb = plugbus_callbacks {
        user: null_mut(),
        on_moves: None,
        on_event: None,
        on_action_result: None,
    };
    // SAFETY (the calls below): live handle, valid callbacks and strings.
    unsafe {
        expect(plugbus_connect(p), PLUGBUS_OK, "");
        expect(plugbus_poll(p, &cb, 10), PLUGBUS_OK, "");
        child.kill().expect("kill the host");
        child.wait().expect("reap the host");
        let deadline = Instant::now() + Duration::from_secs(10);
        let rc = loop {
            let rc = plugbus_poll(p, &cb, 50);
            if rc != PLUGBUS_OK || Instant::now() > deadline {
                break rc;
            }
        };
        expect(rc, PLUGBUS_ERR_HOST_DIED, "died");
        // The connection is over: later calls say so again.
        expect(plugbus_poll(p, &cb, 0), PLUGBUS_ERR_HOST_DIED, "died");
        expect(
            plugbus_send_chat(p, null(), 0, c"x".as_ptr(), 1),
            PLUGBUS_ERR_HOST_DIED,
            "died",
        );
        expect(plugbus_close(p), PLUGBUS_OK, "");
    }
    let _ = plugbus::segment::Segment::unlink(&segment);
    let _ = std::fs::remove_file(&report);
}

// ------------------------------------------------------------------------------------------
// Typed handles: wrong kinds, stale handles, made-up pointers
// ------------------------------------------------------------------------------------------

/// What `kinds_on_event` saw: (what, status, last error) of each call made with a wrong handle.
struct Kinds {
    plugin: *mut plugbus_plugin,
    host: *mut plugbus_host,
    event: *mut plugbus_event,
    calls: Vec<(&'static str, plugbus_status, String)>,
}

unsafe extern "C" fn kinds_on_event(user: *mut c_void, ev: *mut plugbus_event) {
    // SAFETY: `user` is the `Kinds` the test passed, not otherwise borrowed during the poll.
    let k = unsafe { &mut *user.cast::<Kinds>() };
    k.event = ev;
    let mut record = |what, rc| k.calls.push((what, rc, last_error()));
    let mut ty = 0;
    let mut s = plugbus_str::default();
    // SAFETY: deliberately wrong handles (never read through); valid out pointers.
    unsafe {
        record(
            "event as plugin: send_chat",
            plugbus_send_chat(ev.cast(), null(), 0, c"x".as_ptr(), 1),
        );
        record("event as plugin: subscribe", plugbus_subscribe(ev.cast(), null(), 0));
        record("event as plugin: close", plugbus_close(ev.cast()));
        record("event as host: end_tick", plugbus_host_end_tick(ev.cast()));
        record("plugin as event: type", plugbus_event_type(k.plugin.cast(), &mut ty));
        record("plugin as event: cancel", plugbus_reply_cancel(k.plugin.cast()));
        record("host as event: id", plugbus_event_id(k.host.cast(), &mut s));
        record("host as plugin: send_raw", plugbus_send_raw(k.host.cast(), null(), 0));
        // Another thread may not use the handle while this one is inside plugbus_poll.
        let p = SendPtr(k.plugin);
        let (rc, err) = std::thread::spawn(move || {
            let p = p;
            (plugbus_set_wait(p.0, PLUGBUS_WAIT_PARK), last_error())
        })
        .join()
        .unwrap();
        k.calls.push(("another thread: set_wait", rc, err));
        // The real event still works, and is the one answered.
        assert_eq!(plugbus_event_type(ev, &mut ty), PLUGBUS_OK, "{}", last_error());
        assert_eq!(ty, PLUGBUS_EVENT_CHAT);
        assert_eq!(plugbus_reply_cancel(ev), PLUGBUS_OK, "{}", last_error());
    }
}

#[test]
fn handles_of_another_kind_stale_or_made_up_are_refused() {
    let mut config = HostConfig::new(vec![PluginConfig::attached("kinds")]);
    config.host.response_timeout_ms = 30_000;
    config.host.shutdown_grace_ms = 100;
    let mut host = Host::start(config).expect("host starts");
    let segment =
        std::ffi::CString::new(host.address_of("kinds").expect("segment").trim_start_matches("shm:")).unwrap();
    let p = open(&segment, c"kinds");
    let toml = "[host]\nresponse_timeout_ms = 100\n";
    let mut h = null_mut();
    // SAFETY (the calls below): valid pointers, or deliberately wrong handles (never read through).
    unsafe {
        expect(
            plugbus_host_start(toml.as_ptr().cast(), toml.len(), &mut h),
            PLUGBUS_OK,
            "",
        );
        let types = [PLUGBUS_EVENT_CHAT];
        expect(plugbus_subscribe(p, types.as_ptr(), 1), PLUGBUS_OK, "");
        // Before any event: a host as a plugin and the reverse; made-up pointers; NULL.
        expect(
            plugbus_connect(h.cast()),
            PLUGBUS_ERR_CLOSED,
            "not a plugbus plugin handle: this is a plugbus host handle",
        );
        expect(
            plugbus_host_begin_tick(p.cast(), null_mut()),
            PLUGBUS_ERR_CLOSED,
            "not a plugbus host handle: this is a plugbus plugin handle",
        );
        let mut memory = [0u64; 8];
        let made_up: [usize; 4] = [memory.as_mut_ptr() as usize, 0x1234, usize::MAX, 0x5001_ffff_ffff_fff0];
        for m in made_up {
            let what = format!("{m:#x}");
            let rc = plugbus_set_wait(std::ptr::without_provenance_mut(m), PLUGBUS_WAIT_PARK);
            assert_eq!(rc, PLUGBUS_ERR_CLOSED, "{what}: {}", last_error());
            assert!(last_error().contains("plugin handle"), "{what}: {}", last_error());
            let rc = plugbus_reply_ack(std::ptr::without_provenance_mut(m));
            assert_eq!(rc, PLUGBUS_ERR_CLOSED, "{what}: {}", last_error());
            assert!(last_error().contains("event handle"), "{what}: {}", last_error());
            let rc = plugbus_host_end_tick(std::ptr::without_provenance_mut(m));
            assert_eq!(rc, PLUGBUS_ERR_CLOSED, "{what}: {}", last_error());
            assert!(last_error().contains("host handle"), "{what}: {}", last_error());
        }
        assert_eq!(memory, [0; 8], "nothing written through a made-up pointer");
        expect(
            plugbus_reply_ack(null_mut()),
            PLUGBUS_ERR_NULL_POINTER,
            "event handle is NULL",
        );
    }

    let handle = SendPtr(p);
    let connecting = std::thread::spawn(move || {
        let h = handle;
        // SAFETY: live handle, used only by this thread until it is joined.
        (unsafe { plugbus_connect(h.0) }, last_error())
    });
    assert!(host.wait_ready(Duration::from_secs(20)), "the plugin connects");
    let (rc, err) = connecting.join().unwrap();
    assert_eq!(rc, PLUGBUS_OK, "{err}");

    let mut kinds = Kinds {
        plugin: p,
        host: h,
        event: null_mut(),
        calls: Vec::new(),
    };
    let cb = plugbus_callbacks {
        user: (&raw mut kinds).cast(),
        on_moves: None,
        on_event: Some(kinds_on_event),
        on_action_result: None,
    };
    let mut probe = EventEnvelope {
        expects_response: true,
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: "u1".into(),
            name: "n".into(),
            message: "probe".into(),
        })),
        ..Default::default()
    };
    let pending = host.dispatch(&mut probe);
    host.begin_tick().end();
    let o = settle(&mut host, p, &cb, pending);
    assert!(o.cancelled, "the callback ran its checks and cancelled: {o:?}");
    let want = [
        ("event as plugin: send_chat", "this is a plugbus event handle"),
        ("event as plugin: subscribe", "this is a plugbus event handle"),
        ("event as plugin: close", "this is a plugbus event handle"),
        (
            "event as host: end_tick",
            "not a plugbus host handle: this is a plugbus event handle",
        ),
        (
            "plugin as event: type",
            "not a plugbus event handle: this is a plugbus plugin handle",
        ),
        ("plugin as event: cancel", "this is a plugbus plugin handle"),
        ("host as event: id", "this is a plugbus host handle"),
        ("host as plugin: send_raw", "this is a plugbus host handle"),
    ];
    assert_eq!(kinds.calls.len(), want.len() + 1, "{:?}", kinds.calls);
    for ((what, rc, err), (want_what, needle)) in kinds.calls.iter().zip(want) {
        assert_eq!(*what, want_what);
        assert_eq!(*rc, PLUGBUS_ERR_CLOSED, "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err:?} should mention {needle:?}");
    }
    let (what, rc, err) = &kinds.calls[want.len()];
    assert_eq!(*rc, PLUGBUS_ERR_BAD_STATE, "{what}: {err}");
    assert!(err.contains("another thread is using this plugin handle"), "{err}");

    let ev = kinds.event;
    let mut ty = 0;
    // SAFETY (the calls below): handles that are live, past their use, or closed (never read
    // through); valid out pointers.
    unsafe {
        // Past its callback, the event is refused; once the host shut down, the host is stale.
        expect(
            plugbus_event_type(ev, &mut ty),
            PLUGBUS_ERR_BAD_STATE,
            "only during its on_event",
        );
        expect(plugbus_host_shutdown(h, null(), 0), PLUGBUS_OK, "");
        expect(
            plugbus_host_begin_tick(h, null_mut()),
            PLUGBUS_ERR_CLOSED,
            "stale host handle",
        );
        expect(
            plugbus_host_shutdown(h, null(), 0),
            PLUGBUS_ERR_CLOSED,
            "stale host handle",
        );
        // Closed: the plugin handle and its event are stale, also once newer handles reuse the
        // slot; the newer handle works.
        expect(plugbus_close(p), PLUGBUS_OK, "");
        let newer = open(c"plugbus.nowhere", c"newer");
        expect(
            plugbus_set_wait(p, PLUGBUS_WAIT_PARK),
            PLUGBUS_ERR_CLOSED,
            "stale plugin handle",
        );
        expect(plugbus_close(p), PLUGBUS_ERR_CLOSED, "stale plugin handle");
        expect(
            plugbus_event_type(ev, &mut ty),
            PLUGBUS_ERR_CLOSED,
            "stale event handle",
        );
        expect(plugbus_reply_ack(ev), PLUGBUS_ERR_CLOSED, "stale event handle");
        expect(plugbus_set_wait(newer, PLUGBUS_WAIT_PARK), PLUGBUS_OK, "");
        expect(plugbus_close(newer), PLUGBUS_OK, "");
    }
    host.shutdown("test over");
}
