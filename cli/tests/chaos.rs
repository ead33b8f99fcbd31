//! `plugbus loadtest --chaos`, `plugbus loadtest --floor` and `plugbus soak`, as a user runs
//! them: the `plugbus` binary, real plugin processes killed with real signals, real shared memory.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const PLUGBUS: &str = env!("CARGO_BIN_EXE_plugbus");

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn run(args: &[&str], json: &Path) -> (bool, String, Value) {
    let out = Command::new(PLUGBUS)
        .args(args)
        .arg("--json")
        .arg(json)
        .env("PLUGBUS_LOG", "error")
        .output()
        .expect("run plugbus");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read(json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (out.status.success(), text, report)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn chaos_kills_stops_and_restarts_plugins_and_no_survivor_loses_a_critical_event() {
    let dir = scratch("loadtest");
    let json = dir.join("chaos.json");
    let (ok, text, r) = run(
        &[
            "loadtest",
            "--chaos",
            "--seconds",
            "5",
            "--seed",
            "3",
            "--chaos-every",
            "300",
            "--players",
            "100",
        ],
        &json,
    );
    assert!(ok, "plugbus loadtest --chaos failed:\n{text}");
    let c = &r["chaos"];
    assert!(c.is_object(), "no chaos report:\n{text}");
    assert!(c["definition"].as_str().is_some_and(|d| d.contains("surviving")));
    // Each kind once per round of three: a run of several actions has every kind.
    let kinds = &c["actions_by_kind"];
    for kind in ["sigkill", "sigstop", "host_kill"] {
        assert!(u(&kinds[kind]) >= 1, "no {kind} action: {kinds}\n{text}");
    }
    let actions = c["actions"].as_array().expect("actions");
    assert_eq!(
        actions.len() as u64,
        ["sigkill", "sigstop", "host_kill"]
            .iter()
            .map(|k| u(&kinds[*k]))
            .sum::<u64>()
    );
    for a in actions {
        assert!(a["at_s"].as_f64().is_some_and(|t| (0.0..5.0).contains(&t)), "{a}");
        assert!(a["plugin"].as_str().is_some_and(|p| p.starts_with("load-")), "{a}");
        assert!(u(&a["pid"]) > 0, "{a}");
        let stopped = &a["stopped_ms"];
        assert_eq!(a["kind"] == "sigstop", stopped.is_u64(), "{a}");
        if let Some(ms) = stopped.as_u64() {
            // Kept below the heartbeat timeout (a little scheduling slack over its cap).
            assert!(ms < u(&c["heartbeat_timeout_ms"]), "{a}");
        }
    }
    let kills = u(&kinds["sigkill"]) + u(&kinds["host_kill"]);
    assert!(u(&c["restarts"]) >= kills, "{kills} kills, restarts {}", c["restarts"]);
    assert_eq!(u(&c["disabled"]), 0);
    assert_eq!(u(&c["unexplained_disconnects"]), 0, "{}", c["disconnects"]);
    assert_eq!(u(&c["critical_lost_by_survivors"]), 0, "{}", c["incarnations"]);
    // Every critical event a plugin missed is accounted for.
    assert_eq!(
        u(&r["critical_lost"]),
        u(&c["critical_lost_by_survivors"]) + u(&c["critical_lost_with_downed"]) + u(&c["critical_offered_while_down"])
    );
    // Each plugin's incarnations: one per kill at least, the last one alive at the end.
    let incs = c["incarnations"].as_object().expect("incarnations");
    assert_eq!(incs.len(), 2);
    let total: usize = incs.values().map(|v| v.as_array().expect("list").len()).sum();
    assert!(total as u64 > kills, "{total} incarnations for {kills} kills");
    for (id, list) in incs {
        let last = list.as_array().and_then(|l| l.last()).expect("an incarnation");
        assert_eq!(last["end"], "survived", "{id}: {list}");
    }
    assert!(u(&r["host_tick_ns"]["count"]) > 0);
    assert_eq!(u(&r["segments_left"]), 0, "segments left in /dev/shm");
    assert_eq!(u(&r["memfds_left"]), 0, "memfds left open");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn soak_samples_every_second_and_gates_on_its_limits() {
    let dir = scratch("soak");
    let json = dir.join("soak.json");
    let args = [
        "soak",
        "--seconds",
        "6",
        "--warmup",
        "2",
        "--players",
        "200",
        "--plugins",
        "2",
        "--max-growth=1000",
    ];
    let (ok, text, j) = run(&args, &json);
    assert!(ok, "plugbus soak failed:\n{text}");
    let (s, r) = (&j["soak"], &j["load"]);
    let samples = r["resource_samples"].as_array().expect("samples");
    assert!(samples.len() >= 5, "{} samples:\n{text}", samples.len());
    for x in samples {
        assert!(u(&x["rss_kib"]) > 0 && u(&x["fds"]) > 0, "{x}");
    }
    assert!(u(&s["rss_warmup_kib"]) > 0);
    assert!(u(&s["fds_max"]) >= u(&s["fds_min"]));
    // No growth (the soak's own gate); one fewer at the end is fine: the warm-up sample may
    // catch a descriptor that is open only for a moment (one CI run saw 14, then 13).
    assert!(u(&s["fds_end"]) <= u(&s["fds_warmup"]), "fds grew: {s}");
    assert_eq!(u(&r["critical_lost"]), 0);
    assert_eq!(s["failures"].as_array().map(Vec::len), Some(0));

    // A limit no run can meet (growth >= -100 %) fails the soak, with the reason.
    let json = dir.join("fail.json");
    let mut strict = args.to_vec();
    *strict.last_mut().expect("max growth") = "--max-growth=-100";
    let (ok, text, j) = run(&strict, &json);
    assert!(!ok, "the soak passed a limit it cannot meet:\n{text}");
    assert!(text.contains("soak failed: RSS grew"), "{text}");
    assert!(j["soak"]["failures"].as_array().is_some_and(|f| !f.is_empty()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loadtest_floor_measures_the_machine_and_a_run_without_kills_counts_losses_from_reports() {
    let dir = scratch("floor");
    let json = dir.join("floor.json");
    let args = [
        "loadtest",
        "--players",
        "50",
        "--tps",
        "50",
        "--plugins",
        "1",
        "--seconds",
        "2",
    ];
    let (ok, text, r) = run(&[&args[..], &["--floor"]].concat(), &json);
    assert!(ok, "{text}");
    assert!(text.contains("machine floor"), "{text}");
    // No kill: losses come from the plugin's report (no per-event log file is written).
    assert_eq!(u(&r["critical_lost"]), 0, "{text}");
    let offered: u64 = ["CHAT", "COMMAND", "PLAYER_JOIN", "PLAYER_QUIT"]
        .iter()
        .map(|t| r["events_offered_by_type"][t].as_u64().unwrap_or(0))
        .sum();
    assert!(offered > 0, "the run offered critical events: {text}");
    let f = &r["machine_floor"];
    // One copy per plugin of one move frame (48 bytes a player and a 64-byte header), into a
    // ring the size the load test gives each plugin (64 KiB at least).
    assert_eq!(u(&f["bytes_per_copy"]), 50 * 48 + 64, "{f}");
    assert_eq!(u(&f["copies"]), 1, "{f}");
    assert_eq!(u(&f["ring_bytes"]), 64 << 10, "{f}");
    // 5 s of ticks at 50 ticks/s; a tick the reader was late for is left out.
    for k in ["cold_copy_ns", "handoff_ns"] {
        let n = u(&f[k]["count"]);
        assert!((200..=250).contains(&n), "{k}: {n} samples: {f}");
        assert!(u(&f[k]["p50"]) > 0, "{k}: {f}");
    }
    assert_eq!(u(&f["warm_copy_ns"]["count"]), 250, "{f}");
    // Without --floor there is none.
    let json = dir.join("plain.json");
    let (ok, text, r) = run(&args, &json);
    assert!(ok, "{text}");
    assert!(r.get("machine_floor").is_none(), "{r}");
}
