//! The transport port: the only door between the two runtimes and the wire.
//!
//! The host runtime ([`crate::host`]) holds one [`HostLink`] per plugin; the plugin runtime
//! ([`crate::plugin`]) holds one [`PluginLink`]. Links are made by an [`Acceptor`] on the host
//! side and a [`Connector`] on the plugin side. The runtimes know nothing else of the wire: no
//! memory layout, no socket, no environment variable but [`ENV_ADDRESS`]. The shared-memory
//! adapter is [`shm`]; a gRPC adapter stands beside it with the same traits.
//!
//! # Writing an adapter
//!
//! An adapter is a pair of link types, an [`Acceptor`] that makes the host's end and a
//! [`Connector`] that makes the plugin's end from an address, and a line in
//! [`Transports::standard`] and [`connectors`]. What each side must guarantee:
//!
//! 1. **One ordered stream down.** Every item the host's link accepts (`try_send_moves`,
//!    `try_send`) is handed to the plugin side's [`PluginLink::poll`] exactly once, in the order
//!    it was accepted, whatever queues the adapter uses underneath. The host relies on it: it
//!    writes each tick's events, then that tick's moves, and a plugin sees every item of tick
//!    *t* before any item of tick *t + 1*.
//! 2. **Nothing blocks the host.** The host's link is used on the game's tick thread. A
//!    `try_*` that has no room returns `Ok(false)` at once and the host keeps the item (it
//!    conflates moves, queues the rest in order). Only [`HostLink::wake`] may make a system call,
//!    and only when the plugin sleeps. Work that may block (creating memory, binding, accepting)
//!    belongs to [`Acceptor::open`], which runs on the host's supervisor thread; links are also
//!    dropped there.
//! 3. **Moves are all or nothing.** A tick's records arrive as one [`Incoming::Moves`] (or
//!    several with [`crate::fastpath::FLAG_MORE`] on all but the last), never partly.
//! 4. **Upstream in order.** [`HostLink::recv`] yields the plugin's `PluginToHost` messages in
//!    the order it sent them. The bytes may lie in memory the plugin can still write: the host
//!    copies them before decoding, and an adapter that can copy cheaply may lend its own copy.
//! 5. **Wake-ups without loss.** A host that waits for answers announces it on every link it
//!    waits for ([`HostLink::prepare_wait`]), re-checks, and sleeps on their words
//!    ([`HostLink::wait_word`]) with [`crate::sync::wait_any`]. The plugin side's send must
//!    change that word and wake its sleepers after the message is visible to `recv`
//!    ([`crate::ring::doorbell`] is such a protocol, for one word per direction).
//! 6. **Untrusted peers.** Every length, position and kind read from the peer is checked. A
//!    peer that breaks the protocol yields [`LinkError::Protocol`]; a link whose medium failed
//!    under it (truncated memory, reset connection) yields [`LinkError::Broken`] and says why
//!    in [`HostLink::failure`]. The host then disconnects the plugin with that text.
//! 7. **Addresses.** An address is `scheme:rest` (`shm:fd:3`, `shm:plugbus.chat.1234.1`,
//!    `unix:///run/plugbus.sock`, `tcp://127.0.0.1:50050`). The host gives a launched plugin its
//!    address in [`ENV_ADDRESS`] (with whatever else [`OpenedLink::env`] holds), and the
//!    descriptor in [`OpenedLink::inherit`], if any, as [`INHERITED_FD`]; the plugin runtime
//!    calls [`connect`], which picks the connector by scheme.

#[cfg(not(loom))]
pub mod grpc;
pub mod shm;

use std::time::Duration;

use crate::fastpath::{MoveFrameHeader, MoveRecord};
use crate::proto::{EventEnvelope, HostToPlugin, PluginToHost};
use crate::sync::FutexWord;

/// The environment variable that tells a launched plugin where its host is (an address).
pub const ENV_ADDRESS: &str = "PLUGBUS_ADDRESS";

/// Bytes of buffering a link gets per direction (each a power of two). For shared memory these
/// are the ring sizes; another adapter bounds its queues with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSizes {
    /// Moves, host to plugin (default 4 MiB: eight ticks of 10,000 players).
    pub moves: u64,
    /// Every other message, host to plugin (default 1 MiB).
    pub control: u64,
    /// Replies, plugin to host (default 256 KiB).
    pub replies: u64,
}

