//! Events that expect a response: their targets, the answers as they come, the merge, and the
//! wait for them (one sleep on every awaited plugin's wake-up word at once).

use std::time::{Duration, Instant};

use prost::Message as _;

use super::Host;
use crate::proto::{EventResult, event_result};
use crate::sync::FutexWord;

/// Handle of an event that expects a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "poll or wait for the outcome"]
pub struct Pending {
    pub(super) id: u64,
}

impl Pending {
    /// The event id (as sent in `EventEnvelope.event_id`).
    pub fn event_id(&self) -> u64 {
        self.id
    }

    /// The handle of event `id` (the C API hands out ids, not handles).
    pub(crate) fn from_event_id(id: u64) -> Self {
        Self { id }
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

pub(super) struct Target {
    pub slot: usize,
    pub result: Option<EventResult>,
}

pub(super) struct PendingEvent {
    pub targets: Vec<Target>,
    pub dispatched: Instant,
    pub timeout_at: Instant,
    /// When the last target answered.
    pub completed: Option<Instant>,
}

/// How long [`Host::wait`] polls for answers before it sleeps: an awake plugin answers within a
/// few microseconds; a longer spin would take a core from the plugins.
pub const WAIT_SPIN: Duration = Duration::from_micros(20);

/// The longest single sleep of [`Host::wait`], so that a plugin's death (reported by the
/// supervisor) and the deadline are seen in time.
const MAX_NAP: Duration = Duration::from_millis(1);

/// Most plugins one sleep waits on at once (the rest are seen within [`MAX_NAP`]).
const MAX_WAIT_WORDS: usize = 64;

impl Host {
    /// Whether `pending`'s outcome is still to be taken.
    pub fn is_pending(&self, pending: &Pending) -> bool {
        self.pending.contains_key(&pending.id)
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
    /// It polls for [`WAIT_SPIN`], then sleeps until any plugin that has not answered yet sends
    /// something (one `futex_waitv` on all their wake-up words), at most 1 ms at a time.
    ///
    /// An outcome is taken once: waiting again on a taken one returns at once with nothing
    /// answered (see [`Host::is_pending`]).
    pub fn wait(&mut self, pending: &Pending, deadline: Instant) -> Outcome {
        if !self.is_pending(pending) {
            return Outcome {
                event_id: pending.id,
                ..Default::default()
            };
        }
        let started = Instant::now();
        loop {
            self.poll();
            let now = Instant::now();
            if let Some(o) = self.try_finish(pending.id, now, now >= deadline) {
                return o;
            }
            if now.duration_since(started) < WAIT_SPIN {
                if std::env::var_os("PLUGBUS_EXP_HOSTYIELD").is_some() {
                    std::thread::yield_now();
                } else {
                    crate::sync::spin_loop();
                }
                continue;
            }
            let wake_at = self
                .pending
                .get(&pending.id)
                .map_or(deadline, |p| deadline.min(p.timeout_at));
            let nap = wake_at
                .saturating_duration_since(now)
                .clamp(Duration::from_micros(1), MAX_NAP);
            self.sleep_on_answers(pending.id, nap);
        }
    }

    /// Sleeps up to `nap` until a plugin that owes event `id` an answer sends something.
    fn sleep_on_answers(&mut self, id: u64, nap: Duration) {
        self.waiting.clear();
        if let Some(p) = self.pending.get(&id) {
            self.waiting.extend(
                p.targets
                    .iter()
                    .filter(|t| t.result.is_none() && self.slots[t.slot].is_ready())
                    .map(|t| t.slot)
                    .take(MAX_WAIT_WORDS),
            );
        }
        // Announce on each link; one that already has something cancels the sleep (the doorbell
        // protocol: announce, re-check, sleep).
        let mut prepared = 0;
        let mut arrived = false;
        for k in 0..self.waiting.len() {
            let i = self.waiting[k];
            let Some(link) = self.slots[i].link.as_mut() else {
                continue;
            };
            match link.prepare_wait() {
                Ok(true) => {
                    self.waiting[prepared] = i;
                    prepared += 1;
                }
                // Something arrived, or the link broke (the next poll handles it).
                Ok(false) | Err(_) => {
                    arrived = true;
                    break;
                }
            }
        }
        self.waiting.truncate(prepared);
        if !arrived {
            if self.waiting.is_empty() {
                std::thread::sleep(nap);
            } else {
                let filler: (&FutexWord, u32) = self.slots[self.waiting[0]]
                    .link
                    .as_ref()
                    .map(|l| l.wait_word())
                    .expect("prepared links exist");
                let mut words = [filler; MAX_WAIT_WORDS];
                for (w, &i) in words.iter_mut().zip(&self.waiting) {
                    if let Some(link) = self.slots[i].link.as_ref() {
                        *w = link.wait_word();
                    }
                }
                crate::sync::wait_any(&words[..self.waiting.len()], nap);
            }
        }
        for &i in &self.waiting {
            if let Some(link) = self.slots[i].link.as_mut() {
                link.finish_wait();
            }
        }
    }

    pub(super) fn try_finish(&mut self, id: u64, now: Instant, force: bool) -> Option<Outcome> {
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

    /// Records plugin `i`'s answer to an event.
    pub(super) fn on_result(&mut self, i: usize, r: EventResult) {
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
            self.notices.push_back(super::Notice::Slow {
                id: s.cfg.id.clone(),
                what,
            });
        }
    }
}
