// Package plugbus embeds a plugbus host (the shared-memory event bus between a game server and
// plugin processes) in a Go program, through the C API of libplugbus (ffi/plugbus.h).
//
// Threading: one goroutine drives a Host. Calls on one Host must not overlap; a call made while
// another is running on the same Host fails with an *Error whose Code is ErrBadState (the Go
// side checks this before calling C, and the C side refuses concurrent calls the same way).
// Two Hosts are independent and may be driven by two goroutines.
//
// Ownership: every string and byte slice this package returns is a Go copy; nothing lent by the
// C library outlives the call that read it. Strings and slices passed in are read during the
// call only (the C side copies them) and never kept.
package plugbus

/*
#cgo CFLAGS: -I${SRCDIR}/../ffi
#cgo LDFLAGS: -L${SRCDIR}/../target/release -lplugbus -Wl,-rpath,${SRCDIR}/../target/release

#include <stdlib.h>
#include <string.h>
#include "plugbus.h"

// The result of one wrapper call: the status, the plugbus_last_error() text copied (malloc'd,
// freed by Go) when the status is a failure, and one integer or pointer out-value. The message is
// read inside the same C call as the failing function: plugbus_last_error() is per OS thread and
// a goroutine may move to another thread between two cgo calls.
typedef struct {
	int32_t status;
	char *err;
	uint64_t u;
	void *p;
} gopb_res;

// Handles and the scratch pointer cross from Go as uintptr_t: a handle is an opaque C value (a
// typed token, not an address) and the scratch is C memory, and a plain integer needs no cgo
// pointer check (which allocates on the Go side).
#define HOST ((plugbus_host *)hu)
#define SC ((gopb_scratch *)scu)

// Per-host scratch space in C memory for the out-parameters (so that Go passes no pointers to
// its own memory and allocates nothing per call).
typedef struct {
	plugbus_outcome outcome;
	int32_t chat_status;
	plugbus_str chat;
	const uint8_t *result;
	size_t result_len;
	plugbus_action action;
	plugbus_str s1, s2, s3;
	double pos[3], rot[3];
} gopb_scratch;

static gopb_res gopb_make(int32_t st) {
	gopb_res r;
	r.status = st;
	r.err = NULL;
	r.u = 0;
	r.p = NULL;
	if (st < 0) {
		const char *m = plugbus_last_error();
		size_t n = strlen(m);
		r.err = (char *)malloc(n + 1);
		if (r.err != NULL) memcpy(r.err, m, n + 1);
	}
	return r;
}

static gopb_scratch *gopb_scratch_new(void) { return (gopb_scratch *)calloc(1, sizeof(gopb_scratch)); }
static void gopb_free(void *p) { free(p); }

static gopb_res gopb_start(const char *toml, size_t len) {
	plugbus_host *h = NULL;
	gopb_res r = gopb_make(plugbus_host_start(toml, len, &h));
	r.p = h;
	return r;
}

static gopb_res gopb_start_file(const char *path) {
	plugbus_host *h = NULL;
	gopb_res r = gopb_make(plugbus_host_start_file(path, &h));
	r.p = h;
	return r;
}

static gopb_res gopb_begin_tick(uintptr_t hu) {
	uint64_t t = 0;
	gopb_res r = gopb_make(plugbus_host_begin_tick(HOST, &t));
	r.u = t;
	return r;
}

static gopb_res gopb_publish_moves(uintptr_t hu, const plugbus_move_record *recs, size_t n) {
	return gopb_make(plugbus_host_publish_moves(HOST, recs, n));
}

static gopb_res gopb_publish_event(uintptr_t hu, const uint8_t *env, size_t n) {
	return gopb_make(plugbus_host_publish_event(HOST, env, n));
}

static gopb_res gopb_dispatch_event(uintptr_t hu, const uint8_t *env, size_t n) {
	uint64_t p = 0;
	gopb_res r = gopb_make(plugbus_host_dispatch_event(HOST, env, n, &p));
	r.u = p;
	return r;
}

static gopb_res gopb_publish_join(uintptr_t hu, const char *u, size_t ul, const char *n, size_t nl) {
	return gopb_make(plugbus_host_publish_join(HOST, u, ul, n, nl));
}

static gopb_res gopb_publish_quit(uintptr_t hu, const char *u, size_t ul, const char *n, size_t nl) {
	return gopb_make(plugbus_host_publish_quit(HOST, u, ul, n, nl));
}

static gopb_res gopb_dispatch_chat(uintptr_t hu, const char *u, size_t ul, const char *n, size_t nl,
                                   const char *m, size_t ml) {
	uint64_t p = 0;
	gopb_res r = gopb_make(plugbus_host_dispatch_chat(HOST, u, ul, n, nl, m, ml, &p));
	r.u = p;
	return r;
}

static gopb_res gopb_dispatch_command(uintptr_t hu, const char *u, size_t ul, const char *n, size_t nl,
                                      const char *raw, size_t rl) {
	uint64_t p = 0;
	gopb_res r = gopb_make(plugbus_host_dispatch_command(HOST, u, ul, n, nl, raw, rl, &p));
	r.u = p;
	return r;
}

static gopb_res gopb_end_tick(uintptr_t hu) { return gopb_make(plugbus_host_end_tick(HOST)); }

// After an outcome was taken: its chat message and merged change, into the scratch.
static int32_t gopb_outcome_extras_(plugbus_host *h, gopb_scratch *sc) {
	sc->chat.ptr = NULL;
	sc->chat.len = 0;
	sc->result = NULL;
	sc->result_len = 0;
	int32_t st = plugbus_host_outcome_chat(h, &sc->chat);
	if (st < 0) return st;
	sc->chat_status = st;
	return plugbus_host_outcome_result(h, &sc->result, &sc->result_len);
}

static gopb_res gopb_poll(uintptr_t hu, uint64_t pending, uintptr_t scu) {
	int32_t st = plugbus_host_poll_outcome(HOST, pending, &SC->outcome);
	if (st == PLUGBUS_OK) {
		int32_t x = gopb_outcome_extras_(HOST, SC);
		if (x < 0) return gopb_make(x);
	}
	return gopb_make(st);
}

// plugbus_host_wait returns PLUGBUS_ERR_TIMEOUT with the outcome filled; that status is not a
// failure here (and the C side does not set plugbus_last_error for it), so it is passed in u.
static gopb_res gopb_wait(uintptr_t hu, uint64_t pending, uint64_t timeout_us, uintptr_t scu) {
	int32_t st = plugbus_host_wait(HOST, pending, timeout_us, &SC->outcome);
	if (st == PLUGBUS_OK || st == PLUGBUS_ERR_TIMEOUT) {
		int32_t x = gopb_outcome_extras_(HOST, SC);
		if (x < 0) return gopb_make(x);
		gopb_res r = gopb_make(PLUGBUS_OK);
		r.u = st == PLUGBUS_ERR_TIMEOUT;
		return r;
	}
	return gopb_make(st);
}

// Takes the next action and, for the kinds with a typed accessor, reads it into s1/s2/pos/rot.
static gopb_res gopb_next_action(uintptr_t hu, uintptr_t scu) {
	int32_t st = plugbus_host_next_action(HOST, &SC->action);
	if (st != PLUGBUS_OK) return gopb_make(st);
	SC->s1.ptr = NULL; SC->s1.len = 0;
	SC->s2.ptr = NULL; SC->s2.len = 0;
	switch (SC->action.kind) {
	case PLUGBUS_ACTION_SEND_CHAT:
		st = plugbus_host_action_send_chat(HOST, &SC->s1, &SC->s2);
		break;
	case PLUGBUS_ACTION_TELEPORT:
		st = plugbus_host_action_teleport(HOST, &SC->s1, SC->pos, SC->rot);
		break;
	case PLUGBUS_ACTION_KICK:
		st = plugbus_host_action_kick(HOST, &SC->s1, &SC->s2);
		break;
	default:
		break;
	}
	return gopb_make(st);
}

static gopb_res gopb_send_action_result(uintptr_t hu, const char *id, size_t idl, const uint8_t *b, size_t bl) {
	return gopb_make(plugbus_host_send_action_result(HOST, id, idl, b, bl));
}

static gopb_res gopb_next_notice(uintptr_t hu, uintptr_t scu) {
	return gopb_make(plugbus_host_next_notice(HOST, &SC->s1, &SC->s2));
}

static gopb_res gopb_next_log(uintptr_t hu, uintptr_t scu) {
	return gopb_make(plugbus_host_next_log(HOST, &SC->s1, &SC->s2, &SC->s3));
}

static gopb_res gopb_metrics(uintptr_t hu, uintptr_t scu) {
	return gopb_make(plugbus_host_metrics(HOST, &SC->s1));
}

static gopb_res gopb_plugin_pid(uintptr_t hu, const char *id, size_t len) {
	uint32_t pid = 0;
	gopb_res r = gopb_make(plugbus_host_plugin_pid(HOST, id, len, &pid));
	r.u = pid;
	return r;
}

static gopb_res gopb_plugin_ready(uintptr_t hu, const char *id, size_t len) {
	return gopb_make(plugbus_host_plugin_ready(HOST, id, len));
}

static gopb_res gopb_shutdown(uintptr_t hu, const char *reason, size_t len) {
	return gopb_make(plugbus_host_shutdown(HOST, reason, len));
}

// A C function that does nothing, to measure the cost of a cgo call.
static void gopb_noop(void) {}
*/
import "C"

