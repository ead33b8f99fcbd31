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
//!     tick.end();                                 // flush batches, one doorbell per plugin
//!     let outcome = host.wait(&pending, std::time::Instant::now() + host.settings().response_timeout());
//!     if outcome.cancelled { /* drop the chat message */ }
//!     for action in host.drain_actions() { /* apply it in the game */ let _ = action; }
//!     # break;
//! }
//! host.shutdown("server stopping");
//! # Ok::<(), plugbus::host::HostError>(())
//! ```
//!
//! **Merge rule for events that expect a response.** If any plugin that answered cancels, the
//! event is cancelled. Otherwise the mutations are applied in ascending plugin priority (ties
//! broken by plugin id, ascending): each later mutation's set fields overwrite the earlier
//! ones, so the plugin with the highest priority has the final say. A plugin that did not
//! answer by the deadline counts as "no change" and is counted late.

pub mod config;
mod launch;
mod metrics;
mod slot;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use prost::Message as _;

pub use config::{ConfigError, HostConfig, HostSettings, PluginConfig, RingSizes};
pub use launch::{ENV_DF_HOST_BOOT_ID, ENV_DF_PLUGIN_ID, ENV_PLUGIN_ID, ENV_SEGMENT};
pub use slot::{EventSet, SlotState};
pub use stats::{Hist, HostStats, MetricsSnapshot, PluginStats};

use crate::codec::{BatchLimits, BufferPool, PluginDecoder};
use crate::fastpath::MoveRecord;
use crate::proto::{
    self, Action, ActionResult, EventEnvelope, EventResult, EventType, HostHello, HostShutdown, HostToPlugin,
    event_result, host_to_plugin, plugin_to_host,
};
use crate::segment::{self, SegmentCreateError};
use crate::transport::shm::ShmHostLink;

use launch::Supervisor;
use slot::{SendOutcome, Slot};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin's segment could not be created.
    #[error("plugin `{id}`: cannot create its segment: {source}")]
    Segment {
        /// Plugin id.
        id: String,
        /// Cause.
        source: SegmentCreateError,
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
    /// Reported slow (reply latency or ring fill over threshold, or no heartbeat).
    Slow {
        /// Plugin id.
        id: String,
        /// What was slow.
        what: String,
    },
}

/// An action a plugin asked for, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionItem {
    /// The plugin that sent it.
    pub plugin: String,
    /// The action.
    pub action: Action,
}

/// Handle of an event that expects a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "poll or wait for the outcome"]
pub struct Pending {
    id: u64,
}

impl Pending {
    /// The event id (as sent in `EventEnvelope.event_id`).
    pub fn event_id(&self) -> u64 {
        self.id
    }
}

/// The merged answer to an event that expects a response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The event id.
    pub event_id: u64,
    /// Some plugin cancelled the event.
    pub cancelled: bool,
    /// The merged mutation (see the module docs for the rule), if any plugin changed the event.
    pub mutation: Option<event_result::Update>,
    /// Plugins that answered in time, in merge order (ascending priority, then id).
    pub answered: Vec<String>,
    /// Plugins that did not answer in time (counted as "no change").
    pub late: Vec<String>,
    /// Dispatch to complete: to the last answer when every plugin answered, else to the moment
    /// the outcome was taken (the deadline).
    pub elapsed: Duration,
}

struct Target {
    slot: usize,
    result: Option<EventResult>,
}

struct PendingEvent {
    targets: Vec<Target>,
    dispatched: Instant,
    timeout_at: Instant,
    /// When the last target answered.
    completed: Option<Instant>,
}

/// How long [`Host::wait`] polls for answers before sleeping on a plugin's doorbell: an awake
/// plugin answers within a few microseconds; a longer spin would take a core from the plugins.
pub const WAIT_SPIN: Duration = Duration::from_micros(20);

/// The host runtime. Drive it from the game's tick thread.
pub struct Host {
    settings: HostSettings,
    limits: BatchLimits,
    boot_id: String,
    slots: Vec<Slot>,
    /// Per event type number: the ready plugins subscribed to it.
    subs: Vec<Vec<usize>>,
    tick: u64,
    next_event_id: u64,
    pending: HashMap<u64, PendingEvent>,
    target_pool: Vec<Vec<Target>>,
    actions: VecDeque<ActionItem>,
    notices: VecDeque<Notice>,
    scratch: Vec<u8>,
    moves: Vec<MoveRecord>,
    pool: BufferPool,
    inbox: Vec<Vec<u8>>,
    decoder: PluginDecoder,
    supervisor: Supervisor,
    stats: HostStats,
    last_health: Instant,
    shut_down: bool,
    /// Refused processes given until then to exit by themselves, then killed.
    retiring: Vec<(std::process::Child, Instant)>,
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

const MOVE: usize = EventType::PlayerMove as usize;
/// Most plugin messages read per plugin per poll, so one chatty plugin cannot stall a tick.
const RECV_PER_POLL: usize = 1024;
/// How often health is checked.
const HEALTH_EVERY: Duration = Duration::from_millis(50);

impl Host {
    /// Starts the host from a TOML file (see [`config`]).
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Self, HostError> {
        Self::start(HostConfig::from_file(path)?)
    }

