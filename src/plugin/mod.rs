//! The plugin runtime: connect from the environment, shake hands, and run an event loop that
//! hands moves in place and events decoded into reused messages to a [`Handler`].
//!
//! ```no_run
//! use plugbus::plugin::{Context, Handler, Plugin, Reply};
//! use plugbus::proto::{event_envelope::Payload, EventEnvelope, EventType};
//!
//! struct NoSwearing;
//! impl Handler for NoSwearing {
//!     fn on_event(&mut self, _ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
//!         match &event.payload {
//!             Some(Payload::Chat(c)) if c.message.contains("darn") => Reply::Cancel,
//!             _ => Reply::Ack,
//!         }
//!     }
//! }
//!
//! Plugin::from_env()?
//!     .name("no-swearing")
//!     .version("1.0.0")
//!     .subscribe([EventType::Chat])
//!     .run(&mut NoSwearing)?;
//! # Ok::<(), plugbus::plugin::PluginError>(())
//! ```
//!
//! The loop never leaves an event that expects a response unanswered: a handler that returns
//! [`Reply::Ack`] (the default) sends an empty `EventResult`, as the df.plugin SDKs do.

mod cadence;
mod context;

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use cadence::Cadence;
pub use context::{Context, QueryCallback, Reply};

use crate::codec::{DecodeError, HostDecoder, HostMessage};
use crate::fastpath::{MoveFrameHeader, MoveRecord};
use crate::host::{ENV_DF_PLUGIN_ID, ENV_PLUGIN_ID};
use crate::proto::{
    self, ActionResult, CommandSpec, EventEnvelope, EventSubscribe, EventType, HostHello, PluginHello, host_to_plugin,
    plugin_to_host,
};
use crate::transport::{self, ConnectError, ENV_ADDRESS, HostState, Incoming, LinkError, PluginLink};
use context::{OUTBOX_LIMIT, Outbox};

/// What a plugin does with what arrives. Every method has a default, so a handler implements
/// only what it needs.
pub trait Handler {
    /// The handshake completed.
    fn on_start(&mut self, ctx: &mut Context<'_>, hello: &HostHello) {
        let _ = (ctx, hello);
    }
    /// A tick's moves, lent in place (from shared memory: no copy). `frame.tick` is the host's
    /// tick; [`MoveFrameHeader::is_conflated`] says the plugin lagged and the records are each
    /// player's latest position over several ticks (some skipped), and
    /// [`MoveFrameHeader::continues`] that the tick's records go on in the next call.
    fn on_moves(&mut self, ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let _ = (ctx, frame, moves);
    }
    /// One event. For an event that expects a response, the reply is sent to the host.
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        let _ = (ctx, event);
        Reply::Ack
    }
    /// One event with its encoded `EventEnvelope` bytes (valid during the call). The default
    /// calls [`Handler::on_event`]; override it to hand the bytes on (the C API does).
    fn on_event_bytes(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope, bytes: &[u8]) -> Reply {
        let _ = bytes;
        self.on_event(ctx, event)
    }
    /// The result of an action sent with a correlation id but no callback.
    fn on_action_result(&mut self, ctx: &mut Context<'_>, result: &ActionResult) {
        let _ = (ctx, result);
    }
    /// Called when the loop is idle, at most every 100 ms (for timers and summaries).
    fn on_idle(&mut self, ctx: &mut Context<'_>) {
        let _ = ctx;
    }
    /// The host is shutting down; the loop ends after this.
    fn on_shutdown(&mut self, reason: &str) {
        let _ = reason;
    }
}

/// How the loop waits when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Busy-poll: lowest latency, one core at 100%.
    Spin,
    /// Spin this long after the last work, then sleep until the host sends (default: 50 µs).
    SpinThenPark(Duration),
    /// Sleep at once: near-zero idle CPU, a wake-up (a system call on the host's side) per tick.
    Park,
    /// Spin-then-park that also learns the host's tick cadence ([`Cadence`]): it sets its own
    /// timer `lead` before the next tick is due and spins until the tick lands (at most `lead`
    /// past its due time), so the host's wake-up finds it awake and the tick pays no system
    /// call for it. Costs about `2 x lead + spin` of CPU per tick; while no steady cadence is seen
    /// it behaves as `SpinThenPark(spin)`.
    Paced {
        /// Spin this long after the last work (as `SpinThenPark`).
        spin: Duration,
        /// Be awake this long before the next tick is due.
        lead: Duration,
    },
}

