/*
 * plugbus.h: the C API for plugbus plugins and hosts.
 *
 * A plugin is a process that a plugbus host launches (or that attaches to a segment the host
 * created). It talks to the host through shared memory: moves arrive as packed 48-byte records
 * read in place, other events as df.plugin protobuf messages, replies and actions go back.
 *
 *     plugbus_plugin *p;
 *     plugbus_open_env(&p);                       // PLUGBUS_SEGMENT, PLUGBUS_PLUGIN_ID
 *     plugbus_hello(p, "my_plugin", "1.0.0");
 *     int32_t types[] = { PLUGBUS_EVENT_CHAT };
 *     plugbus_subscribe(p, types, 1);
 *     plugbus_connect(p);                         // handshake with the host
 *     plugbus_callbacks cb = { .user = &state, .on_event = on_event };
 *     int32_t rc;
 *     while ((rc = plugbus_poll(p, &cb, 100)) == PLUGBUS_OK) { ... timers ... }
 *     // rc == PLUGBUS_SHUTDOWN: the host stopped (plugbus_shutdown_reason); else an error
 *     plugbus_close(p);
 *
 * Status codes. Every function returns a plugbus_status (except plugbus_last_error and
 * plugbus_status_name, which return strings): PLUGBUS_OK, PLUGBUS_SHUTDOWN, or a negative
 * PLUGBUS_ERR_*. After an error, plugbus_last_error() says what went wrong. A NULL pointer, a
 * bad length, a closed handle, a call in the wrong state: each is an error, never a crash.
 *
 * Handles. plugbus_plugin, plugbus_event and plugbus_host pointers are typed handles: opaque
 * values (not addresses: never dereference one) that carry their kind and a generation. Every
 * function checks the kind and liveness of the handle it is given before touching anything, and
 * reads nothing through it: a handle of another kind (an event passed to plugbus_send_chat, a
 * plugbus_plugin to plugbus_host_begin_tick, ...), a closed handle (stale, also after a newer
 * handle was opened) or a made-up pointer returns PLUGBUS_ERR_CLOSED, and plugbus_last_error()
 * says which ("not a plugbus event handle: this is a plugbus plugin handle", "stale plugin
 * handle: ..."); NULL returns PLUGBUS_ERR_NULL_POINTER.
 *
 * Ownership.
 * - A plugbus_plugin is created by plugbus_open_env / plugbus_open and freed by plugbus_close
 *   (NULL is allowed; closing twice returns PLUGBUS_ERR_CLOSED). Nothing else is freed by you.
 * - Everything plugbus lends you is borrowed, never yours to free:
 *   - the records passed to on_moves and the plugbus_event passed to on_event, and every
 *     plugbus_str and byte pointer read from that event, are valid only until the callback
 *     returns (copy what you keep);
 *   - plugbus_shutdown_reason and plugbus_host_boot_id strings live until plugbus_close;
 *   - plugbus_last_error() is valid until the next plugbus call on the same thread.
 * - Strings you pass are copied before the call returns. plugbus_str is UTF-8 and NOT
 *   NUL-terminated: print it with printf("%.*s", (int)s.len, s.ptr).
 *
 * Threads.
 * - A handle is used by one thread at a time (it may move between threads between calls): a
 *   call from a second thread while one is inside a call on it returns PLUGBUS_ERR_BAD_STATE.
 *   Two handles are independent. plugbus_last_error() is per thread.
 * - Callbacks run on the thread that called plugbus_poll, inside that call. From a callback you
 *   may call the event's accessors and reply helpers, plugbus_send_chat, plugbus_send_raw,
 *   plugbus_log and plugbus_subscribe on the same handle; plugbus_poll, plugbus_connect,
 *   configuration and plugbus_close return PLUGBUS_ERR_BAD_STATE there. Do not longjmp out of
 *   a callback.
 * - plugbus_poll beats the heartbeat the host watches: call it at least every 100 ms.
 *
 * The host side (plugbus_host_*): a game server in C, C++, Go (cgo) or any language with a C
 * FFI embeds the bus.
 *
 *     plugbus_host *h;
 *     plugbus_host_start(toml, strlen(toml), &h);  // [host] settings and [[plugin]] entries
 *     uint64_t tick, pending;
 *     plugbus_host_begin_tick(h, &tick);
 *     plugbus_host_publish_moves(h, records, count);
 *     plugbus_host_dispatch_chat(h, uuid, ulen, name, nlen, msg, mlen, &pending);
 *     plugbus_host_end_tick(h);
 *     plugbus_outcome o;
 *     plugbus_host_wait(h, pending, 50000, &o);   // o.cancelled; plugbus_host_outcome_chat
 *     plugbus_action a;
 *     while (plugbus_host_next_action(h, &a) == PLUGBUS_OK) { ... a.kind, a.data/a.len ... }
 *     plugbus_host_shutdown(h, "bye", 3);         // frees the handle
 *
 * - One thread drives a host: calls on one plugbus_host come from one thread at a time (a
 *   concurrent call gets PLUGBUS_ERR_BAD_STATE, never a race). Two hosts are independent.
 * - Strings go in as (pointer, length) UTF-8, no NUL needed, and are copied: nothing you pass
 *   is kept after the call. Encoded df.plugin messages (EventEnvelope, ActionResult) likewise.
 * - What a host call lends out (plugbus_str, byte pointers) lives in the handle until the next
 *   call that fills the same thing (the next outcome, action, notice, log line, metrics text),
 *   and never past plugbus_host_shutdown. Nothing is yours to free but the handle itself
 *   (plugbus_host_shutdown; NULL allowed). Host handles and plugin handles are told apart: one
 *   passed as the other is PLUGBUS_ERR_CLOSED (see Handles above).
 * - Positive statuses: PLUGBUS_PENDING (an outcome not complete yet), PLUGBUS_NONE (nothing to
 *   take); plugbus_host_wait returns PLUGBUS_ERR_TIMEOUT with the outcome filled all the same
 *   when some plugin did not answer in time.
 *
 * Build: cargo build --release produces target/release/libplugbus.so and libplugbus.a; link
 * with -lplugbus (and -lpthread -ldl -lm for the static library). See ffi/README.md.
 */

