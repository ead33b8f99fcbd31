//! The shared-memory adapter: one segment per plugin, three frame rings, two doorbells.
//!
//! Ring 0 carries moves (host to plugin, packed move frames), ring 1 control (host to plugin,
//! `HostToPlugin` frames), ring 2 replies (plugin to host, `PluginToHost` frames). The plugin
//! sleeps on the header's `to_attacher` doorbell, the host on `to_creator`.
//!
//! **One ordered stream over two rings.** The control ring is the stream: each move frame
//! written to the moves ring is announced by a marker frame ([`KIND_MOVES_MARK`], no payload)
//! in the control ring, written after it. The plugin reads the control ring only and, at a
//! marker, takes the next frame of the moves ring. The moves frame's tail store comes before
//! the marker's (program order, both Release), so a plugin that sees the marker (Acquire on the
//! control tail) sees the frame: `loom-tests/` checks this. The plugin thus gets every item in
//! the order the host wrote it, while moves keep their own ring and size.
//!
//! **Who can reach a segment.** A plugin the host launches gets an anonymous segment: a memfd
//! sealed against shrinking and growing ([`Segment::create_memfd`]), handed over in
//! [`OpenedLink::inherit`] and inherited by the child as descriptor [`INHERITED_FD`]; its address
//! is `shm:fd:3`. The plugin maps it and closes the descriptor, the host closes its copy once
//! the child is started: from then on only the two mappings exist, no name in `/dev/shm`, no
//! descriptor in `/proc/<pid>/fd`, so another process of the same user can neither open the
//! segment nor create a name first. Each restart gets a fresh memfd. A plugin in attach mode is
//! started by someone else and finds its segment by name (`plugbus.<pid>.<id>.<n>`, or the
//! configured one): attach mode trusts the processes of the same user, since any of them can
//! open the name.
//!
//! The adapter owns everything about shared memory: segment names and memfds, creation, the
//! removal of named segments whose host died ([`ShmAcceptor`]'s `clean_stale`), unlinking (when
//! the host's link is dropped), and the [`ENV_SEGMENT`] variable that plugins started by hand
//! may use instead of the address.

use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use crate::codec::{self, KIND_HOST_TO_PLUGIN, KIND_PLUGIN_TO_HOST};
use crate::fastpath::{self, KIND_MOVES, MoveRecord};
use crate::proto::PluginToHost;
use crate::ring::frame::{self, ReserveError};
use crate::ring::{RingError, RingLayoutError};
use crate::segment::header::{STATE_DETACHED, STATE_SHUTDOWN};
use crate::segment::{self, RingSpec, Segment, SegmentCreateError, SegmentOpenError, stale};
use crate::sync::{FutexWord, Ordering};

use super::{
    Acceptor, ConnectError, Connector, Downstream, ENV_ADDRESS, HostLink, HostState, INHERITED_FD, Incoming,
    LinkCounters, LinkError, LinkRequest, Occupancy, OpenError, OpenedLink, PeerHealth, PluginLink, QueueSizes,
};

/// The transport's name and address scheme.
pub const SCHEME: &str = "shm";
/// The variable a plugin started by hand may set to the segment name instead of
/// [`ENV_ADDRESS`].
pub const ENV_SEGMENT: &str = "PLUGBUS_SEGMENT";

/// Ring index of the moves ring.
pub const RING_MOVES: usize = 0;
/// Ring index of the control ring.
pub const RING_CONTROL: usize = 1;
/// Ring index of the replies ring.
pub const RING_REPLIES: usize = 2;

/// Control-ring frame kind: the next frame of the moves ring comes here in the stream.
pub const KIND_MOVES_MARK: u32 = 4;
/// Space a marker takes in the control ring (an empty frame never needs padding).
const MARK_SIZE: usize = frame::frame_size(0);

