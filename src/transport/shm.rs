//! The shared-memory adapter: one segment per plugin.
//!
//! Ring 0 carries moves (host -> plugin, move frames), ring 1 control (host -> plugin,
//! `HostToPlugin` frames), ring 2 replies (plugin -> host, `PluginToHost` frames). The plugin
//! sleeps on the header's `to_attacher` doorbell, the host on `to_creator`.

use std::time::Duration;

use crate::codec::{self, BatchBuilder, KIND_HOST_TO_PLUGIN, KIND_PLUGIN_TO_HOST};
use crate::fastpath::{self, KIND_MOVES, MoveRecord};
use crate::proto::{EventEnvelope, HostToPlugin, PluginToHost};
use crate::ring::frame;
use crate::segment::header::{STATE_DETACHED, STATE_SHUTDOWN};
use crate::segment::{self, RingSpec, Segment, SegmentCreateError, SegmentOpenError, stale};
use crate::sync::Ordering;

use super::{HostLink, HostState, Incoming, LinkCounters, LinkError, Occupancy, PeerHealth, PluginLink};

/// Ring index of the moves ring.
pub const RING_MOVES: usize = 0;
/// Ring index of the control ring.
pub const RING_CONTROL: usize = 1;
/// Ring index of the replies ring.
pub const RING_REPLIES: usize = 2;

/// Creator counter slots (see [`crate::segment::header::Header::creator_counters`]).
pub mod counters {
    /// Events delivered.
    pub const EVENTS: usize = 0;
    /// Move records delivered.
    pub const MOVES: usize = 1;
    /// Move records conflated.
    pub const CONFLATED: usize = 2;
    /// Frames through the overflow queue.
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

/// Ring sizes of a plugin segment, in data bytes (each a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingSizes {
    /// Moves ring (default 4 MiB: eight ticks of 10,000 players).
    pub moves: u64,
    /// Control ring (default 1 MiB).
    pub control: u64,
    /// Replies ring (default 256 KiB).
    pub replies: u64,
}

impl Default for RingSizes {
    fn default() -> Self {
        Self {
            moves: 4 << 20,
            control: 1 << 20,
            replies: 256 << 10,
        }
    }
}

impl RingSizes {
    fn specs(&self) -> [RingSpec; 3] {
        [
            RingSpec::frames(self.moves),
            RingSpec::frames(self.control),
            RingSpec::frames(self.replies),
        ]
    }
}

/// The host's end of a shared-memory link.
pub struct ShmHostLink {
    segment: Segment,
    moves: frame::Producer,
    control: frame::Producer,
    replies: frame::Consumer,
}

impl std::fmt::Debug for ShmHostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmHostLink")
            .field("segment", &self.segment.name())
            .finish()
    }
}

impl ShmHostLink {
    /// Creates the segment `name` for plugin `plugin_id` and attaches the host's ends.
    pub fn create(name: &str, plugin_id: &str, sizes: &RingSizes) -> Result<Self, SegmentCreateError> {
        let segment = Segment::create(name, plugin_id, &sizes.specs())?;
        let ring = |i| segment.ring_region(i).expect("segment has three rings");
        let bad = |e: crate::ring::RingLayoutError| SegmentCreateError::BadRing {
            index: 0,
            reason: e.to_string(),
        };
        Ok(Self {
            moves: frame::Producer::attach(ring(RING_MOVES)).map_err(bad)?,
            control: frame::Producer::attach(ring(RING_CONTROL)).map_err(bad)?,
            replies: frame::Consumer::attach(ring(RING_REPLIES)).map_err(bad)?,
            segment,
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }
}

impl HostLink for ShmHostLink {
    fn try_send_moves(&mut self, tick: u64, flags: u32, moves: &[MoveRecord]) -> Result<bool, LinkError> {
        match fastpath::write_frame(&mut self.moves, tick, flags, moves) {
            Ok(_) => Ok(true),
            Err(e) => LinkError::from_reserve(e),
        }
    }

    fn try_send_event(&mut self, env: &EventEnvelope) -> Result<bool, LinkError> {
        match codec::encode_event_in_ring(&mut self.control, env) {
            Ok(_) => Ok(true),
            Err(codec::EncodeError::Ring(e)) => LinkError::from_reserve(e),
        }
    }

    fn try_send_event_encoded(&mut self, body: &[u8]) -> Result<bool, LinkError> {
        match codec::write_field_frame(
            &mut self.control,
            KIND_HOST_TO_PLUGIN,
            codec::HOST_TO_PLUGIN_EVENT,
            body,
        ) {
            Ok(()) => Ok(true),
            Err(e) => LinkError::from_reserve(e),
        }
    }

    fn try_send_batch(&mut self, batch: &BatchBuilder) -> Result<bool, LinkError> {
        let mut grant = match self.control.try_reserve(batch.frame_len()) {
            Ok(g) => g,
            Err(e) => return LinkError::from_reserve(e),
        };
        batch.write_payload(grant.bytes_mut());
        grant.commit(KIND_HOST_TO_PLUGIN);
        Ok(true)
    }

    fn try_send_raw(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        match self.control.try_push(KIND_HOST_TO_PLUGIN, payload) {
            Ok(()) => Ok(true),
            Err(e) => LinkError::from_reserve(e),
        }
    }

    fn try_send_message(&mut self, msg: &HostToPlugin) -> Result<bool, LinkError> {
        match codec::encode_in_ring(&mut self.control, KIND_HOST_TO_PLUGIN, msg) {
            Ok(_) => Ok(true),
            Err(codec::EncodeError::Ring(e)) => LinkError::from_reserve(e),
        }
    }

    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let Some(frame) = self.replies.try_read()? else {
                break;
            };
            if frame.kind() != KIND_PLUGIN_TO_HOST {
                return Err(LinkError::BadKind(frame.kind()));
            }
            f(frame.payload());
            n += 1;
        }
        Ok(n)
    }