impl Default for QueueSizes {
    fn default() -> Self {
        Self {
            moves: 4 << 20,
            control: 1 << 20,
            replies: 256 << 10,
        }
    }
}

impl QueueSizes {
    /// Checks each size: a power of two between its minimum and 1 GiB. The error names the
    /// field (`moves`, `control`, `replies`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v, min) in [
            ("moves", self.moves, 1 << 16),
            ("control", self.control, 1 << 12),
            ("replies", self.replies, 1 << 12),
        ] {
            if !v.is_power_of_two() || v < min || v > 1 << 30 {
                return Err((
                    field,
                    format!("{v} must be a power of two between {min} and {}", 1u64 << 30),
                ));
            }
        }
        Ok(())
    }
}

/// A link failure. Each means the link is unusable; the runtime disconnects it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer broke the protocol (a corrupt position, length or kind; bytes that are not the
    /// message they claim to be). Nothing more it sends can be trusted.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message can never fit this link.
    #[error("message of {len} bytes exceeds the link's largest message of {max} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Largest message the link carries.
        max: usize,
    },
    /// The medium failed under the link (memory truncated, connection reset); the text says how.
    #[error("{0}")]
    Broken(String),
    /// The link was closed.
    #[error("link closed")]
    Closed,
}

/// Wakes one plugin from any thread (see [`HostLink::wake_handle`]).
pub trait WakeHandle: Send + Sync {
    /// Wakes the plugin if it sleeps; returns whether a wake-up (a system call) was sent.
    fn wake(&self) -> bool;
}

/// One item for the plugin, besides moves, in the order the host sends them.
#[derive(Debug, Clone, Copy)]
pub enum Downstream<'a> {
    /// One event as `HostToPlugin { event }`, encoded by the link.
    Event(&'a EventEnvelope),
    /// One event as `HostToPlugin { event }`, given as the envelope's encoding (encoded once
    /// for every plugin it goes to).
    EncodedEvent(&'a [u8]),
    /// A batch of events as `HostToPlugin { events: EventBatch }`. `body` is the encoding of the
    /// `EventBatch` message: its `events` fields (tag, length, envelope) in order.
    Batch {
        /// How many events `body` holds.
        events: u32,
        /// The `EventBatch` encoding.
        body: &'a [u8],
    },
    /// Any other `HostToPlugin` message (hello, shutdown, action result, server information).
    Message(&'a HostToPlugin),
    /// A complete `HostToPlugin` message already encoded (from the host's queue of items that
    /// waited for room).
    Encoded(&'a [u8]),
}

/// How full a link's outbound buffers are, as fractions of capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Occupancy {
    /// Moves, 0..=1.
    pub moves: f64,
    /// Everything else, 0..=1.
    pub control: f64,
}

/// The peer as a link sees it (cheap: no system call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHealth {
    /// Nanoseconds since the peer's last heartbeat (`u64::MAX` if it never beat).
    pub heartbeat_age_ns: u64,
    /// The peer's process id as the peer reports it, 0 if unknown. Untrusted: use it to watch
    /// the process, never to decide that the peer is who it claims.
    pub pid: u32,
}

/// Counters the host publishes through a link (shared memory shows them to `plugbus inspect`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Events delivered to the link.
    pub events: u64,
    /// Move records delivered.
    pub moves: u64,
    /// Move records conflated away.
    pub conflated: u64,
    /// Messages that waited in the host's queue for room.
    pub overflowed: u64,
    /// Messages (frames) delivered.
    pub frames: u64,
}