/// Creator counter slots (see [`crate::segment::header::Header::creator_counters`]).
pub mod counters {
    /// Events delivered.
    pub const EVENTS: usize = 0;
    /// Move records delivered.
    pub const MOVES: usize = 1;
    /// Move records conflated.
    pub const CONFLATED: usize = 2;
    /// Frames that waited in the host's queue.
    pub const OVERFLOWED: usize = 3;
    /// Frames delivered.
    pub const FRAMES: usize = 4;
    /// Attacher slot: events received.
    pub const PLUGIN_EVENTS: usize = 0;
    /// Attacher slot: move frames received.
    pub const PLUGIN_MOVE_FRAMES: usize = 1;
    /// Attacher slot: replies sent.
    pub const PLUGIN_REPLIES: usize = 2;
}

fn specs(q: &QueueSizes) -> [RingSpec; 3] {
    [
        RingSpec::frames(q.moves),
        RingSpec::frames(q.control),
        RingSpec::frames(q.replies),
    ]
}

/// `shm:plugbus.x` as `plugbus.x`.
fn without_scheme(address: &str) -> &str {
    address.strip_prefix("shm:").unwrap_or(address)
}

/// The descriptor of an address without its scheme (`fd:3` as 3); `None` if it names no
/// descriptor, an error if it names one badly.
fn inherited_fd(address: &str) -> Option<Result<RawFd, String>> {
    let n = address.strip_prefix("fd:")?;
    Some(match n.parse::<RawFd>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(format!(
            "{address:?} does not name an inherited descriptor (fd:<n>, n a number above 2)"
        )),
    })
}

/// A segment name from an address without its scheme (`plugbus.x`), checked.
fn segment_name(address: &str) -> Result<&str, String> {
    if segment::valid_name(address) {
        Ok(address)
    } else {
        Err(format!(
            "{address:?} is not a segment name (\"{}\" then up to {} characters of A-Z a-z 0-9 . _ -)",
            segment::PREFIX,
            segment::MAX_NAME - segment::PREFIX.len()
        ))
    }
}

/// What the host says when the plugin truncated the segment.
const TRUNCATED_BY_PLUGIN: &str = "the plugin truncated its shared-memory segment";
/// What the plugin says when the segment was truncated under it.
const TRUNCATED_UNDER_PLUGIN: &str = "the host's shared-memory segment was truncated";

fn ring_error(e: RingError, segment: &Segment, truncated: &str) -> LinkError {
    // A truncated segment shows up first as a broken ring: name the real cause.
    if segment.is_broken() {
        LinkError::Broken(format!("{truncated} ({e})"))
    } else {
        LinkError::Protocol(e.to_string())
    }
}

// ------------------------------------------------------------------------------------------
// The stream over two rings (the adapter's protocol; `loom-tests/` checks it as it is here)
// ------------------------------------------------------------------------------------------

/// Why the stream failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A ring broke its protocol.
    Ring(RingError),
    /// A frame is not what the stream allows at its place.
    Protocol(String),
    /// A tick's records can never fit the moves ring.
    TooLarge {
        /// Bytes needed.
        len: usize,
        /// Largest frame.
        max: usize,
    },
}

impl StreamError {
    fn into_link_error(self, segment: &Segment, truncated: &str) -> LinkError {
        match self {
            StreamError::Ring(e) => ring_error(e, segment, truncated),
            StreamError::Protocol(p) => LinkError::Protocol(p),
            StreamError::TooLarge { len, max } => LinkError::TooLarge { len, max },
        }
    }
}

