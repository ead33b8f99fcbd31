//! The fuzz harnesses (`fuzz/src/lib.rs`) under proptest, for machines without the fuzzer: each
//! target gets arbitrary bytes and structured mutations of its seeds (bytes replaced, flipped,
//! inserted, removed; the input cut short). `PLUGBUS_FUZZ_CASES` sets the cases per target and
//! input kind (default 256; CI runs more).

#[path = "../fuzz/src/lib.rs"]
mod harness;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("PLUGBUS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (
        0..n,
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..5), 0..12),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(move |(i, edits, cut)| {
            let mut s = seeds[i].clone();
            for (pos, b, kind) in edits {
                if s.is_empty() {
                    s.push(b);
                    continue;
                }
                let p = pos % s.len();
                match kind {
                    0 => s[p] = b,
                    1 => s[p] ^= 1 << (b % 8),
                    2 => s.insert(p, b),
                    3 => {
                        s.remove(p);
                    }
                    _ => {
                        // An interesting word: all ones, zero, or a small length.
                        let w: u32 = [u32::MAX, 0, 8, 0x8000_0000][usize::from(b % 4)];
                        let end = (p + 4).min(s.len());
                        s[p..end].copy_from_slice(&w.to_le_bytes()[..end - p]);
                    }
                }
            }
            if let Some(c) = cut {
                let keep = c.index(s.len() + 1);
                if keep < s.len() && kind_cuts(&s) {
                    s.truncate(keep.max(1));
                }
            }
            s
        })
}

/// Cut one input in four: mostly whole seeds stay whole.
fn kind_cuts(s: &[u8]) -> bool {
    s.iter().fold(0u8, |a, b| a.wrapping_add(*b)) % 4 == 0
}

fn run(target: &str) {
    let (_, run_one) = *harness::TARGETS.iter().find(|(t, _)| *t == target).expect("a target");
    let seeds = harness::seeds()
        .into_iter()
        .find(|(t, _)| *t == target)
        .expect("seeds")
        .1;
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..2048), |bytes| {
            run_one(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{target}, arbitrary bytes: {e}"));
    let mut runner = TestRunner::new(config);
    runner
        .run(&mutated(seeds), |bytes| {
            run_one(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{target}, mutated seeds: {e}"));
}

#[test]
fn frame_ring() {
    run("frame_ring");
}

#[test]
fn move_frame() {
    run("move_frame");
}

#[test]
fn envelope() {
    run("envelope");
}

#[test]
fn segment() {
    run("segment");
}

#[test]
fn ffi() {
    run("ffi");
}
