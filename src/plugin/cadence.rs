//! Learning the host's tick cadence, so a waiting plugin can be awake when the next tick lands.
//!
//! A game server ticks at a fixed rate, and everything a plugin receives comes in a burst at the
//! end of a tick. A parked plugin costs the host a futex wake-up per tick, on the tick thread (on
//! a virtual machine an inter-processor interrupt: tens of microseconds). A plugin that knows
//! when the next burst is due can instead set its own timer a little earlier and spin through
//! the arrival: the host's wake-up then finds it awake and costs no system call, and the
//! timer's cost lands on the plugin, not on the tick.
//!
//! [`Cadence`] watches when bursts start (work after at least [`BURST_GAP`] of silence) and
//! keeps a smoothed period once [`STABLE_AFTER`] intervals in a row agree with it; an interval
//! that is a small multiple of the period (a tick that sent this plugin nothing) still agrees.
//! Anything else (the server changed its rate, paused, or never had one) resets it, and the
//! plugin falls back to plain parking until the rhythm is back. So does a burst off the beat,
//! such as the answer to one of the plugin's own queries: relearning takes six ticks, and a
//! plugin that gets answers between ticks all the time gains little from pacing. (Judging bursts
//! against the learned phase instead would tolerate those, but a grid of 20 ms also matches
//! every other tick of a 30 ms server, and would never let go of the old rate.)

use std::time::{Duration, Instant};

/// Silence that separates two bursts (one tick's messages arrive well within it).
pub const BURST_GAP: Duration = Duration::from_millis(1);
/// The shortest period learned (1,000 ticks/s).
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// The longest period learned (4 ticks/s); slower servers gain nothing from anticipation.
pub const MAX_PERIOD: Duration = Duration::from_millis(250);
/// Intervals in a row that must agree before the cadence is trusted.
pub const STABLE_AFTER: u32 = 4;
/// The most lateness of a timer that is learned (beyond it, the tick thread pays the wake-up).
pub const MAX_OVERSLEEP: Duration = Duration::from_millis(2);
/// How many missed ticks an interval may span and still agree.
const MAX_SKIPPED: u32 = 4;

/// The learned rhythm of the host's ticks.
#[derive(Debug, Clone, Default)]
pub struct Cadence {
    last_work: Option<Instant>,
    last_burst: Option<Instant>,
    period: Option<Duration>,
    agreeing: u32,
    /// Where the ticks fall: the smoothed time of the latest burst, so that one late arrival
    /// does not shift the next prediction.
    anchor: Option<Instant>,
    /// Mean deviation of arrivals from their prediction, ns.
    arrival_dev_ns: u64,
    /// How late a timed sleep returns (smoothed mean and mean deviation, in ns).
    oversleep_ns: u64,
    oversleep_dev_ns: u64,
}

impl Cadence {
    /// Records that work arrived at `now` (call once per poll that handled something).
    pub fn work(&mut self, now: Instant) {
        let new_burst = self
            .last_work
            .is_none_or(|w| now.saturating_duration_since(w) >= BURST_GAP);
        self.last_work = Some(now);
        if !new_burst {
            return;
        }
        let Some(prev) = self.last_burst.replace(now) else {
            return;
        };
        let interval = now.saturating_duration_since(prev);
        match self.period {
            Some(p) => match multiple_of(interval, p) {
                Some(1) => {
                    // Exponential smoothing (1/8), as TCP's SRTT: follows drift, shrugs off jitter.
                    self.period = Some((p * 7 + interval) / 8);
                    self.agreeing = self.agreeing.saturating_add(1);
                }
                Some(_) => self.agreeing = self.agreeing.saturating_add(1),
                None => self.restart(interval),
            },
            None => self.restart(interval),
        }
        self.anchor = Some(match (self.anchor, self.period) {
            (Some(anchor), Some(p)) if self.agreeing > 0 => {
                // A phase-locked loop with gain 1/8: predict this burst from the anchor, move the
                // anchor an eighth of the way towards where it really came.
                let p_ns = p.as_nanos().max(1);
                let k = ((now.saturating_duration_since(anchor).as_nanos() + p_ns / 2) / p_ns).max(1);
                let predicted = anchor + p * u32::try_from(k).unwrap_or(1);
                let (err, early) = match now.checked_duration_since(predicted) {
                    Some(late) => (late, false),
                    None => (predicted - now, true),
                };
                let err_ns = err.as_nanos().min(u128::from(u64::MAX)) as u64;
                self.arrival_dev_ns = (self.arrival_dev_ns * 3 + err_ns) / 4;
                if early {
                    predicted - err / 8
                } else {
                    predicted + err / 8
                }
            }
            _ => now,
        });
    }

