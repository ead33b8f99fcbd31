//! A peer that truncates a shared segment must not kill the process that maps it: the SIGBUS
//! guard swaps the mapping for zero pages, the segment reports itself broken, and the runtime
//! disconnects the peer with that reason.

use std::time::{Duration, Instant};

use plugbus::host::{Host, HostConfig, Notice, PluginConfig};
use plugbus::plugin::{Handler, Plugin};
use plugbus::proto::EventType;
use plugbus::ring::frame;
use plugbus::segment::{RingSpec, Segment, unique_name};

fn truncate(name: &str, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/dev/shm/{name}"))
        .expect("open the segment file");
    f.set_len(len).expect("truncate");
}

/// In one process: the creator keeps writing after the file was cut to one page. Without the
/// guard the first write past the end kills the test with SIGBUS.
#[test]
fn truncated_segment_reads_zeros_instead_of_crashing() {
    let name = unique_name("trunc");
    let seg = Segment::create(&name, "t", &[RingSpec::frames(1 << 16)]).unwrap();
    let mut tx = frame::Producer::attach(seg.frame_region(0).unwrap()).unwrap();
    tx.try_push(7, &[1; 100]).unwrap();
    assert!(!seg.is_broken());

    truncate(&name, 4096);
    // The ring's control block and data are past the first page: this faults.
    let r = tx.try_push(7, &[2; 100]);
    assert!(
        seg.is_broken(),
        "the guard did not notice the truncation (push gave {r:?})"
    );
    // The mapping now reads zeros: positions went back to 0, which the ring reports.
    let mut rx = frame::Consumer::attach(seg.frame_region(0).unwrap()).unwrap();
    let read = rx.try_read().map(|f| f.is_some());
    assert!(
        matches!(read, Ok(false) | Err(_)),
        "a zeroed ring must read as empty or broken, got {read:?}"
    );
    // Faults outside any segment are still faults: nothing else changed. Dropping unmaps.
    drop(tx);
    drop(rx);
    drop(seg);
}

struct Idle;
impl Handler for Idle {}

/// Child role: a plugin that attaches and then truncates its own segment.
#[test]
fn child_truncating_plugin() {
    let Ok(address) = std::env::var(plugbus::transport::ENV_ADDRESS) else {
        return;
    };
    let segment = address.trim_start_matches("shm:").to_owned();
    let plugin = Plugin::from_env()
        .unwrap()
        .subscribe([EventType::All])
        .connect()
        .unwrap();
    truncate(&segment, 0);
    // Keep the process (and the mapping) alive while the host notices.
    let _ = plugin.run(&mut Idle);
    std::process::exit(0);
}

/// Across processes: the host survives a plugin that truncates its segment, and disconnects it
/// saying so. Only a named segment (attach mode) can be truncated: a launched plugin's memfd is
/// sealed against it (tests/isolation.rs), so the plugin here is started by the test and
/// attaches by name.
#[test]
fn host_survives_a_plugin_that_truncates_its_segment() {
    let mut config = HostConfig::new(vec![PluginConfig::attached("truncator")]);
    config.host.hello_timeout_ms = 10_000;
    let mut host = Host::start(config).expect("host starts");
    let address = host.address_of("truncator").expect("configured").to_owned();
    let mut plugin = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_truncating_plugin", "--nocapture", "--test-threads=1"])
        .env(plugbus::transport::ENV_ADDRESS, &address)
        .env("PLUGBUS_PLUGIN_ID", "truncator")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the plugin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reason = None;
    let mut tick_no = 0u64;
    while reason.is_none() && Instant::now() < deadline {
        tick_no += 1;
        let mut tick = host.begin_tick();
        tick.publish_move(plugbus::fastpath::MoveRecord::new(
            [1; 16],
            [tick_no as f64, 0.0, 0.0],
            0.0,
            0.0,
        ));
        tick.end();
        for n in host.drain_notices() {
            if let Notice::Disconnected { reason: r, .. } = n {
                reason = Some(r);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = plugin.kill();
    let _ = plugin.wait();
    let reason = reason.expect("the host never disconnected the truncating plugin");
    assert!(
        reason.contains("truncated"),
        "reason does not name the truncation: {reason}"
    );
}