import (
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"
)

// Status codes of the C API (plugbus_status). Negative codes are errors.
const (
	StatusOK           = 0
	StatusPending      = 2
	StatusNone         = 3
	ErrNullPointer     = -1
	ErrInvalidArgument = -2
	ErrBadState        = -3
	ErrClosed          = -4
	ErrNotFound        = -5
	ErrRefused         = -6
	ErrTimeout         = -7
	ErrHostDied        = -8
	ErrLink            = -9
	ErrProtocol        = -10
	ErrHostNotReading  = -11
	ErrIO              = -12
	ErrInternal        = -13
	ActionKindSendChat = 10 // Action.Kind of a send-chat action
	ActionKindTeleport = 11 // Action.Kind of a teleport action
	ActionKindKick     = 12 // Action.Kind of a kick action
)

// Error is a failed plugbus call: the status code (one of the Err* constants) and the message
// plugbus_last_error() gave for it on the thread that made the call.
type Error struct {
	Code    int
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("plugbus: %s: %s", StatusName(e.Code), e.Message)
}

// StatusName is the name of a status code ("PLUGBUS_ERR_BAD_STATE", ...), from
// plugbus_status_name.
func StatusName(code int) string {
	return C.GoString(C.plugbus_status_name(C.plugbus_status(code)))
}

