//! The supervisor: a thread of its own that does every piece of process and link work, so the
//! game's tick thread never does: it makes links (creating and populating memory, binding),
//! launches plugins, watches them (a pidfd each), kills, reaps and releases them. The tick
//! thread sends it [`Request`]s on a channel (and one non-blocking `eventfd` write to wake it)
//! and learns the results from [`Report`]s it takes in `Host::poll`.
//!
//! The restart policy, the counts and the notices stay on the tick thread (the host's state);
//! only the work moves.

use std::os::fd::OwnedFd;
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::config::PluginConfig;
use super::inbound::shutdown_message;
use super::launch::{self, describe_status};
use super::slot::{Slot, SlotState};
use super::{Host, HostError, Notice};
use crate::transport::{Downstream, HostLink, LinkRequest, Transports};

/// What the tick thread asks.
pub(crate) enum Request {
    /// Make a link for a slot's new incarnation and launch its process (unless attached).
    Open {
        slot: usize,
        generation: u64,
        cfg: Box<PluginConfig>,
        boot_id: Arc<str>,
    },
    /// Stop an incarnation: kill its process after `grace` (zero: now), reap it, release the
    /// link.
    Stop {
        slot: usize,
        generation: u64,
        link: Option<Box<dyn HostLink>>,
        grace: Duration,
    },
    /// Watch an attached plugin's process (it is not ours to kill or reap).
    WatchPid { slot: usize, generation: u64, pid: u32 },
    /// SIGKILL a slot's current process (for tests and operators); its exit is reported as any.
    Kill { slot: usize },
    /// The host is stopping: give launched processes `grace` to exit, kill the rest, release
    /// every link, then report [`Report::ShutDown`].
    Shutdown {
        grace: Duration,
        links: Vec<Box<dyn HostLink>>,
    },
}

/// What the supervisor tells the tick thread.
pub(crate) enum Report {
    Opened {
        slot: usize,
        generation: u64,
        link: Box<dyn HostLink>,
        address: String,
        pid: Option<u32>,
    },
    OpenFailed {
        slot: usize,
        generation: u64,
        error: HostError,
    },
    Exited {
        slot: usize,
        generation: u64,
        status: String,
        at: Instant,
    },
    /// After [`Request::Shutdown`]: every process gone; `killed` were killed after the grace.
    ShutDown { killed: Vec<String> },
}

/// The tick thread's handle on the supervisor thread.
pub(crate) struct Supervisor {
    tx: Option<mpsc::Sender<Request>>,
    rx: mpsc::Receiver<Report>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    pub(crate) fn start(transports: Transports, max_output_line: usize) -> std::io::Result<Self> {
        let (tx, requests) = mpsc::channel();
        let (reports, rx) = mpsc::channel();
        let wake = Arc::new(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?);
        let thread = std::thread::Builder::new().name("plugbus-supervisor".into()).spawn({
            let wake = wake.clone();
            move || {
                Thread {
                    transports,
                    requests,
                    reports,
                    wake,
                    procs: Vec::new(),
                    shutting_down: None,
                    max_output_line,
                }
                .run()
            }
        })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            wake,
            thread: Some(thread),
        })
    }

    /// Queues a request and wakes the thread (one non-blocking `eventfd` write).
    pub(crate) fn send(&self, r: Request) {
        if let Some(tx) = &self.tx {
            if tx.send(r).is_ok() {
                let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
            }
        }
    }

    pub(crate) fn try_recv(&self) -> Option<Report> {
        self.rx.try_recv().ok()
    }

    /// After [`Request::Shutdown`]: waits (at most `limit`) for [`Report::ShutDown`], logging
    /// the exits on the way.
    pub(crate) fn wait_shut_down(&self, limit: Duration, slots: &[Slot]) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Report::ShutDown { killed }) => {
                    for id in killed {
                        tracing::warn!(plugin = %id, "plugin did not exit within the grace period; killed it");
                    }
                    return;
                }
                Ok(Report::Exited { slot, status, .. }) => {
                    if let Some(s) = slots.get(slot) {
                        tracing::info!(plugin = %s.cfg.id, "plugin {status}");
                    }
                }
                // A link made after the shutdown began: released here.
                Ok(Report::Opened { .. } | Report::OpenFailed { .. }) => {}
                Err(_) => {
                    tracing::error!("the plugin supervisor did not finish the shutdown in time");
                    return;
                }
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Closing the channel tells the thread to kill what is left and stop.
        self.tx = None;
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process the supervisor watches.
struct Proc {
    slot: usize,
    generation: u64,
    id: String,
    /// `None` for an attached plugin's process (not ours to kill or reap).
    child: Option<Child>,
    pid: u32,
    /// Readable once the process exits; `None` where the kernel has no pidfd (before Linux 5.3,
    /// or under valgrind): then the process is checked every [`NO_PIDFD_POLL`].
    pidfd: Option<OwnedFd>,
    kill_at: Option<Instant>,
}

