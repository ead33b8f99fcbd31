//! `plugbus loadtest` (and the engine behind `plugbus demo`): the simulated server at scale,
//! with real plugin processes, measuring what the README's performance table reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugbus::fastpath::MoveRecord;
use plugbus::host::{Hist, Host, HostConfig, MetricsSnapshot, Outcome, PluginConfig, QueueSizes};
use plugbus::proto::EventType;
use plugbus::segment::monotonic_ns;
use serde::Serialize;

use crate::chaos::{Chaos, ChaosReport, ChaosSpec};
use crate::load_plugin::PluginReport;
use crate::sim::{TickOutput, World, is_critical};
use crate::soak::{ResourceSample, Sampler};
use crate::{alloc_count, stopping};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub players: usize,
    pub tps: u32,
    pub seconds: f64,
    pub warmup_s: f64,
    pub pin: bool,
    /// One command line per plugin (program, args), each launched with the load report env.
    pub plugins: Vec<(String, Vec<String>)>,
    /// Whether plugins write load reports (the built-in load plugin does).
    pub reports: bool,
    pub metrics: Option<Arc<Mutex<MetricsSnapshot>>>,
    pub seed: u64,
    /// Spin between ticks instead of sleeping (a tick thread that never idles).
    pub busy_pacing: bool,
    /// The host's `wake_thread` setting.
    pub wake_thread: bool,
    /// SIGKILL the first plugin this many seconds into the run, from another thread.
    pub kill_one_at: Option<f64>,
    /// Record the session (the host's `record` setting).
    pub record: Option<std::path::PathBuf>,
    /// `shm` (default) or `grpc` (over a Unix socket).
    pub transport: String,
    /// Kill, stop and restart random plugins during the load (`--chaos`).
    pub chaos: Option<ChaosSpec>,
    /// Keep no per-tick or per-event timestamps (no latency figures but the tick's and the
    /// reply's): a long run's host memory then holds only what plugbus holds (the soak).
    pub lean: bool,
    /// Sample the host process's RSS and open fds every second (the soak).
    pub sample_resources: bool,
}

/// Percentiles of a latency histogram.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Pcts {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl Pcts {
    pub fn of(h: &Hist) -> Self {
        Self {
            p50: h.quantile(0.5),
            p99: h.quantile(0.99),
            p999: h.quantile(0.999),
            max: h.max(),
            count: h.count(),
        }
    }
}