#ifndef PLUGBUS_H
#define PLUGBUS_H

/* Generated by cbindgen from src/ffi/ with cbindgen.toml: do not edit by hand.
   Regenerate with: PLUGBUS_BLESS=1 cargo test --test ffi_header */

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

// Success.
#define PLUGBUS_OK 0

// `plugbus_poll`: the host shut down (see `plugbus_shutdown_reason`); close the handle and exit.
#define PLUGBUS_SHUTDOWN 1

// A required pointer argument was NULL.
#define PLUGBUS_ERR_NULL_POINTER -1

// An argument is invalid: a bad length, not UTF-8, an unknown event type or strategy, bytes that
// do not decode, a message larger than the ring can carry.
#define PLUGBUS_ERR_INVALID_ARGUMENT -2

// The call is not allowed now: poll before connect, configure after connect, an event helper
// outside its callback, a handle call from inside a callback that needs the handle itself.
#define PLUGBUS_ERR_BAD_STATE -3

// The handle is not a live plugbus handle of the kind the function takes: already closed
// (stale), never opened (a made-up or foreign pointer), or a handle of another kind (an event
// passed to a connection function, a host handle to a plugin function, ...). Nothing is read
// through such a pointer; `plugbus_last_error` says which case it is.
#define PLUGBUS_ERR_CLOSED -4

// Not found: no such segment, or the environment variables a host sets are missing.
#define PLUGBUS_ERR_NOT_FOUND -5

// The host refused the handshake, or another process is attached to the segment.
#define PLUGBUS_ERR_REFUSED -6

// No `HostHello` within the hello timeout.
#define PLUGBUS_ERR_TIMEOUT -7

// The host's process died.
#define PLUGBUS_ERR_HOST_DIED -8

// The shared-memory link broke (a ring protocol violation, a message too large for the ring).
#define PLUGBUS_ERR_LINK -9

// The host sent bytes that do not decode, or the segment is not a compatible plugbus segment.
#define PLUGBUS_ERR_PROTOCOL -10

// The host stopped reading this plugin's replies and too many are queued.
#define PLUGBUS_ERR_HOST_NOT_READING -11

// An operating-system call failed.
#define PLUGBUS_ERR_IO -12

// A bug in plugbus (a Rust panic, caught at the boundary). The handle is unusable; close it.
#define PLUGBUS_ERR_INTERNAL -13

// Event type `EVENT_TYPE_ALL`: subscribe to every event.
#define PLUGBUS_EVENT_ALL 1

// Event type `PLAYER_JOIN` (accessor: `plugbus_event_join`).
#define PLUGBUS_EVENT_PLAYER_JOIN 10

// Event type `PLAYER_QUIT` (accessor: `plugbus_event_quit`).
#define PLUGBUS_EVENT_PLAYER_QUIT 11

// `on_moves` flag: the plugin lagged; the records are each player's latest position over
// several ticks, some of which it never saw.
#define PLUGBUS_MOVES_CONFLATED 1

// `on_moves` flag: the tick's records go on in the next `on_moves` call.
#define PLUGBUS_MOVES_MORE 2

// Event type `PLAYER_MOVE`: moves arrive through `on_moves`, in place.
#define PLUGBUS_EVENT_PLAYER_MOVE 12

// Event type `PLAYER_TELEPORT`.
#define PLUGBUS_EVENT_PLAYER_TELEPORT 14

// Event type `CHAT` (accessor: `plugbus_event_chat`).
#define PLUGBUS_EVENT_CHAT 18

// Event type `PLAYER_DEATH`.
#define PLUGBUS_EVENT_PLAYER_DEATH 22

// Event type `PLAYER_BLOCK_BREAK`.
#define PLUGBUS_EVENT_PLAYER_BLOCK_BREAK 27

// Event type `PLAYER_BLOCK_PLACE`.
#define PLUGBUS_EVENT_PLAYER_BLOCK_PLACE 28

// Event type `COMMAND` (accessors: `plugbus_event_command`, `plugbus_event_command_arg`).
#define PLUGBUS_EVENT_COMMAND 45

// Wait strategy: busy-poll while waiting (lowest latency, one core at 100%).
#define PLUGBUS_WAIT_SPIN 0

