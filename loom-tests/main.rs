//! Loom model checks of the rings and the doorbell.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release --test loom`.
//!
//! The ring code under test is the library's own (compiled against loom's atomics through
//! `plugbus::sync`); payload bytes are reported to loom's race detector by `AccessTracker`, so
//! a missing happens-before between a write and a read of the same slot fails the model.
//! Capacities are tiny (2 to 4 records, 64 frame bytes) so the whole state space is explored.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use plugbus::ring::{Doorbell, RegionRef, frame, record};

fn records(cap: usize) -> (record::Producer<u64>, record::Consumer<u64>) {
    record::channel::<u64>(RegionRef::heap(record::region_size::<u64>(cap))).unwrap()
}

fn frames(cap: usize) -> (frame::Producer, frame::Consumer) {
    frame::channel(RegionRef::heap(frame::region_size(cap))).unwrap()
}

/// Pops `n` records, yielding while empty.
fn pop_n(rx: &mut record::Consumer<u64>, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match rx.try_pop().unwrap() {
            Some(v) => got.push(v),
            None => thread::yield_now(),
        }
    }
    got
}

/// One at a time through a 2-slot ring: every value arrives, in order, with no data race.
#[test]
fn push_pop_capacity_2() {
    loom::model(|| {
        let (mut tx, mut rx) = records(2);
        let t = thread::spawn(move || {
            for v in 1..=3u64 {
                let mut v = v;
                loop {
                    match tx.try_push(v) {
                        Ok(()) => break,
                        Err(record::PushError::Full(back)) => {
                            v = back;
                            thread::yield_now();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        assert_eq!(pop_n(&mut rx, 3), vec![1, 2, 3]);
        t.join().unwrap();
    });
}

/// A batch is published with one tail store; the consumer may see none of it or all of it,
/// never a record the producer has not written.
#[test]
fn batch_publish() {
    loom::model(|| {
        let (mut tx, mut rx) = records(4);
        let t = thread::spawn(move || {
            assert_eq!(tx.push_slice(&[10, 11, 12]).unwrap(), 3);
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            let g = rx.read(usize::MAX).unwrap();
            assert!(g.is_empty() || g.len() == 3, "batch seen partly: {}", g.len());
            got.extend_from_slice(&g);
            drop(g);
            thread::yield_now();
        }
        assert_eq!(got, vec![10, 11, 12]);
        t.join().unwrap();
    });
}

/// Records lent in place are released by the guard's commit; the producer then reuses those
/// slots (wrap-around) without racing the reader.
#[test]
fn read_guard_commit_then_reuse() {
    loom::model(|| {
        let (mut tx, mut rx) = records(2);
        let t = thread::spawn(move || {
            let mut sent = 0u64;
            while sent < 4 {
                sent += tx
                    .push_slice(&[sent + 1, sent + 2][..(4 - sent as usize).min(2)])
                    .unwrap() as u64;
                thread::yield_now();
            }
        });
        let mut got = Vec::new();
        while got.len() < 4 {
            let g = rx.read(usize::MAX).unwrap();
            got.extend(g.iter().copied());
            g.commit();
            thread::yield_now();
        }
        assert_eq!(got, vec![1, 2, 3, 4]);
        t.join().unwrap();
    });
}

/// A full ring refuses, then accepts once the consumer releases a slot.
#[test]
fn full_ring() {
    loom::model(|| {
        let (mut tx, mut rx) = records(2);
        assert_eq!(tx.push_slice(&[1, 2]).unwrap(), 2);
        assert!(matches!(tx.try_push(3), Err(record::PushError::Full(3))));
        let t = thread::spawn(move || {
            let mut v = 3;
            loop {
                match tx.try_push(v) {
                    Ok(()) => break,
                    Err(record::PushError::Full(back)) => {
                        v = back;
                        thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        assert_eq!(pop_n(&mut rx, 3), vec![1, 2, 3]);
        t.join().unwrap();
    });
}

/// Frames in a 64-byte ring: the third 16-byte frame does not fit before the end, so the
/// producer writes a padding frame and starts over at offset 0 while the consumer reads.
#[test]
fn frame_wrap_with_padding() {
    loom::model(|| {
        let (mut tx, mut rx) = frames(64);
        let t = thread::spawn(move || {
            for i in 1..=3u8 {
                loop {
                    match tx.try_reserve(16) {
                        Ok(mut g) => {
                            g.bytes_mut().fill(i);
                            g.commit(u32::from(i));
                            break;
                        }
                        Err(frame::ReserveError::Full { .. }) => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut next = 1u8;
        while next <= 3 {
            match rx.try_read().unwrap() {
                Some(f) => {
                    assert_eq!(f.kind(), u32::from(next));
                    assert!(f.payload().iter().all(|&b| b == next));
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}

/// The doorbell never loses a wake-up: a consumer that announces sleep, re-checks and sleeps
/// is always woken by a producer that publishes and rings, in every interleaving. A lost
/// wake-up leaves the consumer asleep forever, which loom reports as a deadlock.
#[test]
fn doorbell_no_lost_wakeup() {
    loom::model(|| {
        let (mut tx, mut rx) = records(2);
        let bell = Arc::new(Doorbell::new());
        let bell2 = Arc::clone(&bell);
        let t = thread::spawn(move || {
            for v in 1..=2u64 {
                tx.try_push(v).unwrap();
                bell2.ring();
            }
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(v) = rx.try_pop().unwrap() {
                got.push(v);
                continue;
            }
            bell.prepare_sleep();
            if let Some(v) = rx.try_pop().unwrap() {
                bell.cancel_sleep();
                got.push(v);
                continue;
            }
            bell.sleep(None);
        }
        assert_eq!(got, vec![1, 2]);
        t.join().unwrap();
    });
}

/// The shared-memory adapter's one ordered stream over two rings: each move frame is announced
/// by a marker in the control ring, written after it. A plugin reading the control ring sees
/// every item in the order the host wrote it, and at each marker the move frame is already
/// there (its commit happened before the marker's). With the move frame's commit weakened to
/// Relaxed, loom finds a reader that sees the marker and an empty moves ring.
#[test]
fn stream_over_two_rings_keeps_order() {
    use plugbus::fastpath::MoveRecord;
    use plugbus::transport::Incoming;
    use plugbus::transport::shm::{poll_stream, send_moves};
    loom::model(|| {
        let (mut moves_tx, mut moves_rx) = frames(256);
        let (mut control_tx, mut control_rx) = frames(64);
        let t = thread::spawn(move || {
            control_tx.try_push(1, &[1; 8]).unwrap();
            let record = MoveRecord::new([7; 16], [1.0, 2.0, 3.0], 4.0, 5.0);
            assert!(send_moves(&mut moves_tx, &mut control_tx, 9, 0, &[record]).unwrap());
            while control_tx.try_push(1, &[2; 8]).is_err() {
                thread::yield_now();
            }
        });
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let n = poll_stream(&mut moves_rx, &mut control_rx, 3, &mut |item| match item {
                Incoming::Host(bytes) => seen.push(format!("host {}", bytes[0])),
                Incoming::Moves { header, records } => {
                    assert_eq!((records.len(), records[0].uuid, records[0].y), (1, [7; 16], 2.0));
                    seen.push(format!("moves {}", header.tick));
                }
            })
            .unwrap();
            if n == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(seen, ["host 1", "moves 9", "host 2"]);
        t.join().unwrap();
    });
}