impl WaitStrategy {
    /// `Paced` with its defaults: 50 µs of spin after work, awake 200 µs before the next tick.
    pub const PACED: WaitStrategy = WaitStrategy::Paced {
        spin: Duration::from_micros(50),
        lead: Duration::from_micros(200),
    };
}

/// Empty polls between two clock reads of a spinning idle loop.
const CLOCK_EVERY: u32 = 16;

/// What an idle loop does next (see [`Plugin::idle_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleStep {
    /// Poll again after a spin hint.
    Spin,
    /// Sleep until the host sends, for at most this long.
    Park(Duration),
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::SpinThenPark(Duration::from_micros(50))
    }
}

impl std::str::FromStr for WaitStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" => Ok(Self::Spin),
            "park" => Ok(Self::Park),
            "paced" => Ok(Self::PACED),
            "spin-then-park" | "default" => Ok(Self::default()),
            _ => Err(format!(
                "unknown wait strategy {s:?} (spin, park, spin-then-park, paced)"
            )),
        }
    }
}

/// Why the plugin stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A required environment variable is missing.
    #[error("{0} is not set: start this plugin from a plugbus host, or set it to the address the host printed")]
    MissingEnv(&'static str),
    /// The link could not be opened (nothing at the address, another version, ...).
    #[error("cannot connect: {0}")]
    Connect(#[from] ConnectError),
    /// The host refused the handshake.
    #[error("the host refused this plugin: {0}")]
    Refused(String),
    /// No `HostHello` in time.
    #[error("no HostHello within {0:?}: is the host running and polling?")]
    HelloTimeout(Duration),
    /// The host's process is gone.
    #[error("the host (pid {pid}) died")]
    HostDied {
        /// Host pid.
        pid: u32,
    },
    /// The link broke.
    #[error("link failure: {0}")]
    Link(#[from] LinkError),
    /// The link's medium failed under this plugin (for shared memory: the segment was
    /// truncated; the plugin survived, the pages read zeros now).
    #[error("{0}")]
    Broken(&'static str),
    /// The host sent bytes that do not decode.
    #[error("malformed message from the host: {0}")]
    Decode(#[from] DecodeError),
    /// The host stopped reading replies and too many piled up.
    #[error("the host has not read replies for a while: {0} messages queued")]
    HostNotReading(usize),
}

/// Builds a plugin connection: identity, commands, subscriptions, wait strategy.
#[derive(Debug, Clone)]
pub struct PluginBuilder {
    address: String,
    plugin_id: String,
    hello: PluginHello,
    subscriptions: Vec<EventType>,
    wait: WaitStrategy,
    hello_timeout: Duration,
}

/// How often the plugin beats its heartbeat and checks the host.
const BEAT_EVERY: Duration = Duration::from_millis(100);

impl PluginBuilder {
    /// Display name sent in the hello.
    pub fn name(mut self, name: &str) -> Self {
        self.hello.name = name.to_owned();
        self
    }
    /// Version sent in the hello.
    pub fn version(mut self, version: &str) -> Self {
        self.hello.version = version.to_owned();
        self
    }
    /// The df.plugin API version claimed (default "v1"; other values are refused by the host).
    pub fn api_version(mut self, v: &str) -> Self {
        self.hello.api_version = v.to_owned();
        self
    }
    /// Registers a command.
    pub fn command(mut self, spec: CommandSpec) -> Self {
        self.hello.commands.push(spec);
        self
    }
    /// Registers a custom item.
    pub fn custom_item(mut self, item: proto::CustomItemDefinition) -> Self {
        self.hello.custom_items.push(item);
        self
    }
    /// Registers a custom block.
    pub fn custom_block(mut self, block: proto::CustomBlockDefinition) -> Self {
        self.hello.custom_blocks.push(block);
        self
    }
    /// The events to receive (`EventType::All` for every one; `PlayerMove` for the move frames).
    pub fn subscribe(mut self, events: impl IntoIterator<Item = EventType>) -> Self {
        self.subscriptions = events.into_iter().collect();
        self
    }
    /// How the loop waits.
    pub fn wait(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }
    /// How long to wait for `HostHello` (default 5 s).
    pub fn hello_timeout(mut self, t: Duration) -> Self {
        self.hello_timeout = t;
        self
    }

    /// Connects to its address, sends the hello and subscriptions, and waits for `HostHello`.
    pub fn connect(self) -> Result<Plugin, PluginError> {
        let link = transport::connect(&self.address)?;
        Plugin::handshake(link, self)
    }

    /// The address it connects to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Connects and runs `handler` until the host shuts down (`Ok`) or fails (`Err`).
    pub fn run<H: Handler>(self, handler: &mut H) -> Result<(), PluginError> {
        self.connect()?.run(handler)
    }
}

/// Counters a plugin keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginCounters {
    /// Events handled.
    pub events: u64,
    /// Move frames handled.
    pub move_frames: u64,
    /// Move records handled.
    pub moves: u64,
    /// Event results sent.
    pub replies: u64,
}

/// A connected plugin.
pub struct Plugin<L: PluginLink = Box<dyn PluginLink>> {
    link: L,
    wait: WaitStrategy,
    decoder: HostDecoder,
    out: Outbox,
    queries: HashMap<String, QueryCallback>,
    next_query: u64,
    host_hello: HostHello,
    shutdown: Option<String>,
    counters: PluginCounters,
    last_beat: Instant,
    last_idle: Instant,
    cadence: Cadence,
}

impl<L: PluginLink> std::fmt::Debug for Plugin<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("plugin_id", &self.out.plugin_id)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// A builder from the environment the host gives a plugin it launches: the address
    /// (`PLUGBUS_ADDRESS`, or a transport's own variable) and the id (`PLUGBUS_PLUGIN_ID`, or
    /// the df.plugin ecosystem's `DF_PLUGIN_ID`).
    pub fn from_env() -> Result<PluginBuilder, PluginError> {
        let address = transport::address_from_env().ok_or(PluginError::MissingEnv(ENV_ADDRESS))?;
        let plugin_id = std::env::var(ENV_PLUGIN_ID)
            .or_else(|_| std::env::var(ENV_DF_PLUGIN_ID))
            .map_err(|_| PluginError::MissingEnv(ENV_PLUGIN_ID))?;
        Ok(Self::builder(&address, &plugin_id))
    }

    /// A builder for the link at `address` (any transport's, e.g. `shm:plugbus.x.1`) as plugin
    /// `plugin_id`.
    pub fn builder(address: &str, plugin_id: &str) -> PluginBuilder {
        PluginBuilder {
            address: address.to_owned(),
            plugin_id: plugin_id.to_owned(),
            hello: PluginHello {
                name: plugin_id.to_owned(),
                version: "0.0.0".to_owned(),
                api_version: proto::API_VERSION.to_owned(),
                ..Default::default()
            },
            subscriptions: Vec::new(),
            wait: WaitStrategy::default(),
            hello_timeout: Duration::from_secs(5),
        }
    }
}

impl<L: PluginLink> Plugin<L> {
    /// Shakes hands over any link: hello and subscriptions out, `HostHello` (or a refusal) in.
    pub fn handshake(link: L, b: PluginBuilder) -> Result<Self, PluginError> {
        let mut p = Self {
            link,
            wait: b.wait,
            decoder: HostDecoder::default(),
            out: Outbox::new(&b.plugin_id),
            queries: HashMap::new(),
            next_query: 0,
            host_hello: HostHello::default(),
            shutdown: None,
            counters: PluginCounters::default(),
            last_beat: Instant::now(),
            last_idle: Instant::now(),
            cadence: Cadence::default(),
        };
        p.link.heartbeat();
        // Subscriptions before the hello: the host marks the plugin ready on its hello, and it
        // must route to it from then on (`Host::start` returns once required plugins said hello).
        p.out.push(plugin_to_host::Payload::Subscribe(EventSubscribe {
            events: b.subscriptions.iter().map(|e| *e as i32).collect(),
        }));
        p.out.push(plugin_to_host::Payload::Hello(b.hello));
        p.flush()?;
        let deadline = Instant::now() + b.hello_timeout;
        loop {
            // The state is read before the link: a host that refuses writes its reason, then
            // closes the link, so a refusal seen here is in what the poll below reads.
            let state = p.link.host_state();
            let mut got: Option<Result<HostHello, String>> = None;
            let decoder = &mut p.decoder;
            let mut err = None;
            p.link.poll(1, &mut |inc| {
                if let Incoming::Host(bytes) = inc {
                    let r = decoder.decode(bytes, |m| match m {
                        HostMessage::Other(msg) => match &msg.payload {
                            Some(host_to_plugin::Payload::Hello(h)) => got = Some(Ok(h.clone())),
                            Some(host_to_plugin::Payload::Shutdown(s)) => got = Some(Err(s.reason.clone())),
                            _ => {}
                        },
                        HostMessage::Event(_) => {}
                    });
                    if let Err(e) = r {
                        err = Some(e);
                    }
                }
            })?;
            if let Some(e) = err {
                return Err(e.into());
            }
            match got {
                Some(Ok(h)) => {
                    p.host_hello = h;
                    return Ok(p);
                }
                Some(Err(reason)) => return Err(PluginError::Refused(reason)),
                None => {}
            }
            match state {
                HostState::Dead => {
                    return Err(PluginError::HostDied { pid: p.link.host_pid() });
                }
                HostState::ShuttingDown => {
                    return Err(PluginError::Refused("host is shutting down".into()));
                }
                HostState::Running => {}
            }
            if Instant::now() >= deadline {
                return Err(PluginError::HelloTimeout(b.hello_timeout));
            }
            p.link.park(Duration::from_millis(10))?;
        }
    }

    /// The host's hello.
    pub fn host_hello(&self) -> &HostHello {
        &self.host_hello
    }

    /// Counters so far.
    pub fn counters(&self) -> PluginCounters {
        self.counters
    }

    /// Why the host shut down, once it has.
    pub fn shutdown_reason(&self) -> Option<&str> {
        self.shutdown.as_deref()
    }

    /// The link.
    pub fn link(&mut self) -> &mut L {
        &mut self.link
    }

    /// A context for sending outside a handler call (flushed by the next `poll`).
    pub fn context(&mut self) -> Context<'_> {
        Context {
            out: &mut self.out,
            queries: &mut self.queries,
            next_query: &mut self.next_query,
        }
    }

    /// Sends queued messages while they fit; wakes the host if any went out.
    pub fn flush(&mut self) -> Result<(), PluginError> {
        self.out.flush_actions();
        let mut sent = false;
        while let Some(buf) = self.out.frames.front() {
            if !self.link.try_send_encoded(buf)? {
                break;
            }
            let buf = self.out.frames.pop_front().expect("front exists");
            self.out.pool.give(buf);
            sent = true;
        }
        if sent {
            self.link.wake_host();
        }
        if self.out.frames.len() > OUTBOX_LIMIT {
            return Err(PluginError::HostNotReading(self.out.frames.len()));
        }
        Ok(())
    }

    /// Handles everything that has arrived (bounded), sends replies, beats the heartbeat.
    /// Returns how many items (frames) were handled. Never blocks.
    pub fn poll<H: Handler + ?Sized>(&mut self, handler: &mut H) -> Result<usize, PluginError> {
        self.poll_with(handler, true)
    }

    /// [`Plugin::poll`]; an empty poll reads the clock (heartbeat, cadence) only if `clock`.
    /// The run loop's spinning turns pass `false` for all but every CLOCK_EVERY-th: a loop of
    /// empty polls would otherwise spend most of its time reading the clock.
    fn poll_with<H: Handler + ?Sized>(&mut self, handler: &mut H, clock: bool) -> Result<usize, PluginError> {
        if let Some(why) = self.link.failure() {
            return Err(PluginError::Broken(why));
        }
        let Self {
            link,
            decoder,
            out,
            queries,
            next_query,
            shutdown,
            counters,
            ..
        } = self;
        let mut err: Option<DecodeError> = None;
        let n = link.poll(256, &mut |inc| match inc {
            Incoming::Moves { header, records } => {
                let mut ctx = Context {
                    out,
                    queries,
                    next_query,
                };
                counters.move_frames += 1;
                counters.moves += records.len() as u64;
                handler.on_moves(&mut ctx, header, records);
            }
            Incoming::Host(bytes) => {
                let r = decoder.decode_raw(bytes, |m, raw| match m {
                    HostMessage::Event(env) => {
                        counters.events += 1;
                        let mut ctx = Context {
                            out,
                            queries,
                            next_query,
                        };
                        let reply = handler.on_event_bytes(&mut ctx, env, raw);
                        if env.expects_response {
                            out.result(&env.event_id, reply);
                            counters.replies += 1;
                        }
                    }
                    HostMessage::Other(msg) => match &msg.payload {
                        Some(host_to_plugin::Payload::Shutdown(s)) => *shutdown = Some(s.reason.clone()),
                        Some(host_to_plugin::Payload::ActionResult(r)) => {
                            let cb = queries.remove(&r.correlation_id);
                            let mut ctx = Context {
                                out,
                                queries,
                                next_query,
                            };
                            match cb {
                                Some(cb) => cb(&mut ctx, r),
                                None => handler.on_action_result(&mut ctx, r),
                            }
                        }
                        _ => {}
                    },
                });
                if let Err(e) = r {
                    err.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        self.flush()?;
        if n == 0 && !clock {
            return Ok(0);
        }
        let now = Instant::now();
        if n > 0 {
            self.cadence.work(now);
        }
        if now.duration_since(self.last_beat) >= BEAT_EVERY {
            self.last_beat = now;
            self.link.heartbeat();
            let c = self.counters;
            self.link.publish_counters(c.events, c.move_frames, c.replies);
        }
        Ok(n)
    }

    /// Runs the loop until the host shuts down (`Ok`) or something fails (`Err`), waiting as the
    /// [`WaitStrategy`] says when idle.
    pub fn run<H: Handler + ?Sized>(mut self, handler: &mut H) -> Result<(), PluginError> {
        {
            let hello = self.host_hello.clone();
            let mut ctx = self.context();
            handler.on_start(&mut ctx, &hello);
        }
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            let n = self.poll_with(handler, spins % CLOCK_EVERY == 0)?;
            if let Some(reason) = self.shutdown.clone() {
                handler.on_shutdown(&reason);
                self.flush()?;
                return Ok(());
            }
            if n > 0 {
                idle_since = None;
                spins = 0;
                continue;
            }
            // While spinning, the clock (and what it decides) is looked at every
            // CLOCK_EVERY-th empty poll only: an idle loop that reads the clock on every turn
            // spends most of its time there, and on a core's other hardware thread that slows
            // whatever runs beside it (the host's tick, on a small machine).
            if spins % CLOCK_EVERY != 0 {
                spins = spins.wrapping_add(1);
                crate::sync::spin_loop();
                continue;
            }
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            // Timers, host liveness and heartbeats: about every 100 ms, whatever the strategy.
            if now.duration_since(self.last_idle) >= BEAT_EVERY {
                self.last_idle = now;
                let mut ctx = self.context();
                handler.on_idle(&mut ctx);
                self.flush()?;
                if let Some(why) = self.link.failure() {
                    return Err(PluginError::Broken(why));
                }
                match self.link.host_state() {
                    HostState::Dead => {
                        return Err(PluginError::HostDied {
                            pid: self.link.host_pid(),
                        });
                    }
                    HostState::ShuttingDown => {
                        // The HostShutdown message may already be on the link: one more poll.
                        self.poll(handler)?;
                        let reason = self.shutdown.clone().unwrap_or_else(|| "host shutting down".into());
                        handler.on_shutdown(&reason);
                        return Ok(());
                    }
                    HostState::Running => {}
                }
            }
            match self.idle_step(self.wait, since, now, BEAT_EVERY) {
                IdleStep::Spin => {
                    spins = spins.wrapping_add(1);
                    crate::sync::spin_loop();
                }
                IdleStep::Park(t) => {
                    let asked = Instant::now();
                    self.link.park(t)?;
                    self.note_park(t, asked);
                }
            }
        }
    }

    /// What an idle loop waiting with `wait` does next, `now`, when the last work ended at
    /// `idle_since`; a park lasts at most `max_park`.
    pub fn idle_step(&self, wait: WaitStrategy, idle_since: Instant, now: Instant, max_park: Duration) -> IdleStep {
        let idle = now.saturating_duration_since(idle_since);
        match wait {
            WaitStrategy::Spin => IdleStep::Spin,
            WaitStrategy::Park => IdleStep::Park(max_park),
            WaitStrategy::SpinThenPark(spin) if idle < spin => IdleStep::Spin,
            WaitStrategy::SpinThenPark(_) => IdleStep::Park(max_park),
            WaitStrategy::Paced { spin, lead } => {
                match cadence::paced_park(&self.cadence, spin, lead, idle_since, now, max_park) {
                    Some(t) => IdleStep::Park(t),
                    None => IdleStep::Spin,
                }
            }
        }
    }

    /// Records how a park of `t` that began at `began` went, so paced waits learn how late this
    /// machine's timers are. Only timed-out parks shorter than the heartbeat period (the paced
    /// ones) count.
    pub fn note_park(&mut self, t: Duration, began: Instant) {
        let took = began.elapsed();
        if t < BEAT_EVERY && took >= t {
            self.cadence.slept(t, took);
        }
    }

    /// The host's tick cadence as this plugin has learned it.
    pub fn cadence(&self) -> &Cadence {
        &self.cadence
    }
}