// Wait strategy (default): spin 50 µs, then sleep on the doorbell.
#define PLUGBUS_WAIT_SPIN_THEN_PARK 1

// Wait strategy: sleep on the doorbell at once (near-zero idle CPU).
#define PLUGBUS_WAIT_PARK 2

// Wait strategy: spin-then-park that learns the host's tick rate and is awake 200 µs before
// each tick, so the host's tick thread pays no wake-up (about 2% of a core at 50 ticks/s).
#define PLUGBUS_WAIT_PACED 3

// `plugbus_host_poll_outcome`: the event's outcome is not complete yet.
#define PLUGBUS_PENDING 2

// `plugbus_host_next_*`: nothing (more) to take; `plugbus_host_outcome_chat`: the outcome does
// not set a chat message.
#define PLUGBUS_NONE 3

// `plugbus_action.kind`: the `Action.kind` field number. Send a chat message
// (`plugbus_host_action_send_chat`).
#define PLUGBUS_ACTION_SEND_CHAT 10

// `plugbus_action.kind`: teleport a player (`plugbus_host_action_teleport`).
#define PLUGBUS_ACTION_TELEPORT 11

// `plugbus_action.kind`: kick a player (`plugbus_host_action_kick`).
#define PLUGBUS_ACTION_KICK 12

// One event, opaque to C: a typed handle (a token naming its connection's slot, never an
// address read through). Valid only during the `on_event` callback it was passed to: its
// accessors and reply helpers return `PLUGBUS_ERR_BAD_STATE` after that, and
// `PLUGBUS_ERR_CLOSED` once its handle is closed.
typedef struct plugbus_event plugbus_event;

// A host, opaque to C: a typed handle (a token checked against the registry of host handles,
// never an address read through). Created by `plugbus_host_start` or
// `plugbus_host_start_file`, freed by `plugbus_host_shutdown`. One thread drives it.
typedef struct plugbus_host plugbus_host;

// A plugin connection, opaque to C: a typed handle (a token checked against the registry of
// plugin handles, never an address read through). Created by `plugbus_open_env` or
// `plugbus_open`, closed by `plugbus_close`. Use it from one thread at a time (a call from a
// second thread while one is in a call is `PLUGBUS_ERR_BAD_STATE`).
typedef struct plugbus_plugin plugbus_plugin;

// A status code: `PLUGBUS_OK` (0), `PLUGBUS_SHUTDOWN` (1), or a negative `PLUGBUS_ERR_*`.
typedef int32_t plugbus_status;

// A string lent by plugbus: `len` bytes of UTF-8 at `ptr`, **not** NUL-terminated (print it
// with `printf("%.*s", (int)s.len, s.ptr)`). Valid as long as the function that filled it says
// (for event fields: during the callback). `ptr` is never NULL (an empty string has `len` 0).
typedef struct plugbus_str {
    // The first byte.
    const char *ptr;
    // Length in bytes.
    size_t len;
} plugbus_str;

// One player's position and rotation, exactly the 48-byte `MoveRecord` of the moves ring
// (no padding; the header asserts size and offsets at compile time).
typedef struct plugbus_move_record {
    // The player's UUID, 16 raw bytes (RFC 4122 byte order).
    uint8_t uuid[16];
    // Position x.
    double x;
    // Position y.
    double y;
    // Position z.
    double z;
    // Rotation yaw, degrees.
    float yaw;
    // Rotation pitch, degrees.
    float pitch;
} plugbus_move_record;

// The functions `plugbus_poll` calls. Any of them may be NULL (moves are then skipped; events
// are acknowledged). All run on the thread that called `plugbus_poll`, inside that call.
typedef struct plugbus_callbacks {
    // Passed as the first argument of every callback.
    void *user;
    // One tick's moves, lent in place from shared memory: `count` records at `records`, valid
    // only during the call (copy what you keep). `flags` holds `PLUGBUS_MOVES_CONFLATED` when
    // this plugin lagged and the records are each player's latest position over several ticks
    // (some skipped), and `PLUGBUS_MOVES_MORE` when the tick's records go on in the next call.
    void (*on_moves)(void *user,
                     uint64_t tick,
                     uint32_t flags,
                     const struct plugbus_move_record *records,
                     size_t count);
    // One event. `event` and everything read from it are valid only during the call; reply to
    // it (if it expects a response) with `plugbus_reply_*` before returning, or it is acked.
    void (*on_event)(void *user, struct plugbus_event *event);
    // The `ActionResult` (encoded df.plugin bytes, valid during the call) of an action sent
    // with a correlation id through `plugbus_send_raw`.
    void (*on_action_result)(void *user, const uint8_t *data, size_t len);
} plugbus_callbacks;

// A finished event's outcome (filled by `plugbus_host_poll_outcome` and `plugbus_host_wait`).
typedef struct plugbus_outcome {
    // The event's id (as sent in `EventEnvelope.event_id`).
    uint64_t event_id;
    // Some plugin cancelled the event.
    bool cancelled;
    // Some plugin changed the event: the merged change is in `plugbus_host_outcome_result`
    // (and, for chat, `plugbus_host_outcome_chat`).
    bool changed;
    // Plugins that answered in time.
    uint32_t answered;
    // Plugins that did not answer in time (counted as "no change").
    uint32_t late;
    // Dispatch to completion, microseconds.
    uint64_t elapsed_us;
} plugbus_outcome;