// check turns a wrapper result into an error (nil for a non-negative status), freeing the copied
// message.
func check(r C.gopb_res) error {
	if r.status >= 0 {
		return nil
	}
	msg := ""
	if r.err != nil {
		msg = C.GoString(r.err)
		C.gopb_free(unsafe.Pointer(r.err))
	}
	return &Error{Code: int(r.status), Message: msg}
}

// Move is one player's position and rotation: exactly the C plugbus_move_record (48 bytes, no
// padding), so a []Move is handed to C as it is.
type Move struct {
	UUID       [16]byte // the player's UUID, raw bytes (RFC 4122 order)
	X, Y, Z    float64
	Yaw, Pitch float32
}

// Compile-time layout checks: each line fails to compile if the layout differs from C's.
var (
	_ [unsafe.Sizeof(Move{}) - 48]struct{}
	_ [48 - unsafe.Sizeof(Move{})]struct{}
	_ [unsafe.Sizeof(Move{}) - unsafe.Sizeof(C.plugbus_move_record{})]struct{}
	_ [unsafe.Sizeof(C.plugbus_move_record{}) - unsafe.Sizeof(Move{})]struct{}
	_ [unsafe.Offsetof(Move{}.X) - 16]struct{}
	_ [16 - unsafe.Offsetof(Move{}.X)]struct{}
	_ [unsafe.Offsetof(Move{}.Y) - 24]struct{}
	_ [24 - unsafe.Offsetof(Move{}.Y)]struct{}
	_ [unsafe.Offsetof(Move{}.Z) - 32]struct{}
	_ [32 - unsafe.Offsetof(Move{}.Z)]struct{}
	_ [unsafe.Offsetof(Move{}.Yaw) - 40]struct{}
	_ [40 - unsafe.Offsetof(Move{}.Yaw)]struct{}
	_ [unsafe.Offsetof(Move{}.Pitch) - 44]struct{}
	_ [44 - unsafe.Offsetof(Move{}.Pitch)]struct{}
	_ [unsafe.Alignof(Move{}) - 8]struct{}
	_ [8 - unsafe.Alignof(Move{})]struct{}
)