struct Thread {
    transports: Transports,
    requests: mpsc::Receiver<Request>,
    reports: mpsc::Sender<Report>,
    wake: Arc<OwnedFd>,
    procs: Vec<Proc>,
    /// Since a shutdown request: the ids killed after the grace.
    shutting_down: Option<Vec<String>>,
    /// Longest stdout/stderr line forwarded.
    max_output_line: usize,
}

/// SIGKILLs a launched plugin's process group (the plugin and whatever it started that stayed
/// in its group), or the process alone if the group is gone.
fn kill_group(child: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        // The plugin leads its own group (`process_group(0)` at spawn), so its pid is the
        // group's id. A pid is not reused while a group of that id has members.
        if rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).is_ok() {
            return;
        }
    }
    let _ = child.kill();
}

/// After a launched plugin exited: SIGKILLs what is left of its process group (children it
/// left behind).
fn kill_leftovers(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// A pidfd for process `pid`: readable once it exits. `Ok(None)` when the kernel has none
/// (`ENOSYS`): the process is then polled.
fn pidfd_of(pid: u32) -> rustix::io::Result<Option<OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(pid as i32).ok_or(rustix::io::Errno::SRCH)?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOSYS) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How often processes without a pidfd are checked for exit.
const NO_PIDFD_POLL: Duration = Duration::from_millis(10);

/// Whether a process without a pidfd has exited: its status if it is our child (reaped), or
/// "exited" when an attached process is gone.
fn exited_without_pidfd(p: &mut Proc) -> Option<String> {
    match p.child.as_mut() {
        Some(c) => match c.try_wait() {
            Ok(Some(status)) => Some(describe_status(status)),
            Ok(None) => None,
            Err(e) => Some(format!("exited (wait failed: {e})")),
        },
        None => {
            let pid = rustix::process::Pid::from_raw(p.pid as i32)?;
            match rustix::process::test_kill_process(pid) {
                Err(rustix::io::Errno::SRCH) => Some("exited".to_owned()),
                _ => None,
            }
        }
    }
}

/// The longest poll when nothing is due (a request wakes it at once).
const IDLE_POLL: Duration = Duration::from_secs(1);