// An action a plugin asked for (filled by `plugbus_host_next_action`; lent until the next
// `plugbus_host_next_action` call or shutdown).
typedef struct plugbus_action {
    // The plugin that sent it.
    struct plugbus_str plugin;
    // Which action: the `Action.kind` field number (`PLUGBUS_ACTION_SEND_CHAT`, ...), 0 if none.
    int32_t kind;
    // The correlation id (empty if none: then no `ActionResult` is expected).
    struct plugbus_str correlation_id;
    // The whole action, encoded `df.plugin.Action` bytes.
    const uint8_t *data;
    // Length of `data`.
    size_t len;
} plugbus_action;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the last failed plugbus call on this thread ("" if none failed yet): a
// NUL-terminated string owned by plugbus, valid until the next plugbus call on this thread.
// Never NULL. Successful calls leave it unchanged.
const char *plugbus_last_error(void);

// The name of a status code (`"PLUGBUS_OK"`, `"PLUGBUS_ERR_BAD_STATE"`, ...), a static
// NUL-terminated string; `"PLUGBUS_UNKNOWN"` for a number that is not a status.
const char *plugbus_status_name(plugbus_status status);

// Opens a handle from the environment a plugbus host sets for the processes it launches
// (`PLUGBUS_ADDRESS`, and `PLUGBUS_PLUGIN_ID` or `DF_PLUGIN_ID`; `PLUGBUS_SEGMENT` may stand
// for the address when a plugin is started by hand). Not connected yet: configure it, then call
// `plugbus_connect`. On success `*out` is the handle (free it with `plugbus_close`); on error
// `*out` is NULL (`PLUGBUS_ERR_NOT_FOUND` if the variables are missing).
//
// # Safety
// `out` is NULL or valid for a write of a pointer.
plugbus_status plugbus_open_env(struct plugbus_plugin **out);

// Opens a handle for the link at `address` (the address a host printed for an attached
// plugin, e.g. `shm:plugbus.external`; a bare segment name works too) as plugin `plugin_id`
// (the id the host configured). Not connected yet; see `plugbus_open_env`.
//
// # Safety
// `address` and `plugin_id` are NULL or NUL-terminated strings; `out` is NULL or valid for a
// write of a pointer.
plugbus_status plugbus_open(const char *address,
                            const char *plugin_id,
                            struct plugbus_plugin **out);

// Sets the name and version sent in the hello (default: the plugin id, "0.0.0").
// `PLUGBUS_ERR_BAD_STATE` once connected.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `name` and `version` are NULL or
// NUL-terminated strings.
plugbus_status plugbus_hello(struct plugbus_plugin *p,
                             const char *name,
                             const char *version);

// Registers a command (sent in the hello); the host then routes `/name` to this plugin as a
// `COMMAND` event. `description` may be NULL. `PLUGBUS_ERR_BAD_STATE` once connected.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `name` and `description` are NULL or
// NUL-terminated strings.
plugbus_status plugbus_register_command(struct plugbus_plugin *p,
                                        const char *name,
                                        const char *description);

// Sets the events to receive: `n` df.plugin `EventType` numbers (`PLUGBUS_EVENT_*`;
// `PLUGBUS_EVENT_PLAYER_MOVE` for the moves, `PLUGBUS_EVENT_ALL` for everything). Replaces any
// earlier set. Before `plugbus_connect` it is sent with the hello; after, at once (also from
// inside a callback). `types` may be NULL when `n` is 0; `n` is at most 1024.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); if `n` is at most 1024, `types` is NULL or
// points to `n` readable `int32_t`.
plugbus_status plugbus_subscribe(struct plugbus_plugin *p,
                                 const int32_t *types,
                                 size_t n);

// Sets how `plugbus_poll` waits when nothing has arrived: `PLUGBUS_WAIT_SPIN`,
// `PLUGBUS_WAIT_SPIN_THEN_PARK` (default), `PLUGBUS_WAIT_PARK` or `PLUGBUS_WAIT_PACED`. Allowed at any time; it
// applies from the next wait.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
plugbus_status plugbus_set_wait(struct plugbus_plugin *p,
                                int32_t strategy);

// Sets how long `plugbus_connect` waits for the host's hello (default 5000 ms; 1 to 3600000).
// `PLUGBUS_ERR_BAD_STATE` once connected.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
plugbus_status plugbus_set_hello_timeout(struct plugbus_plugin *p,
                                         uint32_t timeout_ms);

// Connects to the host's link, sends the hello and subscriptions, and waits for the host's
// hello.
// On failure the handle stays unconnected (fix the cause and call it again, or close it):
// `PLUGBUS_ERR_NOT_FOUND` (nothing at the address), `PLUGBUS_ERR_REFUSED`, `PLUGBUS_ERR_TIMEOUT`,
// `PLUGBUS_ERR_HOST_DIED`, ... `PLUGBUS_ERR_BAD_STATE` if already connected.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
plugbus_status plugbus_connect(struct plugbus_plugin *p);

