"""Checks the JSON of a short load test in which one plugin was killed with SIGKILL mid-run: the
host saw it and restarted it, and the plugin that was not killed lost nothing."""
import json
import sys

r = json.load(open(sys.argv[1]))
errors = []
k = r.get("kill")
lost = r.get("critical_lost_by_plugin", {})
if not k:
    errors.append("no kill report")
else:
    if k.get("detected_ms") is None:
        errors.append("the host never reported the killed plugin's disconnect")
    if k.get("ready_again_ms") is None:
        errors.append("the killed plugin never came back")
    if k.get("restarts", 0) < 1:
        errors.append("no restart")
    if set(lost) != {f"load-{i}" for i in range(r["plugins"])}:
        errors.append(f"critical_lost_by_plugin names the wrong plugins: {lost}")
    for plugin, n in lost.items():
        if plugin != k["plugin"] and n != 0:
            errors.append(f"{plugin} was not killed but lost {n} critical events")
    if sum(lost.values()) != r["critical_lost"]:
        errors.append("critical_lost is not the sum of critical_lost_by_plugin")
if r.get("critical_out_of_order", 1) != 0:
    errors.append(f"critical_out_of_order = {r.get('critical_out_of_order')}")
if errors:
    print("kill check failed:")
    for e in errors:
        print("  -", e)
    sys.exit(1)
print(f"kill check ok: {k['plugin']} seen after {k['detected_ms']:.1f} ms, back after "
      f"{k['ready_again_ms']:.1f} ms; lost per plugin {lost}; tick p99 {r['host_tick_ns']['p99'] / 1000:.0f} us")