/// Host side: writes a tick's move frames into `moves`, then a marker for each into `control`,
/// all or nothing. `Ok(false)`: no room now in one of the rings (nothing written).
pub fn send_moves(
    moves: &mut frame::Producer,
    control: &mut frame::Producer,
    tick: u64,
    flags: u32,
    records: &[MoveRecord],
) -> Result<bool, StreamError> {
    // Room for every marker first: once the move frames are in, their markers must follow.
    let frames = records
        .len()
        .div_ceil(fastpath::max_records_per_frame(moves).max(1))
        .max(1);
    if !control.has_room(frames * MARK_SIZE).map_err(StreamError::Ring)? {
        return Ok(false);
    }
    let written = match fastpath::write_frame(moves, tick, flags, records) {
        Ok(n) => n,
        Err(ReserveError::Full { .. }) => return Ok(false),
        Err(ReserveError::TooLarge { len, max }) => return Err(StreamError::TooLarge { len, max }),
        Err(ReserveError::Broken(e)) => return Err(StreamError::Ring(e)),
        Err(ReserveError::ReservedKind(k)) => return Err(StreamError::Protocol(format!("reserved kind {k}"))),
    };
    for _ in 0..written {
        // The marker's commit (a Release store of the control tail) comes after the move
        // frame's own Release commit: a plugin that acquires the marker sees the frame.
        control.try_push(KIND_MOVES_MARK, &[]).map_err(|e| match e {
            ReserveError::Broken(e) => StreamError::Ring(e),
            // Checked above, and only the plugin frees space.
            other => StreamError::Protocol(format!("the control ring refused a marker it had room for: {other}")),
        })?;
    }
    Ok(true)
}

/// Plugin side: hands up to `max` items to `f` in the order the host wrote them: the control
/// ring's messages, and at each marker the next frame of the moves ring.
pub fn poll_stream(
    moves: &mut frame::Consumer,
    control: &mut frame::Consumer,
    max: usize,
    f: &mut dyn FnMut(Incoming<'_>),
) -> Result<usize, StreamError> {
    let mut n = 0;
    while n < max {
        let Some(frame) = control.try_read().map_err(StreamError::Ring)? else {
            break;
        };
        match frame.kind() {
            KIND_HOST_TO_PLUGIN => f(Incoming::Host(frame.payload())),
            KIND_MOVES_MARK => {
                // Acquiring the marker (in try_read) made the move frame written before it
                // visible: it must be there.
                let Some(m) = moves.try_read().map_err(StreamError::Ring)? else {
                    return Err(StreamError::Protocol(
                        "a moves marker with no frame in the moves ring".into(),
                    ));
                };
                if m.kind() != KIND_MOVES {
                    return Err(StreamError::Protocol(format!(
                        "frame of kind {} on the moves ring",
                        m.kind()
                    )));
                }
                let (header, records) =
                    fastpath::parse(m.payload()).map_err(|e| StreamError::Protocol(e.to_string()))?;
                f(Incoming::Moves { header, records });
            }
            k => return Err(StreamError::Protocol(format!("frame of kind {k} on the control ring"))),
        }
        n += 1;
    }
    Ok(n)
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

/// Makes shared-memory links for the host.
#[derive(Debug, Default)]
pub struct ShmAcceptor;

impl Acceptor for ShmAcceptor {
    fn name(&self) -> &'static str {
        SCHEME
    }

    fn clean_stale(&mut self) -> Vec<String> {
        match stale::remove_stale() {
            Ok(removed) => removed,
            Err(e) => {
                tracing::warn!("cannot scan for stale plugbus segments: {e}");
                Vec::new()
            }
        }
    }

    fn open(&mut self, request: &LinkRequest<'_>) -> Result<OpenedLink, OpenError> {
        if !request.attach {
            // A launched plugin: an anonymous segment that only it inherits. No name exists that
            // another process could open, or create first.
            if let Some(a) = request.address {
                tracing::warn!(
                    plugin = %request.plugin_id,
                    "address {a:?} ignored: a launched plugin's shared-memory segment has no name (it inherits it as fd {INHERITED_FD})"
                );
            }
            let (link, fd) = ShmHostLink::create_memfd(request.plugin_id, request.queues)
                .map_err(|e| OpenError(format!("cannot create its segment: {e}")))?;
            return Ok(OpenedLink {
                address: link.address.clone(),
                link: Box::new(link),
                env: vec![(ENV_ADDRESS.to_owned(), format!("{SCHEME}:fd:{INHERITED_FD}"))],
                inherit: Some(fd),
            });
        }
        let name = match request.address {
            Some(a) => {
                let name = segment_name(without_scheme(a)).map_err(OpenError)?;
                // A fixed name left behind by a dead host, or by the previous incarnation of
                // this plugin (made by this process): remove it. A live host's: refuse.
                match stale::live_owner(name) {
                    None => {
                        let _ = Segment::unlink(name);
                    }
                    Some(0) => {
                        return Err(OpenError(format!(
                            "segment {name} is being created by another process right now; is another host configured with the same address?"
                        )));
                    }
                    Some(pid) => {
                        return Err(OpenError(format!(
                            "segment {name} belongs to live process {pid} (another plugbus host?); stop it or give this plugin another address"
                        )));
                    }
                }
                name.to_owned()
            }
            None => segment::unique_name(request.plugin_id),
        };
        let link = ShmHostLink::create(&name, request.plugin_id, request.queues)
            .map_err(|e| OpenError(format!("cannot create its segment: {e}")))?;
        let address = format!("{SCHEME}:{name}");
        Ok(OpenedLink {
            link: Box::new(link),
            env: vec![(ENV_ADDRESS.to_owned(), address.clone())],
            address,
            inherit: None,
        })
    }
}

/// The host's end of a shared-memory link.
pub struct ShmHostLink {
    segment: Segment,
    address: String,
    moves: frame::Producer,
    control: frame::Producer,
    replies: frame::Consumer,
    /// Where each reply is copied before the host looks at it (plugin memory is never read
    /// through a reference); grows to the largest reply, then is reused.
    scratch: Vec<u8>,
}

/// Bytes reserved for [`ShmHostLink`]'s scratch buffer up front (it grows past this once, to
/// the largest reply seen).
const SCRATCH_RESERVED: usize = 4096;

impl std::fmt::Debug for ShmHostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmHostLink").field("address", &self.address).finish()
    }
}