// The host's boot id (from its hello), valid until `plugbus_close`.
// `PLUGBUS_ERR_BAD_STATE` before `plugbus_connect`.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `out` is NULL or valid for a write.
plugbus_status plugbus_host_boot_id(struct plugbus_plugin *p,
                                    struct plugbus_str *out);

// Handles everything that has arrived (calling the callbacks, sending replies, beating the
// heartbeat); if nothing had arrived, waits up to `timeout_ms` (0: do not wait; negative: until
// something arrives) for the host's doorbell, and handles what then arrives. Returns
// `PLUGBUS_OK` (also when the timeout passed with nothing), `PLUGBUS_SHUTDOWN` when the host
// shut down (`plugbus_shutdown_reason` says why; later calls return it again), or an error
// (`PLUGBUS_ERR_HOST_DIED`, `PLUGBUS_ERR_LINK`, ...; the connection is then over).
// `PLUGBUS_ERR_BAD_STATE` before `plugbus_connect` or from inside a callback.
//
// Call it at least every 100 ms or so: the heartbeat the host watches is beaten here.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `callbacks` is NULL or points to a
// `plugbus_callbacks` whose non-NULL function pointers have the declared signatures and may be
// called with its `user` during this call.
plugbus_status plugbus_poll(struct plugbus_plugin *p,
                            const struct plugbus_callbacks *callbacks,
                            int32_t timeout_ms);

// Why the host shut down, after `plugbus_poll` returned `PLUGBUS_SHUTDOWN`; valid until
// `plugbus_close`. `PLUGBUS_ERR_BAD_STATE` if it has not.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `reason` is NULL or valid for a write.
plugbus_status plugbus_shutdown_reason(struct plugbus_plugin *p,
                                       struct plugbus_str *reason);

// Sends a chat message to player `target_uuid` (its text form, as events carry it), or to
// everyone if `target_len` is 0 (`target_uuid` may then be NULL). Works inside callbacks and
// outside (then it is sent at once). The strings need not be NUL-terminated. Each call is one
// `ActionBatch` message; a message larger than the replies ring can carry is
// `PLUGBUS_ERR_INVALID_ARGUMENT`.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `target_uuid` is NULL or points to
// `target_len` readable bytes, `message` NULL or to `message_len` readable bytes (when those
// lengths are within the ring's limit).
plugbus_status plugbus_send_chat(struct plugbus_plugin *p,
                                 const char *target_uuid,
                                 size_t target_len,
                                 const char *message,
                                 size_t message_len);

// Writes a line into the host's log, tagged with this plugin's id. `level` is "error",
// "warn", "info", "debug" or "trace" (NUL-terminated); `message` need not be.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `level` is NULL or NUL-terminated; `message`
// is NULL or points to `len` readable bytes (when `len` is within the ring's limit).
plugbus_status plugbus_log(struct plugbus_plugin *p,
                           const char *level,
                           const char *message,
                           size_t len);

// Sends any df.plugin `PluginToHost` message, given encoded (for actions, queries and
// messages the C API has no helper for). The bytes are decoded first: bytes that are not a
// `PluginToHost` with a payload are `PLUGBUS_ERR_INVALID_ARGUMENT` and nothing is sent. The
// message's `plugin_id` is replaced by this plugin's id. Works inside callbacks and outside.
//
// # Safety
// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `data` is NULL or points to `len` readable
// bytes (when `len` is within the ring's limit).
plugbus_status plugbus_send_raw(struct plugbus_plugin *p,
                                const uint8_t *data,
                                size_t len);

// Closes the handle: detaches from the link and frees what the handle holds. NULL is
// allowed (nothing happens). The handle (and its event) is then stale: passing it again, to
// this or any function, is `PLUGBUS_ERR_CLOSED`, also after a newer handle was opened (each
// handle carries a generation). Closing from inside a callback is `PLUGBUS_ERR_BAD_STATE`
// (nothing is closed).
//
// # Safety
// `p` is NULL or any pointer (it is checked before use; nothing is read through it).
plugbus_status plugbus_close(struct plugbus_plugin *p);

// The event's id (`EventEnvelope.event_id`), valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
plugbus_status plugbus_event_id(struct plugbus_event *event, struct plugbus_str *out);

// The event's df.plugin `EventType` number (`PLUGBUS_EVENT_*`).
//
// # Safety
// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
plugbus_status plugbus_event_type(struct plugbus_event *event, int32_t *out);

// Whether the host waits for this plugin's answer (a reply helper's choice, or an ack).
//
// # Safety
// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
plugbus_status plugbus_event_expects_response(struct plugbus_event *event, bool *out);

// The event's encoded df.plugin `EventEnvelope` (decode it with any protobuf library for the
// fields the accessors do not cover). The bytes are valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); `data` and `len` are NULL or valid for a
// write.
plugbus_status plugbus_event_bytes(struct plugbus_event *event, const uint8_t **data, size_t *len);

// The fields of a `CHAT` event: `player_uuid` the sender's UUID, `player_name` the sender's
// name (`ChatEvent.name`), `message` the text. `PLUGBUS_ERR_INVALID_ARGUMENT` for another type.
// Each out pointer may be NULL (skipped). The strings are valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
// write.
plugbus_status plugbus_event_chat(struct plugbus_event *event,
                                  struct plugbus_str *player_uuid,
                                  struct plugbus_str *player_name,
                                  struct plugbus_str *message);

