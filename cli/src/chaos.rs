//! `plugbus loadtest --chaos`: during the load, at random intervals, a random ready plugin is
//! killed with SIGKILL from outside (as `kill -9` would), stopped with SIGSTOP for a while and
//! continued, or killed by the host itself ([`Host::kill_plugin`]); and the accounting of which
//! critical events were lost by whom.
//!
//! The chaos thread sleeps and signals; what needs the host (its kill, the plugins' readiness)
//! happens on the tick thread, between ticks, outside the measured tick cost.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugbus::host::{Host, Notice};
use serde::Serialize;

use crate::sim::Rng;

/// How events in flight are told from events lost: an event routed to an incarnation less than
/// this long before it went down (killed, or stopped and then disconnected) is lost with it.
pub const IN_FLIGHT_S: f64 = 1.0;

/// What "lost by surviving plugins" means, written into the JSON.
pub const DEFINITION: &str = "Each plugin runs as a sequence of incarnations (one process from its hello to its disconnect). \
A critical event (join, quit, chat, command) is routed to the incarnation that is ready when it is published. \
An incarnation goes down when chaos kills it (SIGKILL or the host's kill_plugin; at the time of the kill), or when the host \
disconnects it after chaos stopped it with SIGSTOP (at the time of the stop). A routed event that its incarnation never \
observed is 'lost with a downed incarnation' if it was routed less than in_flight_s before the incarnation went down \
or after; every other unobserved routed event is 'lost by a surviving plugin' (including events routed to an incarnation \
that the host disconnected for a reason chaos did not cause). Events published while a plugin had no ready incarnation \
are not routed to it: 'offered while down', counted apart.";

/// What chaos does to a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// SIGKILL from another thread; the supervisor sees the exit and restarts it.
    Sigkill,
    /// SIGSTOP for a random time, then SIGCONT.
    Sigstop,
    /// The host kills it (`Host::kill_plugin`) and restarts it.
    HostKill,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Sigkill, Kind::Sigstop, Kind::HostKill];

    fn name(self) -> &'static str {
        match self {
            Kind::Sigkill => "sigkill",
            Kind::Sigstop => "sigstop",
            Kind::HostKill => "host_kill",
        }
    }
}

/// How much chaos.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    pub seed: u64,
    /// Mean time between actions, ms (each gap is uniform in 0.5x..1.5x).
    pub every_ms: u64,
    /// SIGSTOP duration range, ms (the upper end is capped below the heartbeat timeout).
    pub stop_ms: (u64, u64),
}

/// One chaos action.
#[derive(Debug, Clone, Serialize)]
pub struct Action {
    /// Seconds since the first tick.
    pub at_s: f64,
    pub plugin: String,
    pub pid: u32,
    pub kind: Kind,
    /// For SIGSTOP: how long it was stopped, ms.
    pub stopped_ms: Option<u64>,
}

/// A disconnect the host reported.
#[derive(Debug, Clone, Serialize)]
pub struct Disconnect {
    pub at_s: f64,
    pub plugin: String,
    pub reason: String,
    pub undelivered: u64,
}

/// Why an incarnation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Still running when the run ended.
    Survived,
    /// Killed by chaos.
    Killed,
    /// Disconnected by the host after chaos stopped it.
    DisconnectedAfterSigstop,
    /// Disconnected for a reason chaos did not cause.
    Unexplained,
}

/// One plugin process from its hello to its disconnect.
#[derive(Debug, Clone, Serialize)]
pub struct Incarnation {
    pub pid: u32,
    /// When it was first seen ready, and when it was seen not ready any more (seconds since the
    /// first tick, at tick starts).
    pub from_s: f64,
    pub to_s: Option<f64>,
    pub end: End,
    /// Critical events routed to it, observed, lost with it when it went down, lost otherwise.
    pub routed: u64,
    pub lost_down: u64,
    pub lost: u64,
    #[serde(skip)]
    from_tick: usize,
    #[serde(skip)]
    to_tick: Option<usize>,
    #[serde(skip)]
    down_at_s: Option<f64>,
}

