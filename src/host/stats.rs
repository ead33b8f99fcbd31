//! The host's counters and histograms: plain integers owned by the tick thread (no atomics on
//! the hot path), copied out by [`super::Host::metrics`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// A histogram of non-negative integers (latencies in ns, batch sizes).
#[derive(Debug, Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds"))
    }
}

impl Hist {
    /// Records one value (clamped into range; recording never allocates).
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.0.saturating_record(v.max(1));
    }
    /// Number of values.
    pub fn count(&self) -> u64 {
        self.0.len()
    }
    /// The value at quantile `q` (0..=1), 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }
    /// Largest value, 0 when empty.
    pub fn max(&self) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.max() }
    }
    /// Mean, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.mean() }
    }
    /// Adds another histogram's values.
    pub fn merge(&mut self, other: &Hist) {
        let _ = self.0.add(&other.0);
    }
    /// The underlying histogram.
    pub fn inner(&self) -> &Histogram<u64> {
        &self.0
    }
    /// Forgets every value.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// Per-plugin counters.
#[derive(Debug, Clone, Default)]
pub struct PluginStats {
    /// Events delivered to the link.
    pub events_sent: u64,
    /// Move records delivered.
    pub moves_sent: u64,
    /// Move records superseded while the plugin lagged (conflated away).
    pub moves_conflated: u64,
    /// Messages that had to wait in the host's queue for room.
    pub overflowed_frames: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Batch frames written.
    pub batches: u64,
    /// Wake-ups sent to a sleeping plugin.
    pub wakeups: u64,
    /// Wake-ups handed to the wake thread (the `wake_thread` setting) instead of made on the
    /// tick thread; the wake thread's own system calls are in `wakeups`.
    pub wakeups_handed_over: u64,
    /// Event results received in time.
    pub replies: u64,
    /// Event results that came after the deadline (or never).
    pub late_replies: u64,
    /// Times the plugin was reported slow.
    pub slow_reports: u64,
    /// Disconnections, by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// Restarts.
    pub restarts: u64,
    /// Dispatch -> EventResult latency, ns.
    pub reply_latency_ns: Hist,
    /// Events per batch frame.
    pub batch_events: Hist,
}

/// Where one tick's time went on the tick thread, ns (see [`super::Host::last_tick_cost`]).
///
/// Each part is measured with two clock reads around it; what the parts leave out of the
/// tick's wall time is the caller's own work between the calls (building events), the clock
/// reads themselves, and time the thread was not running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickCost {
    /// Encoding events (once per event, whatever the number of plugins).
    pub encode_ns: u64,
    /// Handing frames to the links: immediate events, batches, move frames, heartbeats
    /// (for shared memory, writes into the rings).
    pub write_ns: u64,
    /// Waking plugins that sleep (a system call each, only for a sleeping plugin).
    pub wake_ns: u64,
    /// Reading what plugins sent (replies, actions, logs) and the health checks, at the end
    /// of the tick.
    pub poll_ns: u64,
    /// Wake-ups the tick thread sent itself (system calls).
    pub wakeups: u32,
    /// Wake-ups handed to the wake thread (no system call on the tick thread).
    pub posted: u32,
}

/// Host-wide counters.
#[derive(Debug, Clone)]
pub struct HostStats {
    /// Ticks ended.
    pub ticks: u64,
    /// Events offered to `publish` / `dispatch`, indexed by event type number.
    pub offered: [u64; 128],
    /// Events no plugin subscribed to (never encoded).
    pub filtered: u64,
    /// Events encoded (once per event, whatever the number of plugins).
    pub encoded: u64,
    /// Move records offered.
    pub moves_offered: u64,
    /// Actions received from plugins.
    pub actions: u64,
    /// Plugin log lines the log thread dropped because it could not keep up (they are still
    /// in [`Host::drain_logs`](super::Host::drain_logs)).
    pub logs_dropped: u64,
    /// Encode time per event, ns.
    pub encode_ns: Hist,
    /// Host-side cost of `end_tick` (flush, moves, wake-ups), ns.
    pub end_tick_ns: Hist,
    /// Windows the wake thread opened around an expected tick end, and those that the tick's
    /// end came into (the others closed on their own: the tick came late, or not at all).
    pub wake_windows: u64,
    /// See `wake_windows`.
    pub wake_windows_used: u64,
    /// Time the wake thread spent with a window open (spinning), ns: its CPU cost.
    pub wake_window_ns: u64,
}

impl Default for HostStats {
    fn default() -> Self {
        Self {
            ticks: 0,
            offered: [0; 128],
            filtered: 0,
            encoded: 0,
            moves_offered: 0,
            actions: 0,
            logs_dropped: 0,
            encode_ns: Hist::default(),
            end_tick_ns: Hist::default(),
            wake_windows: 0,
            wake_windows_used: 0,
            wake_window_ns: 0,
        }
    }
}

impl HostStats {
    /// Events offered, by event type name (types never offered are left out).
    pub fn offered_by_type(&self) -> BTreeMap<&'static str, u64> {
        self.offered
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(t, n)| {
                let name = crate::proto::EventType::try_from(t as i32).map_or("UNKNOWN", |e| e.as_str_name());
                (name, *n)
            })
            .collect()
    }
}

/// A snapshot of every counter, for embedders and the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// Host-wide counters.
    pub host: HostStats,
    /// Per plugin id.
    pub plugins: BTreeMap<String, PluginStats>,
    /// Buffer pool hits and misses.
    pub pool: crate::codec::PoolStats,
}
