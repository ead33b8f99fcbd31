//! The transport port: what the host and plugin runtimes need from the wire, as two traits.
//!
//! The runtimes ([`crate::host`], [`crate::plugin`]) talk only to [`HostLink`] and
//! [`PluginLink`]. The default adapter, [`shm`], is one shared-memory segment per plugin with
//! three frame rings (moves, control, replies) and two doorbells. A remote adapter (gRPC
//! speaking the df.plugin protocol, where moves travel as `PlayerMovementsPacked`) implements
//! the same traits, and the same plugin `Handler` runs over it unchanged.

pub mod shm;

use crate::codec::BatchBuilder;
use crate::fastpath::{MoveFrameError, MoveFrameHeader, MoveRecord};
use crate::proto::{EventEnvelope, HostToPlugin, PluginToHost};
use crate::ring::RingError;
use crate::ring::frame::ReserveError;

/// A transport failure. Each means the link is unusable; the runtime disconnects it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A ring broke its protocol (corrupt positions or frames): the peer misbehaved.
    #[error("ring protocol violation: {0}")]
    Ring(#[from] RingError),
    /// A message can never fit this link (larger than the ring's largest frame).
    #[error("message of {len} bytes exceeds the link's largest frame of {max} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Largest frame.
        max: usize,
    },
    /// The peer sent a frame of an unknown kind.
    #[error("unexpected frame kind {0}")]
    BadKind(u32),
    /// A move frame is malformed.
    #[error("bad move frame: {0}")]
    BadMoves(#[from] MoveFrameError),
    /// The link was closed.
    #[error("link closed")]
    Closed,
}

impl LinkError {
    /// Converts a refused reservation: `Ok(false)` for "full, try later", an error otherwise.
    pub fn from_reserve(e: ReserveError) -> Result<bool, LinkError> {
        match e {
            ReserveError::Full { .. } => Ok(false),
            ReserveError::TooLarge { len, max } => Err(LinkError::TooLarge { len, max }),
            ReserveError::ReservedKind(k) => Err(LinkError::BadKind(k)),
            ReserveError::Broken(e) => Err(LinkError::Ring(e)),
        }
    }
}

/// How full a link's outbound queues are, as fractions of capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Occupancy {
    /// Moves queue fill, 0..=1.
    pub moves: f64,
    /// Control queue fill, 0..=1.
    pub control: f64,
}

/// The peer's liveness as the link sees it (cheap: no system call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHealth {
    /// Nanoseconds since the peer's last heartbeat (`u64::MAX` if it never beat).
    pub heartbeat_age_ns: u64,
    /// The peer's process id, if known (0 if not).
    pub pid: u32,
}

/// Counters the host publishes through a link, for `plugbus inspect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Events delivered to the link.
    pub events: u64,
    /// Move records delivered.
    pub moves: u64,
    /// Move records conflated away.
    pub conflated: u64,
    /// Frames that went through the overflow queue.
    pub overflowed: u64,
    /// Frames delivered.
    pub frames: u64,
}

/// The host's end of one plugin's link. Every `try_*` is non-blocking: `Ok(false)` means
/// "no room now" and the caller keeps the data (conflation, overflow queue).
pub trait HostLink: Send {
    /// Sends a tick's moves (one frame, or several if they exceed a frame), all or nothing.
    fn try_send_moves(&mut self, tick: u64, flags: u32, moves: &[MoveRecord]) -> Result<bool, LinkError>;
    /// Sends one event, encoded in place (`HostToPlugin { event }`).
    fn try_send_event(&mut self, env: &EventEnvelope) -> Result<bool, LinkError>;
    /// Sends one event already encoded (`body` = the envelope's encoding).
    fn try_send_event_encoded(&mut self, body: &[u8]) -> Result<bool, LinkError>;
    /// Sends a gathered batch as one `HostToPlugin { events }` frame.
    fn try_send_batch(&mut self, batch: &BatchBuilder) -> Result<bool, LinkError>;
    /// Sends a complete encoded `HostToPlugin` message (from an overflow queue).
    fn try_send_raw(&mut self, payload: &[u8]) -> Result<bool, LinkError>;
    /// Sends a `HostToPlugin` message.
    fn try_send_message(&mut self, msg: &HostToPlugin) -> Result<bool, LinkError>;
    /// Calls `f` with each `PluginToHost` payload that has arrived, in order, up to `max`
    /// messages. The bytes may be in shared memory: copy before decoding. Returns how many.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError>;
    /// Wakes the plugin if it sleeps; returns whether a wake-up was sent.
    fn wake(&mut self) -> bool;
    /// Sleeps until the plugin sends something, `timeout` passes, or spuriously (for a host
    /// waiting on answers; the plugin's send wakes it).
    fn park(&mut self, timeout: std::time::Duration) -> Result<(), LinkError>;
    /// Publishes the host's heartbeat.
    fn heartbeat(&mut self);
    /// The plugin's heartbeat and pid.
    fn peer(&self) -> PeerHealth;
    /// Whether the plugin's process is alive (may read /proc: call it only when needed;
    /// `true` when the transport cannot tell).
    fn peer_alive(&self) -> bool;
    /// Fill of the outbound queues.
    fn occupancy(&mut self) -> Result<Occupancy, LinkError>;
    /// Why the link's memory can no longer be trusted, if so (for shared memory: the plugin
    /// truncated the segment, and this process now reads zero pages there instead of dying).
    fn broken(&self) -> Option<&'static str>;
    /// Tells the plugin the host is shutting down (besides the `HostShutdown` message).
    fn signal_shutdown(&mut self);
    /// Publishes counters for inspection tools.
    fn publish_counters(&mut self, c: &LinkCounters);
    /// A name for logs (e.g. the segment name).
    fn describe(&self) -> String;
}

/// What a plugin's link delivers.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A move frame, lent in place.
    Moves {
        /// Tick, count, flags.
        header: MoveFrameHeader,
        /// The records.
        records: &'a [MoveRecord],
    },
    /// An encoded `HostToPlugin` message.
    Host(&'a [u8]),
}

/// Why a plugin's link is ending or waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// The host is running.
    Running,
    /// The host announced shutdown.
    ShuttingDown,
    /// The host's process is gone.
    Dead,
}

/// The plugin's end of its link.
pub trait PluginLink: Send {
    /// Delivers up to `max` incoming items in order (moves and host messages interleaved as
    /// sent, per queue); returns how many.
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError>;
    /// Sends one `PluginToHost` message, encoded in place; `Ok(false)` if there is no room now.
    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError>;
    /// Sends a complete encoded `PluginToHost` message.
    fn try_send_raw(&mut self, payload: &[u8]) -> Result<bool, LinkError>;
    /// Whether anything is waiting to be polled.
    fn has_incoming(&mut self) -> Result<bool, LinkError>;
    /// Sleeps until the host rings, `timeout` passes, or spuriously. Re-checks first, so no
    /// wake-up is lost.
    fn park(&mut self, timeout: std::time::Duration) -> Result<(), LinkError>;
    /// Wakes the host if it waits on this link.
    fn wake_host(&mut self);
    /// Publishes the plugin's heartbeat.
    fn heartbeat(&mut self);
    /// The host's state.
    fn host_state(&self) -> HostState;
    /// Why the link's memory can no longer be trusted, if so (see [`HostLink::broken`]).
    fn broken(&self) -> Option<&'static str>;
    /// The host's process id (0 if unknown).
    fn host_pid(&self) -> u32;
    /// Publishes counters for inspection tools: events, move frames, replies.
    fn publish_counters(&mut self, events: u64, move_frames: u64, replies: u64);
}