impl Thread {
    fn run(mut self) {
        for acceptor in self.transports.all() {
            let removed = acceptor.clean_stale();
            if !removed.is_empty() {
                tracing::info!(
                    "removed {} stale {} link(s): {}",
                    removed.len(),
                    acceptor.name(),
                    removed.join(", ")
                );
            }
        }
        loop {
            loop {
                match self.requests.try_recv() {
                    Ok(r) => self.handle(r),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.kill_all();
                        return;
                    }
                }
            }
            if self.procs.is_empty() {
                if let Some(killed) = self.shutting_down.take() {
                    let _ = self.reports.send(Report::ShutDown { killed });
                }
            }
            let now = Instant::now();
            for p in &mut self.procs {
                if p.kill_at.is_some_and(|t| t <= now) {
                    p.kill_at = None;
                    if let Some(c) = p.child.as_mut() {
                        kill_group(c);
                        if let Some(killed) = self.shutting_down.as_mut() {
                            killed.push(p.id.clone());
                        }
                    }
                }
            }
            let timeout = self
                .procs
                .iter()
                .filter_map(|p| p.kill_at)
                .min()
                .map_or(IDLE_POLL, |t| t.saturating_duration_since(now))
                .min(IDLE_POLL)
                .min(if self.procs.iter().any(|p| p.pidfd.is_none()) {
                    NO_PIDFD_POLL
                } else {
                    IDLE_POLL
                });
            self.poll(timeout);
        }
    }

    /// Sleeps until a request, a process exit, or `timeout`; reports the exits.
    fn poll(&mut self, timeout: Duration) {
        let mut fds = Vec::with_capacity(self.procs.len() + 1);
        fds.push(PollFd::new(&*self.wake, PollFlags::IN));
        // Which process each further entry watches.
        let mut watched = Vec::with_capacity(self.procs.len());
        for (k, p) in self.procs.iter().enumerate() {
            if let Some(fd) = &p.pidfd {
                fds.push(PollFd::new(fd, PollFlags::IN));
                watched.push(k);
            }
        }
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let n = rustix::event::poll(&mut fds, Some(&ts)).unwrap_or(0);
        let mut ready = vec![false; self.procs.len()];
        if n > 0 {
            if !fds[0].revents().is_empty() {
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&*self.wake, &mut buf);
            }
            for (f, &k) in fds[1..].iter().zip(&watched) {
                ready[k] = !f.revents().is_empty();
            }
        }
        drop(fds);
        let at = Instant::now();
        // From the highest index down, so that swap_remove never moves an entry still to be seen.
        for k in (0..self.procs.len()).rev() {
            let status = if self.procs[k].pidfd.is_none() {
                match exited_without_pidfd(&mut self.procs[k]) {
                    Some(s) => s,
                    None => continue,
                }
            } else if ready[k] {
                match self.procs[k].child.as_mut().map(Child::wait) {
                    Some(Ok(status)) => describe_status(status),
                    Some(Err(e)) => format!("exited (wait failed: {e})"),
                    None => "exited".to_owned(),
                }
            } else {
                continue;
            };
            let p = self.procs.swap_remove(k);
            if p.child.is_some() {
                kill_leftovers(p.pid);
            }
            let _ = self.reports.send(Report::Exited {
                slot: p.slot,
                generation: p.generation,
                status,
                at,
            });
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::Open {
                slot,
                generation,
                cfg,
                boot_id,
            } => {
                let report = match self.open(slot, generation, &cfg, &boot_id) {
                    Ok(r) => r,
                    Err(error) => Report::OpenFailed {
                        slot,
                        generation,
                        error,
                    },
                };
                let _ = self.reports.send(report);
            }
            Request::Stop {
                slot,
                generation,
                link,
                grace,
            } => {
                drop(link);
                let at = Instant::now() + grace;
                for p in self
                    .procs
                    .iter_mut()
                    .filter(|p| p.slot == slot && p.generation == generation)
                {
                    if p.child.is_some() {
                        p.kill_at = Some(p.kill_at.map_or(at, |t| t.min(at)));
                    } else {
                        // An attached process: stop watching it.
                        p.kill_at = None;
                    }
                }
                self.procs
                    .retain(|p| !(p.slot == slot && p.generation == generation && p.child.is_none()));
            }
            Request::WatchPid { slot, generation, pid } => match pidfd_of(pid) {
                Ok(pidfd) => self.procs.push(Proc {
                    slot,
                    generation,
                    id: String::new(),
                    child: None,
                    pid,
                    pidfd,
                    kill_at: None,
                }),
                Err(_) => {
                    let _ = self.reports.send(Report::Exited {
                        slot,
                        generation,
                        status: "exited".into(),
                        at: Instant::now(),
                    });
                }
            },
            Request::Kill { slot } => {
                if let Some(p) = self
                    .procs
                    .iter_mut()
                    .filter(|p| p.slot == slot && p.child.is_some())
                    .max_by_key(|p| p.generation)
                {
                    if let Some(c) = p.child.as_mut() {
                        kill_group(c);
                    }
                }
            }
            Request::Shutdown { grace, links } => {
                drop(links);
                let at = Instant::now() + grace;
                self.procs.retain(|p| p.child.is_some());
                for p in &mut self.procs {
                    p.kill_at = Some(p.kill_at.map_or(at, |t| t.min(at)));
                }
                self.shutting_down = Some(Vec::new());
            }
        }
    }

    fn open(&mut self, slot: usize, generation: u64, cfg: &PluginConfig, boot_id: &str) -> Result<Report, HostError> {
        let link_error = |reason: String| HostError::Link {
            id: cfg.id.clone(),
            reason,
        };
        let launch_error = |source: std::io::Error| HostError::Launch {
            id: cfg.id.clone(),
            command: cfg
                .command
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            source,
        };
        let acceptor = self
            .transports
            .get(&cfg.transport)
            .ok_or_else(|| link_error(format!("unknown transport {:?}", cfg.transport)))?;
        let opened = acceptor
            .open(&LinkRequest {
                plugin_id: &cfg.id,
                attach: cfg.attach,
                address: cfg.address.as_deref(),
                queues: &cfg.queues,
            })
            .map_err(|e| link_error(e.0))?;
        if cfg.attach {
            return Ok(Report::Opened {
                slot,
                generation,
                link: opened.link,
                address: opened.address,
                pid: None,
            });
        }
        let mut child =
            launch::spawn(cfg, &opened.env, opened.inherit, boot_id, self.max_output_line).map_err(launch_error)?;
        let pid = child.id();
        match pidfd_of(pid) {
            Ok(pidfd) => self.procs.push(Proc {
                slot,
                generation,
                id: cfg.id.clone(),
                child: Some(child),
                pid,
                pidfd,
                kill_at: None,
            }),
            Err(e) => {
                // Without a pidfd the process cannot be watched: do not leave it unwatched.
                kill_group(&mut child);
                let _ = child.wait();
                return Err(launch_error(e.into()));
            }
        }
        Ok(Report::Opened {
            slot,
            generation,
            link: opened.link,
            address: opened.address,
            pid: Some(pid),
        })
    }

    /// The host went away without a shutdown: kill and reap what is left.
    fn kill_all(&mut self) {
        for mut p in self.procs.drain(..) {
            if let Some(c) = p.child.as_mut() {
                kill_group(c);
                let _ = c.wait();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The tick thread's side: reports in, requests out, the restart policy
// ------------------------------------------------------------------------------------------

impl Host {
    /// Asks the supervisor for a new incarnation of slot `i`.
    pub(super) fn open_slot(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.generation += 1;
        s.state = SlotState::Connecting;
        s.connecting_since = Instant::now();
        s.subscribed = Default::default();
        s.hello = None;
        s.pid = None;
        s.pid_watched = false;
        self.supervisor.send(Request::Open {
            slot: i,
            generation: s.generation,
            cfg: Box::new(s.cfg.clone()),
            boot_id: self.boot_id.clone(),
        });
    }

    pub(super) fn take_reports(&mut self) {
        while let Some(r) = self.supervisor.try_recv() {
            self.on_report(r);
        }
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::Opened {
                slot,
                generation,
                link,
                address,
                pid,
            } => {
                let s = &mut self.slots[slot];
                if s.generation != generation || s.state != SlotState::Connecting || self.shut_down {
                    self.supervisor.send(Request::Stop {
                        slot,
                        generation,
                        link: Some(link),
                        grace: Duration::ZERO,
                    });
                    return;
                }
                // A link without a wake handle (gRPC: its wake is cheap) is woken inline.
                let handle = self.waker.as_ref().and(link.wake_handle());
                s.wake_handed = handle.is_some();
                if let Some(w) = &self.waker {
                    w.set_handle(slot, handle);
                }
                s.link = Some(link);
                s.opened = true;
                s.pid = pid;
                s.connecting_since = Instant::now();
                match pid {
                    Some(pid) => tracing::info!(plugin = %s.cfg.id, pid, address = %address, "launched plugin"),
                    None => tracing::info!(plugin = %s.cfg.id, "waiting for an external plugin to attach at {address}"),
                }
                s.address = address;
            }
            Report::OpenFailed {
                slot,
                generation,
                error,
            } => {
                let s = &mut self.slots[slot];
                if s.generation != generation {
                    return;
                }
                if !self.started {
                    self.start_error.get_or_insert(error);
                    s.state = SlotState::Disabled("could not start".into());
                    return;
                }
                let id = s.cfg.id.clone();
                let reason = format!("restart failed: {error}");
                tracing::error!(plugin = %id, "{reason}");
                s.state = SlotState::Disabled(reason.clone());
                self.notices.push_back(Notice::Disabled { id, reason });
            }
            Report::Exited {
                slot,
                generation,
                status,
                at,
            } => {
                let s = &self.slots[slot];
                let _ = &status;
                if s.generation != generation || !s.is_live() {
                    return;
                }
                let reason = if s.cfg.attach {
                    format!("attached process {} died", s.link.as_ref().map_or(0, |l| l.peer().pid))
                } else if s.state == SlotState::Connecting {
                    format!("process {status} before its hello")
                } else {
                    format!("process {status}")
                };
                self.disconnect(slot, reason, true, at);
            }
            Report::ShutDown { .. } => {}
        }
    }

    /// Disconnects plugin `i`: logs the reason and the undelivered count, tells it to stop, has
    /// the supervisor kill its process and release its link; then applies the restart policy.
    pub(super) fn disconnect(&mut self, i: usize, reason: String, restart: bool, detected_at: Instant) {
        self.disconnect_with(i, reason, restart, detected_at, Duration::ZERO);
    }

    fn disconnect_with(&mut self, i: usize, reason: String, restart: bool, detected_at: Instant, grace: Duration) {
        let s = &mut self.slots[i];
        if !s.is_live() {
            return;
        }
        // A medium that failed shows up first as a broken link: name the real cause.
        let reason = match s.link.as_ref().and_then(|l| l.failure()) {
            Some(why) if !reason.contains(why) => format!("{why} ({reason})"),
            _ => reason,
        };
        let undelivered = s.undelivered();
        tracing::error!(plugin = %s.cfg.id, undelivered, "plugin disconnected: {reason}");
        *s.stats.disconnects.entry(short_reason(&reason)).or_default() += 1;
        if let Some(link) = s.link.as_mut() {
            let _ = link.try_send(Downstream::Message(&shutdown_message(&s.cfg.id, &reason)));
            link.close();
        }
        s.publish_counters();
        self.supervisor.send(Request::Stop {
            slot: i,
            generation: s.generation,
            link: s.link.take(),
            grace,
        });
        s.pid = None;
        s.reset_queues(&mut self.pool);
        s.state = SlotState::Disconnected(reason.clone());
        self.notices.push_back(Notice::Disconnected {
            id: s.cfg.id.clone(),
            reason,
            undelivered,
            detected_at,
        });
        self.rebuild_subs();
        if restart {
            self.maybe_restart(i);
        }
    }

    /// Refuses plugin `i`'s handshake: disabled, its process given the grace period to read why
    /// and exit.
    pub(super) fn refuse(&mut self, i: usize, reason: String) {
        let grace = self.settings.shutdown_grace();
        self.disconnect_with(i, reason.clone(), false, Instant::now(), grace);
        self.disable(i, reason);
    }

    fn disable(&mut self, i: usize, reason: String) {
        self.disconnect(i, reason.clone(), false, Instant::now());
        let s = &mut self.slots[i];
        s.state = SlotState::Disabled(reason.clone());
        self.notices.push_back(Notice::Disabled {
            id: s.cfg.id.clone(),
            reason,
        });
    }

    fn maybe_restart(&mut self, i: usize) {
        if self.shut_down {
            return;
        }
        let now = Instant::now();
        let window = Duration::from_secs(self.settings.restart_window_s);
        let s = &mut self.slots[i];
        if s.cfg.attach {
            // An attached plugin is re-armed: a new link at the same address, for the next
            // process that connects.
            self.open_slot(i);
            return;
        }
        while s.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            s.restarts.pop_front();
        }
        if s.restarts.len() >= self.settings.restart_max as usize {
            let reason = format!(
                "restarted {} times within {} s; disabled",
                s.restarts.len(),
                self.settings.restart_window_s
            );
            tracing::error!(plugin = %s.cfg.id, "{reason}");
            s.state = SlotState::Disabled(reason.clone());
            self.notices.push_back(Notice::Disabled {
                id: s.cfg.id.clone(),
                reason,
            });
            return;
        }
        s.restarts.push_back(now);
        s.stats.restarts += 1;
        let attempt = s.restarts.len();
        let id = s.cfg.id.clone();
        self.open_slot(i);
        tracing::warn!(plugin = %id, attempt, "plugin restarting");
        self.notices.push_back(Notice::Restarted { id, attempt });
    }

    /// Kills launched plugin `id` with SIGKILL (for tests and operators); its exit is then
    /// handled like any crash. Returns whether it had a process.
    pub fn kill_plugin(&mut self, id: &str) -> bool {
        let Some(i) = self.slots.iter().position(|s| s.cfg.id == id) else {
            return false;
        };
        if self.slots[i].pid.is_none() {
            return false;
        }
        self.supervisor.send(Request::Kill { slot: i });
        true
    }

    pub(super) fn check_health(&mut self, i: usize, now: Instant) {
        let hello_timeout = self.settings.hello_timeout();
        let s = &mut self.slots[i];
        match s.state {
            SlotState::Connecting if !s.cfg.attach => {
                if now.duration_since(s.connecting_since) > hello_timeout {
                    let reason = format!("no hello within {} ms", self.settings.hello_timeout_ms);
                    self.disconnect(i, reason, true, now);
                }
                return;
            }
            SlotState::Ready => {}
            _ => return,
        }
        let Some(link) = s.link.as_mut() else { return };
        if let Some(why) = link.failure() {
            self.disconnect(i, why.to_owned(), true, now);
            return;
        }
        let peer = link.peer();
        if s.cfg.attach && !s.pid_watched && peer.pid != 0 {
            // Launched plugins are watched from their launch; an attached one from when its
            // process is known.
            s.pid_watched = true;
            self.supervisor.send(Request::WatchPid {
                slot: i,
                generation: s.generation,
                pid: peer.pid,
            });
        }
        let age_ms = peer.heartbeat_age_ns / 1_000_000;
        if age_ms > self.settings.heartbeat_timeout_ms {
            // Its process lives (the supervisor reports deaths on its own): it is wedged.
            let reason = format!(
                "wedged: no heartbeat for {age_ms} ms while its process is alive (host.heartbeat_timeout_ms = {})",
                self.settings.heartbeat_timeout_ms
            );
            tracing::error!(plugin = %s.cfg.id, "{reason}");
            self.disconnect(i, reason, true, now);
            return;
        }
        let stale = age_ms > self.settings.slow_heartbeat_ms;
        let occupancy = link.occupancy().unwrap_or_default();
        let fill = occupancy.moves.max(occupancy.control);
        let slow_now = stale || fill > self.settings.slow_occupancy;
        if slow_now && !s.slow {
            s.stats.slow_reports += 1;
            let what = if stale {
                format!("no heartbeat for {age_ms} ms")
            } else {
                format!("buffers {:.0}% full", fill * 100.0)
            };
            tracing::warn!(plugin = %s.cfg.id, "slow plugin: {what}");
            self.notices.push_back(Notice::Slow {
                id: s.cfg.id.clone(),
                what,
            });
        }
        s.slow = slow_now || (s.slow && fill > self.settings.slow_occupancy / 2.0);
        s.publish_counters();
    }
}

/// The first words of a reason, as a metric label.
fn short_reason(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    for (needle, label) in [
        ("overflow", "overflow"),
        ("quota exceeded", "quota"),
        ("wedged", "wedged"),
        ("before its hello", "exited_before_hello"),
        ("no hello", "hello_timeout"),
        ("handshake refused", "refused"),
        ("signal", "killed"),
        ("attached process", "died"),
        ("exited", "exited"),
        ("died", "died"),
        ("protocol violation", "protocol"),
        ("malformed", "protocol"),
        ("link error", "link_error"),
    ] {
        if r.contains(needle) {
            return label.to_owned();
        }
    }
    "other".to_owned()
}

// The trait objects travel between threads.
const _: () = {
    const fn send<T: Send>() {}
    send::<Request>();
    send::<Report>();
};

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_get_labels() {
        assert_eq!(super::short_reason("process killed by signal 9"), "killed");
        assert_eq!(super::short_reason("attached process 12 exited"), "died");
        assert_eq!(super::short_reason("overflow: more than 4 messages"), "overflow");
    }
}