// The fields of a `COMMAND` event: `player_uuid` the UUID of the player who typed it,
// `player_name` that player's name (`CommandEvent.name`), `command` the command's name without
// the slash (`filterstats`; match on this), `raw` the whole line typed (`/filterstats a b`),
// `arg_count` the number of arguments (read each with `plugbus_event_command_arg`).
// `PLUGBUS_ERR_INVALID_ARGUMENT` for another type. Each out pointer may be NULL (skipped). The
// strings are valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
// write.
plugbus_status plugbus_event_command(struct plugbus_event *event,
                                     struct plugbus_str *player_uuid,
                                     struct plugbus_str *player_name,
                                     struct plugbus_str *command,
                                     struct plugbus_str *raw,
                                     size_t *arg_count);

// Argument `index` (from 0) of a `COMMAND` event; `PLUGBUS_ERR_INVALID_ARGUMENT` if `index` is
// not below the count or the event is another type. Valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); `arg` is NULL or valid for a write.
plugbus_status plugbus_event_command_arg(struct plugbus_event *event,
                                         size_t index,
                                         struct plugbus_str *arg);

// The fields of a `PLAYER_JOIN` event: `player_uuid` the joining player's UUID, `player_name`
// that player's name (`PlayerJoinEvent.name`). `PLUGBUS_ERR_INVALID_ARGUMENT` for another
// type. Each out pointer may be NULL (skipped). The strings are valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
// write.
plugbus_status plugbus_event_join(struct plugbus_event *event,
                                  struct plugbus_str *player_uuid,
                                  struct plugbus_str *player_name);

// The fields of a `PLAYER_QUIT` event: `player_uuid` the leaving player's UUID, `player_name`
// that player's name (`PlayerQuitEvent.name`). `PLUGBUS_ERR_INVALID_ARGUMENT` for another
// type. Each out pointer may be NULL (skipped). The strings are valid during the callback.
//
// # Safety
// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
// write.
plugbus_status plugbus_event_quit(struct plugbus_event *event,
                                  struct plugbus_str *player_uuid,
                                  struct plugbus_str *player_name);

// Answers the event with "no change" (what happens anyway if no reply helper is called).
// The last reply helper called during the callback wins. Replies to events that do not expect
// a response are accepted and ignored.
//
// # Safety
// None: `event` may be any value (checked, never read through).
plugbus_status plugbus_reply_ack(struct plugbus_event *event);

// Answers the event with "cancel it" (the host drops a cancelled chat message, ...).
//
// # Safety
// None: `event` may be any value (checked, never read through).
plugbus_status plugbus_reply_cancel(struct plugbus_event *event);

// Answers a `CHAT` event with "replace the message by `message`" (`len` bytes of UTF-8, not
// necessarily NUL-terminated; copied). `PLUGBUS_ERR_INVALID_ARGUMENT` for another event type,
// text that is not UTF-8, or a message larger than the replies ring carries.
//
// # Safety
// `event` is any value (checked, never read through); `message` is NULL or points to `len`
// readable bytes (when `len` is within the ring's limit).
plugbus_status plugbus_reply_set_chat_message(struct plugbus_event *event,
                                              const char *message,
                                              size_t len);

// Starts a host from a TOML configuration given as text (`len` bytes of UTF-8, no NUL needed):
// the `[host]` settings and `[[plugin]]` entries of a plugins.toml. Launches the plugins and
// waits for the required ones' hellos. On success `*out` is the handle (free it with
// `plugbus_host_shutdown`). Errors: `PLUGBUS_ERR_INVALID_ARGUMENT` for a configuration that
// does not parse or validate, `PLUGBUS_ERR_NOT_FOUND` when the host cannot start (a required
// plugin that does not start, a listen address in use); `plugbus_last_error` says which.
//
// # Safety
// `toml` points to `len` readable bytes; `out` is NULL or writable.
plugbus_status plugbus_host_start(const char *toml, size_t len, struct plugbus_host **out);

// Starts a host from a TOML file (`path` NUL-terminated); as `plugbus_host_start`, and
// `PLUGBUS_ERR_NOT_FOUND` if the file cannot be read.
//
// # Safety
// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
plugbus_status plugbus_host_start_file(const char *path, struct plugbus_host **out);

// Begins a tick; `*tick` (if not NULL) gets its number. Publish and dispatch, then
// `plugbus_host_end_tick`. Beginning a tick inside a tick is `PLUGBUS_ERR_BAD_STATE`.
//
// # Safety
// `h` is any pointer (checked); `tick` is NULL or writable.
plugbus_status plugbus_host_begin_tick(struct plugbus_host *h, uint64_t *tick);

// Stages `count` moves for this tick (the records are copied into the tick's frame; nothing is
// kept). They go out at the end of the tick, one packed frame per subscribed plugin.
//
// # Safety
// `records` points to `count` readable records (may be NULL when `count` is 0).
plugbus_status plugbus_host_publish_moves(struct plugbus_host *h,
                                          const struct plugbus_move_record *records,
                                          size_t count);

