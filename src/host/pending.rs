//! Events that expect a response: their targets, the answers as they come, the merge, and the
//! wait for them (one sleep on every awaited plugin's wake-up word at once).

use std::time::{Duration, Instant};

use super::Host;
use crate::codec::{self, Reusable as _};
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
    /// The plugin answered.
    pub answered: bool,
    /// Its answer cancels the event.
    pub cancel: bool,
    /// Its answer's `EventResult.update` field, encoded (key and body) into a buffer from the
    /// host's update pool; empty when it changed nothing. Kept encoded so that an answer takes
    /// no allocation and the merge decodes each update into one reused message.
    pub update: Vec<u8>,
}

impl Target {
    pub fn new(slot: usize) -> Self {
        Self {
            slot,
            answered: false,
            cancel: false,
            update: Vec::new(),
        }
    }
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
        let mut out = Outcome::default();
        self.poll_outcome_into(pending, &mut out).then_some(out)
    }

    /// [`Host::poll_outcome`] into `out`, reusing its lists, names and mutation: returns whether
    /// the outcome was complete (and written into `out`; otherwise `out` is left as it was).
    /// With the same `out` kept from one event to the next, taking outcomes allocates nothing
    /// in steady state.
    pub fn poll_outcome_into(&mut self, pending: &Pending, out: &mut Outcome) -> bool {
        self.poll();
        self.try_finish(pending.id, Instant::now(), false, out)
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
        let mut out = Outcome::default();
        self.wait_into(pending, deadline, &mut out);
        out
    }

    /// [`Host::wait`] into `out`, reusing its lists, names and mutation (see
    /// [`Host::poll_outcome_into`]).
    pub fn wait_into(&mut self, pending: &Pending, deadline: Instant, out: &mut Outcome) {
        if !self.is_pending(pending) {
            out.event_id = pending.id;
            out.cancelled = false;
            out.mutation = None;
            out.answered.clear();
            out.late.clear();
            out.elapsed = Duration::ZERO;
            return;
        }
        let started = Instant::now();
        loop {
            self.poll();
            let now = Instant::now();
            if self.try_finish(pending.id, now, now >= deadline, out) {
                return;
            }
            if now.duration_since(started) < WAIT_SPIN {
                crate::sync::spin_loop();
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
                    .filter(|t| !t.answered && self.slots[t.slot].is_ready())
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

    /// Writes event `id`'s outcome into `out` if it is complete (or `force`d, or past its
    /// timeout); returns whether it did. Allocates nothing when `out` was used before for as
    /// many plugins (see [`Host::poll_outcome_into`]).
    pub(super) fn try_finish(&mut self, id: u64, now: Instant, force: bool, out: &mut Outcome) -> bool {
        let Some(p) = self.pending.get(&id) else {
            return false;
        };
        let all = p.targets.iter().all(|t| t.answered || !self.slots[t.slot].is_ready());
        if !(all || force || now >= p.timeout_at) {
            return false;
        }
        let Some(mut p) = self.pending.remove(&id) else {
            return false;
        };
        out.event_id = id;
        out.cancelled = false;
        out.elapsed = p.completed.unwrap_or(now).duration_since(p.dispatched);
        // Unstable: the keys (priority, then the unique id) leave no ties, and it never
        // allocates.
        p.targets.sort_unstable_by(|a, b| {
            let (sa, sb) = (&self.slots[a.slot].cfg, &self.slots[b.slot].cfg);
            sa.priority.cmp(&sb.priority).then_with(|| sa.id.cmp(&sb.id))
        });
        // The merge decodes every update, in order, into one message whose variant (and its
        // allocations) is reused: the caller's last mutation if it handed one back in `out`,
        // else the host's own.
        let mut merged = std::mem::take(&mut self.merged);
        if out.mutation.is_some() {
            std::mem::swap(&mut merged.update, &mut out.mutation);
        }
        out.mutation = None;
        merged.keep_strings(&mut self.merge_spare);
        merged.reset_keep();
        let mut changed = false;
        let (mut answered, mut late) = (0, 0);
        for t in p.targets.drain(..) {
            let s = &mut self.slots[t.slot];
            if t.answered {
                set_name(&mut out.answered, &mut answered, &s.cfg.id);
                out.cancelled |= t.cancel;
                if !t.update.is_empty() {
                    // prost merges a oneof of the same variant field by field (later set
                    // fields win) and replaces a different variant. The bytes were encoded by
                    // this host from a decoded message: they decode.
                    changed |= codec::merge_keep(&mut merged, &t.update, &mut self.merge_spare).is_ok();
                }
            } else {
                s.stats.late_replies += 1;
                set_name(&mut out.late, &mut late, &s.cfg.id);
            }
            if t.update.capacity() > 0 {
                self.update_pool.give(t.update);
            }
        }
        out.answered.truncate(answered);
        out.late.truncate(late);
        if changed && !out.cancelled {
            out.mutation = merged.update.take();
        }
        self.merged = merged;
        if self.target_pool.len() < MAX_TARGET_LISTS {
            self.target_pool.push(p.targets);
        }
        true
    }

    /// Records plugin `i`'s answer to an event: whether it cancels, and its update, encoded.
    pub(super) fn on_result(&mut self, i: usize, r: &EventResult) {
        let now = Instant::now();
        let Some(p) = r.event_id.parse::<u64>().ok().and_then(|id| self.pending.get_mut(&id)) else {
            tracing::debug!(plugin = %self.slots[i].cfg.id, event = %r.event_id, "result for an event no longer pending");
            return;
        };
        let Some(t) = p.targets.iter_mut().find(|t| t.slot == i && !t.answered) else {
            return;
        };
        let latency = now.duration_since(p.dispatched);
        t.answered = true;
        t.cancel = r.cancel == Some(true);
        if let Some(u) = &r.update {
            let mut buf = self.update_pool.take();
            u.encode(&mut buf);
            t.update = buf;
        }
        if p.targets.iter().all(|t| t.answered) {
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

/// Target lists kept for reuse, at most (one per event awaiting its outcome is enough).
const MAX_TARGET_LISTS: usize = 1024;

/// Writes `name` as entry `*n` of `names`, into the `String` already there if any (its
/// capacity reused), and counts it.
fn set_name(names: &mut Vec<String>, n: &mut usize, name: &str) {
    match names.get_mut(*n) {
        Some(s) => {
            s.clear();
            s.push_str(name);
        }
        None => names.push(name.to_owned()),
    }
    *n += 1;
}
