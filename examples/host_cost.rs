//! What the Go package's benchmarks measure, from Rust, for the cgo overhead to be read off:
//! `cargo build --release --examples && ./target/release/examples/host_cost [ITERATIONS]`.
//!
//! Starts a host with one example plugin at a time (`move_counter`, then `chat_filter --wait
//! spin`, both built beside this example) and times, per iteration, back to back:
//! - `publish_moves_100`: begin a tick, publish 100 move records, end the tick (as
//!   `BenchmarkPublishMoves100` in go/);
//! - `dispatch_chat_wait`: begin a tick, dispatch a chat, end the tick, wait for the outcome (as
//!   `BenchmarkDispatchChatWait`).
//!
//! Prints the mean and the median of each, in nanoseconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plugbus::fastpath::MoveRecord;
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::proto::{ChatEvent, EventEnvelope, EventType, event_envelope::Payload};

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of this example");
    exe.with_file_name(name)
}

fn report(what: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() / ns.len().max(1) as u64;
    println!("{what}: mean {mean} ns, median {} ns, n {}", ns[ns.len() / 2], ns.len());
}

/// A host with `plugin`, once it is subscribed to `ty`.
fn start(plugin: PluginConfig, ty: EventType) -> Host {
    let id = plugin.id.clone();
    let mut cfg = HostConfig::new(vec![plugin.required(true)]);
    cfg.host.response_timeout_ms = 1_000;
    let mut host = Host::start(cfg).expect("the host starts the example plugin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.is_subscribed(&id, ty) {
        host.begin_tick().end();
        assert!(Instant::now() < deadline, "{id} never subscribed");
        std::thread::sleep(Duration::from_millis(1));
    }
    host
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    // One host per measurement, each with the one plugin it needs, as the Go benchmarks do.
    let mut host = start(
        PluginConfig::launch("move_counter", sibling("move_counter")),
        EventType::PlayerMove,
    );
    let moves: Vec<MoveRecord> = (0..100u8)
        .map(|i| MoveRecord::new([i; 16], [f64::from(i), 64.0, 0.0], 0.0, 0.0))
        .collect();
    let mut publish = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut t = host.begin_tick();
        t.publish_moves(&moves);
        t.end();
        publish.push(t0.elapsed().as_nanos() as u64);
    }

    host.shutdown("measured");
    let mut host = start(
        PluginConfig::launch("chat_filter", sibling("chat_filter")).args(["--wait", "spin"]),
        EventType::Chat,
    );
    let mut chat = EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: "7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01".into(),
            name: "Steve".into(),
            message: "hello everyone".into(),
        })),
        ..Default::default()
    };
    let mut dispatch = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut t = host.begin_tick();
        let p = t.dispatch(&mut chat);
        t.end();
        let o = host.wait(&p, Instant::now() + Duration::from_secs(1));
        dispatch.push(t0.elapsed().as_nanos() as u64);
        assert!(o.late.is_empty(), "chat_filter did not answer: {o:?}");
    }
    host.shutdown("measured");
    report("publish_moves_100", publish);
    report("dispatch_chat_wait", dispatch);
}