/// The host's end of one plugin's link. Used on the tick thread: nothing here blocks.
pub trait HostLink: Send {
    /// Sends one tick's moves, all or nothing; `Ok(false)` if there is no room now.
    fn try_send_moves(&mut self, tick: u64, flags: u32, records: &[MoveRecord]) -> Result<bool, LinkError>;
    /// Sends one item after everything sent before it; `Ok(false)` if there is no room now.
    fn try_send(&mut self, item: Downstream<'_>) -> Result<bool, LinkError>;
    /// Wakes the plugin if it sleeps; returns whether a wake-up (a system call) was sent. The
    /// host calls it once after a burst of sends.
    fn wake(&mut self) -> bool;
    /// A handle that does what [`HostLink::wake`] does from another thread, and stays valid
    /// after the link is dropped (ringing it then does nothing useful, and nothing harmful).
    /// The host's wake thread uses it, so that the tick thread makes no system call to wake a
    /// sleeping plugin. `None` (the default): the adapter's wake is cheap enough to stay on the
    /// tick thread.
    fn wake_handle(&self) -> Option<std::sync::Arc<dyn WakeHandle>> {
        None
    }
    /// Calls `f` with each `PluginToHost` message that has arrived, in order, up to `max`.
    /// The bytes may lie in memory the plugin can write: copy them before decoding.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError>;
    /// Announces that the host will sleep until this plugin sends. `Ok(false)` if something has
    /// already arrived (the announcement is withdrawn: do not sleep). After `Ok(true)`, call
    /// [`HostLink::finish_wait`] once the sleep is over.
    fn prepare_wait(&mut self) -> Result<bool, LinkError>;
    /// The word to sleep on after `prepare_wait` returned `Ok(true)`, and the value it holds
    /// while nothing has arrived.
    fn wait_word(&self) -> (&FutexWord, u32);
    /// Ends a wait begun by `prepare_wait`.
    fn finish_wait(&mut self);
    /// Publishes the host's heartbeat.
    fn heartbeat(&mut self);
    /// The plugin's heartbeat and pid.
    fn peer(&self) -> PeerHealth;
    /// Fill of the outbound buffers.
    fn occupancy(&mut self) -> Result<Occupancy, LinkError>;
    /// Why the link can no longer be trusted, if its medium failed under it.
    fn failure(&self) -> Option<&'static str>;
    /// Tells the plugin that the host is done with it (after the `HostShutdown` message).
    fn close(&mut self);
    /// Publishes counters for inspection tools.
    fn publish_counters(&mut self, c: &LinkCounters);
    /// The link's address, for logs.
    fn address(&self) -> &str;
}

/// What a plugin's link delivers, in order.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A tick's move frame, lent in place.
    Moves {
        /// Tick, count, flags.
        header: MoveFrameHeader,
        /// The records.
        records: &'a [MoveRecord],
    },
    /// An encoded `HostToPlugin` message.
    Host(&'a [u8]),
}

/// The host as a plugin's link sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// The host is running.
    Running,
    /// The host announced shutdown (or closed this link).
    ShuttingDown,
    /// The host's process is gone.
    Dead,
}

/// The plugin's end of its link.
pub trait PluginLink: Send {
    /// Delivers up to `max` items in the order the host sent them; returns how many.
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError>;
    /// Sends one `PluginToHost` message, encoded by the link; `Ok(false)` if there is no room.
    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError>;
    /// Sends a complete encoded `PluginToHost` message; `Ok(false)` if there is no room.
    fn try_send_encoded(&mut self, payload: &[u8]) -> Result<bool, LinkError>;
    /// The largest encoded `PluginToHost` message this link carries.
    fn max_message(&self) -> usize;
    /// Whether anything is waiting to be polled.
    fn has_incoming(&mut self) -> Result<bool, LinkError>;
    /// Sleeps until the host sends, `timeout` passes, or spuriously. Re-checks first, so no
    /// wake-up is lost.
    fn park(&mut self, timeout: Duration) -> Result<(), LinkError>;
    /// Wakes the host if it waits on this link (after a burst of sends).
    fn wake_host(&mut self);
    /// Publishes the plugin's heartbeat.
    fn heartbeat(&mut self);
    /// The host's state.
    fn host_state(&self) -> HostState;
    /// Why the link can no longer be trusted, if its medium failed under it.
    fn failure(&self) -> Option<&'static str>;
    /// The host's process id (0 if unknown).
    fn host_pid(&self) -> u32;
    /// Publishes counters for inspection tools: events, move frames, replies.
    fn publish_counters(&mut self, events: u64, move_frames: u64, replies: u64);
}