    #[inline]
    fn wake(&mut self) -> bool {
        self.segment.header().to_attacher.ring()
    }

    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        // The doorbell protocol (ring/doorbell.rs), host side: announce, re-check, sleep. The
        // plugin rings `to_creator` after every send (`wake_host`).
        let bell = &self.segment.header().to_creator;
        bell.prepare_sleep();
        if !self.replies.is_empty()? {
            bell.cancel_sleep();
            return Ok(());
        }
        bell.sleep(Some(timeout));
        Ok(())
    }

    fn heartbeat(&mut self) {
        self.segment.beat();
    }

    fn peer(&self) -> PeerHealth {
        let pid = self.segment.header().shared.attacher_pid.load(Ordering::Acquire);
        PeerHealth {
            heartbeat_age_ns: self.segment.peer_heartbeat_age_ns(),
            pid,
        }
    }

    fn peer_alive(&self) -> bool {
        let pid = self.segment.header().shared.attacher_pid.load(Ordering::Acquire);
        pid != 0 && stale::pid_alive(pid, 0)
    }

    fn occupancy(&mut self) -> Result<Occupancy, LinkError> {
        Ok(Occupancy {
            moves: self.moves.used()? as f64 / self.moves.capacity() as f64,
            control: self.control.used()? as f64 / self.control.capacity() as f64,
        })
    }

    fn broken(&self) -> Option<&'static str> {
        self.segment
            .is_broken()
            .then_some("the plugin truncated its shared-memory segment")
    }

    fn signal_shutdown(&mut self) {
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

    fn describe(&self) -> String {
        self.segment.name().to_owned()
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
        let segment = Segment::open(name)?;
        if segment.rings().len() != 3 {
            return Err(SegmentOpenError::Corrupt {
                name: name.to_owned(),
                reason: format!("a plugin segment has three rings, this one {}", segment.rings().len()),
            });
        }
        let bad = |e: crate::ring::RingLayoutError| SegmentOpenError::Corrupt {
            name: name.to_owned(),
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
        let mut n = 0;
        // Control first: joins and quits come before the moves that follow them in the tick.
        while n < max {
            let Some(frame) = self.control.try_read()? else {
                break;
            };
            if frame.kind() != KIND_HOST_TO_PLUGIN {
                return Err(LinkError::BadKind(frame.kind()));
            }
            f(Incoming::Host(frame.payload()));
            n += 1;
        }
        while n < max {
            let Some(frame) = self.moves.try_read()? else {
                break;
            };
            if frame.kind() != KIND_MOVES {
                return Err(LinkError::BadKind(frame.kind()));
            }
            let (header, records) = fastpath::parse(frame.payload())?;
            f(Incoming::Moves { header, records });
            n += 1;
        }
        Ok(n)
    }

    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError> {
        match codec::encode_in_ring(&mut self.replies, KIND_PLUGIN_TO_HOST, msg) {
            Ok(_) => Ok(true),
            Err(codec::EncodeError::Ring(e)) => LinkError::from_reserve(e),
        }
    }

    fn try_send_raw(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        match self.replies.try_push(KIND_PLUGIN_TO_HOST, payload) {
            Ok(()) => Ok(true),
            Err(e) => LinkError::from_reserve(e),
        }
    }

    fn has_incoming(&mut self) -> Result<bool, LinkError> {
        Ok(!self.control.is_empty()? || !self.moves.is_empty()?)
    }

    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let bell = &self.segment.header().to_attacher;
        bell.prepare_sleep();
        let shutdown = self.segment.header().shared.state.load(Ordering::Acquire) == STATE_SHUTDOWN;
        if shutdown || !self.control.is_empty()? || !self.moves.is_empty()? {
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

    fn broken(&self) -> Option<&'static str> {
        self.segment
            .is_broken()
            .then_some("the host's shared-memory segment was truncated")
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
