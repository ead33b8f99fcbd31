//! The tick: moves staged and sent at its end, events routed by subscription as they come
//! (immediate ones at once, the others batched), one wake-up per plugin at its end.

use std::fmt::Write as _;
use std::time::Instant;

use super::pending::{Pending, PendingEvent, Target};
use super::slot::SendOutcome;
use super::{Host, Slot};
use crate::fastpath::{MoveRecord, uuid_from_str};
use crate::proto::{EventEnvelope, EventType, event_envelope::Payload};

const MOVE: usize = EventType::PlayerMove as usize;

/// One tick in progress. End it with [`Tick::end`]; dropping it ends it too.
pub struct Tick<'h> {
    pub(super) host: &'h mut Host,
    pub(super) ended: bool,
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

impl Host {
    /// Starts a tick. Publish moves and events on the returned [`Tick`], then end it (or drop it).
    pub fn begin_tick(&mut self) -> Tick<'_> {
        self.tick += 1;
        self.cost = super::TickCost::default();
        Tick {
            host: self,
            ended: false,
        }
    }

    /// Stages moves for the tick in progress (the C API's tick, which has no [`Tick`] value).
    pub(crate) fn stage_moves(&mut self, records: &[MoveRecord]) {
        self.moves.extend_from_slice(records);
    }

    /// Routes one fire-and-forget event. Filtered by subscription before any encoding; batched
    /// unless it is immediate (join, quit, chat, command, `immediate`, or `expects_response`).
    ///
    /// A quit also removes its player from this tick's staged moves and from every plugin's
    /// undelivered moves: no plugin sees a player move after it left.
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
        if let Some(r) = self.recorder.as_mut() {
            crate::codec::encode_body(env, &mut self.record_buf);
            r.event(self.tick, &self.record_buf);
        }
        if let Some(Payload::PlayerQuit(q)) = &env.payload {
            if let Some(uuid) = uuid_from_str(&q.player_uuid) {
                self.forget_player(&uuid);
            }
        }
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
        // Encode once for every plugin, except an immediate event for a single plugin, which
        // the link encodes in place.
        let in_place = immediate && n_targets == 1;
        if !in_place {
            crate::codec::encode_body(env, &mut self.scratch);
        }
        let encoded = Instant::now();
        self.cost.encode_ns += nanos(encode_started, encoded);
        let mut wake_ns = 0;
        self.stats.encoded += 1;
        let mut targets = if respond {
            self.target_pool.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        let limit = self.settings.overflow_frames;
        let mut failed: Vec<(usize, String)> = Vec::new();
        for k in 0..n_targets {
            let i = self.subs[t][k];
            let s = &mut self.slots[i];
            let r = if immediate {
                let body = (!in_place).then_some(self.scratch.as_slice());
                s.send_event_now(env, body, &mut self.pool, limit)
            } else {
                s.batch_event(&self.scratch, &self.limits, &mut self.pool, limit)
            };
            match r {
                Ok(SendOutcome::Sent | SendOutcome::Queued) => {}
                Ok(SendOutcome::Overflow) => failed.push((i, overflow_reason(s, limit))),
                Err(e) => failed.push((i, format!("link error: {e}"))),
            }
            if immediate {
                let w = Instant::now();
                wake_slot(s, i, self.waker.as_ref(), &mut self.cost);
                wake_ns += nanos(w, Instant::now());
            }
            if respond {
                targets.push(Target::new(i));
            }
        }
        let sent = Instant::now();
        self.cost.wake_ns += wake_ns;
        self.cost.write_ns += nanos(encoded, sent).saturating_sub(wake_ns);
        self.stats.encode_ns.record(nanos(encode_started, sent));
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

    /// A player quit: its moves staged in this tick and every plugin's undelivered record of it
    /// go.
    fn forget_player(&mut self, uuid: &[u8; 16]) {
        self.moves.retain(|m| m.uuid != *uuid);
        for s in &mut self.slots {
            s.forget_player(uuid);
        }
    }

    /// Ends the current tick: after each plugin's events of this tick (its batch flushed),
    /// delivers the tick's moves (or conflates them), wakes each plugin at most once, beats the
    /// heartbeat, and reads replies. Never blocks.
    pub fn end_tick(&mut self) {
        let started = Instant::now();
        let limit = self.settings.overflow_frames;
        let mut failed: Vec<(usize, String)> = Vec::new();
        self.stats.moves_offered += self.moves.len() as u64;
        if let Some(r) = self.recorder.as_mut() {
            r.moves(self.tick, &self.moves);
        }
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if !s.is_ready() {
                continue;
            }
            let w = Instant::now();
            match s.flush_batch(&mut self.pool, limit) {
                Ok(SendOutcome::Sent | SendOutcome::Queued) => {}
                Ok(SendOutcome::Overflow) => {
                    failed.push((i, overflow_reason(s, limit)));
                    continue;
                }
                Err(e) => {
                    failed.push((i, format!("link error: {e}")));
                    continue;
                }
            }
            if s.subscribed.contains(MOVE as i32) {
                if let Err(e) = s.send_moves(self.tick, &self.moves) {
                    failed.push((i, format!("link error: {e}")));
                    continue;
                }
            }
            if let Some(link) = s.link.as_mut() {
                link.heartbeat();
            }
            let written = Instant::now();
            wake_slot(s, i, self.waker.as_ref(), &mut self.cost);
            let done = Instant::now();
            self.cost.write_ns += nanos(w, written);
            self.cost.wake_ns += nanos(written, done);
        }
        if let Some(w) = self.waker.as_mut() {
            w.end_tick(Instant::now());
        }
        self.moves.clear();
        for (i, reason) in failed {
            self.disconnect(i, reason, true, Instant::now());
        }
        self.stats.ticks += 1;
        let polled = Instant::now();
        self.stats.end_tick_ns.record(nanos(started, polled));
        self.poll();
        self.cost.poll_ns += nanos(polled, Instant::now());
    }
}

/// Wakes plugin `i` if something was sent to it since its last wake-up: through the wake
/// thread while its window is open (no system call here), else on this thread.
#[inline]
pub(super) fn wake_slot(s: &mut Slot, i: usize, waker: Option<&super::waker::Waker>, cost: &mut super::TickCost) {
    if !s.take_dirty() {
        return;
    }
    if s.wake_handed && waker.is_some_and(|w| w.post(i)) {
        cost.posted += 1;
        s.stats.wakeups_handed_over += 1;
    } else if s.wake_now() {
        cost.wakeups += 1;
    }
}

/// Nanoseconds from `a` to `b` (0 if `b` is earlier).
#[inline]
fn nanos(a: Instant, b: Instant) -> u64 {
    b.saturating_duration_since(a).as_nanos() as u64
}

pub(super) fn overflow_reason(s: &Slot, limit: usize) -> String {
    format!(
        "overflow: more than {limit} messages waiting for room (plugin too slow), {} events undelivered",
        s.undelivered()
    )
}
