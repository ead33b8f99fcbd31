"""Checks the JSON of a short load test and comparison: no critical event lost, fields sane."""
import json
import math
import sys

load = json.load(open(sys.argv[1]))
cmp_ = json.load(open(sys.argv[2]))
errors = []


def need(cond, msg):
    if not cond:
        errors.append(msg)


for key in ["players", "tps", "plugins", "seconds", "events_offered", "events_delivered",
            "moves_conflated", "critical_lost", "host_tick_ns", "publish_to_observe_ns",
            "reply_rtt_ns", "host_allocs_per_event", "plugin_cpu_percent"]:
    need(key in load, f"load: missing {key}")
if not errors:
    need(load["critical_lost"] == 0, f"load: critical_lost = {load['critical_lost']}")
    need(load["critical_out_of_order"] == 0, f"load: critical_out_of_order = {load['critical_out_of_order']}")
    need(load["events_offered"] > 0, "load: nothing offered")
    need(load["events_delivered"] > 0, "load: nothing delivered")
    # Every plugin subscribes to everything: each offered event reaches each plugin, except
    # moves conflated away for a lagging plugin.
    expect = load["events_offered"] * load["plugins"] - load["moves_conflated"]
    need(load["events_delivered"] == expect,
         f"load: delivered {load['events_delivered']} != offered x plugins - conflated = {expect}")
    for k in ["host_tick_ns", "publish_to_observe_ns", "reply_rtt_ns"]:
        p = load[k]
        need(p["count"] > 0, f"load: no {k} samples")
        need(0 < p["p50"] <= p["p99"] <= p["max"], f"load: {k} quantiles out of order: {p}")
    need(load["host_allocs_per_event"] >= 0, "load: negative allocations")
    need(len(load["plugin_cpu_percent"]) == load["plugins"], "load: plugin_cpu_percent length")
    need(all(not math.isnan(c) and c >= 0 for c in load["plugin_cpu_percent"]), "load: bad plugin cpu")

for side in ["plugbus", "baseline", "grpc", "grpc_batched"]:
    need(side in cmp_, f"compare: missing {side}")
    if side in cmp_:
        s = cmp_[side]
        for k in ["events_per_s", "messages_per_s", "p50_ns", "p99_ns", "host_cpu_ns_per_event"]:
            need(k in s and s[k] > 0, f"compare: {side}.{k} missing or not positive")
for k in ["throughput_ratio", "p99_ratio"]:
    need(k in cmp_ and cmp_[k] > 0, f"compare: {k} missing or not positive")

if errors:
    print("JSON check failed:")
    for e in errors:
        print("  -", e)
    sys.exit(1)
print(f"JSON check ok: critical_lost=0, delivered={load['events_delivered']}, "
      f"throughput_ratio={cmp_['throughput_ratio']:.1f}, p99_ratio={cmp_['p99_ratio']:.1f}")
