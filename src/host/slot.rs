//! One plugin as the host sees it: its link, subscriptions, per-tick batch, and the ordered
//! queue in front of its link. Nothing here blocks.
//!
//! **One ordered stream.** Everything for a plugin goes out in one order: the events of a tick
//! as the host published them (immediate ones at once, the others in batches), then the tick's
//! moves, then the next tick. When the link has no room, messages wait in `queue`, in order,
//! and everything after them waits behind them; moves never wait there: while anything is
//! queued, or the link has no room for them, they are merged into `conflated` (each player's
//! latest record) and go out as one frame flagged [`FLAG_CONFLATED`], labelled with the tick in
//! which it is sent, at the end of that tick. A quit removes its player from `conflated`, so a
//! plugin never sees a player move after it left.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use prost::encoding::{WireType, encode_key, encode_varint};

use super::config::PluginConfig;
use super::stats::PluginStats;
use crate::codec::{self, BatchBuilder, BatchLimits, BufferPool};
use crate::fastpath::{FLAG_CONFLATED, MoveRecord};
use crate::proto::{self, EventType, PluginHello};
use crate::transport::{Downstream, HostLink, LinkCounters, LinkError};

/// Where a plugin is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Its link is being made (and its process launched), or it waits for its hello.
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

/// What became of a send.
pub(crate) enum SendOutcome {
    /// Written to the link.
    Sent,
    /// Queued in host memory, in order; goes out at a later flush.
    Queued,
    /// The queue is over its limit: the plugin must be disconnected.
    Overflow,
}

/// What a plugin has made the host hold for the server (taken by `drain_actions`,
/// `drain_logs`, `next_action`, `next_log`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Held {
    pub actions: usize,
    pub action_bytes: usize,
    pub logs: usize,
    pub log_bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.action_bytes + self.log_bytes
    }
}

pub(crate) struct Slot {
    pub cfg: PluginConfig,
    /// The id, shared with the log thread.
    pub log_id: std::sync::Arc<str>,
    pub held: Held,
    pub state: SlotState,
    /// `None` while the supervisor makes it (and after a disconnect).
    pub link: Option<Box<dyn HostLink>>,
    pub address: String,
    /// The launched process, once the supervisor reports it.
    pub pid: Option<u32>,
    /// Which incarnation of this plugin: bumped at every (re)start, so that late reports of
    /// an earlier one are ignored.
    pub generation: u64,
    pub connecting_since: Instant,
    pub subscribed: EventSet,
    pub hello: Option<PluginHello>,
    /// An attached plugin's process is watched by the supervisor.
    pub pid_watched: bool,
    /// A link was made for it at least once.
    pub opened: bool,
    batch: BatchBuilder,
    /// Complete `HostToPlugin` messages waiting for room, in order, with the events each carries.
    queue: VecDeque<(Vec<u8>, u32)>,
    queued_events: u64,
    /// Each player's latest undelivered record, while moves cannot go out.
    conflated: HashMap<[u8; 16], MoveRecord>,
    conflated_buf: Vec<MoveRecord>,
    /// Something was written since the last wake-up.
    pub dirty: bool,
    /// The link gave the wake thread a handle: its wake-ups may be handed over.
    pub wake_handed: bool,
    pub restarts: VecDeque<Instant>,
    pub stats: PluginStats,
    pub slow: bool,
    /// Tick and CLOCK_MONOTONIC time of the last move frame published.
    pub last_moves: (u64, u64),
}

