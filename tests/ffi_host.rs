//! The host C API (`plugbus_host_*`): the C host example (`ffi/examples/host.c`) compiled with
//! gcc and run against the example plugins (real processes), once plainly and once under
//! valgrind's memcheck; and every function's argument checks called from Rust as C would call
//! them (NULL, lengths, UTF-8, stale and foreign handles, calls in the wrong state).

mod common;

use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

use plugbus::ffi::*;
use prost::Message as _;

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>
    let exe = std::env::current_exe().expect("path of the test binary");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

fn example(name: &str) -> PathBuf {
    let p = target_dir().join("examples").join(name);
    assert!(p.exists(), "{} is missing: cargo test builds the examples", p.display());
    p
}

fn compile_host() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-host");
    std::fs::create_dir_all(&out_dir).expect("output dir");
    let exe = out_dir.join("host");
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root.join("ffi"))
        .arg(root.join("ffi/examples/host.c"))
        .arg("-L")
        .arg(common::lib_dir())
        .arg("-lplugbus")
        .arg(format!("-Wl,-rpath,{}", common::lib_dir().display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc failed on ffi/examples/host.c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Checks the example's output: every decision, the actions, the moves, the end.
fn check_output(stdout: &str) {
    for line in [
        "notice chat_filter ready: chat_filter",
        "notice move_counter ready: move_counter",
        "chat hello everyone: passed",
        "chat oh darn, lava: cancelled",
        "action chat_filter send_chat 01000000-0000-4000-8000-000000000000 Your message was blocked by the chat filter.",
        "log chat_filter info: blocked a message from Steve",
        "chat what the heck was that: rewritten to what the h*ck was that",
        "command /filterstats: passed",
        "action chat_filter send_chat 01000000-0000-4000-8000-000000000000 chat filter: 1 blocked, 1 rewritten, 1 passed",
        "moves sent 600",
        "done",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "no line {line:?} in the output:\n{stdout}"
        );
    }
}

#[test]
fn the_c_host_example_runs_the_example_plugins() {
    let host = compile_host();
    let out = Command::new(&host)
        .arg(example("chat_filter"))
        .arg(example("move_counter"))
        .env("LD_LIBRARY_PATH", common::lib_dir())
        .env("PLUGBUS_LOG", "warn")
        .output()
        .expect("run the C host");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the C host failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    check_output(&stdout);
}

#[test]
fn the_c_host_example_under_valgrind_is_clean() {
    let host = compile_host();
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-host/valgrind.log");
    let out = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--error-exitcode=99",
            &format!("--log-file={}", log.display()),
        ])
        .arg(&host)
        .arg(example("chat_filter"))
        .arg(example("move_counter"))
        .env("LD_LIBRARY_PATH", common::lib_dir())
        .env("PLUGBUS_LOG", "warn")
        .output()
        .expect("run valgrind (apt-get install valgrind; .ci/run does)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "the C host under valgrind failed ({}):\n{stdout}\n{report}",
        out.status
    );
    check_output(&stdout);
    common::assert_memcheck_clean(&log);
}

// ------------------------------------------------------------------------------------------
// Argument checks, called as C calls them
// ------------------------------------------------------------------------------------------

