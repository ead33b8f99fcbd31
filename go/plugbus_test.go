package plugbus

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// examplePlugin is the absolute path of a built example plugin; the test fails (it does not
// skip) when it is missing.
func examplePlugin(tb testing.TB, name string) string {
	tb.Helper()
	p, err := filepath.Abs(filepath.Join("..", "target", "release", "examples", name))
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		tb.Fatalf("example plugin %s is missing (%v): run `cargo build --release --examples` in the repository root first", p, err)
	}
	return p
}

type plugin struct {
	id   string
	args []string
}

func configFor(tb testing.TB, plugins ...plugin) string {
	var b strings.Builder
	b.WriteString("[host]\nresponse_timeout_ms = 500\nhello_timeout_ms = 10000\n")
	for _, p := range plugins {
		fmt.Fprintf(&b, "[[plugin]]\nid = %q\ncommand = %q\nrequired = true\n", p.id, examplePlugin(tb, p.id))
		if len(p.args) > 0 {
			q := make([]string, len(p.args))
			for i, a := range p.args {
				q[i] = strconv.Quote(a)
			}
			fmt.Fprintf(&b, "args = [%s]\n", strings.Join(q, ", "))
		}
	}
	return b.String()
}

// startHost starts a host with the given plugins and closes it when the test ends.
func startHost(tb testing.TB, plugins ...plugin) *Host {
	tb.Helper()
	h, err := Start(configFor(tb, plugins...))
	if err != nil {
		tb.Fatalf("Start: %v", err)
	}
	tb.Cleanup(func() { _ = h.Close("test cleanup") })
	return h
}

func chatFilter(args ...string) plugin {
	return plugin{id: "chat_filter", args: append([]string{"--banned", "darn", "--rewrite", "heck=h*ck"}, args...)}
}

func moveCounter(args ...string) plugin { return plugin{id: "move_counter", args: args} }