    fn restart(&mut self, interval: Duration) {
        self.period = (MIN_PERIOD..=MAX_PERIOD).contains(&interval).then_some(interval);
        self.agreeing = 0;
    }

    /// Records a timed sleep that asked for `asked` and lasted `took` without being woken early:
    /// timers on a busy or virtual machine return late, and the plugin must set them earlier by
    /// that much.
    pub fn slept(&mut self, asked: Duration, took: Duration) {
        let late = took.saturating_sub(asked).min(MAX_OVERSLEEP).as_nanos() as u64;
        // Mean and mean deviation smoothed as TCP's RTT estimator (RFC 6298: 1/8 and 1/4).
        let dev = late.abs_diff(self.oversleep_ns);
        self.oversleep_dev_ns = (self.oversleep_dev_ns * 3 + dev) / 4;
        self.oversleep_ns = (self.oversleep_ns * 7 + late) / 8;
    }

    /// How much earlier than wanted to set a timer: the smoothed lateness plus four deviations.
    pub fn timer_margin(&self) -> Duration {
        Duration::from_nanos(self.oversleep_ns + 4 * self.oversleep_dev_ns).min(MAX_OVERSLEEP)
    }

    /// How far from their prediction bursts arrive: three mean deviations (at most
    /// [`MAX_OVERSLEEP`]). A paced wait widens its window by this much on each side.
    pub fn jitter(&self) -> Duration {
        Duration::from_nanos(3 * self.arrival_dev_ns).min(MAX_OVERSLEEP)
    }

    /// The learned period, once trusted.
    pub fn period(&self) -> Option<Duration> {
        (self.agreeing >= STABLE_AFTER).then_some(self.period?)
    }

    /// When the next burst is due, seen from `now`: the first expected arrival not more than
    /// `late` in the past (so a tick running a little late still counts as the current one).
    /// `None` while the cadence is not trusted.
    pub fn next_due(&self, now: Instant, late: Duration) -> Option<Instant> {
        let period = self.period()?;
        let mut due = self.anchor? + period;
        // Skip the ticks that never came (bounded: the cadence is dropped after a long silence).
        let behind = now.saturating_duration_since(due + late);
        if behind > period * MAX_SKIPPED {
            return None;
        }
        while due + late < now {
            due += period;
        }
        Some(due)
    }
}

/// What a paced wait does `now`: `Some(t)` parks for `t`, `None` spins. It spins for `spin`
/// after the last work (`idle_since`), then sleeps until `lead` (plus [`Cadence::jitter`])
/// before the next tick is due (earlier by [`Cadence::timer_margin`], at most `max_park`), and
/// spins from there until as long past the due time. With no trusted cadence it parks for
/// `max_park`.
pub fn paced_park(
    cadence: &Cadence,
    spin: Duration,
    lead: Duration,
    idle_since: Instant,
    now: Instant,
    max_park: Duration,
) -> Option<Duration> {
    if now.saturating_duration_since(idle_since) < spin {
        return None;
    }
    // How far on each side of the due time to stay awake: `lead`, widened by the arrivals' jitter.
    let half = lead + cadence.jitter();
    let Some(due) = cadence.next_due(now, half) else {
        return Some(max_park);
    };
    // Inside the window [due - half, due + half]: stay awake for the tick.
    let until_window = due.checked_duration_since(now + half)?;
    // Set the timer early by how late timers return here; too close to bother: spin.
    match until_window.checked_sub(cadence.timer_margin()) {
        Some(t) if !t.is_zero() => Some(t.min(max_park)),
        _ => None,
    }
}