    /// Removes stale segments of dead hosts, creates every plugin's segment, launches the
    /// launched ones, and waits (up to the hello timeout) for the required ones' hello.
    pub fn start(config: HostConfig) -> Result<Self, HostError> {
        config.validate()?;
        match segment::stale::remove_stale() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(
                    "removed {} stale plugbus segment(s): {}",
                    removed.len(),
                    removed.join(", ")
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot scan for stale segments: {e}"),
        }
        let settings = config.host.clone();
        let mut host = Self {
            limits: BatchLimits {
                max_events: settings.batch_max_events,
                max_bytes: settings.batch_max_bytes,
            },
            settings,
            boot_id: uuid::Uuid::new_v4().to_string(),
            slots: config.plugins.into_iter().map(Slot::new).collect(),
            subs: (0..128).map(|_| Vec::new()).collect(),
            tick: 0,
            next_event_id: 1,
            pending: HashMap::new(),
            target_pool: Vec::new(),
            actions: VecDeque::new(),
            notices: VecDeque::new(),
            scratch: Vec::with_capacity(4096),
            moves: Vec::new(),
            pool: BufferPool::default(),
            inbox: Vec::new(),
            decoder: PluginDecoder::default(),
            supervisor: Supervisor::start().map_err(HostError::Supervisor)?,
            stats: HostStats::default(),
            last_health: Instant::now(),
            shut_down: false,
            retiring: Vec::new(),
        };
        for i in 0..host.slots.len() {
            host.open_slot(i)?;
        }
        let deadline = Instant::now() + host.settings.hello_timeout();
        loop {
            host.poll();
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
            if !waiting {
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
        Ok(host)
    }

    /// Creates slot `i`'s segment and launches its process (unless attached).
    fn open_slot(&mut self, i: usize) -> Result<(), HostError> {
        let s = &mut self.slots[i];
        let name = s.cfg.segment.clone().unwrap_or_else(|| segment::unique_name(&s.cfg.id));
        if s.cfg.segment.is_some() {
            // A fixed name left behind by an earlier run of this host: remove it.
            let _ = segment::Segment::unlink(&name);
        }
        let link = ShmHostLink::create(&name, &s.cfg.id, &s.cfg.rings).map_err(|source| HostError::Segment {
            id: s.cfg.id.clone(),
            source,
        })?;
        s.link = Some(Box::new(link));
        s.segment = name.clone();
        s.state = SlotState::Connecting;
        s.connecting_since = Instant::now();
        s.subscribed = EventSet::default();
        s.hello = None;
        s.generation += 1;
        if s.cfg.attach {
            tracing::info!(plugin = %s.cfg.id, "waiting for an external plugin to attach with {}={name}", launch::ENV_SEGMENT);
            return Ok(());
        }
        let child = launch::spawn(&s.cfg, &name, &self.boot_id).map_err(|source| HostError::Launch {
            id: s.cfg.id.clone(),
            command: s
                .cfg
                .command
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            source,
        })?;
        tracing::info!(plugin = %s.cfg.id, pid = child.id(), segment = %name, "launched plugin");
        if let Err(e) = self.supervisor.watch(&child, i, s.generation) {
            tracing::warn!(plugin = %s.cfg.id, "cannot watch the plugin process ({e}); its exit is seen by heartbeat only");
        }
        s.child = Some(child);
        Ok(())
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

    /// The segment name of plugin `id` (for attach mode and inspection).
    pub fn segment_of(&self, id: &str) -> Option<&str> {
        self.slots.iter().find(|s| s.cfg.id == id).map(|s| s.segment.as_str())
    }

    /// The process id of launched plugin `id`, if running.
    pub fn pid_of(&self, id: &str) -> Option<u32> {
        self.slots
            .iter()
            .find(|s| s.cfg.id == id)
            .and_then(|s| s.child.as_ref())
            .map(std::process::Child::id)
    }

    /// Whether plugin `id` completed its handshake and is connected.
    pub fn is_ready(&self, id: &str) -> bool {
        self.slots.iter().any(|s| s.cfg.id == id && s.is_ready())
    }

    /// Whether plugin `id` is ready and subscribed to `ty`.
    pub fn is_subscribed(&self, id: &str, ty: EventType) -> bool {
        self.slots
            .iter()
            .any(|s| s.cfg.id == id && s.is_ready() && s.subscribed.contains(ty as i32))
    }

    /// The tick and CLOCK_MONOTONIC time (ns, see [`crate::segment::monotonic_ns`]) at which the
    /// last move frame for plugin `id` was published (its ring's tail store), for latency
    /// measurements.
    pub fn last_moves_published(&self, id: &str) -> Option<(u64, u64)> {
        self.slots
            .iter()
            .find(|s| s.cfg.id == id)
            .map(|s| s.last_moves)
            .filter(|m| m.1 != 0)
    }

    /// The hello plugin `id` sent.
    pub fn hello_of(&self, id: &str) -> Option<&proto::PluginHello> {
        self.slots
            .iter()
            .find(|s| s.cfg.id == id)
            .and_then(|s| s.hello.as_ref())
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

    /// Starts a tick. Publish moves and events on the returned [`Tick`], then end it (or drop it).
    pub fn begin_tick(&mut self) -> Tick<'_> {
        self.tick += 1;
        Tick {
            host: self,
            ended: false,
        }
    }

    /// Routes one fire-and-forget event. Filtered by subscription before any encoding; batched
    /// unless it is immediate (join, quit, chat, command, `immediate`, or `expects_response`).
    pub fn publish(&mut self, env: &mut EventEnvelope) {
        self.route(env, false);
    }

    /// Routes one event that expects a response; returns its handle at once.
    pub fn dispatch(&mut self, env: &mut EventEnvelope) -> Pending {
        env.expects_response = true;
        let id = self.route(env, true);
        Pending { id }
    }

    fn route(&mut self, env: &mut EventEnvelope, respond: bool) -> u64 {
        let ty = env.payload.as_ref().map_or(env.r#type, |p| p.event_type() as i32);
        env.r#type = ty;
        let t = (ty as usize).min(127);
        self.stats.offered[t] += 1;
        let id = self.next_event_id;
        self.next_event_id += 1;
        let n_targets = self.subs[t].len();
        if n_targets == 0 {
            self.stats.filtered += 1;
            if respond {
                let now = Instant::now();
                self.pending.insert(
                    id,
                    PendingEvent {
                        targets: self.target_pool.pop().unwrap_or_default(),
                        dispatched: now,
                        timeout_at: now,
                        completed: Some(now),
                    },
                );
            }
            return id;
        }
        env.event_id.clear();
        let _ = write!(env.event_id, "{id}");
        let immediate = respond
            || env.expects_response
            || env.immediate
            || matches!(
                EventType::try_from(ty),
                Ok(EventType::PlayerJoin | EventType::PlayerQuit | EventType::Chat | EventType::Command)
            );
        let encode_started = Instant::now();
        // Encode once for every plugin, except an immediate event for a single plugin, which is
        // encoded straight into its ring.
        let in_place = immediate && n_targets == 1;
        if !in_place {
            crate::codec::encode_body(env, &mut self.scratch);
        }
        self.stats.encoded += 1;
        let mut targets = if respond {
            self.target_pool.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        let overflow_limit = self.settings.overflow_frames;
        let mut failed: Vec<(usize, String)> = Vec::new();
        for k in 0..n_targets {
            let i = self.subs[t][k];
            let s = &mut self.slots[i];
            let r = if immediate {
                let body = (!in_place).then_some(self.scratch.as_slice());
                s.send_event_now(env, body, &mut self.pool, overflow_limit)
            } else {
                s.batch_event(&self.scratch, &self.limits, &mut self.pool, overflow_limit)
            };
            match r {
                Ok(SendOutcome::Sent | SendOutcome::Queued) => {}
                Ok(SendOutcome::Overflow) => failed.push((i, overflow_reason(s, overflow_limit))),
                Err(e) => failed.push((i, format!("link error: {e}"))),
            }
            if immediate {
                s.ring_if_dirty();
            }
            if respond {
                targets.push(Target { slot: i, result: None });
            }
        }
        self.stats.encode_ns.record(encode_started.elapsed().as_nanos() as u64);
        if respond {
            let now = Instant::now();
            self.pending.insert(
                id,
                PendingEvent {
                    targets,
                    dispatched: now,
                    timeout_at: now + self.settings.response_timeout(),
                    completed: None,
                },
            );
        }
        for (i, reason) in failed {
            self.disconnect(i, reason, true, Instant::now());
        }
        id
    }

    /// Ends the current tick: delivers moves (or conflates them), flushes every batch, rings each
    /// plugin's doorbell at most once, beats the heartbeat, and reads replies. Never blocks.
    pub fn end_tick(&mut self) {
        let started = Instant::now();
        let overflow_limit = self.settings.overflow_frames;
        let mut failed: Vec<(usize, String)> = Vec::new();
        self.stats.moves_offered += self.moves.len() as u64;
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if !s.is_ready() {
                continue;
            }
            if s.subscribed.contains(MOVE as i32) {
                if let Err(e) = s.send_moves(self.tick, &self.moves) {
                    failed.push((i, format!("link error: {e}")));
                    continue;
                }
            }
            match s.flush_batch(&mut self.pool, overflow_limit) {
                Ok(SendOutcome::Sent | SendOutcome::Queued) => {}
                Ok(SendOutcome::Overflow) => {
                    failed.push((i, overflow_reason(s, overflow_limit)));
                    continue;
                }
                Err(e) => {
                    failed.push((i, format!("link error: {e}")));
                    continue;
                }
            }
            s.ring_if_dirty();
            if let Some(link) = s.link.as_mut() {
                link.heartbeat();
            }
        }
        self.moves.clear();
        for (i, reason) in failed {
            self.disconnect(i, reason, true, Instant::now());
        }
        self.stats.ticks += 1;
        self.stats.end_tick_ns.record(started.elapsed().as_nanos() as u64);
        self.poll();
    }

    /// Reads every plugin's replies, handles exits, handshakes, subscriptions, results,
    /// actions and logs, and checks health. Non-blocking; `end_tick` calls it.
    pub fn poll(&mut self) {
        while let Ok(exit) = self.supervisor.exits.try_recv() {
            self.on_exit(exit);
        }
        if !self.retiring.is_empty() {
            let now = Instant::now();
            self.retiring.retain_mut(|(child, kill_at)| match child.try_wait() {
                Ok(None) if now < *kill_at => true,
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    false
                }
                Ok(Some(_)) | Err(_) => false,
            });
        }
        for i in 0..self.slots.len() {
            self.read_replies(i);
        }
        let now = Instant::now();
        if now.duration_since(self.last_health) >= HEALTH_EVERY {
            self.last_health = now;
            for i in 0..self.slots.len() {
                self.check_health(i, now);
            }
        }
    }

    fn read_replies(&mut self, i: usize) {
        if !matches!(self.slots[i].state, SlotState::Ready | SlotState::Connecting) {
            return;
        }
        let Some(link) = self.slots[i].link.as_mut() else {
            return;
        };
        let pool = &mut self.pool;
        let inbox = &mut self.inbox;
        // Copy out of shared memory first: a plugin could rewrite bytes we are decoding.
        let r = link.recv(RECV_PER_POLL, &mut |bytes| {
            let mut b = pool.take();
            b.extend_from_slice(bytes);
            inbox.push(b);
        });
        let mut inbox = std::mem::take(&mut self.inbox);
        for buf in inbox.drain(..) {
            if matches!(self.slots[i].state, SlotState::Ready | SlotState::Connecting) {
                self.on_message(i, &buf);
            }
            self.pool.give(buf);
        }
        self.inbox = inbox;
        if let Err(e) = r {
            self.disconnect(
                i,
                format!("protocol violation on the replies ring: {e}"),
                true,
                Instant::now(),
            );
        }
    }

    fn on_message(&mut self, i: usize, bytes: &[u8]) {
        let msg = match self.decoder.decode_mut(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.disconnect(i, format!("malformed PluginToHost message: {e}"), true, Instant::now());
                return;
            }
        };
        let Some(payload) = msg.payload.as_mut() else {
            return;
        };
        match payload {
            plugin_to_host::Payload::Hello(hello) => {
                let hello = std::mem::take(hello);
                let plugin_id = msg.plugin_id.clone();
                self.on_hello(i, &plugin_id, hello);
            }
            plugin_to_host::Payload::Subscribe(sub) => {
                let set = EventSet::from_types(sub.events.iter().copied());
                let s = &mut self.slots[i];
                s.subscribed = set;
                tracing::debug!(plugin = %s.cfg.id, "subscriptions: {:?}", sub.events);
                self.rebuild_subs();
            }
            plugin_to_host::Payload::EventResult(r) => {
                let r = std::mem::take(r);
                self.on_result(i, r);
            }
            plugin_to_host::Payload::Actions(batch) => {
                let id = &self.slots[i].cfg.id;
                for action in batch.actions.drain(..) {
                    self.stats.actions += 1;
                    self.actions.push_back(ActionItem {
                        plugin: id.clone(),
                        action,
                    });
                }
            }
            plugin_to_host::Payload::Log(log) => {
                let id = &self.slots[i].cfg.id;
                match log.level.to_ascii_lowercase().as_str() {
                    "error" => {
                        tracing::error!(target: "plugbus::plugin", plugin = %id, "{}", log.message)
                    }
                    "warn" | "warning" => {
                        tracing::warn!(target: "plugbus::plugin", plugin = %id, "{}", log.message)
                    }
                    "debug" => {
                        tracing::debug!(target: "plugbus::plugin", plugin = %id, "{}", log.message)
                    }
                    "trace" => {
                        tracing::trace!(target: "plugbus::plugin", plugin = %id, "{}", log.message)
                    }
                    _ => tracing::info!(target: "plugbus::plugin", plugin = %id, "{}", log.message),
                }
            }
            plugin_to_host::Payload::ServerInfo(_) => {
                let plugins = self.slots.iter().map(|s| s.cfg.id.clone()).collect();
                let reply = HostToPlugin {
                    plugin_id: self.slots[i].cfg.id.clone(),
                    payload: Some(host_to_plugin::Payload::ServerInfo(proto::ServerInformationResponse {
                        plugins,
                    })),
                };
                self.send_control(i, &reply);
            }
        }
    }

    fn on_hello(&mut self, i: usize, plugin_id: &str, hello: proto::PluginHello) {
        let s = &self.slots[i];
        if s.state != SlotState::Connecting {
            tracing::warn!(plugin = %s.cfg.id, "second hello ignored");
            return;
        }
        let refusal = if hello.api_version != proto::API_VERSION {
            Some(format!(
                "unsupported api_version {:?}: this host speaks {:?}",
                hello.api_version,
                proto::API_VERSION
            ))
        } else if !plugin_id.is_empty() && plugin_id != s.cfg.id {
            Some(format!(
                "plugin id {plugin_id:?} does not match the configured id {:?}",
                s.cfg.id
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::error!(plugin = %s.cfg.id, "handshake refused: {reason}");
            let msg = shutdown_message(&s.cfg.id, &format!("handshake refused: {reason}"));
            self.send_control(i, &msg);
            // Not killed at once: the process reads why and exits by itself (see `retiring`).
            if let Some(child) = self.slots[i].child.take() {
                self.retiring
                    .push((child, Instant::now() + self.settings.shutdown_grace()));
            }
            self.disable(i, format!("handshake refused: {reason}"));
            return;
        }
        let reply = HostToPlugin {
            plugin_id: s.cfg.id.clone(),
            payload: Some(host_to_plugin::Payload::Hello(HostHello {
                api_version: proto::API_VERSION.to_owned(),
                boot_id: self.boot_id.clone(),
            })),
        };
        let name = format!("{} {}", hello.name, hello.version);
        tracing::info!(plugin = %s.cfg.id, "plugin ready: {name} ({} commands)", hello.commands.len());
        self.slots[i].hello = Some(hello);
        self.slots[i].state = SlotState::Ready;
        self.send_control(i, &reply);
        self.rebuild_subs();
        self.notices.push_back(Notice::Ready {
            id: self.slots[i].cfg.id.clone(),
            name,
        });
    }

    fn on_result(&mut self, i: usize, r: EventResult) {
        let now = Instant::now();
        let Some(p) = r.event_id.parse::<u64>().ok().and_then(|id| self.pending.get_mut(&id)) else {
            tracing::debug!(plugin = %self.slots[i].cfg.id, event = %r.event_id, "result for an event no longer pending");
            return;
        };
        let Some(t) = p.targets.iter_mut().find(|t| t.slot == i && t.result.is_none()) else {
            return;
        };
        let latency = now.duration_since(p.dispatched);
        t.result = Some(r);
        if p.targets.iter().all(|t| t.result.is_some()) {
            p.completed = Some(now);
        }
        let s = &mut self.slots[i];
        s.stats.replies += 1;
        s.stats.reply_latency_ns.record(latency.as_nanos() as u64);
        if latency > Duration::from_millis(self.settings.slow_reply_ms) {
            s.stats.slow_reports += 1;
            let what = format!("replied in {} ms", latency.as_millis());
            tracing::warn!(plugin = %s.cfg.id, "slow plugin: {what}");
            self.notices.push_back(Notice::Slow {
                id: s.cfg.id.clone(),
                what,
            });
        }
    }

    fn send_control(&mut self, i: usize, msg: &HostToPlugin) {
        let limit = self.settings.overflow_frames;
        let s = &mut self.slots[i];
        match s.send_message(msg, &mut self.pool, limit) {
            Ok(SendOutcome::Sent | SendOutcome::Queued) => s.ring_if_dirty(),
            Ok(SendOutcome::Overflow) => {
                let reason = overflow_reason(s, limit);
                self.disconnect(i, reason, true, Instant::now());
            }
            Err(e) => self.disconnect(i, format!("link error: {e}"), true, Instant::now()),
        }
    }

    fn rebuild_subs(&mut self) {
        for (t, list) in self.subs.iter_mut().enumerate() {
            list.clear();
            list.extend(
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_ready() && s.subscribed.contains(t as i32))
                    .map(|(i, _)| i),
            );
        }
    }

    fn check_health(&mut self, i: usize, now: Instant) {
        let s = &mut self.slots[i];
        match s.state {
            SlotState::Connecting if !s.cfg.attach => {
                if now.duration_since(s.connecting_since) > self.settings.hello_timeout() {
                    let reason = format!("no hello within {} ms", self.settings.hello_timeout_ms);
                    self.disconnect(i, reason, true, now);
                }
                return;
            }
            SlotState::Ready => {}
            _ => return,
        }
        let Some(link) = s.link.as_mut() else { return };
        if let Some(why) = link.broken() {
            self.disconnect(i, why.to_owned(), true, now);
            return;
        }
        let peer = link.peer();
        let stale = peer.heartbeat_age_ns > self.settings.heartbeat_timeout_ms * 1_000_000;
        if s.cfg.attach && (stale || s.last_pid_check.elapsed() >= Duration::from_millis(200)) {
            // Launched plugins are watched by the supervisor; attached ones by pid (a /proc
            // read, so at most every 200 ms) and heartbeat.
            s.last_pid_check = now;
            if !link.peer_alive() {
                let reason = format!("attached process {} died", peer.pid);
                self.disconnect(i, reason, true, now);
                return;
            }
        }
        let occupancy = link.occupancy().unwrap_or_default();
        let fill = occupancy.moves.max(occupancy.control);
        let slow_now = stale || fill > self.settings.slow_occupancy;
        if slow_now && !s.slow {
            s.stats.slow_reports += 1;
            let what = if stale {
                format!("no heartbeat for {} ms", peer.heartbeat_age_ns / 1_000_000)
            } else {
                format!("rings {:.0}% full", fill * 100.0)
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

    fn on_exit(&mut self, exit: launch::Exited) {
        let Some(s) = self.slots.get_mut(exit.slot) else {
            return;
        };
        if s.generation != exit.generation {
            return;
        }
        let status = s
            .child
            .as_mut()
            .and_then(|c| c.wait().ok())
            .map_or_else(|| "exited".to_owned(), describe_status);
        s.child = None;
        let reason = if s.state == SlotState::Connecting {
            format!("process {status} before its hello")
        } else {
            format!("process {status}")
        };
        self.disconnect(exit.slot, reason, true, exit.at);
    }

    /// Disconnects plugin `i`: logs the reason and the undelivered count, tells it to stop,
    /// kills a launched process, removes the segment; then applies the restart policy.
    fn disconnect(&mut self, i: usize, reason: String, restart: bool, detected_at: Instant) {
        let s = &mut self.slots[i];
        if !matches!(s.state, SlotState::Ready | SlotState::Connecting) {
            return;
        }
        // A truncated segment shows up first as a broken ring; name the real cause.
        let reason = match s.link.as_ref().and_then(|l| l.broken()) {
            Some(why) if !reason.starts_with(why) => format!("{why} ({reason})"),
            _ => reason,
        };
        let undelivered = s.undelivered();
        tracing::error!(plugin = %s.cfg.id, undelivered, "plugin disconnected: {reason}");
        *s.stats.disconnects.entry(short_reason(&reason)).or_default() += 1;
        if let Some(link) = s.link.as_mut() {
            let _ = link.try_send_message(&shutdown_message(&s.cfg.id, &reason));
            link.signal_shutdown();
        }
        s.publish_counters();
        if let Some(mut child) = s.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        s.link = None;
        s.reset_queues(&mut self.pool);
        s.state = SlotState::Disconnected(reason.clone());
        self.notices.push_back(Notice::Disconnected {
            id: s.cfg.id.clone(),
            reason: reason.clone(),
            undelivered,
            detected_at,
        });
        self.rebuild_subs();
        if restart {
            self.maybe_restart(i);
        }
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
        let now = Instant::now();
        let window = Duration::from_secs(self.settings.restart_window_s);
        let s = &mut self.slots[i];
        if s.cfg.attach {
            // An attached plugin is re-armed: a new segment under the same name, for the next
            // process that attaches.
            if let Err(e) = self.open_slot(i) {
                tracing::error!("cannot re-arm attached plugin: {e}");
            }
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
        match self.open_slot(i) {
            Ok(()) => {
                tracing::warn!(plugin = %id, attempt, "plugin restarted");
                self.notices.push_back(Notice::Restarted { id, attempt });
            }
            Err(e) => {
                let reason = format!("restart failed: {e}");
                tracing::error!(plugin = %id, "{reason}");
                self.slots[i].state = SlotState::Disabled(reason.clone());
                self.notices.push_back(Notice::Disabled { id, reason });
            }
        }
    }

    /// Kills launched plugin `id` with SIGKILL (for tests and operators); its exit is then
    /// handled like any crash.
    pub fn kill_plugin(&mut self, id: &str) -> bool {
        self.slots
            .iter_mut()
            .find(|s| s.cfg.id == id)
            .and_then(|s| s.child.as_mut())
            .is_some_and(|c| c.kill().is_ok())
    }

    /// The outcome of `pending` if it is complete: every target answered (or went away), or
    /// the response timeout passed. Reads replies first.
    pub fn poll_outcome(&mut self, pending: &Pending) -> Option<Outcome> {
        self.poll();
        self.try_finish(pending.id, Instant::now(), false)
    }

    /// Waits for `pending` until it completes or `deadline`; at the deadline, plugins that did
    /// not answer count as "no change" and as late.
    ///
    /// It polls for [`WAIT_SPIN`], then sleeps on the doorbell of a plugin that has not answered
    /// yet (its answer wakes the host), at most 1 ms at a time so that deaths and the deadline
    /// are seen.
    pub fn wait(&mut self, pending: &Pending, deadline: Instant) -> Outcome {
        let started = Instant::now();
        loop {
            self.poll();
            let now = Instant::now();
            if let Some(o) = self.try_finish(pending.id, now, now >= deadline) {
                return o;
            }
            if now.duration_since(started) < WAIT_SPIN {
                crate::sync::spin_loop();
                continue;
            }
            // The earlier of the caller's deadline and the response timeout, and a plugin that
            // has not answered yet.
            let (wake_at, slot) = match self.pending.get(&pending.id) {
                Some(p) => (
                    deadline.min(p.timeout_at),
                    p.targets
                        .iter()
                        .find(|t| t.result.is_none() && self.slots[t.slot].is_ready())
                        .map(|t| t.slot),
                ),
                None => (deadline, None),
            };
            let nap = wake_at
                .saturating_duration_since(now)
                .clamp(Duration::from_micros(1), Duration::from_millis(1));
            match slot.and_then(|i| self.slots[i].link.as_mut()) {
                Some(link) => {
                    // An error here (a broken link) is found and handled by the next poll.
                    let _ = link.park(nap);
                }
                None => std::thread::sleep(nap),
            }
        }
    }

    fn try_finish(&mut self, id: u64, now: Instant, force: bool) -> Option<Outcome> {
        let p = self.pending.get(&id)?;
        let all = p
            .targets
            .iter()
            .all(|t| t.result.is_some() || !self.slots[t.slot].is_ready());
        if !(all || force || now >= p.timeout_at) {
            return None;
        }
        let mut p = self.pending.remove(&id)?;
        let mut outcome = Outcome {
            event_id: id,
            elapsed: p.completed.unwrap_or(now).duration_since(p.dispatched),
            ..Default::default()
        };
        p.targets.sort_by(|a, b| {
            let (sa, sb) = (&self.slots[a.slot].cfg, &self.slots[b.slot].cfg);
            sa.priority.cmp(&sb.priority).then_with(|| sa.id.cmp(&sb.id))
        });
        let mut merged = EventResult::default();
        for t in p.targets.drain(..) {
            let s = &mut self.slots[t.slot];
            match t.result {
                Some(r) => {
                    outcome.answered.push(s.cfg.id.clone());
                    if r.cancel == Some(true) {
                        outcome.cancelled = true;
                    }
                    if let Some(u) = r.update {
                        let later = EventResult {
                            update: Some(u),
                            ..Default::default()
                        };
                        // prost merges a oneof of the same variant field by field (later set
                        // fields win) and replaces a different variant.
                        let _ = merged.merge(later.encode_to_vec().as_slice());
                    }
                }
                None => {
                    s.stats.late_replies += 1;
                    outcome.late.push(s.cfg.id.clone());
                }
            }
        }
        outcome.mutation = if outcome.cancelled { None } else { merged.update };
        self.target_pool.push(p.targets);
        Some(outcome)
    }

    /// Actions received from plugins since the last call, in arrival order.
    pub fn drain_actions(&mut self) -> std::collections::vec_deque::Drain<'_, ActionItem> {
        self.actions.drain(..)
    }

    /// Notices since the last call (plugins ready, disconnected, restarted, slow...).
    pub fn drain_notices(&mut self) -> std::collections::vec_deque::Drain<'_, Notice> {
        self.notices.drain(..)
    }

    /// Sends the result of an action back to the plugin that asked (by its `correlation_id`).
    pub fn send_action_result(&mut self, plugin: &str, result: ActionResult) -> bool {
        let Some(i) = self.slots.iter().position(|s| s.cfg.id == plugin && s.is_ready()) else {
            return false;
        };
        let msg = HostToPlugin {
            plugin_id: plugin.to_owned(),
            payload: Some(host_to_plugin::Payload::ActionResult(result)),
        };
        self.send_control(i, &msg);
        true
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            host: self.stats.clone(),
            plugins: self.slots.iter().map(|s| (s.cfg.id.clone(), s.stats.clone())).collect(),
            pool: self.pool.stats(),
        }
    }

    /// Sends `HostShutdown`, waits up to the grace period for launched plugins to exit, kills
    /// the rest, and removes every segment.
    pub fn shutdown(&mut self, reason: &str) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        for s in &mut self.slots {
            if s.link.is_some() {
                s.batch_is_flushed_or_dropped();
            }
            if let Some(link) = s.link.as_mut() {
                let _ = link.try_send_message(&shutdown_message(&s.cfg.id, reason));
                link.signal_shutdown();
            }
        }
        let deadline = Instant::now() + self.settings.shutdown_grace();
        loop {
            let mut running = 0;
            for s in &mut self.slots {
                if let Some(c) = s.child.as_mut() {
                    match c.try_wait() {
                        Ok(Some(status)) => {
                            tracing::info!(plugin = %s.cfg.id, "plugin {}", describe_status(status));
                            s.child = None;
                        }
                        Ok(None) => running += 1,
                        Err(_) => s.child = None,
                    }
                }
            }
            self.retiring.retain_mut(|(c, _)| matches!(c.try_wait(), Ok(None)));
            running += self.retiring.len();
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                tracing::warn!(plugin = %s.cfg.id, "plugin did not exit within the grace period; killing it");
                let _ = c.kill();
                let _ = c.wait();
            }
            s.publish_counters();
            s.link = None;
            if matches!(s.state, SlotState::Ready | SlotState::Connecting) {
                s.state = SlotState::Disconnected(format!("host shutdown: {reason}"));
            }
        }
        for (mut c, _) in self.retiring.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Slot {
    /// At shutdown, flushing is best effort: drop what does not fit, but say so.
    fn batch_is_flushed_or_dropped(&mut self) -> u64 {
        let mut pool = BufferPool::new(0, 0);
        let _ = self.flush_batch(&mut pool, usize::MAX);
        let left = self.undelivered();
        if left > 0 {
            tracing::warn!(plugin = %self.cfg.id, undelivered = left, "events not delivered before shutdown");
        }
        left
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown("host stopped");
    }
}

/// One tick in progress. End it with [`Tick::end`]; dropping it ends it too.
pub struct Tick<'h> {
    host: &'h mut Host,
    ended: bool,
}

impl Tick<'_> {
    /// The tick number.
    pub fn number(&self) -> u64 {
        self.host.tick
    }

    /// Stages one player's movement for this tick (fast path; delivered at the end of the tick
    /// as one packed frame per subscribed plugin).
    #[inline]
    pub fn publish_move(&mut self, record: MoveRecord) {
        self.host.moves.push(record);
    }

    /// Stages several movements.
    #[inline]
    pub fn publish_moves(&mut self, records: &[MoveRecord]) {
        self.host.moves.extend_from_slice(records);
    }

    /// See [`Host::publish`].
    #[inline]
    pub fn publish(&mut self, env: &mut EventEnvelope) {
        self.host.publish(env);
    }

    /// See [`Host::dispatch`].
    #[inline]
    pub fn dispatch(&mut self, env: &mut EventEnvelope) -> Pending {
        self.host.dispatch(env)
    }

    /// Ends the tick (see [`Host::end_tick`]).
    pub fn end(mut self) {
        self.ended = true;
        self.host.end_tick();
    }
}

impl Drop for Tick<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.host.end_tick();
        }
    }
}

fn shutdown_message(id: &str, reason: &str) -> HostToPlugin {
    HostToPlugin {
        plugin_id: id.to_owned(),
        payload: Some(host_to_plugin::Payload::Shutdown(HostShutdown {
            reason: reason.to_owned(),
        })),
    }
}

fn overflow_reason(s: &Slot, limit: usize) -> String {
    format!(
        "control ring full and overflow queue over {limit} frames: plugin too slow, {} events undelivered",
        s.undelivered()
    )
}

/// The first words of a reason, as a metric label.
fn short_reason(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    for (needle, label) in [
        ("overflow", "overflow"),
        ("before its hello", "exited_before_hello"),
        ("no hello", "hello_timeout"),
        ("handshake refused", "refused"),
        ("signal", "killed"),
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

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".to_owned(),
    }
}
