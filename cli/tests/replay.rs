//! `plugbus replay` and `--record`, as a user runs them: the `plugbus` binary, real plugin
//! processes, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const PLUGBUS: &str = env!("CARGO_BIN_EXE_plugbus");

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("replay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The Rust example chat filter, built by `cargo test` beside this test binary.
fn chat_filter_example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let release = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let p = release.join("examples/chat_filter");
    assert!(p.exists(), "{} is missing: cargo test builds the examples", p.display());
    p
}

fn config_for(dir: &Path, command: &Path, args: &[&str]) -> PathBuf {
    config_over(dir, command, args, None)
}

/// A configuration running `command` as plugin `chat_filter`, over shared memory, or over gRPC
/// on a Unix socket in `dir` when `grpc` is set.
fn config_over(dir: &Path, command: &Path, args: &[&str], grpc: Option<&str>) -> PathBuf {
    let path = dir.join("plugins.toml");
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let (listen, transport) = match grpc {
        Some(sock) => (
            format!("listen = [\"unix://{}\"]\n", dir.join(sock).display()),
            "transport = \"grpc\"\n",
        ),
        None => (String::new(), ""),
    };
    std::fs::write(
        &path,
        format!(
            "[host]\nresponse_timeout_ms = 2000\nhello_timeout_ms = 30000\n{listen}\n[[plugin]]\nid = \"chat_filter\"\ncommand = {:?}\nargs = [{}]\nrequired = true\n{transport}",
            command.display().to_string(),
            args.join(", ")
        ),
    )
    .expect("write the config");
    path
}

fn replay(config: &Path, events: &Path, extra: &[&str]) -> Output {
    Command::new(PLUGBUS)
        .current_dir(root())
        .args(["replay", "--config"])
        .arg(config)
        .arg("--events")
        .arg(events)
        .args(["--tps", "50", "--settle-ms", "300"])
        .args(extra)
        .env("PLUGBUS_LOG", "warn")
        .output()
        .expect("run plugbus replay")
}

/// Parses every line of the output as JSON (each must be an object).
fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "plugbus replay failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "not an object: {l}");
            v
        })
        .collect()
}

fn outcome<'a>(lines: &'a [Value], event_id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["eventId"] == event_id)
        .unwrap_or_else(|| panic!("no outcome for {event_id} in {lines:#?}"))
}

fn chats_sent(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["action"]["sendChat"]["message"].as_str())
        .map(str::to_owned)
        .collect()
}

/// Drops the one timing field.
/// What a replay decided, without what depends on timing: the outcome lines without their
/// elapsed time, then the actions and then the logs, each in order but without the tick they
/// happened to be drained at (a plugin's action may land one drain later on a loaded machine).
fn decisions(lines: &[Value]) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let strip = |l: &Value, keys: &[&str]| {
        let mut l = l.clone();
        if let Some(o) = l.as_object_mut() {
            for k in keys {
                o.remove(*k);
            }
        }
        l
    };
    let outcomes = lines
        .iter()
        .filter(|l| l.get("eventId").is_some())
        .map(|l| strip(l, &["elapsedUs"]))
        .collect();
    let actions = lines
        .iter()
        .filter(|l| l.get("action").is_some())
        .map(|l| strip(l, &["tick"]))
        .collect();
    let logs = lines
        .iter()
        .filter(|l| l.get("log").is_some())
        .map(|l| strip(l, &["tick"]))
        .collect();
    (outcomes, actions, logs)
}

#[test]
fn the_example_chat_events_through_the_example_chat_filter() {
    let dir = scratch("example");
    let config = config_for(
        &dir,
        &chat_filter_example(),
        &["--banned", "darn", "--rewrite", "heck=h*ck"],
    );
    let events = root().join("examples/replay/chat.jsonl");
    let first = json_lines(&replay(&config, &events, &[]));

    assert_eq!(outcome(&first, "c1")["cancelled"], false);
    assert_eq!(
        outcome(&first, "c1")["result"],
        Value::Null,
        "\"hello\" passes unchanged"
    );
    assert_eq!(outcome(&first, "c2")["cancelled"], true, "\"darn\" is cancelled");
    assert_eq!(
        outcome(&first, "c3")["result"]["chat"]["message"],
        "what the h*ck was that",
        "\"heck\" is rewritten"
    );
    assert_eq!(outcome(&first, "c2")["answered"], serde_json::json!(["chat_filter"]));
    assert_eq!(
        chats_sent(&first),
        [
            "Your message was blocked by the chat filter.",
            "chat filter: 1 blocked, 1 rewritten, 1 passed"
        ],
        "the block notice, then /filterstats answered"
    );
    assert!(
        first
            .iter()
            .any(|l| l["log"]["message"] == "blocked a message from Steve" && l["plugin"] == "chat_filter"),
        "plugin logs come out too: {first:#?}"
    );

    // Twice: the same decisions.
    let second = json_lines(&replay(&config, &events, &[]));
    assert_eq!(decisions(&first), decisions(&second));
}