impl<L: PluginLink + ?Sized> PluginLink for Box<L> {
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError> {
        (**self).poll(max, f)
    }
    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError> {
        (**self).try_send(msg)
    }
    fn try_send_encoded(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        (**self).try_send_encoded(payload)
    }
    fn max_message(&self) -> usize {
        (**self).max_message()
    }
    fn has_incoming(&mut self) -> Result<bool, LinkError> {
        (**self).has_incoming()
    }
    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        (**self).park(timeout)
    }
    fn wake_host(&mut self) {
        (**self).wake_host()
    }
    fn heartbeat(&mut self) {
        (**self).heartbeat()
    }
    fn host_state(&self) -> HostState {
        (**self).host_state()
    }
    fn failure(&self) -> Option<&'static str> {
        (**self).failure()
    }
    fn host_pid(&self) -> u32 {
        (**self).host_pid()
    }
    fn publish_counters(&mut self, events: u64, move_frames: u64, replies: u64) {
        (**self).publish_counters(events, move_frames, replies)
    }
}

// ------------------------------------------------------------------------------------------
// Making links
// ------------------------------------------------------------------------------------------

/// What the host asks of an acceptor when a plugin's slot opens (at start, and at each restart).
#[derive(Debug, Clone, Copy)]
pub struct LinkRequest<'a> {
    /// The plugin's configured id.
    pub plugin_id: &'a str,
    /// The plugin is started by someone else (attach mode) and finds the link by its address.
    pub attach: bool,
    /// A fixed address from the configuration; the acceptor makes one up when `None`.
    pub address: Option<&'a str>,
    /// Buffer sizes.
    pub queues: &'a QueueSizes,
}

/// Where and how network transports accept plugins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenSettings {
    /// Addresses to listen on (`unix:///path`, `tcp://host:port`).
    pub addresses: Vec<String>,
    /// TLS for TCP listeners: a PEM certificate (chain) and its PEM private key.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A file holding the token every plugin must present (`authorization: Bearer <token>`).
    pub token_file: Option<std::path::PathBuf>,
}

/// A link made for a plugin that has not connected yet.
pub struct OpenedLink {
    /// The host's end.
    pub link: Box<dyn HostLink>,
    /// The link's address, for logs: where an attached plugin connects (for attach mode's
    /// operator); for a launched plugin, what names its link (e.g. `shm:memfd:plugbus.<...>`),
    /// while `env` holds what the plugin connects to.
    pub address: String,
    /// The environment a launched plugin needs to connect ([`ENV_ADDRESS`] at least).
    pub env: Vec<(String, String)>,
    /// A descriptor the launched plugin inherits as [`INHERITED_FD`] (the shared-memory
    /// adapter's memfd; its address in `env` names that number). The host closes its own copy
    /// once the plugin is started; `None` for transports that pass nothing.
    pub inherit: Option<std::os::fd::OwnedFd>,
}

/// The descriptor number at which a launched plugin finds [`OpenedLink::inherit`].
pub const INHERITED_FD: std::os::fd::RawFd = 3;

impl std::fmt::Debug for OpenedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedLink")
            .field("address", &self.address)
            .field("env", &self.env)
            .field("inherit", &self.inherit)
            .finish_non_exhaustive()
    }
}

/// Why an acceptor could not make a link.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// Makes the host's ends of links. Runs on the host's supervisor thread, so it may block.
pub trait Acceptor: Send {
    /// The transport's name in configurations (`transport = "shm"`).
    fn name(&self) -> &'static str;
    /// Removes what hosts that died left behind; returns what it removed, for the log.
    fn clean_stale(&mut self) -> Vec<String>;
    /// Takes where and how remote plugins connect (the host's `listen`, TLS and token
    /// settings); an acceptor that listens nowhere ignores them. Called once, before any `open`.
    fn listen(&mut self, settings: &ListenSettings) -> Result<(), String> {
        let _ = settings;
        Ok(())
    }
    /// Makes a link for one plugin.
    fn open(&mut self, request: &LinkRequest<'_>) -> Result<OpenedLink, OpenError>;
}

/// The acceptors a host can use, by transport name.
pub struct Transports {
    acceptors: Vec<Box<dyn Acceptor>>,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.acceptors.iter().map(|a| a.name())).finish()
    }
}

impl Transports {
    /// Every transport plugbus ships (shared memory, gRPC).
    pub fn standard() -> Self {
        #[cfg(not(loom))]
        let acceptors: Vec<Box<dyn Acceptor>> =
            vec![Box::new(shm::ShmAcceptor), Box::new(grpc::GrpcAcceptor::default())];
        #[cfg(loom)]
        let acceptors: Vec<Box<dyn Acceptor>> = vec![Box::new(shm::ShmAcceptor)];
        Self { acceptors }
    }

