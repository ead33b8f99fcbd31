//! `plugbus loadtest --floor`: what this machine gives a tick thread, with no plugbus code in
//! the way, so that the load test's figures can be read against it.
//!
//! A writer thread, paced like the load test's tick thread (the same sleep, then the same
//! short spin), wakes once per tick and copies one move frame's bytes (48 bytes a player) into
//! one ring per plugin, each sized as the load test sizes its moves rings, at the next offset.
//! It then publishes a sequence number; a reader thread on another CPU spins on it, notes when
//! it saw it, and reads the bytes back (as a plugin reads its frame, so the next copy finds
//! the lines in the reader's cache, as the host's does). Both threads are pinned (writer on
//! CPU 0, reader on CPU 1) when the machine has two CPUs or more.
//!
//! Figures: the copy's time on a thread that slept a tick (the floor of the tick's writes),
//! the same copy back to back (the same work, warm), and the store-to-seen time of the
//! sequence number (the floor of any hand-off to a spinning plugin: an event's publish to its
//! handler, a reply's way back).
//!
//! The rings are atomics written with relaxed stores (plain moves on x86-64): the same cache
//! traffic as a copy into shared memory, with no `unsafe`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plugbus::segment::monotonic_ns;
use plugbus::sync::{AtomicU64, Ordering};
use serde::Serialize;

use crate::loadtest::{Pcts, sleep_until};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct FloorSpec {
    /// Bytes per copy (one move frame: 48 bytes a player).
    pub bytes: usize,
    /// Copies per tick (one per plugin).
    pub copies: usize,
    /// Each ring's size in bytes (a power of two, at least `bytes`).
    pub ring: usize,
    pub tick_len: Duration,
    /// Ticks measured (after 10 unmeasured).
    pub ticks: usize,
}

/// What the machine gave.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FloorReport {
    pub bytes_per_copy: usize,
    pub copies: usize,
    pub ring_bytes: usize,
    /// The copies on a thread that slept one tick length before them, ns.
    pub cold_copy_ns: Pcts,
    /// The same copies back to back, ns.
    pub warm_copy_ns: Pcts,
    /// A store on the woken thread to a spinning thread on another CPU seeing it, ns.
    pub handoff_ns: Pcts,
    /// Whether the two threads were pinned to different CPUs.
    pub pinned: bool,
}

struct Shared {
    rings: Vec<Vec<AtomicU64>>,
    /// Tick number (0 = nothing yet); `u64::MAX` = stop.
    seq: AtomicU64,
    /// When `seq` was stored (CLOCK_MONOTONIC, ns).
    stored_ns: AtomicU64,
    /// Where the last copy starts, in words.
    at: AtomicU64,
    /// The last tick the reader finished reading.
    ack: AtomicU64,
}

/// Ticks (and back-to-back copies) run before the measured ones.
const WARM_UP: u64 = 10;