/// Everything the load test measured. Serialized as the `--json` object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub players: usize,
    pub tps: u32,
    pub plugins: usize,
    pub seconds: f64,
    pub wait: String,
    /// `shm` or `grpc`.
    pub transport: String,
    /// Whether the tick thread spun between ticks instead of sleeping.
    pub busy_pacing: bool,
    /// Whether the host's wake thread woke sleeping plugins (else the tick thread did).
    pub wake_thread: bool,
    pub pinned: Option<Pinning>,
    pub machine: String,
    /// Events offered by the server (moves count one per player per tick).
    pub events_offered: u64,
    /// Events observed by plugins, summed over plugins.
    pub events_delivered: u64,
    pub events_offered_by_type: BTreeMap<String, u64>,
    pub events_delivered_by_type: BTreeMap<String, u64>,
    pub moves_conflated: u64,
    /// Critical events (join, quit, chat, command) offered to a plugin and never observed by it,
    /// summed over plugins.
    pub critical_lost: u64,
    /// The same per plugin id (with `--kill-one-at`, the killed plugin's losses stand apart).
    pub critical_lost_by_plugin: BTreeMap<String, u64>,
    /// With `--kill-one-at`: what was killed and what the host made of it.
    pub kill: Option<KillReport>,
    /// Critical events observed out of publish order.
    pub critical_out_of_order: u64,
    /// The host's plugbus work per tick (publish, dispatch, end_tick), ns.
    pub host_tick_ns: Pcts,
    /// That time split into its parts (see [`TickSplit`]).
    pub host_tick_split: TickSplit,
    /// A move frame's publish (its ring tail store) to the plugin's handler seeing it, ns.
    pub publish_to_observe_ns: Pcts,
    /// The start of `end_tick` (which copies the staged moves into each plugin's ring) to the
    /// plugin's handler seeing the frame, ns: includes the copy.
    pub end_tick_to_observe_ns: Pcts,
    /// Publish of a critical event to the plugin's handler seeing it, ns.
    pub publish_to_observe_events_ns: Pcts,
    /// Dispatch of an event expecting a response to the merged outcome, ns.
    pub reply_rtt_ns: Pcts,
    pub replies_late: u64,
    /// Events cancelled / mutated by plugins.
    pub cancelled: u64,
    pub mutated: u64,
    /// Heap allocations on the tick thread per offered event, in steady state.
    pub host_allocs_per_event: f64,
    /// Each plugin's CPU use over the measured window, percent of one core.
    pub plugin_cpu_percent: Vec<f64>,
    pub ticks: u64,
    pub tick_overruns: u64,
    pub disconnects: u64,
    /// Futex wake-ups the host sent to sleeping plugins (whole run, summed over plugins): the
    /// part of the tick's cost that a plugin's wait strategy decides.
    pub doorbell_wakeups: u64,
    /// Of those, how many the tick thread handed to the host's wake thread (the tick thread
    /// made the others itself), and the wake thread's windows: opened, and used by a tick.
    pub wakeups_handed_over: u64,
    pub wake_windows: u64,
    pub wake_windows_used: u64,
    /// The wake thread's time spinning in its windows, percent of one core over the run.
    pub wake_thread_cpu_percent: f64,
    /// With `--chaos`: what chaos did, and the critical events lost by surviving plugins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<ChaosReport>,
    /// Segments this process left in /dev/shm once its host was dropped (should be 0; null if
    /// not looked at).
    pub segments_left: Option<u64>,
    /// memfds this process still held once its host was dropped (should be 0).
    pub memfds_left: Option<u64>,
    /// Host process RSS and fds, one sample a second (the soak).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resource_samples: Vec<ResourceSample>,
    /// With `--floor`: what this machine gives a tick thread with no plugbus code (see
    /// `floor.rs`), measured after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_floor: Option<crate::floor::FloorReport>,
    /// Raw samples for plots (not serialized).
    #[serde(skip)]
    pub samples: Samples,
}

/// The host's cost per tick in parts, each a distribution over the measured ticks, ns (from
/// [`Host::last_tick_cost`]). `other` is the tick's wall time minus the four parts: the
/// calls' own bookkeeping, the clock reads, and any time the thread was not running. `on_cpu`
/// is the tick thread's CPU time over the same span (`CLOCK_THREAD_CPUTIME_ID`): wall time
/// well above it means the thread waited for a CPU, not that plugbus worked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TickSplit {
    pub encode_ns: Pcts,
    pub write_ns: Pcts,
    pub wake_ns: Pcts,
    pub poll_ns: Pcts,
    pub other_ns: Pcts,
    pub on_cpu_ns: Pcts,
    /// Ticks that sent at least one wake-up, and their cost per tick.
    pub ticks_with_wakeups: u64,
    pub tick_with_wakeups_ns: Pcts,
    pub tick_without_wakeups_ns: Pcts,
}

/// Latency samples for plotting.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub observe: Hist,
    pub observe_from_end_tick: Hist,
    pub observe_events: Hist,
    pub rtt: Hist,
    pub tick: Hist,
    pub encode: Hist,
    pub write: Hist,
    pub wake: Hist,
    pub poll: Hist,
    pub other: Hist,
    pub on_cpu: Hist,
    pub tick_woke: Hist,
    pub tick_quiet: Hist,
}

/// The plugin killed during the run.
#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    pub plugin: String,
    pub pid: u32,
    /// Seconds into the run.
    pub at_s: f64,
    /// Kill to the host's disconnect notice, ms (as the tick loop saw it).
    pub detected_ms: Option<f64>,
    /// Kill to the restarted plugin's hello, ms.
    pub ready_again_ms: Option<f64>,
    /// Restarts the host made (of any plugin).
    pub restarts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pinning {
    pub host_cpu: usize,
    pub plugin_cpus: Vec<usize>,
}

/// Live figures for a progress line.
pub struct Progress<'a> {
    pub tick: u64,
    pub events_per_s: f64,
    pub rtt_p50_ns: u64,
    pub host: &'a Host,
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a configuration value; no memory is passed.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as f64 } else { 100.0 }
}

fn pow2_at_least(n: u64) -> u64 {
    n.max(1).next_power_of_two()
}