func init() {
	// The same checks against the C definition (cgo types are not constant everywhere).
	var c C.plugbus_move_record
	if unsafe.Sizeof(c) != unsafe.Sizeof(Move{}) ||
		unsafe.Offsetof(c.x) != unsafe.Offsetof(Move{}.X) ||
		unsafe.Offsetof(c.y) != unsafe.Offsetof(Move{}.Y) ||
		unsafe.Offsetof(c.z) != unsafe.Offsetof(Move{}.Z) ||
		unsafe.Offsetof(c.yaw) != unsafe.Offsetof(Move{}.Yaw) ||
		unsafe.Offsetof(c.pitch) != unsafe.Offsetof(Move{}.Pitch) {
		panic("plugbus: Move does not have the layout of plugbus_move_record")
	}
}

// strArg is a Go string's bytes as a C pointer, without copying or allocating. The C side reads
// them during the call only. Go 1.19 has no unsafe.StringData: the first word of a string
// header is its data pointer.
func strArg(s string) (*C.char, C.size_t) {
	return (*C.char)(*(*unsafe.Pointer)(unsafe.Pointer(&s))), C.size_t(len(s))
}

// bytesArg is a byte slice as a C pointer (NULL when empty).
func bytesArg(b []byte) (*C.uint8_t, C.size_t) {
	if len(b) == 0 {
		return nil, 0
	}
	return (*C.uint8_t)(unsafe.Pointer(&b[0])), C.size_t(len(b))
}

// goStr copies a lent plugbus_str.
func goStr(s C.plugbus_str) string {
	if s.len == 0 || s.ptr == nil {
		return ""
	}
	return C.GoStringN(s.ptr, C.int(s.len))
}

// Host is a running plugbus host: its plugin processes, their shared-memory links, the tick.
//
// One goroutine drives a Host: calls must not overlap (an overlapping call returns an *Error
// with Code ErrBadState, and so does the C library, which refuses concurrent calls on one host).
// The goroutine may move between OS threads between calls; error messages are read in the same
// C call as the failure, so they are never another thread's. Close it with Close.
type Host struct {
	hu     C.uintptr_t     // the plugbus_host handle (an opaque C value), as an integer
	sc     *C.gopb_scratch // out-parameters, C memory freed by Close
	scu    C.uintptr_t     // sc as an integer, for the calls
	busy   int32           // 1 while a call runs (atomic)
	closed bool
	tick   Tick
}

var errBusy = &Error{Code: ErrBadState, Message: "another goroutine is using this host: one goroutine drives a host"}
var errClosed = &Error{Code: ErrClosed, Message: "the host was closed with Close"}

// enter marks the host busy; leave must follow when it returns nil.
func (h *Host) enter() error {
	if h == nil {
		return &Error{Code: ErrNullPointer, Message: "nil *Host"}
	}
	if !atomic.CompareAndSwapInt32(&h.busy, 0, 1) {
		return errBusy
	}
	if h.closed {
		atomic.StoreInt32(&h.busy, 0)
		return errClosed
	}
	return nil
}

func (h *Host) leave() { atomic.StoreInt32(&h.busy, 0) }

func newHost(r C.gopb_res) (*Host, error) {
	if err := check(r); err != nil {
		return nil, err
	}
	sc := C.gopb_scratch_new()
	if sc == nil {
		C.gopb_shutdown(C.uintptr_t(uintptr(r.p)), nil, 0)
		return nil, &Error{Code: ErrIO, Message: "out of memory"}
	}
	h := &Host{hu: C.uintptr_t(uintptr(r.p)), sc: sc, scu: C.uintptr_t(uintptr(unsafe.Pointer(sc)))}
	h.tick.h = h
	return h, nil
}

// Start starts a host from a TOML configuration ([host] settings and [[plugin]] entries). It
// launches the plugins and returns once the required ones have connected.
func Start(configTOML string) (*Host, error) {
	p, n := strArg(configTOML)
	return newHost(C.gopb_start(p, n))
}