/// Runs the probe (about `ticks` tick lengths plus a few back-to-back copies).
pub fn measure(spec: &FloorSpec) -> FloorReport {
    let words = spec.bytes.div_ceil(8).max(1);
    let ring_words = (spec.ring / 8).max(words);
    let shared = Arc::new(Shared {
        rings: (0..spec.copies.max(1))
            .map(|_| (0..ring_words).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        seq: AtomicU64::new(0),
        stored_ns: AtomicU64::new(0),
        at: AtomicU64::new(0),
        ack: AtomicU64::new(0),
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus >= 2;
    let reader = {
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            if pinned {
                crate::pin_current_thread(1);
            }
            let mut handoff = plugbus::host::Hist::default();
            let mut last = 0;
            let mut sum = 0u64;
            loop {
                let seq = s.seq.load(Ordering::Acquire);
                if seq == last {
                    plugbus::sync::spin_loop();
                    continue;
                }
                if seq == u64::MAX {
                    break;
                }
                let now = monotonic_ns();
                if seq > WARM_UP {
                    handoff.record(now.saturating_sub(s.stored_ns.load(Ordering::Relaxed)));
                }
                let at = s.at.load(Ordering::Relaxed) as usize;
                for r in &s.rings {
                    for k in 0..words {
                        sum = sum.wrapping_add(r[(at + k) % r.len()].load(Ordering::Relaxed));
                    }
                }
                last = seq;
                s.ack.store(seq, Ordering::Release);
            }
            std::hint::black_box(sum);
            handoff
        })
    };
    let writer = {
        let s = Arc::clone(&shared);
        let spec = *spec;
        std::thread::spawn(move || {
            if pinned {
                crate::pin_current_thread(0);
            }
            let mut cold = plugbus::host::Hist::default();
            let mut warm = plugbus::host::Hist::default();
            let mut at = 0usize;
            let copy = |s: &Shared, at: &mut usize, tick: u64| -> u64 {
                let started = Instant::now();
                for r in &s.rings {
                    for k in 0..words {
                        r[(*at + k) % r.len()].store(tick.wrapping_add(k as u64), Ordering::Relaxed);
                    }
                }
                let took = started.elapsed().as_nanos() as u64;
                s.at.store(*at as u64, Ordering::Relaxed);
                *at = (*at + words.next_multiple_of(8)) % ring_words;
                took
            };
            let mut next = Instant::now() + spec.tick_len;
            let mut published = 0u64;
            for tick in 1..=WARM_UP + spec.ticks as u64 {
                sleep_until(next);
                next += spec.tick_len;
                // The reader is still reading the last copy only if it lost its CPU for a whole
                // tick: wait for it (no copy overwrites a read), and leave this tick out.
                let mut measured = tick > WARM_UP;
                while s.ack.load(Ordering::Acquire) != published {
                    measured = false;
                    std::thread::yield_now();
                }
                if !measured && tick > WARM_UP {
                    next = Instant::now() + spec.tick_len;
                }
                let took = copy(&s, &mut at, tick);
                s.stored_ns.store(monotonic_ns(), Ordering::Relaxed);
                s.seq.store(tick, Ordering::Release);
                published = tick;
                if measured {
                    cold.record(took);
                }
            }
            // Back to back: the same copies, with the reader stopped.
            while s.ack.load(Ordering::Acquire) != published {
                std::thread::yield_now();
            }
            s.seq.store(u64::MAX, Ordering::Release);
            for tick in 0..WARM_UP + spec.ticks as u64 {
                let took = copy(&s, &mut at, tick);
                if tick >= WARM_UP {
                    warm.record(took);
                }
            }
            (cold, warm)
        })
    };
    let (cold, warm) = writer.join().expect("floor writer panicked");
    let handoff = reader.join().expect("floor reader panicked");
    FloorReport {
        bytes_per_copy: spec.bytes,
        copies: spec.copies,
        ring_bytes: ring_words * 8,
        cold_copy_ns: Pcts::of(&cold),
        warm_copy_ns: Pcts::of(&warm),
        handoff_ns: Pcts::of(&handoff),
        pinned,
    }
}

/// Prints the report under the load test's table.
pub fn print(f: &FloorReport) {
    let us = |ns: u64| format!("{:.2} µs", ns as f64 / 1000.0);
    println!(
        "  machine floor             no plugbus code: a thread woken each tick copies {} x {} B into {} KiB rings{}",
        f.copies,
        f.bytes_per_copy,
        f.ring_bytes / 1024,
        if f.pinned {
            " (pinned: CPU 0 writes, CPU 1 reads)"
        } else {
            " (one CPU)"
        }
    );
    println!(
        "    copy after a tick's sleep p50 {}  p99 {}   back to back p50 {}  p99 {}",
        us(f.cold_copy_ns.p50),
        us(f.cold_copy_ns.p99),
        us(f.warm_copy_ns.p50),
        us(f.warm_copy_ns.p99)
    );
    println!(
        "    store to a spinning thread on another CPU seeing it  p50 {}  p99 {}  ({} ticks)",
        us(f.handoff_ns.p50),
        us(f.handoff_ns.p99),
        f.handoff_ns.count
    );
}