/// The same replay file against the example chat filter over shared memory and over gRPC: the
/// same decisions.
#[test]
fn the_same_decisions_over_shared_memory_and_grpc() {
    let events = root().join("examples/replay/chat.jsonl");
    let args = ["--banned", "darn", "--rewrite", "heck=h*ck"];
    let shm_dir = scratch("over-shm");
    let shm = json_lines(&replay(
        &config_for(&shm_dir, &chat_filter_example(), &args),
        &events,
        &[],
    ));
    let grpc_dir = scratch("over-grpc");
    let grpc = json_lines(&replay(
        &config_over(&grpc_dir, &chat_filter_example(), &args, Some("host.sock")),
        &events,
        &[],
    ));
    assert!(shm.len() >= 7, "{shm:#?}");
    assert_eq!(decisions(&shm), decisions(&grpc));
}

#[test]
fn a_malformed_line_stops_the_run_before_anything_is_applied() {
    let dir = scratch("malformed");
    let out_file = dir.join("out.jsonl");
    let config = config_for(&dir, &chat_filter_example(), &[]);
    let events = dir.join("bad.jsonl");
    std::fs::write(
        &events,
        concat!(
            "{\"tick\": 1, \"event\": {\"type\": \"CHAT\", \"expectsResponse\": true, \"chat\": {\"message\": \"hi\"}}}\n",
            "\n",
            "{\"tick\": 2, \"event\": {\"type\": \"CHAT\", \"chat\": {\"mesage\": \"typo\"}}}\n",
        ),
    )
    .unwrap();
    let out = replay(&config, &events, &["--out", out_file.to_str().unwrap()]);
    assert!(!out.status.success(), "a malformed line fails the run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("event.chat.mesage"),
        "the error names the line and the field: {err}"
    );
    // Checked before the host started: no plugin ran, nothing was written.
    assert!(!out_file.exists(), "no output file for a run that never started");
    assert!(!err.contains("launched plugin"), "{err}");

    std::fs::write(&events, "{\"tick\": 5, \"moves\": []}\n{\"tick\": 4, \"moves\": []}\n").unwrap();
    let out = replay(&config, &events, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 2") && err.contains("`tick`"),
        "ticks may not go back: {err}"
    );
}

/// A live session recorded with `plugbus demo --record` is the input of a replay.
#[test]
fn a_recorded_demo_replays() {
    let dir = scratch("record");
    let recorded = dir.join("session.jsonl");
    let demo = Command::new(PLUGBUS)
        .args(["demo", "--players", "100", "--tps", "20", "--seconds", "2", "--record"])
        .arg(&recorded)
        .env("PLUGBUS_LOG", "warn")
        .output()
        .expect("run the demo");
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let text = std::fs::read_to_string(&recorded).expect("the recording");
    let lines = plugbus::jsonl::parse_input(text.as_bytes()).expect("the recording parses as replay input");
    let moves = lines
        .iter()
        .filter(|l| matches!(l.item, plugbus::jsonl::InputItem::Moves(_)))
        .count();
    assert!(moves >= 30, "about one moves line per tick: {moves}");
    assert!(
        lines.iter().all(|l| l.tick.is_some()),
        "every recorded line has its tick"
    );
    let requests = lines
        .iter()
        .filter(|l| matches!(&l.item, plugbus::jsonl::InputItem::Event(e) if e.expects_response))
        .count();

    assert!(requests > 0, "the demo's chats and commands were recorded");

    let config = config_for(&dir, Path::new(PLUGBUS), &["plugin", "chat-filter"]);
    let out = json_lines(&replay(&config, &recorded, &[]));
    let outcomes = out.iter().filter(|l| l.get("eventId").is_some()).count();
    assert_eq!(
        outcomes, requests,
        "one outcome per recorded event that expects a response"
    );
    assert!(
        out.iter()
            .filter(|l| l.get("eventId").is_some())
            .all(|l| l["late"].as_array().is_some_and(Vec::is_empty)),
        "every one answered in time"
    );
}
