//! One plugin as the host sees it: its link, subscriptions, per-tick batch, overflow queue and
//! move conflation. Nothing here blocks.

use std::collections::{HashMap, VecDeque};
use std::process::Child;
use std::time::Instant;

use prost::encoding::{WireType, encode_key, encode_varint};

use super::config::PluginConfig;
use super::stats::PluginStats;
use crate::codec::{self, BatchBuilder, BatchLimits, BufferPool};
use crate::fastpath::{FLAG_CONFLATED, MoveRecord};
use crate::proto::{self, EventType, PluginHello};
use crate::transport::{HostLink, LinkCounters, LinkError};

/// Where a plugin is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Segment made (and process launched); waiting for its hello.
    Connecting,
    /// Handshake done; receives what it subscribed to.
    Ready,
    /// Gone; may be restarted.
    Disconnected(String),
    /// Gone for good (refused handshake, restart budget spent).
    Disabled(String),
}

/// Subscriptions as a bit set over event type numbers 0..128.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventSet([u64; 2]);

impl EventSet {
    /// Every event type.
    pub const ALL: EventSet = EventSet([u64::MAX, u64::MAX]);

    /// The set of `types` (`EVENT_TYPE_ALL` means every type).
    pub fn from_types(types: impl IntoIterator<Item = i32>) -> Self {
        let mut s = Self::default();
        for t in types {
            if t == EventType::All as i32 {
                return Self::ALL;
            }
            if (0..128).contains(&t) {
                s.0[(t / 64) as usize] |= 1 << (t % 64);
            }
        }
        s
    }

    /// Whether `t` is in the set.
    #[inline]
    pub fn contains(&self, t: i32) -> bool {
        (0..128).contains(&t) && self.0[(t / 64) as usize] & (1 << (t % 64)) != 0
    }
}

/// Why a send did not go through right now.
pub(crate) enum SendOutcome {
    /// Written to the link.
    Sent,
    /// Queued in host memory (overflow); goes out at a later flush.
    Queued,
    /// The overflow queue is full: the plugin must be disconnected.
    Overflow,
}

pub(crate) struct Slot {
    pub cfg: PluginConfig,
    pub state: SlotState,
    pub link: Option<Box<dyn HostLink>>,
    pub segment: String,
    pub child: Option<Child>,
    pub generation: u64,
    pub connecting_since: Instant,
    pub subscribed: EventSet,
    pub hello: Option<PluginHello>,
    batch: BatchBuilder,
    /// Complete `HostToPlugin` payloads waiting for room, with the events each carries.
    overflow: VecDeque<(Vec<u8>, u32)>,
    overflow_events: u64,
    /// Each player's latest unsent record while the moves ring is full.
    conflated: HashMap<[u8; 16], MoveRecord>,
    conflated_buf: Vec<MoveRecord>,
    /// Something was written since the last doorbell.
    pub dirty: bool,
    pub restarts: VecDeque<Instant>,
    pub stats: PluginStats,
    pub slow: bool,
    pub last_pid_check: Instant,
    /// Tick and CLOCK_MONOTONIC time of the last move frame published.
    pub last_moves: (u64, u64),
}