// Publishes one event given as an encoded `df.plugin.EventEnvelope` (no answer awaited).
// Subscribers get it in this tick's batch, or at once if it is immediate.
//
// # Safety
// `envelope` points to `len` readable bytes.
plugbus_status plugbus_host_publish_event(struct plugbus_host *h,
                                          const uint8_t *envelope,
                                          size_t len);

// Dispatches one event given as an encoded `df.plugin.EventEnvelope`, expecting answers:
// `*pending` gets its id, for `plugbus_host_poll_outcome` / `plugbus_host_wait`.
//
// # Safety
// `envelope` points to `len` readable bytes; `pending` is writable.
plugbus_status plugbus_host_dispatch_event(struct plugbus_host *h,
                                           const uint8_t *envelope,
                                           size_t len,
                                           uint64_t *pending);

// Publishes a `PlayerJoinEvent` (`uuid` the player's UUID as text, `name` the player's name).
//
// # Safety
// Each (pointer, length) pair points to that many readable bytes.
plugbus_status plugbus_host_publish_join(struct plugbus_host *h,
                                         const char *uuid,
                                         size_t uuid_len,
                                         const char *name,
                                         size_t name_len);

// Publishes a `PlayerQuitEvent`. No plugin sees a move of this player after it.
//
// # Safety
// Each (pointer, length) pair points to that many readable bytes.
plugbus_status plugbus_host_publish_quit(struct plugbus_host *h,
                                         const char *uuid,
                                         size_t uuid_len,
                                         const char *name,
                                         size_t name_len);

// Dispatches a `ChatEvent` (player `uuid` and `name`, the `message` typed); `*pending` gets
// its id.
//
// # Safety
// Each (pointer, length) pair points to that many readable bytes; `pending` is writable.
plugbus_status plugbus_host_dispatch_chat(struct plugbus_host *h,
                                          const char *uuid,
                                          size_t uuid_len,
                                          const char *name,
                                          size_t name_len,
                                          const char *message,
                                          size_t message_len,
                                          uint64_t *pending);

// Dispatches a `CommandEvent` for the line `raw` a player typed (`"/home set"`): `command` is
// its first word without the slash (`"home"`), `args` the other words, as the df.plugin host
// fills them; `name` is the player's name. `*pending` gets its id.
//
// # Safety
// Each (pointer, length) pair points to that many readable bytes; `pending` is writable.
plugbus_status plugbus_host_dispatch_command(struct plugbus_host *h,
                                             const char *uuid,
                                             size_t uuid_len,
                                             const char *name,
                                             size_t name_len,
                                             const char *raw,
                                             size_t raw_len,
                                             uint64_t *pending);

// Ends the tick: moves go out as frames, batches are flushed, sleeping plugins are woken.
//
// # Safety
// `h` is any pointer (checked).
plugbus_status plugbus_host_end_tick(struct plugbus_host *h);

// Takes the outcome of a dispatched event if it is complete (every plugin answered, or the
// response timeout passed): `PLUGBUS_OK` and `*out` filled, or `PLUGBUS_PENDING`. Never
// blocks. An outcome is taken once; asking again is `PLUGBUS_ERR_INVALID_ARGUMENT`.
//
// # Safety
// `out` is writable.
plugbus_status plugbus_host_poll_outcome(struct plugbus_host *h,
                                         uint64_t pending,
                                         struct plugbus_outcome *out);

// Waits up to `timeout_us` microseconds for a dispatched event's outcome, sleeping until an
// awaited plugin answers, then takes it (`*out`): plugins that did not answer by then count as
// "no change" and as late. Returns `PLUGBUS_OK` when every plugin answered in time, else
// `PLUGBUS_ERR_TIMEOUT` with `*out` filled all the same (the outcome is taken) and
// `plugbus_last_error` naming the plugins that were late.
//
// # Safety
// `out` is writable.
plugbus_status plugbus_host_wait(struct plugbus_host *h,
                                 uint64_t pending,
                                 uint64_t timeout_us,
                                 struct plugbus_outcome *out);

// The last outcome as an encoded `df.plugin.EventResult`: `cancel` set if some plugin
// cancelled, `update` the merged change; `*len` is 0 if no plugin cancelled or changed the
// event. Lent until the next outcome is taken.
//
// # Safety
// `data` and `len` are writable.
plugbus_status plugbus_host_outcome_result(struct plugbus_host *h,
                                           const uint8_t **data,
                                           size_t *len);

// The chat message the last outcome sets (a chat event rewritten by a plugin): `PLUGBUS_OK`
// and `*message` (lent until the next outcome), or `PLUGBUS_NONE` if it sets none.
//
// # Safety
// `message` is writable.
plugbus_status plugbus_host_outcome_chat(struct plugbus_host *h, struct plugbus_str *message);

// Takes the next action a plugin asked for, in arrival order: `PLUGBUS_OK` and `*out` (lent
// until the next call of this function), or `PLUGBUS_NONE`. Reads what plugins sent first.
//
// # Safety
// `out` is writable.
plugbus_status plugbus_host_next_action(struct plugbus_host *h, struct plugbus_action *out);

// The current action (the last one `plugbus_host_next_action` returned) as a send-chat:
// `*target` the player's UUID, `*message` the text (lent as the action).
//
// # Safety
// `target` and `message` are NULL (skipped) or writable.
plugbus_status plugbus_host_action_send_chat(struct plugbus_host *h,
                                             struct plugbus_str *target,
                                             struct plugbus_str *message);