/// One tick's move frame for `players` (48 bytes a player and the frame's header), bytes.
pub fn move_frame_bytes(players: usize) -> u64 {
    (players as u64 * 48 + 64).max(1)
}

/// The moves ring the load test gives each plugin: eight ticks' frames, at least 64 KiB.
pub fn moves_ring_bytes(players: usize) -> u64 {
    pow2_at_least(move_frame_bytes(players) * 8).max(1 << 16)
}

/// Runs the simulation against the plugins; `progress` is called about every 250 ms.
pub fn run(spec: &LoadSpec, mut progress: impl FnMut(&Progress<'_>)) -> Result<(LoadReport, Host), String> {
    let dir = std::env::temp_dir().join(format!("plugbus-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues = QueueSizes {
        moves: moves_ring_bytes(spec.players),
        ..QueueSizes::default()
    };
    let kills = spec.kill_one_at.is_some() || spec.chaos.is_some();
    let mut plugin_cpus = Vec::new();
    let mut configs = Vec::new();
    for (i, (cmd, args)) in spec.plugins.iter().enumerate() {
        let id = format!("load-{i}");
        let mut cfg = PluginConfig::launch(&id, cmd)
            .args(args.clone())
            .queues(queues)
            .required(true);
        if spec.reports {
            cfg = cfg.env("PLUGBUS_REPORT", &dir.join(format!("{id}.json")).display().to_string());
            // Only a run that kills plugins needs what a killed incarnation saw; the log is a
            // write per critical event in the plugin's handler, which would show in the
            // latencies measured.
            if kills {
                cfg = cfg.env(
                    "PLUGBUS_CRITICAL_LOG",
                    &dir.join(format!("{id}.critical")).display().to_string(),
                );
            }
        }
        cfg.transport.clone_from(&spec.transport);
        if spec.pin {
            let cpu = (1 + i) % ncpu;
            plugin_cpus.push(cpu);
            cfg = cfg.env("PLUGBUS_PIN_CPU", &cpu.to_string());
        }
        configs.push(cfg);
    }
    let mut config = HostConfig::new(configs);
    config.host.hello_timeout_ms = 10_000;
    config.host.shutdown_grace_ms = 10_000;
    config.host.record.clone_from(&spec.record);
    config.host.wake_thread = spec.wake_thread;
    if spec.chaos.is_some() {
        // Chaos restarts plugins far more often than the default policy (3 a minute) allows.
        config.host.restart_max = u32::MAX;
    }
    let heartbeat_timeout_ms = config.host.heartbeat_timeout_ms;
    if spec.transport == "grpc" {
        config.host.listen = vec![format!("unix://{}", dir.join("host.sock").display())];
    }
    let mut host = Host::start(config).map_err(|e| e.to_string())?;
    let ids: Vec<String> = (0..spec.plugins.len()).map(|i| format!("load-{i}")).collect();
    // Wait until each plugin's subscriptions are in, so the measured window starts clean.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ids
        .iter()
        .all(|id| host.is_subscribed(id, EventType::PlayerMove) || host.is_subscribed(id, EventType::Chat))
    {
        if Instant::now() > deadline {
            return Err("plugins did not subscribe within 10 s".into());
        }
        host.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    if spec.pin {
        crate::pin_current_thread(0);
    }

    let mut world = World::new(spec.players, spec.tps, spec.seed);
    let mut out = TickOutput::default();
    let tick_len = Duration::from_secs_f64(1.0 / f64::from(spec.tps.max(1)));
    let total_ticks = (spec.seconds * f64::from(spec.tps)).ceil() as u64;
    let warmup_ticks = (spec.warmup_s * f64::from(spec.tps)).ceil() as u64;
    let mut report = LoadReport {
        players: spec.players,
        tps: spec.tps,
        plugins: spec.plugins.len(),
        seconds: spec.seconds,
        transport: spec.transport.clone(),
        busy_pacing: spec.busy_pacing,
        wake_thread: spec.wake_thread,
        pinned: spec.pin.then(|| Pinning {
            host_cpu: 0,
            plugin_cpus: plugin_cpus.clone(),
        }),
        machine: crate::machine(),
        ..Default::default()
    };
    // Publish times: per tick (moves), per critical event id.
    let mut tick_pub: Vec<(u64, u64)> = Vec::with_capacity(total_ticks as usize);
    // Per plugin: tick -> when its move frame was published.
    let mut frame_pub: Vec<HashMap<u64, u64>> = ids.iter().map(|_| HashMap::new()).collect();
    let mut event_pub: HashMap<u64, u64> = HashMap::new();
    let mut published_at: Vec<(usize, u64)> = Vec::with_capacity(1024);
    let mut requested_at: Vec<(u64, u64)> = Vec::with_capacity(1024);
    let mut critical_offered = 0u64;
    let mut offered_moves = 0u64;
    let mut offered_events = 0u64;
    let mut steady_allocs = 0u64;
    let mut steady_offered = 0u64;
    let mut cpu_start: Vec<Option<u64>> = Vec::new();
    let mut steady_started = Instant::now();
    let mut pendings = Vec::new();
    // Reused for every outcome, as a game would (no allocation per answer).
    let mut o = Outcome::default();
    let mut next = Instant::now() + tick_len;
    let mut last_progress = Instant::now();
    let mut window_events = 0u64;
    let mut window_started = Instant::now();
    let mut last_metrics = Instant::now();
    // The kill, from another thread at its time, as an external `kill -9` would come.
    let run_started = Instant::now();
    let mut killer = match spec.kill_one_at {
        Some(at_s) => {
            let id = ids[0].clone();
            let pid = host.pid_of(&id).ok_or("the plugin to kill has no process")?;
            let at = run_started + Duration::from_secs_f64(at_s);
            report.kill = Some(KillReport {
                plugin: id,
                pid,
                at_s,
                detected_ms: None,
                ready_again_ms: None,
                restarts: 0,
            });
            Some(std::thread::spawn(move || {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let killed_at = Instant::now();
                let pid = rustix::process::Pid::from_raw(pid as i32).ok_or("pid 0")?;
                rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                    .map_err(|e| format!("cannot kill plugin pid {pid:?}: {e}"))?;
                Ok::<Instant, String>(killed_at)
            }))
        }
        None => None,
    };
    let mut killed_at: Option<Instant> = None;
    let mut chaos = spec.chaos.as_ref().map(|c| {
        // From the end of warm-up to 1.5 s before the end, so every plugin is back by then.
        let window = (spec.warmup_s, (spec.seconds - 1.5).max(spec.warmup_s));
        Chaos::start(c.clone(), ids.clone(), run_started, window, heartbeat_timeout_ms)
    });
    let sampler = spec
        .sample_resources
        .then(|| Sampler::start(run_started, Duration::from_secs(1)));
    for t in 0..total_ticks {
        if stopping() {
            break;
        }
        let steady = t >= warmup_ticks;
        if t == warmup_ticks {
            steady_started = Instant::now();
            cpu_start = ids.iter().map(|id| host.pid_of(id).and_then(cpu_ticks)).collect();
        }
        world.step(&mut out);
        let moves: &[MoveRecord] = &out.moves;
        let n_events = (moves.len() + out.events.len() + out.requests.len()) as u64;
        if let Some(c) = &mut chaos {
            c.before_tick(&mut host, t as usize);
            // The host gives an id only to an event it routes: an empty one was routed nowhere.
            for env in out.events.iter_mut().chain(out.requests.iter_mut()) {
                env.event_id.clear();
            }
        }
        let allocs_before = alloc_count();
        let cpu_before = thread_cpu_ns();
        let started = Instant::now();
        let mut tick = host.begin_tick();
        let tick_no = tick.number();
        tick.publish_moves(moves);
        // Publish times are noted in a reused list and filed after the tick, so the tick's
        // measured cost holds no bookkeeping of the load test's own.
        published_at.clear();
        for (k, env) in out.events.iter_mut().enumerate() {
            let at = monotonic_ns();
            tick.publish(env);
            if !spec.lean && is_critical(env.r#type) {
                published_at.push((k, at));
            }
        }
        for env in &mut out.requests {
            let at = monotonic_ns();
            let p = tick.dispatch(env);
            requested_at.push((p.event_id(), at));
            pendings.push(p);
        }
        let published = monotonic_ns();
        tick.end();
        let cost = started.elapsed();
        let on_cpu = thread_cpu_ns().saturating_sub(cpu_before);
        let allocs = alloc_count() - allocs_before;
        if !spec.lean {
            for &(k, at) in &published_at {
                if let Ok(id) = out.events[k].event_id.parse::<u64>() {
                    event_pub.insert(id, at);
                }
            }
            event_pub.extend(requested_at.iter().copied());
        }
        requested_at.clear();
        if let Some(c) = &mut chaos {
            for env in out.events.iter().filter(|e| is_critical(e.r#type)).chain(&out.requests) {
                c.published(t as usize, &env.event_id);
            }
        }
        if !spec.lean {
            tick_pub.push((tick_no, published));
            for (i, id) in ids.iter().enumerate() {
                if let Some((t, at)) = host.last_moves_published(id) {
                    if t == tick_no {
                        frame_pub[i].insert(t, at);
                    }
                }
            }
        }
        critical_offered +=
            out.requests.len() as u64 + out.events.iter().filter(|e| is_critical(e.r#type)).count() as u64;
        offered_moves += moves.len() as u64;
        offered_events += (out.events.len() + out.requests.len()) as u64;
        window_events += n_events;
        if steady {
            let wall = cost.as_nanos() as u64;
            report.samples.tick.record(wall);
            let c = host.last_tick_cost();
            let sm = &mut report.samples;
            sm.encode.record(c.encode_ns);
            sm.write.record(c.write_ns);
            sm.wake.record(c.wake_ns);
            sm.poll.record(c.poll_ns);
            sm.other
                .record(wall.saturating_sub(c.encode_ns + c.write_ns + c.wake_ns + c.poll_ns));
            sm.on_cpu.record(on_cpu);
            if c.wakeups > 0 {
                sm.tick_woke.record(wall);
            } else {
                sm.tick_quiet.record(wall);
            }
            steady_allocs += allocs;
            steady_offered += n_events;
        }
        // The game waits for the answers it needs (chat, commands): the reply round trip.
        for p in pendings.drain(..) {
            host.wait_into(&p, Instant::now() + host.settings().response_timeout(), &mut o);
            report.cancelled += u64::from(o.cancelled);
            report.mutated += u64::from(o.mutation.is_some());
            if o.late.is_empty() {
                if steady {
                    report.samples.rtt.record(o.elapsed.as_nanos() as u64);
                }
            } else {
                report.replies_late += o.late.len() as u64;
            }
        }
        // The game takes what plugins sent (a host holds only so much per plugin) and gives the
        // items back for reuse; log lines already went to the log.
        while let Some(a) = host.next_action() {
            host.recycle_action(a);
        }
        while let Some(l) = host.next_log() {
            host.recycle_log(l);
        }
        if killed_at.is_none() && killer.as_ref().is_some_and(std::thread::JoinHandle::is_finished) {
            killed_at = Some(
                killer
                    .take()
                    .expect("finished")
                    .join()
                    .map_err(|_| "the killer panicked")??,
            );
        }
        for n in host.drain_notices() {
            match (&n, &mut report.kill, killed_at) {
                (plugbus::host::Notice::Disconnected { id, detected_at, .. }, Some(k), Some(at)) if *id == k.plugin => {
                    k.detected_ms = Some(detected_at.saturating_duration_since(at).as_secs_f64() * 1e3);
                }
                (plugbus::host::Notice::Ready { id, .. }, Some(k), Some(at)) if *id == k.plugin => {
                    k.ready_again_ms = Some(at.elapsed().as_secs_f64() * 1e3);
                }
                _ => {}
            }
            if let plugbus::host::Notice::Disconnected { .. } = n {
                report.disconnects += 1;
            }
            if let Some(c) = &mut chaos {
                c.notice(&n);
            }
        }
        world.recycle(&mut out);
        report.ticks += 1;
        let now = Instant::now();
        if now.duration_since(last_progress) >= Duration::from_millis(250) {
            let secs = now.duration_since(window_started).as_secs_f64();
            progress(&Progress {
                tick: t + 1,
                events_per_s: window_events as f64 / secs.max(1e-9),
                rtt_p50_ns: report.samples.rtt.quantile(0.5),
                host: &host,
            });
            window_events = 0;
            window_started = now;
            last_progress = now;
        }
        if let Some(m) = &spec.metrics {
            if now.duration_since(last_metrics) >= Duration::from_millis(500) {
                last_metrics = now;
                if let Ok(mut g) = m.lock() {
                    *g = host.metrics();
                }
            }
        }
        if now > next {
            report.tick_overruns += 1;
            next = now + tick_len;
        } else {
            if spec.busy_pacing {
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
            } else {
                sleep_until(next);
            }
            next += tick_len;
        }
    }
    if let Some(s) = sampler {
        report.resource_samples = s.finish();
    }
    if let Some(c) = &mut chaos {
        // Every stopped plugin is continued before the shutdown.
        c.stop();
    }
    let measured = steady_started.elapsed().as_secs_f64().max(1e-9);
    let hz = clock_ticks_per_s();
    report.plugin_cpu_percent = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let end = host.pid_of(id).and_then(cpu_ticks);
            match (cpu_start.get(i).copied().flatten(), end) {
                (Some(a), Some(b)) => (b.saturating_sub(a)) as f64 / hz / measured * 100.0,
                _ => f64::NAN,
            }
        })
        .collect();
    let metrics = host.metrics();
    host.shutdown("load test finished");
    report.moves_conflated = metrics.plugins.values().map(|p| p.moves_conflated).sum();
    if let Some(k) = &mut report.kill {
        k.restarts = metrics.plugins.values().map(|p| p.restarts).sum();
        if killed_at.is_none() {
            return Err("the plugin was not killed before the run ended".into());
        }
    }
    report.doorbell_wakeups = metrics.plugins.values().map(|p| p.wakeups).sum();
    report.wakeups_handed_over = metrics.plugins.values().map(|p| p.wakeups_handed_over).sum();
    report.wake_windows = metrics.host.wake_windows;
    report.wake_windows_used = metrics.host.wake_windows_used;
    report.wake_thread_cpu_percent =
        metrics.host.wake_window_ns as f64 / 1e9 / run_started.elapsed().as_secs_f64() * 100.0;
    report.host_allocs_per_event = if steady_offered > 0 {
        steady_allocs as f64 / steady_offered as f64
    } else {
        0.0
    };
    report.events_offered = offered_moves + offered_events;
    report.events_offered_by_type = metrics
        .host
        .offered_by_type()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    report
        .events_offered_by_type
        .insert("PLAYER_MOVE (fast path)".into(), offered_moves);

    if spec.reports {
        let tick_times: HashMap<u64, u64> = tick_pub.iter().copied().collect();
        let first_steady_tick = tick_pub.get(warmup_ticks as usize).map_or(u64::MAX, |t| t.0);
        let mut delivered_moves = 0;
        let mut seen_by_plugin = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let path = dir.join(format!("{id}.json"));
            let r = match PluginReport::read(&path) {
                Ok(r) => r,
                // Under chaos, the last incarnation may not have had the time to write it:
                // its critical log below is what the accounting needs.
                Err(_) if chaos.is_some() => PluginReport::default(),
                Err(e) => return Err(format!("plugin {id}: {e}")),
            };
            delivered_moves += r.moves;
            for (ty, n) in &r.counts {
                let name = EventType::try_from(*ty).map_or("UNKNOWN", |e| e.as_str_name());
                *report.events_delivered_by_type.entry(name.to_owned()).or_default() += n;
                report.events_delivered += n;
            }
            for [tick, seen, _] in &r.move_frames {
                if *tick >= first_steady_tick {
                    if let Some(p) = tick_times.get(tick) {
                        report.samples.observe_from_end_tick.record(seen.saturating_sub(*p));
                    }
                    if let Some(p) = frame_pub[i].get(tick) {
                        report.samples.observe.record(seen.saturating_sub(*p));
                    }
                }
            }
            let mut last = 0;
            for [id, seen] in &r.critical {
                if *id < last {
                    report.critical_out_of_order += 1;
                }
                last = *id;
                if let Some(p) = event_pub.get(id) {
                    report.samples.observe_events.record(seen.saturating_sub(*p));
                }
            }
            // What each incarnation of this plugin saw, the killed one's included (its log), or
            // without kills what its one incarnation reported.
            let log_path = dir.join(format!("{id}.critical"));
            let (seen, seen_count) = if kills {
                let text = match std::fs::read_to_string(&log_path) {
                    Ok(t) => t,
                    // It saw no critical event at all.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(format!("plugin {id}: cannot read {}: {e}", log_path.display())),
                };
                let seen: std::collections::HashSet<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
                let n = seen.len() as u64;
                (seen, n)
            } else {
                let seen: std::collections::HashSet<u64> = r.critical.iter().map(|&[id, _]| id).collect();
                // Distinct ids, when the list holds exactly the critical events; else (cut at its
                // bound, or holding every event) the plugin's count.
                let n = if r.critical.len() as u64 == r.critical_seen {
                    seen.len() as u64
                } else {
                    r.critical_seen
                };
                (seen, n)
            };
            let lost = critical_offered.saturating_sub(seen_count);
            report.critical_lost_by_plugin.insert(id.clone(), lost);
            report.critical_lost += lost;
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&log_path);
            seen_by_plugin.push(seen);
        }
        if let Some(c) = chaos.take() {
            let restarts = metrics.plugins.values().map(|p| p.restarts).sum();
            report.chaos = Some(c.report(&seen_by_plugin, restarts));
        }
        report.events_delivered += delivered_moves;
        report
            .events_delivered_by_type
            .insert("PLAYER_MOVE (fast path)".into(), delivered_moves);
    }
    let _ = std::fs::remove_dir(&dir);
    report.host_tick_ns = Pcts::of(&report.samples.tick);
    report.publish_to_observe_ns = Pcts::of(&report.samples.observe);
    report.end_tick_to_observe_ns = Pcts::of(&report.samples.observe_from_end_tick);
    report.publish_to_observe_events_ns = Pcts::of(&report.samples.observe_events);
    report.reply_rtt_ns = Pcts::of(&report.samples.rtt);
    let sm = &report.samples;
    report.host_tick_split = TickSplit {
        encode_ns: Pcts::of(&sm.encode),
        write_ns: Pcts::of(&sm.write),
        wake_ns: Pcts::of(&sm.wake),
        poll_ns: Pcts::of(&sm.poll),
        other_ns: Pcts::of(&sm.other),
        on_cpu_ns: Pcts::of(&sm.on_cpu),
        ticks_with_wakeups: sm.tick_woke.count(),
        tick_with_wakeups_ns: Pcts::of(&sm.tick_woke),
        tick_without_wakeups_ns: Pcts::of(&sm.tick_quiet),
    };
    Ok((report, host))
}

/// CPU time this thread has used, ns.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Sleeps until `deadline`: a coarse sleep, then a short spin for the last stretch.
pub(crate) fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    let left = deadline - now;
    if left > Duration::from_micros(300) {
        std::thread::sleep(left - Duration::from_micros(200));
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// Prints the report as a table.
pub fn print(r: &LoadReport) {
    let us = |ns: u64| format!("{:.2} µs", ns as f64 / 1000.0);
    println!();
    println!(
        "plugbus load test: {} players x {} tps x {} plugins over {}, {:.1} s ({} ticks, {} overruns), wait={}{}{}",
        r.players,
        r.tps,
        r.plugins,
        r.transport,
        r.seconds,
        r.ticks,
        r.tick_overruns,
        r.wait,
        match (r.busy_pacing, r.wake_thread) {
            (true, true) => ", busy pacing",
            (true, false) => ", busy pacing, inline wake-ups",
            (false, true) => "",
            (false, false) => ", inline wake-ups",
        },
        r.pinned.as_ref().map_or(String::new(), |p| format!(
            ", pinned host cpu {} plugins {:?}",
            p.host_cpu, p.plugin_cpus
        ))
    );
    println!("  machine                   {}", r.machine);
    println!("  events offered            {}", r.events_offered);
    println!(
        "  events delivered          {} (summed over plugins)",
        r.events_delivered
    );
    println!("  moves conflated           {}", r.moves_conflated);
    println!(
        "  critical lost             {} {:?}",
        r.critical_lost, r.critical_lost_by_plugin
    );
    if let Some(k) = &r.kill {
        let ms = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.1} ms"));
        println!(
            "  killed                    {} (pid {}) at {:.1} s: seen after {}, ready again after {}, {} restart(s)",
            k.plugin,
            k.pid,
            k.at_s,
            ms(k.detected_ms),
            ms(k.ready_again_ms),
            k.restarts
        );
    }
    println!(
        "  doorbell wake-ups         {} ({:.2} per plugin per tick)",
        r.doorbell_wakeups,
        r.doorbell_wakeups as f64 / (r.ticks.max(1) * r.plugins.max(1) as u64) as f64
    );
    if r.wake_windows > 0 || r.wakeups_handed_over > 0 {
        println!(
            "    handed to the wake thread {} wake requests; its windows {} opened, {} met by a tick's end; it spun {:.1} % of a core",
            r.wakeups_handed_over, r.wake_windows, r.wake_windows_used, r.wake_thread_cpu_percent
        );
    }
    println!("  critical out of order     {}", r.critical_out_of_order);
    println!(
        "  host cost per tick        p50 {}  p99 {}  max {}",
        us(r.host_tick_ns.p50),
        us(r.host_tick_ns.p99),
        us(r.host_tick_ns.max)
    );
    let t = &r.host_tick_split;
    let part = |name: &str, p: &Pcts| println!("    {name:<23} p50 {}  p99 {}", us(p.p50), us(p.p99));
    part("encode", &t.encode_ns);
    part("writes to links", &t.write_ns);
    part("wake-ups", &t.wake_ns);
    part("reading replies", &t.poll_ns);
    part("other", &t.other_ns);
    part("on CPU", &t.on_cpu_ns);
    println!(
        "    ticks that woke a plugin {} of {}: p50 {}  p99 {}; the others p50 {}  p99 {}",
        t.ticks_with_wakeups,
        r.host_tick_ns.count,
        us(t.tick_with_wakeups_ns.p50),
        us(t.tick_with_wakeups_ns.p99),
        us(t.tick_without_wakeups_ns.p50),
        us(t.tick_without_wakeups_ns.p99)
    );
    println!(
        "  publish -> observe moves  p50 {}  p99 {}  p99.9 {}",
        us(r.publish_to_observe_ns.p50),
        us(r.publish_to_observe_ns.p99),
        us(r.publish_to_observe_ns.p999)
    );
    println!(
        "  end_tick -> observe moves p50 {}  p99 {}  p99.9 {}",
        us(r.end_tick_to_observe_ns.p50),
        us(r.end_tick_to_observe_ns.p99),
        us(r.end_tick_to_observe_ns.p999)
    );
    println!(
        "  publish -> observe events p50 {}  p99 {}  p99.9 {}",
        us(r.publish_to_observe_events_ns.p50),
        us(r.publish_to_observe_events_ns.p99),
        us(r.publish_to_observe_events_ns.p999)
    );
    println!(
        "  reply round trip          p50 {}  p99 {}  ({} samples, {} late)",
        us(r.reply_rtt_ns.p50),
        us(r.reply_rtt_ns.p99),
        r.reply_rtt_ns.count,
        r.replies_late
    );
    println!("  host allocs per event     {:.4}", r.host_allocs_per_event);
    println!(
        "  plugin CPU                {:?} % of a core",
        r.plugin_cpu_percent
            .iter()
            .map(|c| (c * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!("  disconnects               {}", r.disconnects);
    if let Some(c) = &r.chaos {
        print_chaos(c);
    }
    if let (Some(seg), Some(mfd)) = (r.segments_left, r.memfds_left) {
        println!("  left after shutdown       {seg} segment(s) in /dev/shm, {mfd} memfd(s) open");
    }
    for (ty, n) in &r.events_offered_by_type {
        println!(
            "    {ty:<28} offered {n:>10}  delivered {:>10}",
            r.events_delivered_by_type.get(ty).copied().unwrap_or(0)
        );
    }
    if let Some(f) = &r.machine_floor {
        crate::floor::print(f);
    }
}

fn print_chaos(c: &ChaosReport) {
    println!(
        "  chaos                     seed {}, every ~{} ms, stops {}..{} ms: {:?}",
        c.seed, c.every_ms, c.stop_ms_min, c.stop_ms_max, c.actions_by_kind
    );
    for a in &c.actions {
        println!(
            "    {:>8.3} s  {:<10} pid {:<8} {:?}{}",
            a.at_s,
            a.plugin,
            a.pid,
            a.kind,
            a.stopped_ms.map_or(String::new(), |ms| format!(" {ms} ms"))
        );
    }
    println!(
        "  restarts                  {} ({} disabled, {} disconnects not caused by chaos)",
        c.restarts, c.disabled, c.unexplained_disconnects
    );
    println!(
        "  critical lost by survivors {} {:?}",
        c.critical_lost_by_survivors, c.critical_lost_by_survivors_by_plugin
    );
    println!(
        "  critical lost with downed {}   offered while down {}",
        c.critical_lost_with_downed, c.critical_offered_while_down
    );
}