/// `interval` as a whole multiple `k` (1 to [`MAX_SKIPPED`]) of `period`, within a tolerance of
/// an eighth of the period or 500 µs, whichever is larger.
fn multiple_of(interval: Duration, period: Duration) -> Option<u32> {
    let tolerance = (period / 8).max(Duration::from_micros(500));
    (1..=MAX_SKIPPED).find(|&k| {
        let expect = period * k;
        interval.abs_diff(expect) <= tolerance
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(20);

    fn feed(c: &mut Cadence, start: Instant, offsets_us: &[u64]) {
        for &us in offsets_us {
            c.work(start + Duration::from_micros(us));
        }
    }

    #[test]
    fn learns_a_steady_rate_and_predicts_the_next_tick() {
        let t0 = Instant::now();
        let mut c = Cadence::default();
        // Bursts every 20 ms, each with a few items 30 µs apart: the first interval proposes the
        // period, four more agree with it.
        for tick in 0..6u64 {
            assert!(c.period().is_none(), "trusted too early, at tick {tick}");
            let base = tick * 20_000;
            feed(&mut c, t0, &[base, base + 30, base + 60]);
        }
        assert_eq!(c.period(), Some(TICK));
        let now = t0 + Duration::from_millis(105);
        assert_eq!(c.next_due(now, Duration::ZERO), Some(t0 + Duration::from_millis(120)));
        // A tick 150 µs late is still "the current one" with 200 µs of allowance.
        let now = t0 + Duration::from_micros(120_150);
        let late = Duration::from_micros(200);
        assert_eq!(c.next_due(now, late), Some(t0 + Duration::from_millis(120)));
        // Past the allowance, the next one.
        let now = t0 + Duration::from_micros(120_300);
        assert_eq!(c.next_due(now, late), Some(t0 + Duration::from_millis(140)));
    }

    #[test]
    fn jitter_and_skipped_ticks_keep_the_cadence() {
        let t0 = Instant::now();
        let mut c = Cadence::default();
        // ±300 µs of jitter, and ticks 6 and 7 sent nothing.
        let arrivals = [0, 20_300, 39_800, 60_200, 80_000, 99_700, 160_100, 180_000];
        feed(&mut c, t0, &arrivals);
        let p = c.period().expect("trusted despite jitter and gaps");
        assert!(p.abs_diff(TICK) < Duration::from_micros(300), "period {p:?}");
    }

    #[test]
    fn a_change_of_rate_or_irregular_traffic_drops_trust() {
        let t0 = Instant::now();
        let mut c = Cadence::default();
        feed(&mut c, t0, &[0, 20_000, 40_000, 60_000, 80_000, 100_000]);
        assert!(c.period().is_some());
        // An interval of 1.5 periods is no multiple (the rate changed): trust is gone.
        feed(&mut c, t0, &[130_000]);
        assert!(c.period().is_none());
        assert_eq!(c.next_due(t0 + Duration::from_millis(131), Duration::ZERO), None);
        // Irregular traffic never becomes trusted.
        let mut c = Cadence::default();
        feed(&mut c, t0, &[0, 7_000, 30_000, 33_000, 90_000, 91_500, 140_000]);
        assert!(c.period().is_none());
        // Work closer together than BURST_GAP is one burst, not a 0.5 ms period.
        let mut c = Cadence::default();
        let burst: Vec<u64> = (0..100).map(|i| i * 500).collect();
        feed(&mut c, t0, &burst);
        assert!(c.period().is_none());
    }

    #[test]
    fn a_long_silence_forgets_the_next_tick() {
        let t0 = Instant::now();
        let mut c = Cadence::default();
        feed(&mut c, t0, &[0, 20_000, 40_000, 60_000, 80_000, 100_000]);
        assert!(c.next_due(t0 + Duration::from_millis(110), Duration::ZERO).is_some());
        // Ten periods later with nothing: stop anticipating (the server is paused or gone).
        assert_eq!(c.next_due(t0 + Duration::from_millis(300), Duration::ZERO), None);
    }

    #[test]
    fn timer_margin_follows_lateness() {
        let mut c = Cadence::default();
        assert_eq!(c.timer_margin(), Duration::ZERO);
        let ms = Duration::from_millis(19);
        for late_us in [150u64, 100, 200, 120, 180, 150, 160, 140].repeat(4) {
            c.slept(ms, ms + Duration::from_micros(late_us));
        }
        let m = c.timer_margin();
        assert!(
            m > Duration::from_micros(150) && m < Duration::from_micros(400),
            "margin {m:?}"
        );
        // Lateness is capped: one pathological sleep cannot make the plugin spin for a second.
        c.slept(ms, ms + Duration::from_secs(1));
        assert!(c.timer_margin() <= MAX_OVERSLEEP);
    }

    #[test]
    fn paced_park_sleeps_until_the_window_then_spins_through_it() {
        let t0 = Instant::now();
        let (spin, lead, max) = (
            Duration::from_micros(50),
            Duration::from_micros(200),
            Duration::from_millis(100),
        );
        let mut c = Cadence::default();
        // Unknown cadence: spin briefly after work, then park for the longest allowed.
        assert_eq!(
            paced_park(&c, spin, lead, t0, t0 + Duration::from_micros(10), max),
            None
        );
        assert_eq!(
            paced_park(&c, spin, lead, t0, t0 + Duration::from_micros(60), max),
            Some(max)
        );
        feed(&mut c, t0, &[0, 20_000, 40_000, 60_000, 80_000, 100_000]);
        let at = |us: u64| t0 + Duration::from_micros(us);
        // Right after the tick at 100 ms: spin first, then sleep until 200 µs before 120 ms.
        assert_eq!(paced_park(&c, spin, lead, at(100_000), at(100_020), max), None);
        assert_eq!(
            paced_park(&c, spin, lead, at(100_000), at(100_100), max),
            Some(Duration::from_micros(19_700))
        );
        // Timers that return 100 µs late are set 100 µs earlier (the margin adds deviations,
        // none here).
        for _ in 0..40 {
            c.slept(Duration::from_millis(19), Duration::from_micros(19_100));
        }
        let margin = c.timer_margin();
        assert!(margin >= Duration::from_micros(95) && margin <= Duration::from_micros(105));
        let t = paced_park(&c, spin, lead, at(100_000), at(100_100), max).expect("parks");
        assert_eq!(t, Duration::from_micros(19_700) - margin);
        // In the window, on either side of the due time: spin.
        for us in [119_800, 119_950, 120_000, 120_150, 120_199] {
            assert_eq!(paced_park(&c, spin, lead, at(100_000), at(us), max), None, "at {us}");
        }
        // Past the window, the tick did not come: sleep towards the next one.
        let t = paced_park(&c, spin, lead, at(100_000), at(120_300), max).expect("parks");
        assert_eq!(t, Duration::from_micros(19_500) - margin);
        // Far from any tick the park is capped (heartbeats must go on).
        let small = Duration::from_millis(5);
        assert_eq!(paced_park(&c, spin, lead, at(100_000), at(100_100), small), Some(small));
    }

    #[test]
    fn the_window_covers_a_jittery_host() {
        // A host whose sleeps overshoot by 0 to 700 µs (worse than this project's VM): each tick lands
        // late by a different amount. The window (lead + jitter on each side of the due time)
        // must catch nearly every arrival once learned, without growing past a millisecond.
        let t0 = Instant::now();
        let lead = Duration::from_micros(200);
        let mut c = Cadence::default();
        let mut seed = 12345u64;
        let (mut caught, mut judged) = (0, 0);
        for tick in 0..500u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let late_us = (seed >> 33) % 700;
            let arrival = t0 + Duration::from_micros(tick * 20_000 + late_us);
            if tick >= 20 {
                let half = lead + c.jitter();
                let before = arrival - Duration::from_millis(5);
                let due = c.next_due(before, half).expect("trusted");
                judged += 1;
                caught += u32::from(arrival.max(due) - arrival.min(due) <= half);
            }
            c.work(arrival);
        }
        assert!(caught * 100 >= judged * 95, "caught {caught} of {judged}");
        assert!(c.jitter() < Duration::from_millis(1), "jitter {:?}", c.jitter());
    }

    #[test]
    fn rates_outside_the_range_are_not_learned() {
        let t0 = Instant::now();
        let mut slow = Cadence::default();
        let one_a_second: Vec<u64> = (0..8).map(|i| i * 1_000_000).collect();
        feed(&mut slow, t0, &one_a_second);
        assert!(slow.period().is_none());
    }
}
