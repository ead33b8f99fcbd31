#!/usr/bin/env bash
# Runs every cargo-afl target one after another, SECONDS_PER_TARGET each (default 360), one
# fuzzer process at a time, from fuzz/corpus/<target>, into fuzz/out/<target>; then prints each
# target's executions, run time, crashes and hangs (from AFL++'s fuzzer_stats).
# Needs `cargo install cargo-afl` (which builds AFL++), then `cargo afl build --release` here.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-360}
targets=${TARGETS:-frame_ring move_frame envelope segment ffi}
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
for t in $targets; do
  rm -rf "out/$t"
  # -t 1000: an input that runs over a second is a hang; -m none: no memory limit (the
  # harnesses map segments); -V: stop after $secs seconds.
  cargo afl fuzz -i "corpus/$t" -o "out/$t" -t 1000 -m none -V "$secs" "target/release/$t" >"out-$t.log" 2>&1 || true
done
printf '%-12s %12s %8s %8s %8s %8s\n' target execs seconds execs/s crashes hangs
for t in $targets; do
  s=out/$t/default/fuzzer_stats
  [ -f "$s" ] || { echo "$t: no stats (see out-$t.log)"; continue; }
  get() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$s"; }
  printf '%-12s %12s %8s %8s %8s %8s\n' "$t" "$(get execs_done)" "$(get run_time)" "$(get execs_per_sec)" \
    "$(get saved_crashes)" "$(get saved_hangs)"
done
