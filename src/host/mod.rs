//! The host runtime, embedded in a game server: launches plugins, shakes hands, routes events
//! by subscription, batches them per tick, gathers replies with deadlines, applies backpressure
//! without ever blocking the tick, and watches plugin health.
//!
//! ```no_run
//! use plugbus::host::{Host, HostConfig, PluginConfig};
//! use plugbus::proto::{event_envelope::Payload, EventType};
//!
//! let config = HostConfig::new(vec![
//!     PluginConfig::launch("chat_filter", "target/release/examples/chat_filter").required(true),
//! ]);
//! let mut host = Host::start(config)?;            // waits for required plugins' hello
//! let mut events = plugbus::codec::EnvelopePool::default();
//! loop {
//!     let mut tick = host.begin_tick();
//!     // tick.publish_move(record) for each player that moved
//!     let mut chat = events.take(EventType::Chat);
//!     if let Some(Payload::Chat(c)) = &mut chat.payload {
//!         c.message.push_str("hello");
//!     }
//!     let pending = tick.dispatch(&mut chat);     // expects a response: returns at once
//!     events.give(chat);
//!     tick.end();                                 // flush batches, one wake-up per plugin
//!     let outcome = host.wait(&pending, std::time::Instant::now() + host.settings().response_timeout());
//!     if outcome.cancelled { /* drop the chat message */ }
//!     for action in host.drain_actions() { /* apply it in the game */ let _ = action; }
//!     # break;
//! }
//! host.shutdown("server stopping");
//! # Ok::<(), plugbus::host::HostError>(())
//! ```
//!
//! **The parts.** [`tick`](self) publishes and ends ticks (`tick.rs`); inbound messages are
//! read and routed in `inbound.rs`; events that expect a response are gathered and merged in
//! `pending.rs`; plugin processes and links are made, restarted and stopped by a supervisor
//! thread (`supervise.rs`), so that the game's tick thread only writes to links, reads from
//! them and, when a plugin sleeps, wakes it. Each plugin's ordered stream is kept in
//! `slot.rs`. The wire is the transport port's business ([`crate::transport`]).
//!
//! **Steady state without allocation.** Publishing, dispatching, ending ticks and reading
//! answers allocate nothing once warm. So does taking outcomes, actions and log lines when the
//! server hands back what it took: keep one [`Outcome`] and take outcomes with
//! [`Host::poll_outcome_into`] / [`Host::wait_into`]; give actions and log lines back with
//! [`Host::recycle_action`] / [`Host::recycle_log`]; send action results with
//! [`Host::send_action_result_ref`] from a reused [`proto::ActionResult`]. (A mutation with an
//! `optional string` field, such as a chat mutation, still allocates its string when decoded.)
//! `tests/alloc_free.rs` checks all of it with a counting allocator.
//!
//! **Merge rule for events that expect a response.** If any plugin that answered cancels, the
//! event is cancelled. Otherwise the mutations are applied in ascending plugin priority (ties
//! broken by plugin id, ascending): each later mutation's set fields overwrite the earlier
//! ones, so the plugin with the highest priority has the final say. A plugin that did not
//! answer by the deadline counts as "no change" and is counted late.

pub mod config;
mod inbound;
mod launch;
mod logsink;
mod metrics;
mod pending;
mod recycle;
mod slot;
pub mod stats;
mod supervise;
mod tick;
mod waker;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use config::{ConfigError, HostConfig, HostSettings, PluginConfig};
pub use launch::{ENV_ALLOWLIST, ENV_DF_HOST_BOOT_ID, ENV_DF_PLUGIN_ID, ENV_PLUGIN_ID};
pub use logsink::escape as escape_plugin_text;
pub use pending::{Outcome, Pending, WAIT_SPIN};
pub use slot::{EventSet, SlotState};
pub use stats::{Hist, HostStats, MetricsSnapshot, PluginStats, TickCost};
pub use tick::Tick;

use crate::codec::{BatchLimits, BufferPool, PluginDecoder};
use crate::fastpath::MoveRecord;
use crate::proto::{self, Action, EventType};
pub use crate::transport::QueueSizes;
use crate::transport::Transports;