fn last_error() -> String {
    // SAFETY: plugbus_last_error returns a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(plugbus_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A host with no plugins (starts at once).
fn empty_host() -> *mut plugbus_host {
    let toml = "[host]\nresponse_timeout_ms = 100\n";
    let mut h = null_mut();
    // SAFETY: valid pointers.
    let rc = unsafe { plugbus_host_start(toml.as_ptr().cast(), toml.len(), &mut h) };
    assert_eq!(rc, PLUGBUS_OK, "{}", last_error());
    assert!(!h.is_null());
    h
}

fn s(text: &str) -> (*const c_char, usize) {
    (text.as_ptr().cast(), text.len())
}

#[test]
fn bad_configurations_and_null_out_are_errors() {
    let mut h = null_mut();
    let bad = "[host]\nresponse_timeout_ms = \"soon\"\n";
    // SAFETY: valid pointers or deliberate NULLs the API must refuse.
    unsafe {
        assert_eq!(
            plugbus_host_start(bad.as_ptr().cast(), bad.len(), &mut h),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("response_timeout_ms"), "{}", last_error());
        assert!(h.is_null());
        let not_utf8 = [0xffu8, 0xfe];
        assert_eq!(
            plugbus_host_start(not_utf8.as_ptr().cast(), 2, &mut h),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(plugbus_host_start(null(), 5, &mut h), PLUGBUS_ERR_NULL_POINTER);
        let ok = "[host]\n";
        assert_eq!(
            plugbus_host_start(ok.as_ptr().cast(), ok.len(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER
        );
        assert_eq!(
            plugbus_host_start(ok.as_ptr().cast(), usize::MAX, &mut h),
            PLUGBUS_ERR_INVALID_ARGUMENT,
            "a garbage length is refused before the pointer is read"
        );
        assert_eq!(
            plugbus_host_start_file(c"/nonexistent/plugins.toml".as_ptr(), &mut h),
            PLUGBUS_ERR_NOT_FOUND
        );
        assert!(last_error().contains("/nonexistent/plugins.toml"), "{}", last_error());
        // A plugin that cannot be launched: the host does not start, and says why.
        let missing = "[[plugin]]\nid = \"x\"\ncommand = \"/nonexistent/plugin\"\nrequired = true\n";
        assert_eq!(
            plugbus_host_start(missing.as_ptr().cast(), missing.len(), &mut h),
            PLUGBUS_ERR_NOT_FOUND
        );
        assert!(last_error().contains("/nonexistent/plugin"), "{}", last_error());
    }
}

#[test]
fn calls_in_the_wrong_state_and_bad_arguments_are_errors() {
    let h = empty_host();
    let (uuid, uuid_len) = s("7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01");
    let (name, name_len) = s("Steve");
    let mut pending = 0u64;
    let mut o = plugbus_outcome::default();
    // SAFETY: valid pointers or deliberate bad ones the API must refuse.
    unsafe {
        // Outside a tick.
        assert_eq!(plugbus_host_publish_moves(h, null(), 0), PLUGBUS_ERR_BAD_STATE);
        assert_eq!(plugbus_host_end_tick(h), PLUGBUS_ERR_BAD_STATE);
        assert!(last_error().contains("no tick in progress"), "{}", last_error());
        assert_eq!(
            plugbus_host_dispatch_chat(h, uuid, uuid_len, name, name_len, name, name_len, &mut pending),
            PLUGBUS_ERR_BAD_STATE
        );

        let mut tick = 0;
        assert_eq!(plugbus_host_begin_tick(h, &mut tick), PLUGBUS_OK);
        assert_eq!(tick, 1);
        assert_eq!(plugbus_host_begin_tick(h, null_mut()), PLUGBUS_ERR_BAD_STATE);
        assert_eq!(plugbus_host_publish_moves(h, null(), 3), PLUGBUS_ERR_NULL_POINTER);
        assert_eq!(
            plugbus_host_publish_moves(h, null(), usize::MAX),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        let moves = [plugbus_move_record::default(); 2];
        assert_eq!(plugbus_host_publish_moves(h, moves.as_ptr(), 2), PLUGBUS_OK);
        // Strings: not UTF-8, NULL with a length, garbage lengths.
        let bad = [0xc3u8, 0x28];
        assert_eq!(
            plugbus_host_publish_join(h, uuid, uuid_len, bad.as_ptr().cast(), 2),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("name is not UTF-8"), "{}", last_error());
        assert_eq!(
            plugbus_host_publish_quit(h, null(), 4, name, name_len),
            PLUGBUS_ERR_NULL_POINTER
        );
        assert_eq!(
            plugbus_host_publish_quit(h, uuid, usize::MAX, name, name_len),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            plugbus_host_dispatch_chat(h, uuid, uuid_len, name, name_len, name, name_len, null_mut()),
            PLUGBUS_ERR_NULL_POINTER
        );
        // Envelopes: bytes that do not decode, and an envelope without an event.
        let junk = [0xffu8; 7];
        assert_eq!(
            plugbus_host_publish_event(h, junk.as_ptr(), junk.len()),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        let empty = plugbus::proto::EventEnvelope::default().encode_to_vec();
        assert_eq!(
            plugbus_host_dispatch_event(h, empty.as_ptr(), empty.len(), &mut pending),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("no event"), "{}", last_error());
        // A dispatch with no subscriber completes at once, unchanged.
        assert_eq!(
            plugbus_host_dispatch_command(h, uuid, uuid_len, name, name_len, name, name_len, &mut pending),
            PLUGBUS_OK
        );
        assert_eq!(plugbus_host_end_tick(h), PLUGBUS_OK);
        assert_eq!(plugbus_host_poll_outcome(h, pending, &mut o), PLUGBUS_OK);
        assert_eq!(
            (o.event_id, o.cancelled, o.changed, o.answered, o.late),
            (pending, false, false, 0, 0)
        );
        // Taken once: again is an error, not a hang.
        assert_eq!(
            plugbus_host_wait(h, pending, 1_000, &mut o),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            plugbus_host_poll_outcome(h, 999_999, &mut o),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            plugbus_host_wait(h, pending, u64::MAX, &mut o),
            PLUGBUS_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            plugbus_host_wait(h, pending, 1_000, null_mut()),
            PLUGBUS_ERR_NULL_POINTER
        );
        let mut msg = plugbus_str::default();
        assert_eq!(plugbus_host_outcome_chat(h, &mut msg), PLUGBUS_NONE);
        let (mut data, mut len) = (null(), 1usize);
        assert_eq!(plugbus_host_outcome_result(h, &mut data, &mut len), PLUGBUS_OK);
        assert_eq!(len, 0);
        // Nothing to take; typed action views without a current action.
        let mut a = plugbus_action::default();
        assert_eq!(plugbus_host_next_action(h, &mut a), PLUGBUS_NONE);
        assert_eq!(
            plugbus_host_action_kick(h, null_mut(), null_mut()),
            PLUGBUS_ERR_BAD_STATE
        );
        assert_eq!(
            plugbus_host_next_log(h, null_mut(), null_mut(), null_mut()),
            PLUGBUS_NONE
        );
        assert_eq!(plugbus_host_next_notice(h, null_mut(), null_mut()), PLUGBUS_NONE);
        // Plugins that do not exist.
        let (id, id_len) = s("nobody");
        let result = plugbus::proto::ActionResult::default().encode_to_vec();
        assert_eq!(
            plugbus_host_send_action_result(h, id, id_len, result.as_ptr(), result.len()),
            PLUGBUS_ERR_NOT_FOUND
        );
        let mut pid = 0u32;
        assert_eq!(plugbus_host_plugin_pid(h, id, id_len, &mut pid), PLUGBUS_ERR_NOT_FOUND);
        assert_eq!(plugbus_host_plugin_ready(h, id, id_len), PLUGBUS_ERR_NOT_FOUND);
        // Metrics: Prometheus text.
        let mut text = plugbus_str::default();
        assert_eq!(plugbus_host_metrics(h, &mut text), PLUGBUS_OK);
        assert!(text.as_str().contains("plugbus_host_total"), "{}", text.as_str());

        assert_eq!(plugbus_host_shutdown(h, null(), 0), PLUGBUS_OK);
        // A shut-down handle is recognized, never reused.
        assert_eq!(plugbus_host_begin_tick(h, null_mut()), PLUGBUS_ERR_CLOSED);
        assert!(last_error().contains("already shut down"), "{}", last_error());
        assert_eq!(plugbus_host_shutdown(h, null(), 0), PLUGBUS_ERR_CLOSED);
        assert_eq!(plugbus_host_shutdown(null_mut(), null(), 0), PLUGBUS_OK);
    }
}

#[test]
fn foreign_and_made_up_pointers_are_not_taken_for_a_host() {
    // A plugin handle (configured, not connected) passed as a host.
    let mut p = null_mut();
    // SAFETY: valid NUL-terminated strings and out-pointer.
    assert_eq!(
        unsafe { plugbus_open(c"plugbus.none".as_ptr(), c"id".as_ptr(), &mut p) },
        PLUGBUS_OK
    );
    let mut local = 0u64;
    // SAFETY: deliberately wrong pointers: the API checks them against its registry first.
    unsafe {
        assert_eq!(plugbus_host_begin_tick(p.cast(), null_mut()), PLUGBUS_ERR_CLOSED);
        assert!(last_error().contains("not a plugbus host handle"), "{}", last_error());
        assert_eq!(
            plugbus_host_end_tick((&raw mut local).cast()),
            PLUGBUS_ERR_CLOSED,
            "a pointer to some other memory"
        );
        assert_eq!(
            plugbus_host_begin_tick(null_mut(), null_mut()),
            PLUGBUS_ERR_NULL_POINTER
        );
        // And a host handle passed as a plugin.
        let h = empty_host();
        assert_eq!(plugbus_connect(h.cast()), PLUGBUS_ERR_CLOSED);
        assert_eq!(plugbus_host_shutdown(h, null(), 0), PLUGBUS_OK);
        assert_eq!(plugbus_close(p), PLUGBUS_OK);
    }
}

/// One thread drives a host: while one thread waits on it (for a plugin held stopped), a call
/// from another thread is refused with `PLUGBUS_ERR_BAD_STATE`, not run beside it.
#[test]
fn a_second_thread_on_the_same_host_is_refused_not_raced() {
    let toml = format!(
        "[host]\nresponse_timeout_ms = 60000\nhello_timeout_ms = 30000\n[[plugin]]\nid = \"chat\"\ncommand = {:?}\nrequired = true\n",
        example("chat_filter").display().to_string()
    );
    let mut h = null_mut();
    let (uuid, uuid_len) = s("7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01");
    let (id, id_len) = s("chat");
    let mut pid = 0u32;
    let mut pending = 0u64;
    // SAFETY: valid pointers throughout; the handle is live until the shutdown at the end.
    unsafe {
        assert_eq!(
            plugbus_host_start(toml.as_ptr().cast(), toml.len(), &mut h),
            PLUGBUS_OK,
            "{}",
            last_error()
        );
        assert_eq!(plugbus_host_plugin_pid(h, id, id_len, &mut pid), PLUGBUS_OK);
        // The plugin is held stopped: the dispatch below waits for it.
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(plugbus_host_begin_tick(h, null_mut()), PLUGBUS_OK);
        assert_eq!(
            plugbus_host_dispatch_chat(h, uuid, uuid_len, uuid, 5, uuid, 5, &mut pending),
            PLUGBUS_OK
        );
        assert_eq!(plugbus_host_end_tick(h), PLUGBUS_OK);
    }
    let addr = h as usize;
    let waiter = std::thread::spawn(move || {
        let mut o = plugbus_outcome::default();
        // SAFETY: a live handle, a writable outcome.
        let rc = unsafe { plugbus_host_wait(addr as *mut plugbus_host, pending, 1_500_000, &mut o) };
        (rc, o, last_error())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut text = plugbus_str::default();
    // SAFETY: a live handle (in use by the waiter).
    let rc = unsafe { plugbus_host_metrics(h, &mut text) };
    assert_eq!(rc, PLUGBUS_ERR_BAD_STATE);
    assert!(last_error().contains("another thread"), "{}", last_error());
    let (rc, o, message) = waiter.join().unwrap();
    assert_eq!(rc, PLUGBUS_ERR_TIMEOUT, "the stopped plugin did not answer in time");
    assert!(message.contains("chat did not answer event"), "{message}");
    assert_eq!((o.answered, o.late), (0, 1));
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // SAFETY: a live handle, now free.
    unsafe {
        assert_eq!(plugbus_host_metrics(h, &mut text), PLUGBUS_OK);
        assert_eq!(plugbus_host_shutdown(h, null(), 0), PLUGBUS_OK);
    }
}