func code(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// tickOnce runs one empty tick.
func tickOnce(t *testing.T, h *Host) {
	t.Helper()
	tk, err := h.BeginTick()
	if err != nil {
		t.Fatalf("BeginTick: %v", err)
	}
	if err := tk.End(); err != nil {
		t.Fatalf("End: %v", err)
	}
}

// dispatch runs one tick dispatching f's events and waits for each outcome.
func dispatch(t *testing.T, h *Host, f func(tk *Tick) []Pending) []Outcome {
	t.Helper()
	tk, err := h.BeginTick()
	if err != nil {
		t.Fatalf("BeginTick: %v", err)
	}
	ps := f(tk)
	if err := tk.End(); err != nil {
		t.Fatalf("End: %v", err)
	}
	var out []Outcome
	for _, p := range ps {
		o, err := h.Wait(p, time.Now().Add(5*time.Second))
		if err != nil {
			t.Fatalf("Wait(%d): %v", p, err)
		}
		if o.Late != 0 {
			t.Fatalf("Wait(%d): %d plugins late: %+v", p, o.Late, o)
		}
		out = append(out, o)
	}
	return out
}

func chat(t *testing.T, tk *Tick, uuid, name, msg string) Pending {
	t.Helper()
	p, err := tk.DispatchChat(uuid, name, msg)
	if err != nil {
		t.Fatalf("DispatchChat(%q): %v", msg, err)
	}
	return p
}

// awaitActions ticks until n actions were drained (or 5 s passed).
func awaitActions(t *testing.T, h *Host, n int) []Action {
	t.Helper()
	var got []Action
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < n && time.Now().Before(deadline) {
		a, err := h.DrainActions()
		if err != nil {
			t.Fatalf("DrainActions: %v", err)
		}
		got = append(got, a...)
		if len(got) < n {
			tickOnce(t, h)
			time.Sleep(5 * time.Millisecond)
		}
	}
	if len(got) < n {
		t.Fatalf("got %d actions within 5 s, want %d: %+v", len(got), n, got)
	}
	return got
}

// TestChatFilter: chat_filter cancels "oh darn", rewrites "what the heck", passes "hello"; its
// block messages arrive as send-chat actions (two in one tick, none lost); /filterstats is
// answered with a send-chat action to the player who typed it.
func TestChatFilter(t *testing.T) {
	h := startHost(t, chatFilter())
	const alice, bob = "00000000-0000-0000-0000-00000000a11c", "00000000-0000-0000-0000-000000000b0b"
	o := dispatch(t, h, func(tk *Tick) []Pending {
		return []Pending{
			chat(t, tk, alice, "alice", "oh darn"),
			chat(t, tk, alice, "alice", "what the heck"),
			chat(t, tk, alice, "alice", "hello"),
			chat(t, tk, bob, "bob", "DARN it"),
		}
	})
	if !o[0].Cancelled || o[0].Answered != 1 {
		t.Errorf("oh darn: want cancelled, got %+v", o[0])
	}
	t.Logf("cancelled outcome: %+v", o[0])
	if o[1].Cancelled || !o[1].Changed || !o[1].HasChat || o[1].Chat != "what the h*ck" || len(o[1].Result) == 0 {
		t.Errorf("what the heck: want rewritten to %q, got %+v", "what the h*ck", o[1])
	}
	if o[2].Cancelled || o[2].Changed || o[2].HasChat || o[2].Result != nil || o[2].Answered != 1 {
		t.Errorf("hello: want unchanged, got %+v", o[2])
	}
	if !o[3].Cancelled {
		t.Errorf("DARN it: want cancelled, got %+v", o[3])
	}
	if o[0].EventID == o[1].EventID || o[0].EventID == 0 {
		t.Errorf("event ids: %d %d", o[0].EventID, o[1].EventID)
	}

	acts := awaitActions(t, h, 2)
	targets := map[string]bool{}
	for _, a := range acts {
		if a.Plugin != "chat_filter" || a.Kind != ActionKindSendChat || a.SendChat == nil || len(a.Data) == 0 {
			t.Fatalf("want a send-chat action from chat_filter, got %+v", a)
		}
		if !strings.Contains(a.SendChat.Message, "blocked") {
			t.Errorf("block notice text: %q", a.SendChat.Message)
		}
		targets[a.SendChat.Target] = true
	}
	if len(acts) != 2 || !targets[alice] || !targets[bob] {
		t.Errorf("want one block notice for alice and one for bob, got %+v", acts)
	}

	o = dispatch(t, h, func(tk *Tick) []Pending {
		p, err := tk.DispatchCommand(bob, "bob", "/filterstats")
		if err != nil {
			t.Fatalf("DispatchCommand: %v", err)
		}
		return []Pending{p}
	})
	if o[0].Cancelled || o[0].Answered != 1 {
		t.Errorf("/filterstats outcome: %+v", o[0])
	}
	acts = awaitActions(t, h, 1)
	a := acts[0]
	if len(acts) != 1 || a.SendChat == nil || a.SendChat.Target != bob ||
		a.SendChat.Message != "chat filter: 2 blocked, 1 rewritten, 1 passed" {
		t.Errorf("want the stats send-chat to bob, got %+v (send-chat %+v)", acts, a.SendChat)
	}

	// The plugin logs each block through the bus (not stdout): two lines.
	var logs []Log
	deadline := time.Now().Add(5 * time.Second)
	for len(logs) < 2 && time.Now().Before(deadline) {
		l, err := h.Logs()
		if err != nil {
			t.Fatalf("Logs: %v", err)
		}
		logs = append(logs, l...)
		tickOnce(t, h)
	}
	if len(logs) != 2 || logs[0].Plugin != "chat_filter" || logs[0].Level != "info" || !strings.Contains(logs[0].Message, "blocked a message from") {
		t.Errorf("logs: %+v", logs)
	}
}

var metricRE = regexp.MustCompile(`(?m)^plugbus_plugin_total\{plugin="([^"]+)",what="([^"]+)"\} (\d+)$`)

// pluginMetric reads plugbus_plugin_total{plugin=..., what=...} from the metrics text.
func pluginMetric(t *testing.T, text, plugin, what string) int64 {
	t.Helper()
	for _, m := range metricRE.FindAllStringSubmatch(text, -1) {
		if m[1] == plugin && m[2] == what {
			n, _ := strconv.ParseInt(m[3], 10, 64)
			return n
		}
	}
	t.Fatalf("no plugbus_plugin_total{plugin=%q,what=%q} in the metrics:\n%s", plugin, what, text)
	return 0
}

func players(n int) []Move {
	moves := make([]Move, n)
	for i := range moves {
		moves[i].UUID[15] = byte(i + 1)
		moves[i].UUID[6] = 0x40
	}
	return moves
}

// TestMovesDelivered: 20 players' moves at ~100 ticks/s for 1.2 s reach move_counter: the
// metrics count every record as sent, none conflated or overflowed.
func TestMovesDelivered(t *testing.T) {
	h := startHost(t, moveCounter())
	moves := players(20)
	ticks := 0
	start := time.Now()
	next := start
	for time.Since(start) < 1200*time.Millisecond {
		tk, err := h.BeginTick()
		if err != nil {
			t.Fatal(err)
		}
		for i := range moves {
			moves[i].X = float64(ticks) * 0.1
			moves[i].Yaw = float32(i)
		}
		if err := tk.PublishMoves(moves); err != nil {
			t.Fatal(err)
		}
		if err := tk.End(); err != nil {
			t.Fatal(err)
		}
		ticks++
		next = next.Add(10 * time.Millisecond)
		time.Sleep(time.Until(next))
	}
	text, err := h.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("metrics after %d ticks:\n%s", ticks, text)
	sent := pluginMetric(t, text, "move_counter", "moves_sent")
	if want := int64(ticks * len(moves)); sent != want {
		t.Errorf("moves_sent = %d, want %d (%d ticks x %d players)", sent, want, ticks, len(moves))
	}
	if n := pluginMetric(t, text, "move_counter", "overflowed_frames"); n != 0 {
		t.Errorf("overflowed_frames = %d", n)
	}
	if n := pluginMetric(t, text, "move_counter", "frames_sent"); n < int64(ticks) {
		t.Errorf("frames_sent = %d < %d ticks", n, ticks)
	}
	if err := h.Close("test over"); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// TestKillAndRestart: a SIGKILLed chat_filter is restarted by the host (new pid, ready again)
// while the host keeps ticking, filters again, and the notices tell of the disconnect and restart.
func TestKillAndRestart(t *testing.T) {
	h := startHost(t, chatFilter())
	pid, err := h.PluginPID("chat_filter")
	if err != nil || pid <= 0 {
		t.Fatalf("PluginPID: %d, %v", pid, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %d: %v", pid, err)
	}
	deadline := time.Now().Add(20 * time.Second)
	newPID := 0
	for {
		tickOnce(t, h)
		p, err := h.PluginPID("chat_filter")
		if err == nil && p != pid {
			ready, err := h.PluginReady("chat_filter")
			if err != nil {
				t.Fatalf("PluginReady: %v", err)
			}
			if ready {
				newPID = p
				break
			}
		} else if err != nil && code(err) != ErrNotFound {
			t.Fatalf("PluginPID while restarting: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("chat_filter not restarted within 20 s (pid %d, last %d, %v)", pid, p, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("chat_filter pid %d -> %d", pid, newPID)
	// The killed process was reaped (no zombie left behind).
	for deadline := time.Now().Add(5 * time.Second); !gone(pid); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("killed chat_filter %d still exists (not reaped?)", pid)
		}
	}
	o := dispatch(t, h, func(tk *Tick) []Pending {
		return []Pending{chat(t, tk, "00000000-0000-0000-0000-000000000001", "carol", "darn")}
	})
	if !o[0].Cancelled {
		t.Errorf("after the restart, darn: want cancelled, got %+v", o[0])
	}
	notices, err := h.Notices()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("notices: %+v", notices)
	var disconnected, restarted bool
	for _, n := range notices {
		if n.Plugin != "chat_filter" {
			continue
		}
		disconnected = disconnected || strings.HasPrefix(n.Text, "disconnected")
		restarted = restarted || strings.HasPrefix(n.Text, "restarted")
	}
	if !disconnected || !restarted {
		t.Errorf("want a disconnected and a restarted notice for chat_filter, got %+v", notices)
	}
	text, err := h.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if n := pluginMetric(t, text, "chat_filter", "restarts"); n != 1 {
		t.Errorf("restarts = %d, want 1", n)
	}
}

// gone reports whether process pid no longer exists.
func gone(pid int) bool { return syscall.Kill(pid, 0) == syscall.ESRCH }

// TestCloseStopsPlugins: after Close the plugin processes are gone, every call on the closed
// host fails with ErrClosed, and a second Close is an error from the C library, not a crash.
func TestCloseStopsPlugins(t *testing.T) {
	h := startHost(t, chatFilter(), moveCounter())
	var pids []int
	for _, id := range []string{"chat_filter", "move_counter"} {
		pid, err := h.PluginPID(id)
		if err != nil {
			t.Fatalf("PluginPID(%s): %v", id, err)
		}
		pids = append(pids, pid)
	}
	tickOnce(t, h)
	if err := h.Close("test over"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, pid := range pids {
		deadline := time.Now().Add(5 * time.Second)
		for !gone(pid) {
			if time.Now().After(deadline) {
				state, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				t.Fatalf("plugin process %d still exists 5 s after Close: %s", pid, state)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, err := h.BeginTick(); code(err) != ErrClosed {
		t.Errorf("BeginTick after Close: want ErrClosed, got %v", err)
	}
	if _, err := h.Metrics(); code(err) != ErrClosed {
		t.Errorf("Metrics after Close: want ErrClosed, got %v", err)
	}
	if _, err := h.PluginPID("chat_filter"); code(err) != ErrClosed {
		t.Errorf("PluginPID after Close: want ErrClosed, got %v", err)
	}
	if _, err := h.Wait(1, time.Now()); code(err) != ErrClosed {
		t.Errorf("Wait after Close: want ErrClosed, got %v", err)
	}
	err := h.Close("again")
	if code(err) != ErrClosed || !strings.Contains(err.Error(), "PLUGBUS_ERR_CLOSED") {
		t.Errorf("second Close: want PLUGBUS_ERR_CLOSED from the C library, got %v", err)
	}
}

// TestArgumentErrors: bad arguments and calls in the wrong state are errors with the right
// code and message, never crashes.
func TestArgumentErrors(t *testing.T) {
	if _, err := Start("[host]\nresponse_timeout_ms = \"soon\"\n"); code(err) != ErrInvalidArgument {
		t.Errorf("Start with a bad config: want ErrInvalidArgument, got %v", err)
	}
	if _, err := Start("[host\n"); code(err) != ErrInvalidArgument {
		t.Errorf("Start with bad TOML: want ErrInvalidArgument, got %v", err)
	}
	if _, err := StartFile("/nonexistent/plugins.toml"); code(err) != ErrNotFound {
		t.Errorf("StartFile of a missing file: want ErrNotFound, got %v", err)
	}

	h := startHost(t, chatFilter())
	// Outside a tick.
	if err := h.tick.End(); code(err) != ErrBadState {
		t.Errorf("End outside a tick: want ErrBadState, got %v", err)
	}
	if _, err := h.tick.DispatchChat("u", "n", "m"); code(err) != ErrBadState {
		t.Errorf("DispatchChat outside a tick: want ErrBadState, got %v", err)
	}
	tk, err := h.BeginTick()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.BeginTick(); code(err) != ErrBadState || !strings.Contains(err.Error(), "already in progress") {
		t.Errorf("BeginTick twice: want ErrBadState, got %v", err)
	}
	_, err = tk.DispatchChat("u", "n", "bad \xff utf-8")
	if code(err) != ErrInvalidArgument || !strings.Contains(err.Error(), "UTF-8") {
		t.Errorf("DispatchChat with invalid UTF-8: want ErrInvalidArgument mentioning UTF-8, got %v", err)
	}
	if err := tk.PublishJoin("\xc3", "n"); code(err) != ErrInvalidArgument {
		t.Errorf("PublishJoin with invalid UTF-8: want ErrInvalidArgument, got %v", err)
	}
	if err := tk.PublishEvent([]byte{0xff, 0xff, 0xff}); code(err) != ErrInvalidArgument {
		t.Errorf("PublishEvent of garbage: want ErrInvalidArgument, got %v", err)
	}
	if _, err := tk.DispatchEvent(nil); code(err) != ErrInvalidArgument {
		t.Errorf("DispatchEvent of nothing: want ErrInvalidArgument, got %v", err)
	}
	if err := tk.PublishMoves(nil); err != nil {
		t.Errorf("PublishMoves(nil): %v", err)
	}
	p := chat(t, tk, "u", "n", "hello")
	if err := tk.End(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Wait(p, time.Now().Add(2*time.Hour)); code(err) != ErrInvalidArgument {
		t.Errorf("Wait over an hour: want ErrInvalidArgument, got %v", err)
	}
	if _, err := h.Wait(p, time.Now().Add(5*time.Second)); err != nil {
		t.Errorf("Wait: %v", err)
	}
	_, err = h.Wait(p, time.Now().Add(time.Second))
	if code(err) != ErrInvalidArgument || !strings.Contains(err.Error(), fmt.Sprintf("no event %d ", p)) {
		t.Errorf("Wait on a taken outcome: want ErrInvalidArgument, got %v", err)
	}
	if _, _, err := h.Poll(Pending(987654321)); code(err) != ErrInvalidArgument {
		t.Errorf("Poll of an unknown pending: want ErrInvalidArgument, got %v", err)
	}
	if _, err := h.Wait(Pending(987654321), time.Now()); code(err) != ErrInvalidArgument {
		t.Errorf("Wait on an unknown pending: want ErrInvalidArgument, got %v", err)
	}
	if _, err := h.PluginPID("no_such_plugin"); code(err) != ErrNotFound {
		t.Errorf("PluginPID of an unknown plugin: want ErrNotFound, got %v", err)
	}
	if _, err := h.PluginPID("\xff"); code(err) != ErrInvalidArgument {
		t.Errorf("PluginPID with invalid UTF-8: want ErrInvalidArgument, got %v", err)
	}
	if ok, err := h.PluginReady("no_such_plugin"); ok || code(err) != ErrNotFound {
		t.Errorf("PluginReady of an unknown plugin: want false and ErrNotFound, got %v, %v", ok, err)
	}
	if err := h.SendActionResult("no_such_plugin", nil); code(err) != ErrNotFound {
		t.Errorf("SendActionResult to an unknown plugin: want ErrNotFound, got %v", err)
	}
	if err := h.SendActionResult("chat_filter", []byte{0xff}); code(err) != ErrInvalidArgument {
		t.Errorf("SendActionResult of garbage: want ErrInvalidArgument, got %v", err)
	}
	tickOnce(t, h)
	// A shutdown never fails on its reason: invalid UTF-8 is replaced, and the host is closed.
	if err := h.Close("\xff"); err != nil {
		t.Errorf("Close with invalid UTF-8: want it closed, got %v", err)
	}
	if _, err := h.BeginTick(); code(err) != ErrClosed {
		t.Errorf("BeginTick after Close: want ErrClosed, got %v", err)
	}
	var nilHost *Host
	if _, err := nilHost.BeginTick(); err == nil {
		t.Errorf("BeginTick on a nil *Host: want an error")
	}
}

// TestPollOutcome: Poll reports a pending outcome as not ready, then takes it once.
func TestPollOutcome(t *testing.T) {
	h := startHost(t, chatFilter())
	tk, err := h.BeginTick()
	if err != nil {
		t.Fatal(err)
	}
	p := chat(t, tk, "u", "n", "what the heck")
	if err := tk.End(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		o, ok, err := h.Poll(p)
		if err != nil {
			t.Fatalf("Poll: %v", err)
		}
		if ok {
			if o.Chat != "what the h*ck" || !o.HasChat {
				t.Errorf("Poll outcome: %+v", o)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no outcome within 5 s")
		}
		time.Sleep(time.Millisecond)
	}
	if _, _, err := h.Poll(p); code(err) != ErrInvalidArgument {
		t.Errorf("Poll of a taken outcome: want ErrInvalidArgument, got %v", err)
	}
}

// TestErrorMessagesPerCall: many goroutines (free to move between OS threads between cgo
// calls) fail calls on their own hosts at once; every error carries the message of its own
// call, because the wrapper reads plugbus_last_error in the same C call.
func TestErrorMessagesPerCall(t *testing.T) {
	const n = 8
	hosts := make([]*Host, n)
	for i := range hosts {
		h, err := Start("[host]\nresponse_timeout_ms = 500\n")
		if err != nil {
			t.Fatalf("Start with no plugins: %v", err)
		}
		hosts[i] = h
		t.Cleanup(func() { _ = h.Close("") })
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range hosts {
		wg.Add(1)
		go func(i int, h *Host) {
			defer wg.Done()
			for j := 0; j < 2000; j++ {
				p := Pending(i*1_000_000 + j + 1)
				_, err := h.Wait(p, time.Now())
				if !strings.Contains(fmt.Sprint(err), fmt.Sprintf("no event %d ", p)) {
					errs <- fmt.Errorf("goroutine %d, Wait(%d): got %v", i, p, err)
					return
				}
			}
		}(i, hosts[i])
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestConcurrentUseRefused: a call on a host while another call on it runs is ErrBadState.
func TestConcurrentUseRefused(t *testing.T) {
	h, err := Start("[host]\n")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close("") })
	var wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[int]int{}
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				_, err := h.Metrics()
				mu.Lock()
				counts[code(err)]++
				mu.Unlock()
				if err != nil && code(err) != ErrBadState {
					t.Errorf("Metrics: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("outcomes by code: %v", counts)
	if counts[0] == 0 {
		t.Errorf("no call succeeded: %v", counts)
	}
}

// TestMoveLayout: Move is plugbus_move_record (also checked at compile time).
func TestMoveLayout(t *testing.T) {
	var m Move
	if unsafe.Sizeof(m) != 48 || unsafe.Alignof(m) != 8 || unsafe.Offsetof(m.X) != 16 || unsafe.Offsetof(m.Y) != 24 ||
		unsafe.Offsetof(m.Z) != 32 || unsafe.Offsetof(m.Yaw) != 40 || unsafe.Offsetof(m.Pitch) != 44 {
		t.Fatalf("Move layout: size %d", unsafe.Sizeof(m))
	}
}

// TestPublishMovesAllocatesNothing: a tick publishing 100 moves allocates nothing on the Go side.
func TestPublishMovesAllocatesNothing(t *testing.T) {
	h := startHost(t, moveCounter())
	moves := players(100)
	allocs := testing.AllocsPerRun(500, func() {
		tk, err := h.BeginTick()
		if err != nil {
			t.Fatal(err)
		}
		if err := tk.PublishMoves(moves); err != nil {
			t.Fatal(err)
		}
		if err := tk.End(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("BeginTick+PublishMoves(100)+End allocates %v times per tick, want 0", allocs)
	}
	// Dispatching a chat message (three strings passed as pointer+length) allocates nothing either.
	tk, err := h.BeginTick()
	if err != nil {
		t.Fatal(err)
	}
	uuid, name, msg := "00000000-0000-0000-0000-000000000001", "dave", "hello there"
	allocs = testing.AllocsPerRun(500, func() {
		if _, err := tk.DispatchChat(uuid, name, msg); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("DispatchChat allocates %v times per call, want 0", allocs)
	}
	if err := tk.End(); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkPublishMoves100(b *testing.B) {
	h := startHost(b, moveCounter())
	moves := players(100)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tk, err := h.BeginTick()
		if err != nil {
			b.Fatal(err)
		}
		if err := tk.PublishMoves(moves); err != nil {
			b.Fatal(err)
		}
		if err := tk.End(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDispatchChatWait(b *testing.B) {
	h := startHost(b, chatFilter("--wait", "spin"))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tk, err := h.BeginTick()
		if err != nil {
			b.Fatal(err)
		}
		p, err := tk.DispatchChat("00000000-0000-0000-0000-000000000001", "erin", "hello")
		if err != nil {
			b.Fatal(err)
		}
		if err := tk.End(); err != nil {
			b.Fatal(err)
		}
		o, err := h.Wait(p, time.Now().Add(time.Second))
		if err != nil || o.Late != 0 || o.Answered != 1 {
			b.Fatalf("Wait: %+v %v", o, err)
		}
	}
}

// BenchmarkCgoCall: one cgo call to a C function that does nothing.
func BenchmarkCgoCall(b *testing.B) {
	for i := 0; i < b.N; i++ {
		cgoNoop()
	}
}

// BenchmarkStatusName: plugbus_status_name plus the copy of its result into a Go string.
func BenchmarkStatusName(b *testing.B) {
	for i := 0; i < b.N; i++ {
		_ = StatusName(ErrBadState)
	}
}