// StartFile starts a host from a TOML configuration file.
func StartFile(path string) (*Host, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	return newHost(C.gopb_start_file(cpath))
}

// Tick is the open tick of a Host, between BeginTick and End. A Host has one Tick value, reused
// by every BeginTick.
type Tick struct {
	h      *Host
	number uint64
}

// BeginTick begins a tick (an error if one is open). Publish and dispatch on the Tick, then End.
func (h *Host) BeginTick() (*Tick, error) {
	if err := h.enter(); err != nil {
		return nil, err
	}
	defer h.leave()
	r := C.gopb_begin_tick(h.hu)
	if err := check(r); err != nil {
		return nil, err
	}
	h.tick.number = uint64(r.u)
	return &h.tick, nil
}

// Number is the tick's number.
func (t *Tick) Number() uint64 { return t.number }

// PublishMoves stages moves for this tick (copied during the call); they go out at End.
func (t *Tick) PublishMoves(moves []Move) error {
	h := t.h
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	var p *C.plugbus_move_record
	if len(moves) > 0 {
		p = (*C.plugbus_move_record)(unsafe.Pointer(&moves[0]))
	}
	return check(C.gopb_publish_moves(h.hu, p, C.size_t(len(moves))))
}

// PublishJoin publishes a player join (uuid as text).
func (t *Tick) PublishJoin(uuid, name string) error {
	h := t.h
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	up, ul := strArg(uuid)
	np, nl := strArg(name)
	return check(C.gopb_publish_join(h.hu, up, ul, np, nl))
}

// PublishQuit publishes a player quit; no plugin sees a move of that player after it.
func (t *Tick) PublishQuit(uuid, name string) error {
	h := t.h
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	up, ul := strArg(uuid)
	np, nl := strArg(name)
	return check(C.gopb_publish_quit(h.hu, up, ul, np, nl))
}

// PublishEvent publishes an encoded df.plugin.EventEnvelope (no answer awaited).
func (t *Tick) PublishEvent(envelope []byte) error {
	h := t.h
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	p, n := bytesArg(envelope)
	return check(C.gopb_publish_event(h.hu, p, n))
}

// Pending identifies a dispatched event whose outcome is awaited (Wait or Poll takes it once).
type Pending uint64

// DispatchEvent dispatches an encoded df.plugin.EventEnvelope expecting answers.
func (t *Tick) DispatchEvent(envelope []byte) (Pending, error) {
	h := t.h
	if err := h.enter(); err != nil {
		return 0, err
	}
	defer h.leave()
	p, n := bytesArg(envelope)
	r := C.gopb_dispatch_event(h.hu, p, n)
	if err := check(r); err != nil {
		return 0, err
	}
	return Pending(r.u), nil
}

// DispatchChat dispatches a chat message typed by a player (uuid as text).
func (t *Tick) DispatchChat(uuid, name, message string) (Pending, error) {
	h := t.h
	if err := h.enter(); err != nil {
		return 0, err
	}
	defer h.leave()
	up, ul := strArg(uuid)
	np, nl := strArg(name)
	mp, ml := strArg(message)
	r := C.gopb_dispatch_chat(h.hu, up, ul, np, nl, mp, ml)
	if err := check(r); err != nil {
		return 0, err
	}
	return Pending(r.u), nil
}

// DispatchCommand dispatches the command line raw ("/home set") a player typed.
func (t *Tick) DispatchCommand(uuid, name, raw string) (Pending, error) {
	h := t.h
	if err := h.enter(); err != nil {
		return 0, err
	}
	defer h.leave()
	up, ul := strArg(uuid)
	np, nl := strArg(name)
	rp, rl := strArg(raw)
	r := C.gopb_dispatch_command(h.hu, up, ul, np, nl, rp, rl)
	if err := check(r); err != nil {
		return 0, err
	}
	return Pending(r.u), nil
}

// End ends the tick: moves go out, batches are flushed, sleeping plugins are woken.
func (t *Tick) End() error {
	h := t.h
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	return check(C.gopb_end_tick(h.hu))
}

