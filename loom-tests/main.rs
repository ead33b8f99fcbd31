//! Loom model checks of the rings and the doorbell.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release --test loom`.
//!
//! The ring code under test is the library's own (compiled against loom's atomics through
//! `plugbus::sync`); payload bytes are reported to loom's race detector by `AccessTracker`, so
//! a missing happens-before between a write and a read of the same slot fails the model.
//! Capacities are tiny (32 to 256 bytes) so the whole state space is explored.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use plugbus::ring::{Doorbell, RegionRef, frame};

fn frames(cap: usize) -> (frame::Producer, frame::Consumer) {
    frame::channel(RegionRef::heap(frame::region_size(cap))).unwrap()
}

/// Pushes `v` as a frame of 8 bytes (16 in the ring), yielding while the ring is full.
fn push_u64(tx: &mut frame::Producer, v: u64) {
    loop {
        match tx.try_push(1, &v.to_ne_bytes()) {
            Ok(()) => return,
            Err(frame::ReserveError::Full { .. }) => thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
}

/// The value of an 8-byte frame.
fn value(f: &frame::Frame<'_>) -> u64 {
    u64::from_ne_bytes(f.payload().try_into().expect("an 8-byte frame"))
}

/// Reads `n` 8-byte frames, yielding while empty.
fn read_n(rx: &mut frame::Consumer, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match rx.try_read().unwrap() {
            Some(f) => got.push(value(&f)),
            None => thread::yield_now(),
        }
    }
    got
}

/// One at a time through a 32-byte ring that holds two 16-byte frames: every value arrives, in
/// order, and the third frame reuses the first one's bytes without racing its reader.
#[test]
fn frames_one_at_a_time_two_fit() {
    loom::model(|| {
        let (mut tx, mut rx) = frames(32);
        let t = thread::spawn(move || {
            for v in 1..=3u64 {
                push_u64(&mut tx, v);
            }
        });
        assert_eq!(read_n(&mut rx, 3), vec![1, 2, 3]);
        t.join().unwrap();
    });
}

/// A move frame of two records is published with one tail store and read in place: the
/// consumer sees the whole frame or nothing, never a record the producer has not written.
#[test]
fn move_frame_published_whole() {
    use plugbus::fastpath::{self, MoveRecord};
    loom::model(|| {
        let (mut tx, mut rx) = frames(256);
        let moves = [
            MoveRecord::new([1; 16], [1.0, 2.0, 3.0], 4.0, 5.0),
            MoveRecord::new([2; 16], [6.0, 7.0, 8.0], 9.0, 10.0),
        ];
        let t = thread::spawn(move || {
            assert_eq!(fastpath::write_frame(&mut tx, 7, 0, &moves).unwrap(), 1);
        });
        loop {
            if let Some(f) = rx.try_read().unwrap() {
                let (header, records) = fastpath::parse(f.payload()).unwrap();
                assert_eq!((header.tick, records), (7, &moves[..]));
                break;
            }
            thread::yield_now();
        }
        t.join().unwrap();
    });
}

/// A full ring refuses, then accepts once the consumer releases a frame.
#[test]
fn full_ring() {
    loom::model(|| {
        let (mut tx, mut rx) = frames(32);
        push_u64(&mut tx, 1);
        push_u64(&mut tx, 2);
        assert!(matches!(
            tx.try_push(1, &3u64.to_ne_bytes()),
            Err(frame::ReserveError::Full { .. })
        ));
        let t = thread::spawn(move || push_u64(&mut tx, 3));
        assert_eq!(read_n(&mut rx, 3), vec![1, 2, 3]);
        t.join().unwrap();
    });
}

/// Releases the consumer defers (it has not caught up with the tail it read, and less than a
/// quarter of the ring is unpublished) still reach the producer: a 64-byte ring full of eight
/// empty frames (8 bytes each, a quarter is 16), and a ninth that waits for published space.
#[test]
fn deferred_release_reaches_the_producer() {
    loom::model(|| {
        let (mut tx, mut rx) = frames(64);
        for kind in 1..=8u32 {
            tx.try_push(kind, &[]).unwrap();
        }
        let t = thread::spawn(move || {
            loop {
                match tx.try_push(9, &[]) {
                    Ok(()) => break,
                    Err(frame::ReserveError::Full { .. }) => thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut next = 1u32;
        while next <= 9 {
            match rx.try_read().unwrap() {
                Some(f) => {
                    assert_eq!(f.kind(), next);
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
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
        let (mut tx, mut rx) = frames(32);
        let bell = Arc::new(Doorbell::new());
        let bell2 = Arc::clone(&bell);
        let t = thread::spawn(move || {
            for v in 1..=2u64 {
                tx.try_push(1, &v.to_ne_bytes()).unwrap();
                bell2.ring();
            }
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(f) = rx.try_read().unwrap() {
                got.push(value(&f));
                continue;
            }
            bell.prepare_sleep();
            if let Some(f) = rx.try_read().unwrap() {
                bell.cancel_sleep();
                got.push(value(&f));
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