/// What chaos did and what it cost. Serialized as the report's `chaos` object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosReport {
    pub definition: &'static str,
    pub in_flight_s: f64,
    pub seed: u64,
    pub every_ms: u64,
    pub stop_ms_min: u64,
    /// Capped below the host's heartbeat timeout (`heartbeat_timeout_ms` - 200).
    pub stop_ms_max: u64,
    pub heartbeat_timeout_ms: u64,
    pub actions_by_kind: BTreeMap<String, u64>,
    pub actions: Vec<Action>,
    /// Restarts the host made (its metrics), and its Restarted / Disabled notices.
    pub restarts: u64,
    pub restarted_notices: u64,
    pub disabled: u64,
    pub disconnects: Vec<Disconnect>,
    /// Incarnations that ended for a reason chaos did not cause.
    pub unexplained_disconnects: u64,
    /// Critical events lost by surviving plugins (see `definition`): must be 0.
    pub critical_lost_by_survivors: u64,
    pub critical_lost_by_survivors_by_plugin: BTreeMap<String, u64>,
    /// Critical events lost with a killed (or stopped-then-disconnected) incarnation.
    pub critical_lost_with_downed: u64,
    /// Critical events published while the plugin had no ready incarnation, summed over plugins.
    pub critical_offered_while_down: u64,
    pub incarnations: BTreeMap<String, Vec<Incarnation>>,
}

/// What the chaos thread and the tick thread share.
#[derive(Default)]
struct Shared {
    /// Per plugin: its pid while ready (as the tick thread last saw it).
    ready_pids: Vec<Option<u32>>,
    /// Plugins the host is to kill, with the pid chaos chose.
    host_kills: Vec<(usize, u32)>,
    actions: Vec<Action>,
}

/// The chaos thread and the tick thread's bookkeeping.
pub struct Chaos {
    spec: ChaosSpec,
    stop_ms_max: u64,
    heartbeat_timeout_ms: u64,
    ids: Vec<String>,
    started: Instant,
    shared: Arc<Mutex<Shared>>,
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Per plugin, its incarnations in order.
    incarnations: Vec<Vec<Incarnation>>,
    /// Seconds since the start at each tick's start, by tick index.
    tick_s: Vec<f64>,
    /// Critical events routed to at least one plugin: (event id, tick index).
    routed: Vec<(u64, u32)>,
    /// Critical events routed to no plugin.
    unrouted: u64,
    disconnects: Vec<Disconnect>,
    restarted_notices: u64,
    disabled: u64,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn signal(pid: u32, sig: rustix::process::Signal) -> bool {
    rustix::process::Pid::from_raw(pid as i32).is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
}

impl Chaos {
    /// Starts the chaos thread: it acts between `window.0` and `window.1` seconds after
    /// `started`. `heartbeat_timeout_ms` caps the stops so that the host's heartbeat rule does
    /// not turn a stop into a disconnect.
    pub fn start(
        spec: ChaosSpec,
        ids: Vec<String>,
        started: Instant,
        window: (f64, f64),
        heartbeat_timeout_ms: u64,
    ) -> Self {
        let stop_ms_max = spec
            .stop_ms
            .1
            .min(heartbeat_timeout_ms.saturating_sub(200))
            .max(spec.stop_ms.0);
        let shared = Arc::new(Mutex::new(Shared {
            ready_pids: vec![None; ids.len()],
            ..Default::default()
        }));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = {
            let shared = Arc::clone(&shared);
            let ids = ids.clone();
            let spec = spec.clone();
            std::thread::Builder::new()
                .name("plugbus-chaos".into())
                .spawn(move || chaos_thread(&spec, stop_ms_max, &ids, started, window, &shared, &stopped))
                .expect("spawn the chaos thread")
        };
        Self {
            spec,
            stop_ms_max,
            heartbeat_timeout_ms,
            incarnations: vec![Vec::new(); ids.len()],
            ids,
            started,
            shared,
            stop,
            thread: Some(thread),
            tick_s: Vec::new(),
            routed: Vec::new(),
            unrouted: 0,
            disconnects: Vec::new(),
            restarted_notices: 0,
            disabled: 0,
        }
    }