impl ShmHostLink {
    /// Creates the segment `name` for plugin `plugin_id` and attaches the host's ends. Any
    /// process of this user can open the name: for attach mode only.
    pub fn create(name: &str, plugin_id: &str, sizes: &QueueSizes) -> Result<Self, SegmentCreateError> {
        Self::attach(Segment::create(name, plugin_id, &specs(sizes))?)
    }

    /// Creates an anonymous segment (a sealed memfd, see [`Segment::create_memfd`]) for plugin
    /// `plugin_id` and attaches the host's ends. The descriptor is for the plugin to inherit;
    /// close it once the plugin is started (the link keeps its mapping).
    pub fn create_memfd(plugin_id: &str, sizes: &QueueSizes) -> Result<(Self, OwnedFd), SegmentCreateError> {
        let (segment, fd) = Segment::create_memfd(plugin_id, &specs(sizes))?;
        Ok((Self::attach(segment)?, fd))
    }

    fn attach(segment: Segment) -> Result<Self, SegmentCreateError> {
        let ring = |i| segment.ring_region(i).expect("segment has three rings");
        let bad = |index: usize| {
            move |e: RingLayoutError| SegmentCreateError::BadRing {
                index,
                reason: e.to_string(),
            }
        };
        Ok(Self {
            moves: frame::Producer::attach(ring(RING_MOVES)).map_err(bad(RING_MOVES))?,
            control: frame::Producer::attach(ring(RING_CONTROL)).map_err(bad(RING_CONTROL))?,
            replies: frame::Consumer::attach(ring(RING_REPLIES)).map_err(bad(RING_REPLIES))?,
            address: format!("{SCHEME}:{}", segment.name()),
            segment,
            scratch: Vec::with_capacity(SCRATCH_RESERVED),
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    fn reserve_error(&self, e: ReserveError) -> Result<bool, LinkError> {
        match e {
            ReserveError::Full { .. } => Ok(false),
            ReserveError::TooLarge { len, max } => Err(LinkError::TooLarge { len, max }),
            ReserveError::ReservedKind(k) => Err(LinkError::Protocol(format!("reserved frame kind {k}"))),
            ReserveError::Broken(e) => Err(ring_error(e, &self.segment, TRUNCATED_BY_PLUGIN)),
        }
    }
}

impl HostLink for ShmHostLink {
    fn try_send_moves(&mut self, tick: u64, flags: u32, records: &[MoveRecord]) -> Result<bool, LinkError> {
        send_moves(&mut self.moves, &mut self.control, tick, flags, records)
            .map_err(|e| e.into_link_error(&self.segment, TRUNCATED_BY_PLUGIN))
    }

    fn try_send(&mut self, item: Downstream<'_>) -> Result<bool, LinkError> {
        let r = match item {
            Downstream::Event(env) => codec::encode_event_in_ring(&mut self.control, env)
                .map(drop)
                .map_err(|codec::EncodeError::Ring(e)| e),
            Downstream::EncodedEvent(body) => codec::write_field_frame(
                &mut self.control,
                KIND_HOST_TO_PLUGIN,
                codec::HOST_TO_PLUGIN_EVENT,
                body,
            ),
            Downstream::Batch { body, .. } => codec::write_field_frame(
                &mut self.control,
                KIND_HOST_TO_PLUGIN,
                codec::HOST_TO_PLUGIN_EVENTS,
                body,
            ),
            Downstream::Message(msg) => codec::encode_in_ring(&mut self.control, KIND_HOST_TO_PLUGIN, msg)
                .map(drop)
                .map_err(|codec::EncodeError::Ring(e)| e),
            Downstream::Encoded(payload) => self.control.try_push(KIND_HOST_TO_PLUGIN, payload),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) => self.reserve_error(e),
        }
    }

    #[inline]
    fn wake(&mut self) -> bool {
        self.segment.header().to_attacher.ring()
    }

    fn wake_handle(&self) -> Option<std::sync::Arc<dyn super::WakeHandle>> {
        Some(std::sync::Arc::new(self.segment.attacher_bell()))
    }

    /// Each reply is copied out of the ring (raw-pointer copy, [`frame::Frame::copy_to`]) into
    /// the link's scratch buffer, released, and only then handed to `f`: the plugin may write
    /// its ring at any time, and nothing the host decodes is memory the plugin can change.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let frame = match self.replies.try_read() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(ring_error(e, &self.segment, TRUNCATED_BY_PLUGIN)),
            };
            if frame.kind() != KIND_PLUGIN_TO_HOST {
                return Err(LinkError::Protocol(format!(
                    "frame of kind {} on the replies ring",
                    frame.kind()
                )));
            }
            frame.copy_to(&mut self.scratch);
            drop(frame);
            f(&self.scratch);
            n += 1;
        }
        Ok(n)
    }

    fn prepare_wait(&mut self) -> Result<bool, LinkError> {
        // The doorbell protocol (ring/doorbell.rs), host side: announce, re-check, sleep. The
        // plugin rings `to_creator` after its sends (`wake_host`).
        let bell = &self.segment.header().to_creator;
        bell.prepare_sleep();
        match self.replies.is_empty() {
            Ok(true) => Ok(true),
            Ok(false) => {
                bell.cancel_sleep();
                Ok(false)
            }
            Err(e) => {
                bell.cancel_sleep();
                Err(ring_error(e, &self.segment, TRUNCATED_BY_PLUGIN))
            }
        }
    }

    fn wait_word(&self) -> (&FutexWord, u32) {
        self.segment.header().to_creator.sleep_word()
    }

    fn finish_wait(&mut self) {
        self.segment.header().to_creator.cancel_sleep();
    }

    fn heartbeat(&mut self) {
        self.segment.beat();
    }

    fn peer(&self) -> PeerHealth {
        PeerHealth {
            heartbeat_age_ns: self.segment.peer_heartbeat_age_ns(),
            pid: self.segment.header().shared.attacher_pid.load(Ordering::Acquire),
        }
    }

    fn occupancy(&mut self) -> Result<Occupancy, LinkError> {
        let moves = self
            .moves
            .used()
            .map_err(|e| ring_error(e, &self.segment, TRUNCATED_BY_PLUGIN))?;
        let control = self
            .control
            .used()
            .map_err(|e| ring_error(e, &self.segment, TRUNCATED_BY_PLUGIN))?;
        Ok(Occupancy {
            moves: moves as f64 / self.moves.capacity() as f64,
            control: control as f64 / self.control.capacity() as f64,
        })
    }

    fn failure(&self) -> Option<&'static str> {
        self.segment.is_broken().then_some(TRUNCATED_BY_PLUGIN)
    }

    fn close(&mut self) {
        self.segment
            .header()
            .shared
            .state
            .store(STATE_SHUTDOWN, Ordering::Release);
        self.segment.header().to_attacher.ring();
    }

    fn publish_counters(&mut self, c: &LinkCounters) {
        let slots = &self.segment.header().creator_counters;
        for (i, v) in [
            (counters::EVENTS, c.events),
            (counters::MOVES, c.moves),
            (counters::CONFLATED, c.conflated),
            (counters::OVERFLOWED, c.overflowed),
            (counters::FRAMES, c.frames),
        ] {
            slots[i].store(v, Ordering::Relaxed);
        }
    }

    fn address(&self) -> &str {
        &self.address
    }
}

