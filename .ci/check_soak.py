"""Checks the JSON of a short `plugbus soak`: it sampled every second, the host's open fds did not
grow after warm-up, no critical event was lost, nothing was left behind. RSS growth is printed,
not gated: a short run's warm-up is too short for it (the 10-minute soak gates it)."""
import json
import sys

j = json.load(open(sys.argv[1]))
s, r = j["soak"], j["load"]
errors = []
samples = r.get("resource_samples", [])
if len(samples) < int(r["seconds"]) - 1:
    errors.append(f"{len(samples)} samples over {r['seconds']} s")
if any(x["rss_kib"] <= 0 or x["fds"] <= 0 for x in samples):
    errors.append("a sample without RSS or fds")
if s["fds_end"] > s["fds_warmup"] or s["fds_max"] > s["fds_warmup"]:
    errors.append(f"open fds grew after warm-up: {s['fds_warmup']} -> max {s['fds_max']}, end {s['fds_end']}")
if r.get("critical_lost", 1) != 0:
    errors.append(f"critical_lost = {r.get('critical_lost')}")
if r.get("segments_left") != 0 or r.get("memfds_left") != 0:
    errors.append(f"left behind: {r.get('segments_left')} segments, {r.get('memfds_left')} memfds")
if r.get("ticks", 0) < r["tps"] * (r["seconds"] - 1):
    errors.append(f"only {r.get('ticks')} ticks")
if errors:
    print("soak check failed:")
    for e in errors:
        print("  -", e)
    sys.exit(1)
t = r["host_tick_ns"]
print(f"soak check ok: {len(samples)} samples, fds {s['fds_warmup']} flat, RSS {s['rss_warmup_kib']} -> "
      f"{s['rss_end_kib']} KiB ({s['rss_growth_pct']:.2f} %, not gated here), 0 critical lost, "
      f"tick p50 {t['p50'] / 1000:.0f} us p99 {t['p99'] / 1000:.0f} us")