    /// Adds (or replaces) an acceptor.
    pub fn with(mut self, acceptor: Box<dyn Acceptor>) -> Self {
        self.acceptors.retain(|a| a.name() != acceptor.name());
        self.acceptors.push(acceptor);
        self
    }

    /// The acceptor for transport `name`.
    pub fn get(&mut self, name: &str) -> Option<&mut dyn Acceptor> {
        self.acceptors
            .iter_mut()
            .find(|a| a.name() == name)
            .map(|a| &mut **a as &mut dyn Acceptor)
    }

    /// Every acceptor.
    pub fn all(&mut self) -> impl Iterator<Item = &mut Box<dyn Acceptor>> {
        self.acceptors.iter_mut()
    }
}

/// The name of the default transport.
pub const DEFAULT_TRANSPORT: &str = shm::SCHEME;

/// Why a plugin could not connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The address is not one any connector reads.
    #[error("{address:?} is not a plugbus address: {reason}")]
    BadAddress {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Nothing is there (the host has not made the link, or has removed it).
    #[error("nothing at {address}: {reason}")]
    NotFound {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Another plugin process holds the link.
    #[error("{address} is taken: {reason}")]
    Taken {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The operating system refused (permissions, resources).
    #[error("cannot open {address}: {reason}")]
    Io {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Something is there, but this plugin cannot use it (another version, corrupt).
    #[error("cannot use {address}: {reason}")]
    Refused {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Makes the plugin's end of a link from an address.
pub trait Connector: Sync {
    /// The address schemes it reads (`shm`; `unix` and `tcp`).
    fn schemes(&self) -> &'static [&'static str];
    /// Whether `address` is one it reads without a scheme prefix (shared memory takes a bare
    /// segment name, gRPC a bare `host:port`).
    fn claims_bare(&self, address: &str) -> bool;
    /// An address from this transport's own environment variables, for plugins started by
    /// hand (attach mode) or by another host.
    fn address_from_env(&self) -> Option<String>;
    /// Checks an address without connecting.
    fn check(&self, address: &str) -> Result<(), String>;
    /// Connects to `address`.
    fn connect(&self, address: &str) -> Result<Box<dyn PluginLink>, ConnectError>;
}

/// Every connector plugbus ships, in the order they claim bare addresses.
pub fn connectors() -> &'static [&'static dyn Connector] {
    #[cfg(not(loom))]
    static ALL: [&dyn Connector; 2] = [&shm::ShmConnector, &grpc::GrpcConnector];
    #[cfg(loom)]
    static ALL: [&dyn Connector; 1] = [&shm::ShmConnector];
    &ALL
}

/// The connector that reads `address`.
fn pick(address: &str) -> Result<&'static dyn Connector, ConnectError> {
    let scheme = address.split_once(':').map(|(s, _)| s);
    if let Some(c) = connectors()
        .iter()
        .find(|c| scheme.is_some_and(|s| c.schemes().contains(&s)))
    {
        return Ok(*c);
    }
    if let Some(c) = connectors().iter().find(|c| c.claims_bare(address)) {
        return Ok(*c);
    }
    let schemes: Vec<&str> = connectors().iter().flat_map(|c| c.schemes().iter().copied()).collect();
    Err(ConnectError::BadAddress {
        address: address.to_owned(),
        reason: format!("expected <scheme>:<address> with a scheme among {schemes:?}"),
    })
}

/// Connects the plugin's end of a link at `address`, with the connector its scheme names.
pub fn connect(address: &str) -> Result<Box<dyn PluginLink>, ConnectError> {
    pick(address)?.connect(address)
}

/// Whether `address` is one a connector reads and well formed (without connecting).
pub fn check_address(address: &str) -> Result<(), ConnectError> {
    pick(address)?
        .check(address)
        .map_err(|reason| ConnectError::BadAddress {
            address: address.to_owned(),
            reason,
        })
}

/// The address a plugin was given: [`ENV_ADDRESS`], else a transport's own variable.
pub fn address_from_env() -> Option<String> {
    std::env::var(ENV_ADDRESS)
        .ok()
        .filter(|a| !a.is_empty())
        .or_else(|| connectors().iter().find_map(|c| c.address_from_env()))
}