    /// On the tick thread before tick `t` (an index from 0): carries out the host kills chaos
    /// asked for, and notes which incarnation of each plugin is ready (what this tick's events
    /// are routed to: nothing changes a plugin's state between here and the publishing).
    pub fn before_tick(&mut self, host: &mut Host, t: usize) {
        let now_s = self.started.elapsed().as_secs_f64();
        self.tick_s.push(now_s);
        let mut shared = lock(&self.shared);
        for (i, pid) in std::mem::take(&mut shared.host_kills) {
            // Only the incarnation chaos chose (it may have died and restarted since).
            if host.pid_of(&self.ids[i]) == Some(pid) && host.kill_plugin(&self.ids[i]) {
                shared.actions.push(Action {
                    at_s: self.started.elapsed().as_secs_f64(),
                    plugin: self.ids[i].clone(),
                    pid,
                    kind: Kind::HostKill,
                    stopped_ms: None,
                });
            }
        }
        for (i, id) in self.ids.iter().enumerate() {
            let pid = host.pid_of(id).filter(|_| host.is_ready(id));
            shared.ready_pids[i] = pid;
            let incs = &mut self.incarnations[i];
            let current = incs.last_mut().filter(|c| c.to_tick.is_none());
            match (current, pid) {
                (Some(c), Some(p)) if c.pid == p => {}
                (current, pid) => {
                    if let Some(c) = current {
                        c.to_tick = Some(t);
                        c.to_s = Some(now_s);
                    }
                    if let Some(pid) = pid {
                        incs.push(Incarnation {
                            pid,
                            from_s: now_s,
                            to_s: None,
                            end: End::Survived,
                            routed: 0,
                            lost_down: 0,
                            lost: 0,
                            from_tick: t,
                            to_tick: None,
                            down_at_s: None,
                        });
                    }
                }
            }
        }
    }

    /// A critical event published in tick `t`: `id` is the event id the host gave it, empty
    /// when the host routed it to no plugin.
    pub fn published(&mut self, t: usize, id: &str) {
        match id.parse::<u64>() {
            Ok(id) => self.routed.push((id, t as u32)),
            Err(_) => self.unrouted += 1,
        }
    }

    /// A notice the host gave.
    pub fn notice(&mut self, n: &Notice) {
        match n {
            Notice::Disconnected {
                id,
                reason,
                undelivered,
                detected_at,
            } => self.disconnects.push(Disconnect {
                at_s: detected_at.saturating_duration_since(self.started).as_secs_f64(),
                plugin: id.clone(),
                reason: reason.clone(),
                undelivered: *undelivered,
            }),
            Notice::Restarted { .. } => self.restarted_notices += 1,
            Notice::Disabled { .. } => self.disabled += 1,
            _ => {}
        }
    }