use pending::{PendingEvent, Target};
use slot::Slot;
use supervise::{Request, Supervisor};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin's link could not be made.
    #[error("plugin `{id}`: {reason}")]
    Link {
        /// Plugin id.
        id: String,
        /// Why (from the transport).
        reason: String,
    },
    /// A plugin could not be launched.
    #[error("plugin `{id}`: cannot launch {command:?}: {source}")]
    Launch {
        /// Plugin id.
        id: String,
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A required plugin did not complete its handshake.
    #[error("required plugin `{id}` did not start: {reason}")]
    RequiredPlugin {
        /// Plugin id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The supervisor thread could not start.
    #[error("cannot start the plugin supervisor: {0}")]
    Supervisor(std::io::Error),
    /// The `record` file could not be created.
    #[error("cannot record to {path}: {source}")]
    Record {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Something the embedding server may want to know about a plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Handshake completed.
    Ready {
        /// Plugin id.
        id: String,
        /// Name and version from its hello.
        name: String,
    },
    /// Disconnected; `undelivered` events were dropped with it.
    Disconnected {
        /// Plugin id.
        id: String,
        /// Why.
        reason: String,
        /// Events that were queued for it and are now lost (reported, never silent).
        undelivered: u64,
        /// When the host saw it (for launched plugins, when the supervisor saw the exit).
        detected_at: Instant,
    },
    /// Relaunched after a disconnect.
    Restarted {
        /// Plugin id.
        id: String,
        /// Restarts within the current window.
        attempt: usize,
    },
    /// Disabled for good.
    Disabled {
        /// Plugin id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Reported slow (reply latency or buffer fill over threshold, or no heartbeat).
    Slow {
        /// Plugin id.
        id: String,
        /// What was slow.
        what: String,
    },
}

/// An action a plugin asked for, in arrival order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActionItem {
    /// The plugin that sent it.
    pub plugin: String,
    /// The action.
    pub action: Action,
}

/// A log line a plugin sent (`LogMessage`), in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogItem {
    /// The plugin that sent it.
    pub plugin: String,
    /// Its level as sent (`info`, `warn`, ...).
    pub level: String,
    /// The message.
    pub message: String,
}

/// The host runtime. Drive it from the game's tick thread.
pub struct Host {
    settings: HostSettings,
    limits: BatchLimits,
    boot_id: std::sync::Arc<str>,
    slots: Vec<Slot>,
    /// Per event type number: the ready plugins subscribed to it.
    subs: Vec<Vec<usize>>,
    tick: u64,
    next_event_id: u64,
    pending: HashMap<u64, PendingEvent>,
    target_pool: Vec<Vec<Target>>,
    /// Encoded updates of answers not merged yet (small buffers, reused).
    update_pool: BufferPool,
    /// The message answers are merged into (its variant's allocations reused).
    merged: proto::EventResult,
    /// Strings of merged mutations kept for the next merge (a chat mutation's text).
    merge_spare: crate::codec::StringSpare,
    actions: VecDeque<ActionItem>,
    logs: VecDeque<LogItem>,
    /// Items given back by the server, for the next actions and log lines.
    recycler: recycle::Recycler,
    /// The actions of the batch being read (reused).
    staged_actions: Vec<ActionItem>,
    notices: VecDeque<Notice>,
    scratch: Vec<u8>,
    moves: Vec<MoveRecord>,
    pool: BufferPool,
    /// The plugin message being handled (copied out of its link; reused).
    rx_buf: Vec<u8>,
    /// Actions and log lines taken in from the plugin being read, this poll.
    poll_actions: usize,
    poll_logs: usize,
    log_sink: logsink::LogSink,
    /// Slots a waiting host sleeps on (reused).
    waiting: Vec<usize>,
    decoder: PluginDecoder,
    supervisor: Supervisor,
    stats: HostStats,
    /// The tick in progress's cost so far; the last tick's once it ended.
    cost: TickCost,
    /// The wake thread (`wake_thread` setting).
    waker: Option<waker::Waker>,
    last_health: Instant,
    /// Writes every tick's moves and events (the `record` setting), and its scratch buffer.
    recorder: Option<crate::jsonl::Recorder>,
    record_buf: Vec<u8>,
    /// Until `start` returns: the first plugin whose link or process could not be made.
    start_error: Option<HostError>,
    started: bool,
    shut_down: bool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("boot_id", &self.boot_id)
            .field(
                "plugins",
                &self.slots.iter().map(|s| (&s.cfg.id, &s.state)).collect::<Vec<_>>(),
            )
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Starts the host from a TOML file (see [`config`]).
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Self, HostError> {
        Self::start(HostConfig::from_file(path)?)
    }

    /// [`Host::start_with`] the transports plugbus ships.
    pub fn start(config: HostConfig) -> Result<Self, HostError> {
        Self::start_with(config, Transports::standard())
    }

    /// Starts the supervisor (which first removes what dead hosts left behind), makes every
    /// plugin's link, launches the launched ones, and waits (up to the hello timeout) for the
    /// required ones' hello.
    pub fn start_with(config: HostConfig, mut transports: Transports) -> Result<Self, HostError> {
        config.validate()?;
        for a in transports.all() {
            a.listen(&config.host.listen_settings())
                .map_err(|e| ConfigError::new(None, Some("host.listen"), e))?;
        }
        for p in &config.plugins {
            if transports.get(&p.transport).is_none() {
                return Err(ConfigError::new(
                    Some(&p.id),
                    Some("transport"),
                    format!("unknown transport {:?} (known: {transports:?})", p.transport),
                )
                .into());
            }
        }
        let settings = config.host.clone();
        if settings.protect_memory {
            protect_memory();
        }
        let max_output_line = settings.max_output_line;
        let recorder = match &settings.record {
            Some(path) => Some(
                crate::jsonl::Recorder::create(path).map_err(|source| HostError::Record {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let mut host = Self {
            limits: BatchLimits {
                max_events: settings.batch_max_events,
                max_bytes: settings.batch_max_bytes,
            },
            settings,
            boot_id: uuid::Uuid::new_v4().to_string().into(),
            slots: config.plugins.into_iter().map(Slot::new).collect(),
            subs: (0..128).map(|_| Vec::new()).collect(),
            tick: 0,
            next_event_id: 1,
            // Room for the events of a few ticks awaiting their outcomes: no rehash in steady
            // state.
            pending: HashMap::with_capacity(256),
            target_pool: Vec::new(),
            update_pool: BufferPool::new(256, 64),
            merged: proto::EventResult::default(),
            merge_spare: crate::codec::StringSpare::default(),
            actions: VecDeque::new(),
            logs: VecDeque::new(),
            recycler: recycle::Recycler::default(),
            staged_actions: Vec::new(),
            notices: VecDeque::new(),
            scratch: Vec::with_capacity(4096),
            moves: Vec::new(),
            pool: BufferPool::default(),
            rx_buf: Vec::new(),
            poll_actions: 0,
            poll_logs: 0,
            log_sink: logsink::LogSink::start(),
            waiting: Vec::new(),
            decoder: PluginDecoder::default(),
            supervisor: Supervisor::start(transports, max_output_line).map_err(HostError::Supervisor)?,
            stats: HostStats::default(),
            cost: TickCost::default(),
            waker: if config.host.wake_thread {
                Some(waker::Waker::start().map_err(HostError::Supervisor)?)
            } else {
                None
            },
            last_health: Instant::now(),
            recorder,
            record_buf: Vec::new(),
            start_error: None,
            started: false,
            shut_down: false,
        };
        for i in 0..host.slots.len() {
            host.open_slot(i);
        }
        let deadline = Instant::now() + host.settings.hello_timeout();
        loop {
            host.poll();
            if let Some(e) = host.start_error.take() {
                return Err(e);
            }
            let mut waiting = false;
            for s in &host.slots {
                if !s.cfg.required {
                    continue;
                }
                match &s.state {
                    SlotState::Ready => {}
                    SlotState::Connecting => waiting = true,
                    SlotState::Disconnected(r) | SlotState::Disabled(r) => {
                        return Err(HostError::RequiredPlugin {
                            id: s.cfg.id.clone(),
                            reason: r.clone(),
                        });
                    }
                }
            }
            // Every link made, and every required plugin ready.
            if !waiting && host.slots.iter().all(|s| s.opened || !s.is_live()) {
                break;
            }
            if Instant::now() >= deadline {
                let id = host
                    .slots
                    .iter()
                    .find(|s| s.cfg.required && s.state == SlotState::Connecting)
                    .map(|s| s.cfg.id.clone())
                    .unwrap_or_default();
                return Err(HostError::RequiredPlugin {
                    id,
                    reason: format!("no hello within {} ms", host.settings.hello_timeout_ms),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        host.started = true;
        Ok(host)
    }

    /// Host-wide settings.
    pub fn settings(&self) -> &HostSettings {
        &self.settings
    }

    /// This host run's boot id (sent in `HostHello`).
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The current tick number (incremented by each `begin_tick`).
    pub fn tick_number(&self) -> u64 {
        self.tick
    }

    /// Plugin ids and states.
    pub fn plugins(&self) -> Vec<(String, SlotState)> {
        self.slots.iter().map(|s| (s.cfg.id.clone(), s.state.clone())).collect()
    }

    /// The address plugin `id` connects to (for attach mode and inspection); empty until its
    /// link is made.
    pub fn address_of(&self, id: &str) -> Option<&str> {
        self.slot(id).map(|s| s.address.as_str())
    }

    /// The process id of launched plugin `id`, if running.
    pub fn pid_of(&self, id: &str) -> Option<u32> {
        self.slot(id).and_then(|s| s.pid)
    }

    /// Whether plugin `id` completed its handshake and is connected.
    pub fn is_ready(&self, id: &str) -> bool {
        self.slot(id).is_some_and(Slot::is_ready)
    }

    /// Whether plugin `id` is ready and subscribed to `ty`.
    pub fn is_subscribed(&self, id: &str, ty: EventType) -> bool {
        self.slot(id)
            .is_some_and(|s| s.is_ready() && s.subscribed.contains(ty as i32))
    }

    /// The tick and CLOCK_MONOTONIC time (ns, see [`crate::clock::monotonic_ns`]) at which the
    /// last move frame for plugin `id` was handed to its link, for latency measurements.
    pub fn last_moves_published(&self, id: &str) -> Option<(u64, u64)> {
        self.slot(id).map(|s| s.last_moves).filter(|m| m.1 != 0)
    }

    /// Events waiting in the host for plugin `id` (gathered in its batch, or queued because
    /// its link had no room): a publisher that must not outrun a plugin can wait on it.
    pub fn backlog(&self, id: &str) -> Option<u64> {
        self.slot(id).map(Slot::undelivered)
    }

    /// The hello plugin `id` sent.
    pub fn hello_of(&self, id: &str) -> Option<&proto::PluginHello> {
        self.slot(id).and_then(|s| s.hello.as_ref())
    }

    fn slot(&self, id: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.cfg.id == id)
    }

    /// Waits (polling) until every plugin is ready or `timeout` passes; returns whether all are.
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if self.slots.iter().all(Slot::is_ready) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Actions received from plugins since the last call, in arrival order. Take them every
    /// tick or so: a plugin whose untaken actions pass `max_queued_actions` (or, with its log
    /// lines, `max_queued_bytes`) is disconnected.
    pub fn drain_actions(&mut self) -> std::collections::vec_deque::Drain<'_, ActionItem> {
        for s in &mut self.slots {
            s.held.actions = 0;
            s.held.action_bytes = 0;
        }
        self.actions.drain(..)
    }

    /// Log lines plugins sent since the last call, in arrival order (each also went to the
    /// `tracing` log, escaped). The text is the plugin's own: untrusted, unescaped. Take them
    /// every tick or so: a plugin whose untaken lines pass `max_queued_logs` (or, with its
    /// actions, `max_queued_bytes`) is disconnected.
    pub fn drain_logs(&mut self) -> std::collections::vec_deque::Drain<'_, LogItem> {
        for s in &mut self.slots {
            s.held.logs = 0;
            s.held.log_bytes = 0;
        }
        self.logs.drain(..)
    }

    /// Gives back an action taken with [`Host::next_action`] or [`Host::drain_actions`] once the
    /// server is done with it: a later action of its kind is decoded into it, reusing its
    /// strings. With every action given back, taking actions allocates nothing in steady state.
    pub fn recycle_action(&mut self, item: ActionItem) {
        self.recycler.give_action(item);
    }

    /// Gives back a log line taken with [`Host::next_log`] or [`Host::drain_logs`] (see
    /// [`Host::recycle_action`]).
    pub fn recycle_log(&mut self, item: LogItem) {
        self.recycler.give_log(item);
    }

    /// Notices since the last call (plugins ready, disconnected, restarted, slow...).
    pub fn drain_notices(&mut self) -> std::collections::vec_deque::Drain<'_, Notice> {
        self.notices.drain(..)
    }

    /// The oldest action not taken yet (one at a time, for callers that cannot hold a drain).
    pub fn next_action(&mut self) -> Option<ActionItem> {
        let item = self.actions.pop_front()?;
        if let Some(s) = self.slots.iter_mut().find(|s| s.cfg.id == item.plugin) {
            s.held.actions = s.held.actions.saturating_sub(1);
            s.held.action_bytes = s
                .held
                .action_bytes
                .saturating_sub(prost::Message::encoded_len(&item.action));
        }
        Some(item)
    }

    /// The oldest plugin log line not taken yet.
    pub fn next_log(&mut self) -> Option<LogItem> {
        let item = self.logs.pop_front()?;
        if let Some(s) = self.slots.iter_mut().find(|s| s.cfg.id == item.plugin) {
            s.held.logs = s.held.logs.saturating_sub(1);
            s.held.log_bytes = s.held.log_bytes.saturating_sub(item.level.len() + item.message.len());
        }
        Some(item)
    }

    /// The oldest notice not taken yet.
    pub fn next_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    /// Where the last ended tick's time went (the tick in progress's so far, between
    /// `begin_tick` and its end): encoding, writes to the links, wake-ups, reading replies.
    pub fn last_tick_cost(&self) -> TickCost {
        self.cost
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut host = self.stats.clone();
        host.logs_dropped = self.log_sink.dropped();
        if let Some(w) = &self.waker {
            let ws = w.stats();
            host.wake_windows = ws.windows;
            host.wake_windows_used = ws.served_ticks;
            host.wake_window_ns = ws.window_ns;
        }
        MetricsSnapshot {
            host,
            plugins: self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut stats = s.stats.clone();
                    stats.wakeups += self.waker.as_ref().map_or(0, |w| w.woken(i));
                    (s.cfg.id.clone(), stats)
                })
                .collect(),
            pool: self.pool.stats(),
        }
    }

    /// Sends `HostShutdown` to every plugin, waits up to the grace period for launched plugins
    /// to exit, kills the rest, and releases every link.
    pub fn shutdown(&mut self, reason: &str) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        let mut links = Vec::new();
        for s in &mut self.slots {
            if s.link.is_some() {
                s.flush_or_drop();
            }
            if let Some(link) = s.link.as_mut() {
                let _ = link.try_send(crate::transport::Downstream::Message(&inbound::shutdown_message(
                    &s.cfg.id, reason,
                )));
                link.close();
            }
            s.publish_counters();
            links.extend(s.link.take());
            if s.is_live() {
                s.state = SlotState::Disconnected(format!("host shutdown: {reason}"));
            }
        }
        let grace = self.settings.shutdown_grace();
        self.supervisor.send(Request::Shutdown { grace, links });
        self.supervisor
            .wait_shut_down(grace + Duration::from_secs(5), &self.slots);
        if let Some(r) = self.recorder.take() {
            let dropped = r.dropped();
            match r.finish() {
                Ok(lines) if dropped == 0 => tracing::info!("recorded {lines} lines"),
                Ok(lines) => {
                    tracing::warn!("recorded {lines} lines; {dropped} items dropped (the writer could not keep up)")
                }
                Err(e) => tracing::error!("recording failed: {e}"),
            }
        }
    }
}

/// Makes this process non-dumpable, so that a process of the same user (a plugin) can neither
/// ptrace it nor read its memory or its file descriptors through /proc. Where the kernel
/// refuses, says so and goes on.
fn protect_memory() {
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        tracing::warn!("cannot make the host non-dumpable (PR_SET_DUMPABLE): {e}");
    }
}

impl Slot {
    /// At shutdown, flushing is best effort: drop what does not fit, but say so.
    fn flush_or_drop(&mut self) -> u64 {
        let mut pool = BufferPool::new(0, 0);
        let _ = self.flush_batch(&mut pool, usize::MAX);
        let left = self.undelivered();
        if left > 0 {
            tracing::warn!(plugin = %self.cfg.id, undelivered = left, "events not delivered before shutdown");
        }
        left
    }

    /// Connecting or ready.
    fn is_live(&self) -> bool {
        matches!(self.state, SlotState::Ready | SlotState::Connecting)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown("host stopped");
    }
}