// Outcome is a dispatched event's outcome.
type Outcome struct {
	EventID   uint64
	Cancelled bool // some plugin cancelled the event
	Changed   bool // some plugin changed it (see Result, and Chat for a chat event)
	Answered  int  // plugins that answered in time
	Late      int  // plugins that did not (counted as "no change")
	Elapsed   time.Duration
	Chat      string // the rewritten chat message, when HasChat
	HasChat   bool
	Result    []byte // the merged change as an encoded df.plugin.EventResult (nil if none)
}

// outcome copies the outcome in the scratch.
func (h *Host) outcome() Outcome {
	sc := h.sc
	o := Outcome{
		EventID:   uint64(sc.outcome.event_id),
		Cancelled: bool(sc.outcome.cancelled),
		Changed:   bool(sc.outcome.changed),
		Answered:  int(sc.outcome.answered),
		Late:      int(sc.outcome.late),
		Elapsed:   time.Duration(sc.outcome.elapsed_us) * time.Microsecond,
	}
	if sc.chat_status == StatusOK {
		o.HasChat = true
		o.Chat = goStr(sc.chat)
	}
	if sc.result_len > 0 && sc.result != nil {
		o.Result = C.GoBytes(unsafe.Pointer(sc.result), C.int(sc.result_len))
	}
	return o
}

// Wait waits until deadline for p's outcome and takes it. Plugins that did not answer by then
// count as late (Outcome.Late > 0): that is not an error. A deadline in the past takes the
// outcome at once. The C side refuses waits longer than an hour (ErrInvalidArgument).
func (h *Host) Wait(p Pending, deadline time.Time) (Outcome, error) {
	if err := h.enter(); err != nil {
		return Outcome{}, err
	}
	defer h.leave()
	d := time.Until(deadline)
	if d < 0 {
		d = 0
	}
	r := C.gopb_wait(h.hu, C.uint64_t(p), C.uint64_t(d/time.Microsecond), h.scu)
	if err := check(r); err != nil {
		return Outcome{}, err
	}
	return h.outcome(), nil
}

// Poll takes p's outcome if it is complete (ok true); it never blocks.
func (h *Host) Poll(p Pending) (Outcome, bool, error) {
	if err := h.enter(); err != nil {
		return Outcome{}, false, err
	}
	defer h.leave()
	r := C.gopb_poll(h.hu, C.uint64_t(p), h.scu)
	if err := check(r); err != nil {
		return Outcome{}, false, err
	}
	if r.status == StatusPending {
		return Outcome{}, false, nil
	}
	return h.outcome(), true, nil
}

// SendChat is a send-chat action: a message to one player.
type SendChat struct {
	Target  string // the player's UUID
	Message string
}

// Teleport is a teleport action.
type Teleport struct {
	Player   string
	Position [3]float64
	Rotation [3]float64
}

// Kick is a kick action.
type Kick struct {
	Player string
	Reason string
}

// Action is an action a plugin asked for. Data is the whole encoded df.plugin.Action; the typed
// view matching Kind (ActionKind*) is set.
type Action struct {
	Plugin        string
	Kind          int
	CorrelationID string // empty if no ActionResult is expected
	Data          []byte
	SendChat      *SendChat
	Teleport      *Teleport
	Kick          *Kick
}

// DrainActions takes every action the plugins sent, in arrival order.
func (h *Host) DrainActions() ([]Action, error) {
	if err := h.enter(); err != nil {
		return nil, err
	}
	defer h.leave()
	var out []Action
	sc := h.sc
	for {
		r := C.gopb_next_action(h.hu, h.scu)
		if err := check(r); err != nil {
			return out, err
		}
		if r.status == StatusNone {
			return out, nil
		}
		a := Action{
			Plugin:        goStr(sc.action.plugin),
			Kind:          int(sc.action.kind),
			CorrelationID: goStr(sc.action.correlation_id),
		}
		if sc.action.len > 0 {
			a.Data = C.GoBytes(unsafe.Pointer(sc.action.data), C.int(sc.action.len))
		}
		switch a.Kind {
		case ActionKindSendChat:
			a.SendChat = &SendChat{Target: goStr(sc.s1), Message: goStr(sc.s2)}
		case ActionKindTeleport:
			tp := &Teleport{Player: goStr(sc.s1)}
			for i := 0; i < 3; i++ {
				tp.Position[i] = float64(sc.pos[i])
				tp.Rotation[i] = float64(sc.rot[i])
			}
			a.Teleport = tp
		case ActionKindKick:
			a.Kick = &Kick{Player: goStr(sc.s1), Reason: goStr(sc.s2)}
		}
		out = append(out, a)
	}
}

