"""Checks the JSON of a short `plugbus loadtest --chaos` run: each kind of chaos action happened,
every killed plugin came back, no surviving plugin lost a critical event (see the report's
`chaos.definition`), no disconnect that chaos did not cause, nothing left behind."""
import json
import sys

r = json.load(open(sys.argv[1]))
errors = []
c = r.get("chaos")
if not c:
    print("chaos check failed: no chaos report")
    sys.exit(1)
kinds = c.get("actions_by_kind", {})
for kind in ("sigkill", "sigstop", "host_kill"):
    if kinds.get(kind, 0) < 1:
        errors.append(f"no {kind} action happened: {kinds}")
if len(c.get("actions", [])) != sum(kinds.values()):
    errors.append("actions_by_kind does not add up to the actions logged")
kills = kinds.get("sigkill", 0) + kinds.get("host_kill", 0)
if c.get("restarts", 0) < kills:
    errors.append(f"{kills} kills but {c.get('restarts')} restarts")
if c.get("disabled", 1) != 0:
    errors.append(f"{c.get('disabled')} plugin(s) disabled")
if c.get("unexplained_disconnects", 1) != 0:
    errors.append(f"{c.get('unexplained_disconnects')} disconnect(s) chaos did not cause: {c.get('disconnects')}")
if c.get("critical_lost_by_survivors", 1) != 0:
    errors.append(f"critical events lost by surviving plugins: {c.get('critical_lost_by_survivors_by_plugin')}")
by_plugin = c.get("critical_lost_by_survivors_by_plugin", {})
if set(by_plugin) != {f"load-{i}" for i in range(r["plugins"])}:
    errors.append(f"critical_lost_by_survivors_by_plugin names the wrong plugins: {by_plugin}")
if sum(by_plugin.values()) != c.get("critical_lost_by_survivors"):
    errors.append("critical_lost_by_survivors is not the sum over plugins")
# Every critical event a plugin missed is accounted for: lost by a survivor, lost with a downed
# incarnation, or offered while it was down.
accounted = c["critical_lost_by_survivors"] + c["critical_lost_with_downed"] + c["critical_offered_while_down"]
if accounted != r["critical_lost"]:
    errors.append(f"critical_lost {r['critical_lost']} but {accounted} accounted for")
for plugin, incs in c.get("incarnations", {}).items():
    if not incs or incs[-1].get("end") != "survived":
        errors.append(f"{plugin}: its last incarnation did not survive to the end: {incs[-1:] }")
if r.get("critical_out_of_order", 1) != 0:
    errors.append(f"critical_out_of_order = {r.get('critical_out_of_order')}")
if r.get("segments_left") != 0:
    errors.append(f"segments left in /dev/shm: {r.get('segments_left')}")
if r.get("memfds_left") != 0:
    errors.append(f"memfds left open: {r.get('memfds_left')}")
if errors:
    print("chaos check failed:")
    for e in errors:
        print("  -", e)
    sys.exit(1)
t = r["host_tick_ns"]
print(f"chaos check ok: actions {kinds}, {c['restarts']} restarts, 0 lost by survivors "
      f"({c['critical_lost_with_downed']} with downed incarnations, {c['critical_offered_while_down']} offered while down); "
      f"tick p50 {t['p50'] / 1000:.0f} us p99 {t['p99'] / 1000:.0f} us max {t['max'] / 1000:.0f} us")