    /// Stops the chaos thread (it continues a plugin it stopped before it returns).
    pub fn stop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The report, given each plugin's observed critical event ids (over all its incarnations)
    /// and the host's restart count.
    pub fn report(mut self, seen: &[HashSet<u64>], restarts: u64) -> ChaosReport {
        self.stop();
        let mut actions = std::mem::take(&mut lock(&self.shared).actions);
        actions.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        let mut r = ChaosReport {
            definition: DEFINITION,
            in_flight_s: IN_FLIGHT_S,
            seed: self.spec.seed,
            every_ms: self.spec.every_ms,
            stop_ms_min: self.spec.stop_ms.0,
            stop_ms_max: self.stop_ms_max,
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            restarts,
            restarted_notices: self.restarted_notices,
            disabled: self.disabled,
            ..Default::default()
        };
        for k in Kind::ALL {
            r.actions_by_kind.insert(
                k.name().to_owned(),
                actions.iter().filter(|a| a.kind == k).count() as u64,
            );
        }
        // Why each incarnation ended, and when it went down.
        for incs in &mut self.incarnations {
            for inc in incs.iter_mut() {
                let Some(to_s) = inc.to_s else { continue };
                let pid = inc.pid;
                let on_it = || actions.iter().filter(|a| a.pid == pid);
                if let Some(kill) = on_it().find(|a| a.kind != Kind::Sigstop) {
                    inc.end = End::Killed;
                    inc.down_at_s = Some(kill.at_s);
                } else if let Some(stop) = on_it().find(|a| {
                    a.kind == Kind::Sigstop
                        && to_s >= a.at_s
                        && to_s <= a.at_s + a.stopped_ms.unwrap_or(0) as f64 / 1e3 + 2.0
                }) {
                    inc.end = End::DisconnectedAfterSigstop;
                    inc.down_at_s = Some(stop.at_s);
                } else {
                    inc.end = End::Unexplained;
                    r.unexplained_disconnects += 1;
                }
            }
        }
        for (i, id) in self.ids.iter().enumerate() {
            let incs = &mut self.incarnations[i];
            let empty = HashSet::new();
            let seen = seen.get(i).unwrap_or(&empty);
            let mut lost_by_survivor = 0;
            for &(event, t) in &self.routed {
                let t = t as usize;
                // The incarnation ready at tick t: the last one that started at or before it.
                let k = incs.partition_point(|c| c.from_tick <= t);
                let Some(inc) = k
                    .checked_sub(1)
                    .map(|k| &mut incs[k])
                    .filter(|c| c.to_tick.is_none_or(|e| t < e))
                else {
                    r.critical_offered_while_down += 1;
                    continue;
                };
                inc.routed += 1;
                if seen.contains(&event) {
                    continue;
                }
                let routed_at = self.tick_s[t];
                if inc.down_at_s.is_some_and(|d| routed_at >= d - IN_FLIGHT_S) {
                    inc.lost_down += 1;
                    r.critical_lost_with_downed += 1;
                } else {
                    inc.lost += 1;
                    lost_by_survivor += 1;
                }
            }
            r.critical_offered_while_down += self.unrouted;
            r.critical_lost_by_survivors += lost_by_survivor;
            r.critical_lost_by_survivors_by_plugin
                .insert(id.clone(), lost_by_survivor);
            r.incarnations.insert(id.clone(), std::mem::take(incs));
        }
        r.disconnects = std::mem::take(&mut self.disconnects);
        r.actions = actions;
        r
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The chaos thread: waits a random gap, picks a kind (each kind once per round of three, in a
/// random order, so that a short run sees each), picks a random ready plugin, acts, logs.
fn chaos_thread(
    spec: &ChaosSpec,
    stop_ms_max: u64,
    ids: &[String],
    started: Instant,
    window: (f64, f64),
    shared: &Mutex<Shared>,
    stopped: &mpsc::Receiver<()>,
) {
    let mut rng = Rng::new(spec.seed);
    let mut round: Vec<Kind> = Vec::new();
    // Pids chaos killed: a killed plugin stays "ready" until the host notices.
    let mut killed: HashSet<u32> = HashSet::new();
    let at = |s: f64| started + Duration::from_secs_f64(s.max(0.0));
    let mut next = at(window.0);
    loop {
        let gap = spec.every_ms as f64 * (0.5 + rng.unit());
        next += Duration::from_secs_f64(gap / 1e3);
        if next > at(window.1) {
            // Out of the window: wait to be stopped.
            let _ = stopped.recv();
            return;
        }
        match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if round.is_empty() {
            round = Kind::ALL.to_vec();
            // Fisher-Yates.
            for i in (1..round.len()).rev() {
                round.swap(i, rng.below(i + 1));
            }
        }
        let candidates: Vec<(usize, u32)> = lock(shared)
            .ready_pids
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.filter(|p| !killed.contains(p)).map(|p| (i, p)))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let kind = round.pop().expect("a round is never empty here");
        let (i, pid) = candidates[rng.below(candidates.len())];
        let now_s = || started.elapsed().as_secs_f64();
        match kind {
            Kind::Sigkill => {
                let at_s = now_s();
                if signal(pid, rustix::process::Signal::KILL) {
                    killed.insert(pid);
                    lock(shared).actions.push(Action {
                        at_s,
                        plugin: ids[i].clone(),
                        pid,
                        kind,
                        stopped_ms: None,
                    });
                }
            }
            Kind::Sigstop => {
                let ms = spec.stop_ms.0 + rng.below((stop_ms_max - spec.stop_ms.0 + 1) as usize) as u64;
                let at_s = now_s();
                if signal(pid, rustix::process::Signal::STOP) {
                    let until = Instant::now() + Duration::from_millis(ms);
                    // A stop asked for meanwhile waits: the plugin must be continued first.
                    let interrupted = stopped.recv_timeout(until.saturating_duration_since(Instant::now()));
                    signal(pid, rustix::process::Signal::CONT);
                    lock(shared).actions.push(Action {
                        at_s,
                        plugin: ids[i].clone(),
                        pid,
                        kind,
                        stopped_ms: Some(((now_s() - at_s) * 1e3).round() as u64),
                    });
                    if !matches!(interrupted, Err(mpsc::RecvTimeoutError::Timeout)) {
                        return;
                    }
                }
            }
            Kind::HostKill => {
                killed.insert(pid);
                lock(shared).host_kills.push((i, pid));
            }
        }
    }
}
