//! How long does the host take to see a plugin die?
//!
//! `cargo run --release --example kill_detection [trials]` runs, `trials` times each (default
//! 20): a launched plugin killed with SIGKILL (seen by the host's pidfd supervisor), and an
//! attached plugin (started by someone else) killed with SIGKILL (seen by the pid and heartbeat
//! checks). It prints the time from the kill to the host's detection (`detected_at` of the
//! `Disconnected` notice) and to the notice being handled in the host's poll loop, which here
//! polls every millisecond like a busy game loop.
//!
//! The same binary is the plugin: with `PLUGBUS_ADDRESS` set it connects and parks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plugbus::host::{Hist, Host, HostConfig, Notice, PluginConfig};
use plugbus::plugin::{Handler, Plugin, WaitStrategy};
use plugbus::proto::EventType;

struct Idle;
impl Handler for Idle {}

fn kill(pid: u32) {
    // SAFETY: kill takes a pid and a signal number; no memory is passed.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Polls until the plugin's `Disconnected` notice; returns (detected, handled) after `t0`.
fn wait_disconnect(host: &mut Host, t0: Instant) -> (Duration, Duration) {
    let deadline = t0 + Duration::from_secs(10);
    loop {
        host.poll();
        for n in host.drain_notices() {
            if let Notice::Disconnected { detected_at, .. } = n {
                return (detected_at.saturating_duration_since(t0), t0.elapsed());
            }
        }
        assert!(Instant::now() < deadline, "no disconnect within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn report(what: &str, detected: &Hist, handled: &Hist) {
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "{what:<34} detected p50 {:>7.2} ms  max {:>7.2} ms | handled p50 {:>7.2} ms  max {:>7.2} ms  ({} trials)",
        ms(detected.quantile(0.5)),
        ms(detected.max()),
        ms(handled.quantile(0.5)),
        ms(handled.max()),
        detected.count()
    );
}

fn main() {
    if std::env::var_os(plugbus::transport::ENV_ADDRESS).is_some() {
        let r = Plugin::from_env().and_then(|b| b.subscribe([EventType::All]).wait(WaitStrategy::Park).run(&mut Idle));
        if let Err(e) = r {
            eprintln!("kill_detection plugin: {e}");
            std::process::exit(1);
        }
        return;
    }
    let trials: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let exe = std::env::current_exe().expect("current exe");

    let (mut detected, mut handled) = (Hist::default(), Hist::default());
    for _ in 0..trials {
        let mut config = HostConfig::new(vec![PluginConfig::launch("victim", &exe).required(true)]);
        config.host.restart_max = 0;
        let mut host = Host::start(config).expect("host starts");
        let pid = host.pid_of("victim").expect("launched");
        let t0 = Instant::now();
        kill(pid);
        let (d, h) = wait_disconnect(&mut host, t0);
        detected.record(d.as_nanos() as u64);
        handled.record(h.as_nanos() as u64);
    }
    report("launched plugin, SIGKILL (pidfd)", &detected, &handled);

    let (mut detected, mut handled) = (Hist::default(), Hist::default());
    for i in 0..trials {
        let name = format!("plugbus.killdetect.{}.{i}", std::process::id());
        let mut cfg = PluginConfig::attached("victim");
        cfg.address = Some(name.clone());
        let mut config = HostConfig::new(vec![cfg]);
        config.host.restart_max = 0;
        let mut host = Host::start(config).expect("host starts");
        let mut child = Command::new(&exe)
            .env(plugbus::transport::ENV_ADDRESS, &name)
            .env(plugbus::host::ENV_PLUGIN_ID, "victim")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the attached plugin");
        assert!(
            host.wait_ready(Duration::from_secs(10)),
            "attached plugin did not connect"
        );
        let t0 = Instant::now();
        kill(child.id());
        let _ = child.wait();
        let (d, h) = wait_disconnect(&mut host, t0);
        detected.record(d.as_nanos() as u64);
        handled.record(h.as_nanos() as u64);
    }
    report("attached plugin, SIGKILL (pidfd)", &detected, &handled);
}