impl Slot {
    pub fn new(cfg: PluginConfig) -> Self {
        Self {
            log_id: cfg.id.as_str().into(),
            held: Held::default(),
            cfg,
            state: SlotState::Connecting,
            link: None,
            address: String::new(),
            pid: None,
            generation: 0,
            connecting_since: Instant::now(),
            subscribed: EventSet::default(),
            hello: None,
            pid_watched: false,
            opened: false,
            batch: BatchBuilder::with_capacity(8192),
            queue: VecDeque::new(),
            queued_events: 0,
            conflated: HashMap::new(),
            conflated_buf: Vec::new(),
            dirty: false,
            wake_handed: false,
            restarts: VecDeque::new(),
            stats: PluginStats::default(),
            slow: false,
            last_moves: (0, 0),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state == SlotState::Ready
    }

    /// Events not yet delivered: gathered in the batch, or queued.
    pub fn undelivered(&self) -> u64 {
        self.batch.len() as u64 + self.queued_events
    }

    /// Forgets everything queued (on disconnect), returning the buffers to the pool.
    pub fn reset_queues(&mut self, pool: &mut BufferPool) {
        self.batch.clear();
        for (buf, _) in self.queue.drain(..) {
            pool.give(buf);
        }
        self.queued_events = 0;
        self.conflated.clear();
        self.dirty = false;
    }

    /// Sends queued messages while they fit. `Ok(true)` when the queue is empty.
    fn drain_queue(&mut self, pool: &mut BufferPool) -> Result<bool, LinkError> {
        let Some(link) = self.link.as_mut() else {
            return Err(LinkError::Closed);
        };
        while let Some((buf, events)) = self.queue.front() {
            if !link.try_send(Downstream::Encoded(buf))? {
                return Ok(false);
            }
            self.stats.events_sent += u64::from(*events);
            self.stats.frames_sent += 1;
            self.queued_events -= u64::from(*events);
            let (buf, _) = self.queue.pop_front().expect("front exists");
            pool.give(buf);
            self.dirty = true;
        }
        Ok(true)
    }

    fn enqueue(&mut self, buf: Vec<u8>, events: u32, limit: usize) -> SendOutcome {
        self.queue.push_back((buf, events));
        self.queued_events += u64::from(events);
        self.stats.overflowed_frames += 1;
        if self.queue.len() > limit {
            SendOutcome::Overflow
        } else {
            SendOutcome::Queued
        }
    }

    /// Writes the gathered batch after what is queued; queues it if it does not fit.
    pub fn flush_batch(&mut self, pool: &mut BufferPool, limit: usize) -> Result<SendOutcome, LinkError> {
        let drained = self.drain_queue(pool)?;
        if self.batch.is_empty() {
            return Ok(if drained {
                SendOutcome::Sent
            } else {
                SendOutcome::Queued
            });
        }
        let events = self.batch.len() as u32;
        if drained {
            let link = self.link.as_mut().ok_or(LinkError::Closed)?;
            if link.try_send(Downstream::Batch {
                events,
                body: self.batch.body(),
            })? {
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
        Ok(self.enqueue(buf, events, limit))
    }

    /// Appends one encoded event (`body`) to the batch, flushing first if `limits` say so.
    pub fn batch_event(
        &mut self,
        body: &[u8],
        limits: &BatchLimits,
        pool: &mut BufferPool,
        limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        self.batch.push_encoded(body);
        if self.batch.is_full(limits) {
            return self.flush_batch(pool, limit);
        }
        Ok(SendOutcome::Sent)
    }

    /// Sends one event at once, after everything gathered or queued before it. `body` is its
    /// encoding when it was encoded for several plugins; `None` encodes it into the link.
    pub fn send_event_now(
        &mut self,
        env: &proto::EventEnvelope,
        body: Option<&[u8]>,
        pool: &mut BufferPool,
        limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        if let SendOutcome::Queued | SendOutcome::Overflow = self.flush_batch(pool, limit)? {
            return Ok(self.queue_event(env, body, pool, limit));
        }
        let link = self.link.as_mut().ok_or(LinkError::Closed)?;
        let sent = match body {
            Some(b) => link.try_send(Downstream::EncodedEvent(b))?,
            None => link.try_send(Downstream::Event(env))?,
        };
        if sent {
            self.stats.events_sent += 1;
            self.stats.frames_sent += 1;
            self.dirty = true;
            Ok(SendOutcome::Sent)
        } else {
            Ok(self.queue_event(env, body, pool, limit))
        }
    }

    fn queue_event(
        &mut self,
        env: &proto::EventEnvelope,
        body: Option<&[u8]>,
        pool: &mut BufferPool,
        limit: usize,
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
        self.enqueue(buf, 1, limit)
    }

    /// Sends a control message (hello, shutdown, action result) in order with the events.
    pub fn send_message(
        &mut self,
        msg: &proto::HostToPlugin,
        pool: &mut BufferPool,
        limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        if let SendOutcome::Sent = self.flush_batch(pool, limit)? {
            let link = self.link.as_mut().ok_or(LinkError::Closed)?;
            if link.try_send(Downstream::Message(msg))? {
                self.stats.frames_sent += 1;
                self.dirty = true;
                return Ok(SendOutcome::Sent);
            }
        }
        let mut buf = pool.take();
        prost::Message::encode_raw(msg, &mut buf);
        Ok(self.enqueue(buf, 0, limit))
    }

    /// Sends a complete encoded `HostToPlugin` message (from `pool`, returned to it once
    /// written) in order with the events.
    pub fn send_encoded(
        &mut self,
        buf: Vec<u8>,
        pool: &mut BufferPool,
        limit: usize,
    ) -> Result<SendOutcome, LinkError> {
        if let SendOutcome::Sent = self.flush_batch(pool, limit)? {
            let link = self.link.as_mut().ok_or(LinkError::Closed)?;
            if link.try_send(Downstream::Encoded(&buf))? {
                self.stats.frames_sent += 1;
                self.dirty = true;
                pool.give(buf);
                return Ok(SendOutcome::Sent);
            }
        }
        Ok(self.enqueue(buf, 0, limit))
    }

    /// Delivers tick `tick`'s moves after everything sent before them (call after
    /// [`Slot::flush_batch`]), or conflates them while anything is queued or the link has no
    /// room. Returns the number of records conflated away this time.
    pub fn send_moves(&mut self, tick: u64, moves: &[MoveRecord]) -> Result<u64, LinkError> {
        let link = self.link.as_mut().ok_or(LinkError::Closed)?;
        let in_order = self.queue.is_empty();
        if self.conflated.is_empty() {
            if moves.is_empty() {
                return Ok(0);
            }
            if in_order && link.try_send_moves(tick, 0, moves)? {
                self.last_moves = (tick, crate::clock::monotonic_ns());
                self.stats.moves_sent += moves.len() as u64;
                self.stats.frames_sent += 1;
                self.dirty = true;
                return Ok(0);
            }
        }
        // Merge this tick into the pending set: a player's older undelivered record is
        // superseded.
        let mut dropped = 0;
        if self.conflated.capacity() < moves.len() {
            self.conflated.reserve(moves.len());
        }
        for m in moves {
            if self.conflated.insert(m.uuid, *m).is_some() {
                dropped += 1;
            }
        }
        self.stats.moves_conflated += dropped;
        if !in_order {
            return Ok(dropped);
        }
        self.conflated_buf.clear();
        self.conflated_buf.extend(self.conflated.values().copied());
        if link.try_send_moves(tick, FLAG_CONFLATED, &self.conflated_buf)? {
            self.last_moves = (tick, crate::clock::monotonic_ns());
            self.stats.moves_sent += self.conflated_buf.len() as u64;
            self.stats.frames_sent += 1;
            self.conflated.clear();
            self.dirty = true;
        }
        Ok(dropped)
    }

    /// Forgets a player's undelivered record (it quit): counted as conflated away.
    pub fn forget_player(&mut self, uuid: &[u8; 16]) {
        if self.conflated.remove(uuid).is_some() {
            self.stats.moves_conflated += 1;
        }
    }

    /// Wakes the plugin if anything was written since the last wake-up.
    /// Whether something was sent since the last call (the plugin may need a wake-up).
    #[inline]
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Wakes the plugin if it sleeps; returns whether a wake-up was sent.
    pub fn wake_now(&mut self) -> bool {
        let woke = self.link.as_mut().is_some_and(|link| link.wake());
        self.stats.wakeups += u64::from(woke);
        woke
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
