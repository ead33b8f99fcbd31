//! Replays the fuzz corpora: every committed file in `fuzz/corpus/<target>/` and every generated
//! seed goes through its harness (`fuzz/src/lib.rs`, shared with the cargo-afl targets), which
//! panics when plugbus panics on it or breaks a property. A crash the fuzzer finds is minimized
//! and committed there, so this test keeps it fixed.
//!
//! `PLUGBUS_FUZZ_WRITE_SEEDS=1` rewrites the `seed-*` files from `harness::seeds()` first.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

#[test]
fn every_corpus_file_and_seed_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let seeds = harness::seeds();
    if std::env::var_os("PLUGBUS_FUZZ_WRITE_SEEDS").is_some() {
        for (target, inputs) in &seeds {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in inputs.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
            }
        }
    }
    let mut failures = Vec::new();
    let mut runs = 0;
    for &(target, harness) in harness::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "{}: only {} corpus files", dir.display(), files.len());
        let generated = &seeds
            .iter()
            .find(|(t, _)| *t == target)
            .expect("seeds for every target")
            .1;
        assert!(!generated.is_empty(), "no seeds for {target}");
        let inputs = files
            .iter()
            .map(|f| (f.display().to_string(), std::fs::read(f).unwrap()))
            .chain(
                generated
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("{target} seed {i}"), s.clone())),
            );
        for (what, bytes) in inputs {
            runs += 1;
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| harness(&bytes))) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{what}: {msg}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{runs} corpus inputs ran clean");
}