impl super::WakeHandle for segment::AttacherBell {
    #[inline]
    fn wake(&self) -> bool {
        self.ring()
    }
}

// ------------------------------------------------------------------------------------------
// Plugin side
// ------------------------------------------------------------------------------------------

/// Opens shared-memory links for plugins.
#[derive(Debug, Default)]
pub struct ShmConnector;

impl Connector for ShmConnector {
    fn schemes(&self) -> &'static [&'static str] {
        &[SCHEME]
    }

    fn claims_bare(&self, address: &str) -> bool {
        address.starts_with(segment::PREFIX)
    }

    fn address_from_env(&self) -> Option<String> {
        std::env::var(ENV_SEGMENT)
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| format!("{SCHEME}:{s}"))
    }

    fn check(&self, address: &str) -> Result<(), String> {
        let address = without_scheme(address);
        match inherited_fd(address) {
            Some(fd) => fd.map(drop),
            None => segment_name(address).map(drop),
        }
    }

    fn connect(&self, address: &str) -> Result<Box<dyn PluginLink>, ConnectError> {
        let address = without_scheme(address);
        let bad = |reason| ConnectError::BadAddress {
            address: address.to_owned(),
            reason,
        };
        let opened = match inherited_fd(address) {
            Some(fd) => ShmPluginLink::open_inherited(fd.map_err(bad)?),
            None => ShmPluginLink::open(segment_name(address).map_err(bad)?),
        };
        match opened {
            Ok(link) => Ok(Box::new(link)),
            Err(e) => {
                let address = format!("{SCHEME}:{address}");
                let reason = e.to_string();
                Err(match e {
                    SegmentOpenError::NotFound(_) => ConnectError::NotFound { address, reason },
                    SegmentOpenError::InvalidName(_) => ConnectError::BadAddress { address, reason },
                    SegmentOpenError::AlreadyAttached { .. } => ConnectError::Taken { address, reason },
                    SegmentOpenError::Os { .. } => ConnectError::Io { address, reason },
                    _ => ConnectError::Refused { address, reason },
                })
            }
        }
    }
}