// SendActionResult sends an encoded df.plugin.ActionResult to a plugin.
func (h *Host) SendActionResult(pluginID string, encoded []byte) error {
	if err := h.enter(); err != nil {
		return err
	}
	defer h.leave()
	ip, il := strArg(pluginID)
	bp, bl := bytesArg(encoded)
	return check(C.gopb_send_action_result(h.hu, ip, il, bp, bl))
}

// Notice is a note about a plugin (ready, disconnected, restarted, disabled, slow).
type Notice struct {
	Plugin string
	Text   string
}

// Notices takes every pending notice.
func (h *Host) Notices() ([]Notice, error) {
	if err := h.enter(); err != nil {
		return nil, err
	}
	defer h.leave()
	var out []Notice
	for {
		r := C.gopb_next_notice(h.hu, h.scu)
		if err := check(r); err != nil {
			return out, err
		}
		if r.status == StatusNone {
			return out, nil
		}
		out = append(out, Notice{Plugin: goStr(h.sc.s1), Text: goStr(h.sc.s2)})
	}
}

// Log is a log line a plugin sent.
type Log struct {
	Plugin  string
	Level   string
	Message string
}

// Logs takes every pending plugin log line.
func (h *Host) Logs() ([]Log, error) {
	if err := h.enter(); err != nil {
		return nil, err
	}
	defer h.leave()
	var out []Log
	for {
		r := C.gopb_next_log(h.hu, h.scu)
		if err := check(r); err != nil {
			return out, err
		}
		if r.status == StatusNone {
			return out, nil
		}
		out = append(out, Log{Plugin: goStr(h.sc.s1), Level: goStr(h.sc.s2), Message: goStr(h.sc.s3)})
	}
}

// Metrics is the host's metrics as Prometheus text.
func (h *Host) Metrics() (string, error) {
	if err := h.enter(); err != nil {
		return "", err
	}
	defer h.leave()
	if err := check(C.gopb_metrics(h.hu, h.scu)); err != nil {
		return "", err
	}
	return goStr(h.sc.s1), nil
}

// PluginPID is the process id of a launched plugin (ErrNotFound when it is not running).
func (h *Host) PluginPID(id string) (int, error) {
	if err := h.enter(); err != nil {
		return 0, err
	}
	defer h.leave()
	p, n := strArg(id)
	r := C.gopb_plugin_pid(h.hu, p, n)
	if err := check(r); err != nil {
		return 0, err
	}
	return int(r.u), nil
}

// PluginReady reports whether a plugin is connected and past its handshake.
func (h *Host) PluginReady(id string) (bool, error) {
	if err := h.enter(); err != nil {
		return false, err
	}
	defer h.leave()
	p, n := strArg(id)
	r := C.gopb_plugin_ready(h.hu, p, n)
	if err := check(r); err != nil {
		return false, err
	}
	return r.status == StatusOK, nil
}

// Close shuts the host down: plugins get the shutdown reason, launched ones are stopped after
// the grace period. Later calls return an *Error with Code ErrClosed; so does a second Close
// (from the C library, which recognizes a closed handle as stale).
func (h *Host) Close(reason string) error {
	if h == nil {
		return &Error{Code: ErrNullPointer, Message: "nil *Host"}
	}
	if !atomic.CompareAndSwapInt32(&h.busy, 0, 1) {
		return errBusy
	}
	defer h.leave()
	rp, rl := strArg(reason)
	if err := check(C.gopb_shutdown(h.hu, rp, rl)); err != nil {
		return err
	}
	h.closed = true
	if h.sc != nil {
		C.gopb_free(unsafe.Pointer(h.sc))
		h.sc = nil
		h.scu = 0
	}
	return nil
}

// cgoNoop is a cgo call to a C function that does nothing (for BenchmarkCgoCall).
func cgoNoop() { C.gopb_noop() }
