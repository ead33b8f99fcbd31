//! What one tick costs the host, and why: `cargo run --release --example tick_cost`.
//!
//! Launches N plugins (this same binary; `N=2` by default) with wait strategy `W` (`spin`,
//! `park`, `spin-then-park` or `paced`; default `park`), then runs 300 ticks of 100 moves (plus, with the argument `events`,
//! two batched jumps and one immediate chat per tick) at three spacings: back to back, 1 ms and
//! 20 ms apart, the tick thread spinning in between. It prints the host's time in
//! `begin_tick`..`end` (p50 / p99), split into the publish calls and `end_tick`.
//!
//! Comparing `W=spin` with `W=park` isolates the cost of waking a sleeping plugin (a futex wake,
//! which on a virtual machine is an inter-processor interrupt); comparing spacings isolates
//! cold caches.

use std::time::{Duration, Instant};

use plugbus::codec::EnvelopePool;
use plugbus::fastpath::MoveRecord;
use plugbus::host::{Hist, Host, HostConfig, PluginConfig};
use plugbus::plugin::{Handler, Plugin, WaitStrategy};
use plugbus::proto::{EventType, event_envelope::Payload};

struct Idle;
impl Handler for Idle {}

fn main() {
    let wait = std::env::var("W").unwrap_or_else(|_| "park".into());
    if std::env::var_os(plugbus::transport::ENV_ADDRESS).is_some() {
        let wait: WaitStrategy = wait.parse().expect("W: spin, park or spin-then-park");
        let r = Plugin::from_env().and_then(|b| b.subscribe([EventType::All]).wait(wait).run(&mut Idle));
        if let Err(e) = r {
            eprintln!("tick_cost plugin: {e}");
            std::process::exit(1);
        }
        return;
    }
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let events = std::env::args().nth(1).is_some_and(|a| a == "events");
    let exe = std::env::current_exe().expect("current exe");
    let plugins = (0..n)
        .map(|i| {
            PluginConfig::launch(&format!("p{i}"), &exe)
                .env("W", &wait)
                .required(true)
        })
        .collect();
    let mut host = Host::start(HostConfig::new(plugins)).expect("host starts");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(0..n).all(|i| host.is_subscribed(&format!("p{i}"), EventType::PlayerMove)) && Instant::now() < deadline {
        host.poll();
    }
    let moves: Vec<MoveRecord> = (0..100u8)
        .map(|i| MoveRecord::new([i; 16], [1.0, 2.0, 3.0], 0.0, 0.0))
        .collect();
    let mut pool = EnvelopePool::default();
    println!(
        "{n} plugins, wait {wait}, {}",
        if events { "moves + events" } else { "moves only" }
    );
    for gap_us in [0u64, 1000, 20_000] {
        let (mut total, mut publish, mut end) = (Hist::default(), Hist::default(), Hist::default());
        for _ in 0..300 {
            let until = Instant::now() + Duration::from_micros(gap_us);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            let t0 = Instant::now();
            let mut tick = host.begin_tick();
            tick.publish_moves(&moves);
            if events {
                for ty in [EventType::PlayerJump, EventType::PlayerJump, EventType::Chat] {
                    let mut e = pool.take(ty);
                    match &mut e.payload {
                        Some(Payload::PlayerJump(j)) => j.name.push_str("bob"),
                        Some(Payload::Chat(c)) => c.message.push_str("hi"),
                        _ => {}
                    }
                    tick.publish(&mut e);
                    pool.give(e);
                }
            }
            let t1 = Instant::now();
            tick.end();
            let t2 = Instant::now();
            total.record((t2 - t0).as_nanos() as u64);
            publish.record((t1 - t0).as_nanos() as u64);
            end.record((t2 - t1).as_nanos() as u64);
        }
        let us = |h: &Hist, q| h.quantile(q) as f64 / 1000.0;
        println!(
            "  ticks {:>5} µs apart: tick p50 {:>6.2} µs p99 {:>7.2} µs | publish p50 {:>6.2} µs | end_tick p50 {:>6.2} µs",
            gap_us,
            us(&total, 0.5),
            us(&total, 0.99),
            us(&publish, 0.5),
            us(&end, 0.5)
        );
    }
}