/// The plugin's end of a shared-memory link.
pub struct ShmPluginLink {
    segment: Segment,
    moves: frame::Consumer,
    control: frame::Consumer,
    replies: frame::Producer,
}

impl std::fmt::Debug for ShmPluginLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPluginLink")
            .field("segment", &self.segment.name())
            .finish()
    }
}

impl ShmPluginLink {
    /// Opens segment `name` (validated) and attaches the plugin's ends.
    pub fn open(name: &str) -> Result<Self, SegmentOpenError> {
        Self::attach(Segment::open(name)?)
    }

    /// Opens the segment inherited as descriptor `fd` (a sealed memfd; validated), attaches the
    /// plugin's ends and closes the descriptor (see [`Segment::open_inherited`]).
    pub fn open_inherited(fd: RawFd) -> Result<Self, SegmentOpenError> {
        Self::attach(Segment::open_inherited(fd)?)
    }

    fn attach(segment: Segment) -> Result<Self, SegmentOpenError> {
        let name = segment.name().to_owned();
        if segment.rings().len() != 3 {
            return Err(SegmentOpenError::Corrupt {
                name,
                reason: format!("a plugin segment has three rings, this one {}", segment.rings().len()),
            });
        }
        let bad = |e: RingLayoutError| SegmentOpenError::Corrupt {
            name: name.clone(),
            reason: e.to_string(),
        };
        Ok(Self {
            moves: frame::Consumer::attach(segment.frame_region(RING_MOVES)?).map_err(bad)?,
            control: frame::Consumer::attach(segment.frame_region(RING_CONTROL)?).map_err(bad)?,
            replies: frame::Producer::attach(segment.frame_region(RING_REPLIES)?).map_err(bad)?,
            segment,
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    fn fail(&self, e: RingError) -> LinkError {
        ring_error(e, &self.segment, TRUNCATED_UNDER_PLUGIN)
    }
}

impl Drop for ShmPluginLink {
    fn drop(&mut self) {
        let _ = self.segment.header().shared.state.compare_exchange(
            segment::header::STATE_ATTACHED,
            STATE_DETACHED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

impl PluginLink for ShmPluginLink {
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError> {
        poll_stream(&mut self.moves, &mut self.control, max, f)
            .map_err(|e| e.into_link_error(&self.segment, TRUNCATED_UNDER_PLUGIN))
    }

    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError> {
        match codec::encode_in_ring(&mut self.replies, KIND_PLUGIN_TO_HOST, msg) {
            Ok(_) => Ok(true),
            Err(codec::EncodeError::Ring(e)) => self.reserve_error(e),
        }
    }

    fn try_send_encoded(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        match self.replies.try_push(KIND_PLUGIN_TO_HOST, payload) {
            Ok(()) => Ok(true),
            Err(e) => self.reserve_error(e),
        }
    }

    fn max_message(&self) -> usize {
        self.replies.max_payload()
    }

    fn has_incoming(&mut self) -> Result<bool, LinkError> {
        self.control.is_empty().map(|e| !e).map_err(|e| self.fail(e))
    }

    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let bell = &self.segment.header().to_attacher;
        bell.prepare_sleep();
        let shutdown = self.segment.header().shared.state.load(Ordering::Acquire) == STATE_SHUTDOWN;
        let empty = match self.control.is_empty() {
            Ok(e) => e,
            Err(e) => {
                bell.cancel_sleep();
                return Err(self.fail(e));
            }
        };
        if shutdown || !empty {
            bell.cancel_sleep();
            return Ok(());
        }
        bell.sleep(Some(timeout));
        Ok(())
    }

    fn wake_host(&mut self) {
        self.segment.header().to_creator.ring();
    }

    fn heartbeat(&mut self) {
        self.segment.beat();
    }

    fn failure(&self) -> Option<&'static str> {
        self.segment.is_broken().then_some(TRUNCATED_UNDER_PLUGIN)
    }

    fn host_state(&self) -> HostState {
        if !self.segment.peer_alive() {
            HostState::Dead
        } else if self.segment.header().shared.state.load(Ordering::Acquire) == STATE_SHUTDOWN {
            HostState::ShuttingDown
        } else {
            HostState::Running
        }
    }

    fn host_pid(&self) -> u32 {
        self.segment.header().fixed.creator_pid
    }

    fn publish_counters(&mut self, events: u64, move_frames: u64, replies: u64) {
        let slots = &self.segment.header().attacher_counters;
        slots[counters::PLUGIN_EVENTS].store(events, Ordering::Relaxed);
        slots[counters::PLUGIN_MOVE_FRAMES].store(move_frames, Ordering::Relaxed);
        slots[counters::PLUGIN_REPLIES].store(replies, Ordering::Relaxed);
    }
}

impl ShmPluginLink {
    fn reserve_error(&self, e: ReserveError) -> Result<bool, LinkError> {
        match e {
            ReserveError::Full { .. } => Ok(false),
            ReserveError::TooLarge { len, max } => Err(LinkError::TooLarge { len, max }),
            ReserveError::ReservedKind(k) => Err(LinkError::Protocol(format!("reserved frame kind {k}"))),
            ReserveError::Broken(e) => Err(self.fail(e)),
        }
    }
}