// The current action as a teleport: `*player`, `position[3]` (x, y, z) and `rotation[3]` (as
// the action's `rotation` Vec3), each skipped if NULL.
//
// # Safety
// `player` is NULL or writable; `position` and `rotation` are NULL or point to 3 writable
// doubles.
plugbus_status plugbus_host_action_teleport(struct plugbus_host *h,
                                            struct plugbus_str *player,
                                            double *position,
                                            double *rotation);

// The current action as a kick: `*player` and `*reason`.
//
// # Safety
// `player` and `reason` are NULL (skipped) or writable.
plugbus_status plugbus_host_action_kick(struct plugbus_host *h,
                                        struct plugbus_str *player,
                                        struct plugbus_str *reason);

// Sends an `ActionResult` (encoded `df.plugin.ActionResult` bytes, its `correlation_id` the
// action's) to plugin `plugin_id`. `PLUGBUS_ERR_NOT_FOUND` if that plugin is not connected.
//
// # Safety
// Each (pointer, length) pair points to that many readable bytes.
plugbus_status plugbus_host_send_action_result(struct plugbus_host *h,
                                               const char *plugin_id,
                                               size_t plugin_id_len,
                                               const uint8_t *result,
                                               size_t result_len);

// Takes the next notice about the plugins (ready, disconnected, restarted, disabled, slow):
// `PLUGBUS_OK` with `*plugin` and `*text` (one line, lent until the next call), or
// `PLUGBUS_NONE`.
//
// # Safety
// `plugin` and `text` are NULL (skipped) or writable.
plugbus_status plugbus_host_next_notice(struct plugbus_host *h,
                                        struct plugbus_str *plugin,
                                        struct plugbus_str *text);

// Takes the next log line a plugin sent: `PLUGBUS_OK` with `*plugin`, `*level` and `*message`
// (lent until the next call), or `PLUGBUS_NONE`.
//
// # Safety
// The out-pointers are NULL (skipped) or writable.
plugbus_status plugbus_host_next_log(struct plugbus_host *h,
                                     struct plugbus_str *plugin,
                                     struct plugbus_str *level,
                                     struct plugbus_str *message);

// The host's metrics as Prometheus text (OpenMetrics), lent in `*text` until the next call.
//
// # Safety
// `text` is writable.
plugbus_status plugbus_host_metrics(struct plugbus_host *h, struct plugbus_str *text);

// The process id of launched plugin `plugin_id` (`*pid`), or `PLUGBUS_ERR_NOT_FOUND` when it
// is not running (attached, between restarts, or not configured).
//
// # Safety
// `plugin_id` points to `len` readable bytes; `pid` is writable.
plugbus_status plugbus_host_plugin_pid(struct plugbus_host *h,
                                       const char *plugin_id,
                                       size_t len,
                                       uint32_t *pid);

// Whether plugin `plugin_id` is connected and past its handshake: `PLUGBUS_OK` if so,
// `PLUGBUS_NONE` if not (yet), `PLUGBUS_ERR_NOT_FOUND` if no such plugin is configured. Reads
// what plugins sent first.
//
// # Safety
// `plugin_id` points to `len` readable bytes.
plugbus_status plugbus_host_plugin_ready(struct plugbus_host *h, const char *plugin_id, size_t len);

// Shuts the host down: every plugin gets `HostShutdown` with `reason` (may be NULL with
// `len` 0; bytes that are not UTF-8 are replaced, never a reason not to shut down), launched plugins are given the shutdown grace and then stopped, and the handle is
// freed (what it lent is gone; later calls with it return `PLUGBUS_ERR_CLOSED`). Passing NULL
// is allowed and does nothing.
//
// # Safety
// `reason` points to `len` readable bytes.
plugbus_status plugbus_host_shutdown(struct plugbus_host *h,
                                     const char *reason,
                                     size_t len);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* PLUGBUS_H */

/* Layout checks: plugbus_move_record is read in place from shared memory. */
#ifndef PLUGBUS_H_LAYOUT_CHECKS
#define PLUGBUS_H_LAYOUT_CHECKS
#include <stddef.h>
#ifdef __cplusplus
#define PLUGBUS_STATIC_ASSERT(c, m) static_assert(c, m)
#define PLUGBUS_ALIGNOF(t) alignof(t)
#else
#define PLUGBUS_STATIC_ASSERT(c, m) _Static_assert(c, m)
#define PLUGBUS_ALIGNOF(t) _Alignof(t)
#endif
PLUGBUS_STATIC_ASSERT(sizeof(plugbus_move_record) == 48, "plugbus_move_record is 48 bytes");
PLUGBUS_STATIC_ASSERT(PLUGBUS_ALIGNOF(plugbus_move_record) == 8, "plugbus_move_record is 8-aligned");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, uuid) == 0, "uuid at 0");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, x) == 16, "x at 16");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, y) == 24, "y at 24");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, z) == 32, "z at 32");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, yaw) == 40, "yaw at 40");
PLUGBUS_STATIC_ASSERT(offsetof(plugbus_move_record, pitch) == 44, "pitch at 44");
#endif  /* PLUGBUS_H_LAYOUT_CHECKS */