impl Slot {
    pub fn new(cfg: PluginConfig) -> Self {
        Self {
            cfg,
            state: SlotState::Connecting,
            link: None,
            segment: String::new(),
            child: None,
            generation: 0,
            connecting_since: Instant::now(),
            subscribed: EventSet::default(),
            hello: None,
            batch: BatchBuilder::with_capacity(8192),
            overflow: VecDeque::new(),
            overflow_events: 0,
            conflated: HashMap::new(),
            conflated_buf: Vec::new(),
            dirty: false,
            restarts: VecDeque::new(),
            stats: PluginStats::default(),
            slow: false,
            last_pid_check: Instant::now(),
            last_moves: (0, 0),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state == SlotState::Ready
    }

    /// Events not yet delivered: gathered, queued in overflow.
    pub fn undelivered(&self) -> u64 {
        self.batch.len() as u64 + self.overflow_events
    }

    /// Forgets everything queued (on disconnect), returning the buffers to the pool.
    pub fn reset_queues(&mut self, pool: &mut BufferPool) {
        self.batch.clear();
        for (buf, _) in self.overflow.drain(..) {
            pool.give(buf);
        }
        self.overflow_events = 0;
        self.conflated.clear();
        self.dirty = false;
    }

    /// Sends queued overflow frames while they fit. `Ok(true)` when the queue is empty.
    fn drain_overflow(&mut self, pool: &mut BufferPool) -> Result<bool, LinkError> {
        let Some(link) = self.link.as_mut() else {
            return Err(LinkError::Closed);
        };
        while let Some((buf, events)) = self.overflow.front() {
            if !link.try_send_raw(buf)? {
                return Ok(false);
            }
            self.stats.events_sent += u64::from(*events);
            self.stats.frames_sent += 1;
            self.overflow_events -= u64::from(*events);
            let (buf, _) = self.overflow.pop_front().expect("front exists");
            pool.give(buf);
            self.dirty = true;
        }
        Ok(true)
    }

    fn push_overflow(&mut self, buf: Vec<u8>, events: u32, limit: usize) -> SendOutcome {
        self.overflow.push_back((buf, events));
        self.overflow_events += u64::from(events);
        self.stats.overflowed_frames += 1;
        if self.overflow.len() > limit {
            SendOutcome::Overflow
        } else {
            SendOutcome::Queued
        }
    }

    /// Writes the gathered batch (after any overflow, to keep order). Never blocks.
    pub fn flush_batch(&mut self, pool: &mut BufferPool, limit: usize) -> Result<SendOutcome, LinkError> {
        if self.batch.is_empty() {
            return Ok(if self.drain_overflow(pool)? {
                SendOutcome::Sent
            } else {
                SendOutcome::Queued
            });
        }
        let events = self.batch.len() as u32;
        if self.drain_overflow(pool)? {
            let link = self.link.as_mut().ok_or(LinkError::Closed)?;
            if link.try_send_batch(&self.batch)? {
                self.stats.events_sent += u64::from(events);
                self.stats.frames_sent += 1;
                self.stats.batches += 1;
                self.stats.batch_events.record(u64::from(events));
                self.batch.clear();
                self.dirty = true;
                return Ok(SendOutcome::Sent);
            }
        }
        let mut buf = pool.take();
        self.batch.drain_into(&mut buf);
        Ok(self.push_overflow(buf, events, limit))
    }

    /// Appends one encoded event (`body`) to the batch, flushing first if `limits` say so.
    pub fn batch_event(
        &mut self,
        body: &[u8],
        limits: &BatchLimits,
        pool: &mut BufferPool,
        overflow_limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        self.batch.push_encoded(body);
        if self.batch.is_full(limits) {
            return self.flush_batch(pool, overflow_limit);
        }
        Ok(SendOutcome::Sent)
    }

    /// Sends one event at once, after everything gathered before it.
    pub fn send_event_now(
        &mut self,
        env: &proto::EventEnvelope,
        body: Option<&[u8]>,
        pool: &mut BufferPool,
        overflow_limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        match self.flush_batch(pool, overflow_limit)? {
            SendOutcome::Sent => {}
            SendOutcome::Queued | SendOutcome::Overflow => {
                return Ok(self.queue_event(env, body, pool, overflow_limit));
            }
        }
        let link = self.link.as_mut().ok_or(LinkError::Closed)?;
        let sent = match body {
            Some(b) => link.try_send_event_encoded(b)?,
            None => link.try_send_event(env)?,
        };
        if sent {
            self.stats.events_sent += 1;
            self.stats.frames_sent += 1;
            self.dirty = true;
            Ok(SendOutcome::Sent)
        } else {
            Ok(self.queue_event(env, body, pool, overflow_limit))
        }
    }

    fn queue_event(
        &mut self,
        env: &proto::EventEnvelope,
        body: Option<&[u8]>,
        pool: &mut BufferPool,
        overflow_limit: usize,
    ) -> SendOutcome {
        let mut buf = pool.take();
        match body {
            Some(b) => {
                encode_key(codec::HOST_TO_PLUGIN_EVENT, WireType::LengthDelimited, &mut buf);
                encode_varint(b.len() as u64, &mut buf);
                buf.extend_from_slice(b);
            }
            None => prost::encoding::message::encode(codec::HOST_TO_PLUGIN_EVENT, env, &mut buf),
        }
        self.push_overflow(buf, 1, overflow_limit)
    }

    /// Sends a control message (hello, shutdown, action result) in order with the events.
    pub fn send_message(
        &mut self,
        msg: &proto::HostToPlugin,
        pool: &mut BufferPool,
        overflow_limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        match self.flush_batch(pool, overflow_limit)? {
            SendOutcome::Sent => {
                let link = self.link.as_mut().ok_or(LinkError::Closed)?;
                if link.try_send_message(msg)? {
                    self.stats.frames_sent += 1;
                    self.dirty = true;
                    return Ok(SendOutcome::Sent);
                }
            }
            SendOutcome::Queued | SendOutcome::Overflow => {}
        }
        let mut buf = pool.take();
        prost::Message::encode_raw(msg, &mut buf);
        Ok(self.push_overflow(buf, 0, overflow_limit))
    }

    /// Delivers this tick's moves, or conflates them (each player's latest record kept) while
    /// the moves ring is full. Returns the number of records conflated away this time.
    pub fn send_moves(&mut self, tick: u64, moves: &[MoveRecord]) -> Result<u64, LinkError> {
        let link = self.link.as_mut().ok_or(LinkError::Closed)?;
        if self.conflated.is_empty() {
            if moves.is_empty() {
                return Ok(0);
            }
            if link.try_send_moves(tick, 0, moves)? {
                self.last_moves = (tick, crate::segment::monotonic_ns());
                self.stats.moves_sent += moves.len() as u64;
                self.stats.frames_sent += 1;
                self.dirty = true;
                return Ok(0);
            }
        }
        // Merge this tick into the pending set: a player's older unsent record is superseded.
        let mut dropped = 0;
        if self.conflated.capacity() < moves.len() {
            self.conflated.reserve(moves.len());
        }
        for m in moves {
            if self.conflated.insert(m.uuid, *m).is_some() {
                dropped += 1;
            }
        }
        self.conflated_buf.clear();
        self.conflated_buf.extend(self.conflated.values().copied());
        if link.try_send_moves(tick, FLAG_CONFLATED, &self.conflated_buf)? {
            self.last_moves = (tick, crate::segment::monotonic_ns());
            self.stats.moves_sent += self.conflated_buf.len() as u64;
            self.stats.frames_sent += 1;
            self.conflated.clear();
            self.dirty = true;
        }
        self.stats.moves_conflated += dropped;
        Ok(dropped)
    }

    /// Rings the doorbell if anything was written since the last ring.
    pub fn ring_if_dirty(&mut self) {
        if self.dirty {
            if let Some(link) = self.link.as_mut() {
                if link.wake() {
                    self.stats.wakeups += 1;
                }
            }
            self.dirty = false;
        }
    }

    /// Publishes counters into the link (for `plugbus inspect`).
    pub fn publish_counters(&mut self) {
        let c = LinkCounters {
            events: self.stats.events_sent,
            moves: self.stats.moves_sent,
            conflated: self.stats.moves_conflated,
            overflowed: self.stats.overflowed_frames,
            frames: self.stats.frames_sent,
        };
        if let Some(link) = self.link.as_mut() {
            link.publish_counters(&c);
        }
    }
}
