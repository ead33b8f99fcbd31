//! The host handle (`plugbus_host`): a game server written in C, C++, Go (through cgo) or any
//! language with a C FFI embeds the bus. It starts a host from a TOML configuration, drives its
//! ticks (moves, events, dispatches), takes the outcomes, actions, logs and notices, and shuts
//! it down.
//!
//! Rules (the header states them too):
//! - one thread drives a host: every call on one handle comes from one thread at a time (a
//!   second thread calling at the same moment gets `PLUGBUS_ERR_BAD_STATE`, never a data race);
//! - strings go in as (pointer, length) pairs of UTF-8, need no NUL, and are copied during the
//!   call; nothing the caller passes is kept after the call returns;
//! - what a call lends out (`plugbus_str`, byte pointers) lives in the handle until the next call
//!   that fills the same kind of thing (the next outcome, action, notice, log, metrics text), and
//!   never past `plugbus_host_shutdown`. Nothing returned needs to be freed, except the handle
//!   itself, by `plugbus_host_shutdown`;
//! - a host handle is a typed token in a registry of its own (see `ffi::handles`), so a plugin
//!   handle, an event, a shut-down host or a made-up pointer passed as a host is an error
//!   (`PLUGBUS_ERR_CLOSED`, the message says which), never a read through the pointer.

use std::ffi::c_char;
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use prost::Message as _;

use super::handles::{Kind, Registry, Token};
use super::{
    Error, PLUGBUS_ERR_CLOSED, PLUGBUS_ERR_INVALID_ARGUMENT, PLUGBUS_ERR_NOT_FOUND, PLUGBUS_ERR_TIMEOUT, PLUGBUS_OK,
    arg_bytes, arg_cstr, arg_str, guard, plugbus_move_record, plugbus_status, plugbus_str, put_opt,
};
use crate::codec::{self, EnvelopeDecoder};
use crate::fastpath::MoveRecord;
use crate::host::{ActionItem, Host, HostConfig, LogItem, Notice, Outcome, Pending};
use crate::proto::{ActionResult, EventEnvelope, EventResult, action, event_envelope::Payload, event_result};

/// `plugbus_host_poll_outcome`: the event's outcome is not complete yet.
pub const PLUGBUS_PENDING: i32 = 2;
/// `plugbus_host_next_*`: nothing (more) to take; `plugbus_host_outcome_chat`: the outcome does
/// not set a chat message.
pub const PLUGBUS_NONE: i32 = 3;

/// `plugbus_action.kind`: the `Action.kind` field number. Send a chat message
/// (`plugbus_host_action_send_chat`).
pub const PLUGBUS_ACTION_SEND_CHAT: i32 = 10;
/// `plugbus_action.kind`: teleport a player (`plugbus_host_action_teleport`).
pub const PLUGBUS_ACTION_TELEPORT: i32 = 11;
/// `plugbus_action.kind`: kick a player (`plugbus_host_action_kick`).
pub const PLUGBUS_ACTION_KICK: i32 = 12;

/// Largest configuration text `plugbus_host_start` reads.
const MAX_CONFIG: usize = 1 << 20;
/// Largest encoded envelope, action result or string argument accepted.
const MAX_MESSAGE: usize = 4 << 20;
/// Largest number of move records one `plugbus_host_publish_moves` call takes.
const MAX_MOVES: usize = 1 << 20;
/// Longest wait `plugbus_host_wait` accepts (one hour): a larger value is surely a unit mistake.
const MAX_WAIT_US: u64 = 3_600_000_000;

/// A host, opaque to C: a typed handle (a token checked against the registry of host handles,
/// never an address read through). Created by `plugbus_host_start` or
/// `plugbus_host_start_file`, freed by `plugbus_host_shutdown`. One thread drives it.
pub struct plugbus_host {
    _opaque: [u8; 0],
}

/// What a `plugbus_host` token stands for.
struct HostHandle {
    state: Mutex<Option<Box<HostState>>>,
}

/// The live host handles.
static HOSTS: Registry<HostHandle> = Registry::new(Kind::Host);

/// A finished event's outcome (filled by `plugbus_host_poll_outcome` and `plugbus_host_wait`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct plugbus_outcome {
    /// The event's id (as sent in `EventEnvelope.event_id`).
    pub event_id: u64,
    /// Some plugin cancelled the event.
    pub cancelled: bool,
    /// Some plugin changed the event: the merged change is in `plugbus_host_outcome_result`
    /// (and, for chat, `plugbus_host_outcome_chat`).
    pub changed: bool,
    /// Plugins that answered in time.
    pub answered: u32,
    /// Plugins that did not answer in time (counted as "no change").
    pub late: u32,
    /// Dispatch to completion, microseconds.
    pub elapsed_us: u64,
}

/// An action a plugin asked for (filled by `plugbus_host_next_action`; lent until the next
/// `plugbus_host_next_action` call or shutdown).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct plugbus_action {
    /// The plugin that sent it.
    pub plugin: plugbus_str,
    /// Which action: the `Action.kind` field number (`PLUGBUS_ACTION_SEND_CHAT`, ...), 0 if none.
    pub kind: i32,
    /// The correlation id (empty if none: then no `ActionResult` is expected).
    pub correlation_id: plugbus_str,
    /// The whole action, encoded `df.plugin.Action` bytes.
    pub data: *const u8,
    /// Length of `data`.
    pub len: usize,
}

impl Default for plugbus_action {
    fn default() -> Self {
        Self {
            plugin: plugbus_str::default(),
            kind: 0,
            correlation_id: plugbus_str::default(),
            data: [].as_ptr(),
            len: 0,
        }
    }
}

/// What a host handle keeps between calls. Everything an event, outcome, action or log line
/// passes through is kept and reused, so that the C API, like the Rust one, allocates nothing
/// in steady state.
struct HostState {
    host: Host,
    in_tick: bool,
    /// The last outcome taken (its lists and names reused by the next; its chat message is
    /// what `plugbus_host_outcome_chat` lends).
    outcome: Outcome,
    /// The last outcome's merged change, encoded (built in `result`).
    outcome_bytes: Vec<u8>,
    result: EventResult,
    /// `plugbus_host_publish_event` / `dispatch_event`: the envelopes decoded into.
    decoder: EnvelopeDecoder,
    /// `plugbus_host_send_action_result`: the result decoded into.
    action_result: ActionResult,
    action: Option<ActionItem>,
    action_bytes: Vec<u8>,
    notice: (String, String),
    log: Option<LogItem>,
    metrics: String,
    /// Reused for the typed helpers, one per helper (join, quit, chat, command), so that each
    /// keeps its payload's strings from one event to the next.
    typed: [EventEnvelope; 4],
    /// The last command's arguments, kept for the next command's.
    spare_args: crate::codec::StringSpare,
}

/// Runs `f` on the live host behind `h`.
///
/// # Safety
/// None: `h` may be any value (it is checked against the registry, never read through). The
/// function is `unsafe` because `f` is typically an unsafe block writing the caller's pointers.
unsafe fn with_host(
    h: *const plugbus_host,
    f: impl FnOnce(&mut HostState) -> Result<plugbus_status, Error>,
) -> plugbus_status {
    guard(|| {
        let handle = HOSTS.get(Token::decode(h, Kind::Host)?)?;
        let mut guard = match handle.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(Error::bad_state(
                    "another thread is using this host: one thread drives a host",
                ));
            }
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        match guard.as_deref_mut() {
            Some(state) => f(state),
            None => Err(Error::new(
                PLUGBUS_ERR_CLOSED,
                "the host was already shut down with plugbus_host_shutdown",
            )),
        }
    })
}

fn start(config: Result<HostConfig, crate::host::ConfigError>, out: *mut *mut plugbus_host) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let config = config.map_err(|e| Error::invalid(format!("bad configuration: {e}")))?;
        let host = Host::start(config).map_err(|e| Error::new(PLUGBUS_ERR_NOT_FOUND, e.to_string()))?;
        let state = HostState {
            host,
            in_tick: false,
            outcome: Outcome::default(),
            outcome_bytes: Vec::new(),
            result: EventResult::default(),
            decoder: EnvelopeDecoder::default(),
            action_result: ActionResult::default(),
            action: None,
            action_bytes: Vec::new(),
            notice: Default::default(),
            log: None,
            metrics: String::new(),
            typed: Default::default(),
            spare_args: Default::default(),
        };
        let t = HOSTS.insert(Arc::new(HostHandle {
            state: Mutex::new(Some(Box::new(state))),
        }))?;
        // SAFETY: checked non-null above; the caller passes a writable `plugbus_host *`.
        unsafe { out.write(t.as_ptr()) };
        Ok(PLUGBUS_OK)
    })
}

/// Starts a host from a TOML configuration given as text (`len` bytes of UTF-8, no NUL needed):
/// the `[host]` settings and `[[plugin]]` entries of a plugins.toml. Launches the plugins and
/// waits for the required ones' hellos. On success `*out` is the handle (free it with
/// `plugbus_host_shutdown`). Errors: `PLUGBUS_ERR_INVALID_ARGUMENT` for a configuration that
/// does not parse or validate, `PLUGBUS_ERR_NOT_FOUND` when the host cannot start (a required
/// plugin that does not start, a listen address in use); `plugbus_last_error` says which.
///
/// # Safety
/// `toml` points to `len` readable bytes; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_start(
    toml: *const c_char,
    len: usize,
    out: *mut *mut plugbus_host,
) -> plugbus_status {
    // SAFETY: forwarded contract.
    let text = match unsafe { arg_str(toml, len, MAX_CONFIG, "toml") } {
        Ok(t) => t,
        Err(e) => return guard(|| Err(e)),
    };
    start(HostConfig::from_toml(text), out)
}

/// Starts a host from a TOML file (`path` NUL-terminated); as `plugbus_host_start`, and
/// `PLUGBUS_ERR_NOT_FOUND` if the file cannot be read.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_start_file(path: *const c_char, out: *mut *mut plugbus_host) -> plugbus_status {
    // SAFETY: forwarded contract.
    let path = match unsafe { arg_cstr(path, "path") } {
        Ok(p) => p,
        Err(e) => return guard(|| Err(e)),
    };
    if let Err(e) = std::fs::metadata(path) {
        return guard(|| Err(Error::new(PLUGBUS_ERR_NOT_FOUND, format!("cannot read {path}: {e}"))));
    }
    start(HostConfig::from_file(path), out)
}

/// Begins a tick; `*tick` (if not NULL) gets its number. Publish and dispatch, then
/// `plugbus_host_end_tick`. Beginning a tick inside a tick is `PLUGBUS_ERR_BAD_STATE`.
///
/// # Safety
/// `h` is any pointer (checked); `tick` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_begin_tick(h: *mut plugbus_host, tick: *mut u64) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `tick` per the contract.
    unsafe {
        with_host(h, |s| {
            if s.in_tick {
                return Err(Error::bad_state("a tick is already in progress: end it first"));
            }
            s.in_tick = true;
            let n = {
                let t = s.host.begin_tick();
                let n = t.number();
                // The tick stays open until plugbus_host_end_tick.
                std::mem::forget(t);
                n
            };
            put_opt(tick, n);
            Ok(PLUGBUS_OK)
        })
    }
}

fn in_tick(s: &HostState) -> Result<(), Error> {
    if s.in_tick {
        Ok(())
    } else {
        Err(Error::bad_state(
            "no tick in progress: call plugbus_host_begin_tick first",
        ))
    }
}

/// Stages `count` moves for this tick (the records are copied into the tick's frame; nothing is
/// kept). They go out at the end of the tick, one packed frame per subscribed plugin.
///
/// # Safety
/// `records` points to `count` readable records (may be NULL when `count` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_publish_moves(
    h: *mut plugbus_host,
    records: *const plugbus_move_record,
    count: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `records` per the contract, its length checked first.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            if count > MAX_MOVES {
                return Err(Error::invalid(format!(
                    "records: {count} records exceed the limit of {MAX_MOVES} per call"
                )));
            }
            if count == 0 {
                return Ok(PLUGBUS_OK);
            }
            if records.is_null() {
                return Err(Error::null("records"));
            }
            // SAFETY: plugbus_move_record and MoveRecord have the same layout (asserted in
            // ffi/mod.rs); non-null, `count` records readable per the contract.
            let moves = std::slice::from_raw_parts(records.cast::<MoveRecord>(), count);
            s.host.stage_moves(moves);
            Ok(PLUGBUS_OK)
        })
    }
}

/// Decodes an envelope argument into the handle's reused envelopes (lent until the next call).
fn decode_envelope<'s>(decoder: &'s mut EnvelopeDecoder, bytes: &[u8]) -> Result<&'s mut EventEnvelope, Error> {
    let env = decoder
        .decode(bytes)
        .map_err(|e| Error::invalid(format!("envelope does not decode: {e}")))?;
    if env.payload.is_none() {
        return Err(Error::invalid("envelope carries no event (payload is empty)"));
    }
    Ok(env)
}

/// Publishes one event given as an encoded `df.plugin.EventEnvelope` (no answer awaited).
/// Subscribers get it in this tick's batch, or at once if it is immediate.
///
/// # Safety
/// `envelope` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_publish_event(
    h: *mut plugbus_host,
    envelope: *const u8,
    len: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `envelope` per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            let env = decode_envelope(&mut s.decoder, arg_bytes(envelope, len, MAX_MESSAGE, "envelope")?)?;
            s.host.publish(env);
            Ok(PLUGBUS_OK)
        })
    }
}

/// Dispatches one event given as an encoded `df.plugin.EventEnvelope`, expecting answers:
/// `*pending` gets its id, for `plugbus_host_poll_outcome` / `plugbus_host_wait`.
///
/// # Safety
/// `envelope` points to `len` readable bytes; `pending` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_dispatch_event(
    h: *mut plugbus_host,
    envelope: *const u8,
    len: usize,
    pending: *mut u64,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the pointers per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            if pending.is_null() {
                return Err(Error::null("pending"));
            }
            let env = decode_envelope(&mut s.decoder, arg_bytes(envelope, len, MAX_MESSAGE, "envelope")?)?;
            let p = s.host.dispatch(env);
            pending.write(p.event_id());
            Ok(PLUGBUS_OK)
        })
    }
}

/// Which of `HostState::typed` a helper fills.
const JOIN: usize = 0;
const QUIT: usize = 1;
const CHAT: usize = 2;
const COMMAND: usize = 3;

/// The payload of `env` as the variant `get` picks, made (`wrap` of a default) if `env` holds
/// another one or none.
fn typed<T: Default>(
    env: &mut EventEnvelope,
    wrap: fn(T) -> Payload,
    get: fn(&mut Payload) -> Option<&mut T>,
) -> &mut T {
    if env.payload.as_mut().and_then(get).is_none() {
        env.payload = Some(wrap(T::default()));
    }
    env.payload.as_mut().and_then(get).expect("the variant was just set")
}

/// Sets `dst` to `src`, keeping `dst`'s storage.
fn set(dst: &mut String, src: &str) {
    dst.clear();
    dst.push_str(src);
}

/// Routes the envelope a typed helper filled in `s.typed[which]`: published, or dispatched
/// into `pending`.
fn route(s: &mut HostState, which: usize, pending: Option<*mut u64>) -> Result<plugbus_status, Error> {
    let env = &mut s.typed[which];
    env.event_id.clear();
    env.r#type = 0;
    env.expects_response = false;
    env.immediate = false;
    match pending {
        Some(out) => {
            let p = s.host.dispatch(env);
            // SAFETY: checked non-null by the caller; writable per its contract.
            unsafe { out.write(p.event_id()) };
        }
        None => s.host.publish(env),
    }
    Ok(PLUGBUS_OK)
}

/// Publishes a `PlayerJoinEvent` (`uuid` the player's UUID as text, `name` the player's name).
///
/// # Safety
/// Each (pointer, length) pair points to that many readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_publish_join(
    h: *mut plugbus_host,
    uuid: *const c_char,
    uuid_len: usize,
    name: *const c_char,
    name_len: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the strings per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            let (uuid, name) = (
                arg_str(uuid, uuid_len, MAX_MESSAGE, "uuid")?,
                arg_str(name, name_len, MAX_MESSAGE, "name")?,
            );
            let ev = typed(&mut s.typed[JOIN], Payload::PlayerJoin, |p| match p {
                Payload::PlayerJoin(e) => Some(e),
                _ => None,
            });
            set(&mut ev.player_uuid, uuid);
            set(&mut ev.name, name);
            ev.world = None;
            route(s, JOIN, None)
        })
    }
}

/// Publishes a `PlayerQuitEvent`. No plugin sees a move of this player after it.
///
/// # Safety
/// Each (pointer, length) pair points to that many readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_publish_quit(
    h: *mut plugbus_host,
    uuid: *const c_char,
    uuid_len: usize,
    name: *const c_char,
    name_len: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the strings per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            let (uuid, name) = (
                arg_str(uuid, uuid_len, MAX_MESSAGE, "uuid")?,
                arg_str(name, name_len, MAX_MESSAGE, "name")?,
            );
            let ev = typed(&mut s.typed[QUIT], Payload::PlayerQuit, |p| match p {
                Payload::PlayerQuit(e) => Some(e),
                _ => None,
            });
            set(&mut ev.player_uuid, uuid);
            set(&mut ev.name, name);
            route(s, QUIT, None)
        })
    }
}

/// Dispatches a `ChatEvent` (player `uuid` and `name`, the `message` typed); `*pending` gets
/// its id.
///
/// # Safety
/// Each (pointer, length) pair points to that many readable bytes; `pending` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_dispatch_chat(
    h: *mut plugbus_host,
    uuid: *const c_char,
    uuid_len: usize,
    name: *const c_char,
    name_len: usize,
    message: *const c_char,
    message_len: usize,
    pending: *mut u64,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the pointers per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            if pending.is_null() {
                return Err(Error::null("pending"));
            }
            let (uuid, name) = (
                arg_str(uuid, uuid_len, MAX_MESSAGE, "uuid")?,
                arg_str(name, name_len, MAX_MESSAGE, "name")?,
            );
            let message = arg_str(message, message_len, MAX_MESSAGE, "message")?;
            let ev = typed(&mut s.typed[CHAT], Payload::Chat, |p| match p {
                Payload::Chat(e) => Some(e),
                _ => None,
            });
            set(&mut ev.player_uuid, uuid);
            set(&mut ev.name, name);
            set(&mut ev.message, message);
            route(s, CHAT, Some(pending))
        })
    }
}

/// Dispatches a `CommandEvent` for the line `raw` a player typed (`"/home set"`): `command` is
/// its first word without the slash (`"home"`), `args` the other words, as the df.plugin host
/// fills them; `name` is the player's name. `*pending` gets its id.
///
/// # Safety
/// Each (pointer, length) pair points to that many readable bytes; `pending` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_dispatch_command(
    h: *mut plugbus_host,
    uuid: *const c_char,
    uuid_len: usize,
    name: *const c_char,
    name_len: usize,
    raw: *const c_char,
    raw_len: usize,
    pending: *mut u64,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the pointers per the contract.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            if pending.is_null() {
                return Err(Error::null("pending"));
            }
            let (uuid, name) = (
                arg_str(uuid, uuid_len, MAX_MESSAGE, "uuid")?,
                arg_str(name, name_len, MAX_MESSAGE, "name")?,
            );
            let raw = arg_str(raw, raw_len, MAX_MESSAGE, "raw")?;
            let ev = typed(&mut s.typed[COMMAND], Payload::Command, |p| match p {
                Payload::Command(e) => Some(e),
                _ => None,
            });
            set(&mut ev.player_uuid, uuid);
            set(&mut ev.name, name);
            set(&mut ev.raw, raw);
            let mut words = raw.strip_prefix('/').unwrap_or(raw).split_whitespace();
            set(&mut ev.command, words.next().unwrap_or_default());
            // The arguments reuse the strings of earlier commands (see `codec::StringSpare`).
            s.spare_args.give_all(&mut ev.args);
            for w in words {
                let mut a = s.spare_args.take();
                a.push_str(w);
                ev.args.push(a);
            }
            route(s, COMMAND, Some(pending))
        })
    }
}

/// Ends the tick: moves go out as frames, batches are flushed, sleeping plugins are woken.
///
/// # Safety
/// `h` is any pointer (checked).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_end_tick(h: *mut plugbus_host) -> plugbus_status {
    // SAFETY: `with_host` checks `h`.
    unsafe {
        with_host(h, |s| {
            in_tick(s)?;
            s.in_tick = false;
            s.host.end_tick();
            Ok(PLUGBUS_OK)
        })
    }
}

/// Encodes the merged change of the outcome just taken into `s.outcome` (reusing the buffer)
/// and fills `*out`.
fn take_outcome(s: &mut HostState, out: *mut plugbus_outcome) {
    use std::fmt::Write as _;
    let o = &mut s.outcome;
    s.outcome_bytes.clear();
    if o.cancelled || o.mutation.is_some() {
        // The outcome's mutation is lent to the reused message for the encoding, not cloned.
        let r = &mut s.result;
        r.event_id.clear();
        let _ = write!(r.event_id, "{}", o.event_id);
        r.cancel = o.cancelled.then_some(true);
        std::mem::swap(&mut r.update, &mut o.mutation);
        r.encode(&mut s.outcome_bytes).expect("a Vec grows");
        std::mem::swap(&mut r.update, &mut o.mutation);
    }
    let o = &s.outcome;
    let c = plugbus_outcome {
        event_id: o.event_id,
        cancelled: o.cancelled,
        changed: o.mutation.is_some(),
        answered: o.answered.len() as u32,
        late: o.late.len() as u32,
        elapsed_us: o.elapsed.as_micros() as u64,
    };
    // SAFETY: callers check `out` non-null; writable per their contract.
    unsafe { out.write(c) };
}

fn pending_of(s: &HostState, pending: u64) -> Result<Pending, Error> {
    let p = Pending::from_event_id(pending);
    if s.host.is_pending(&p) {
        Ok(p)
    } else {
        Err(Error::invalid(format!(
            "no event {pending} is awaiting its outcome (never dispatched, or its outcome was already taken)"
        )))
    }
}

/// Takes the outcome of a dispatched event if it is complete (every plugin answered, or the
/// response timeout passed): `PLUGBUS_OK` and `*out` filled, or `PLUGBUS_PENDING`. Never
/// blocks. An outcome is taken once; asking again is `PLUGBUS_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_poll_outcome(
    h: *mut plugbus_host,
    pending: u64,
    out: *mut plugbus_outcome,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `out` per the contract.
    unsafe {
        with_host(h, |s| {
            if out.is_null() {
                return Err(Error::null("out"));
            }
            let p = pending_of(s, pending)?;
            if s.host.poll_outcome_into(&p, &mut s.outcome) {
                take_outcome(s, out);
                Ok(PLUGBUS_OK)
            } else {
                Ok(super::host::PLUGBUS_PENDING)
            }
        })
    }
}

/// Waits up to `timeout_us` microseconds for a dispatched event's outcome, sleeping until an
/// awaited plugin answers, then takes it (`*out`): plugins that did not answer by then count as
/// "no change" and as late. Returns `PLUGBUS_OK` when every plugin answered in time, else
/// `PLUGBUS_ERR_TIMEOUT` with `*out` filled all the same (the outcome is taken) and
/// `plugbus_last_error` naming the plugins that were late.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_wait(
    h: *mut plugbus_host,
    pending: u64,
    timeout_us: u64,
    out: *mut plugbus_outcome,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `out` per the contract.
    unsafe {
        with_host(h, |s| {
            if out.is_null() {
                return Err(Error::null("out"));
            }
            if timeout_us > MAX_WAIT_US {
                return Err(Error::invalid(format!(
                    "timeout_us {timeout_us} is over an hour: microseconds are expected"
                )));
            }
            let p = pending_of(s, pending)?;
            s.host
                .wait_into(&p, Instant::now() + Duration::from_micros(timeout_us), &mut s.outcome);
            take_outcome(s, out);
            let o = &s.outcome;
            if o.late.is_empty() {
                Ok(PLUGBUS_OK)
            } else {
                Err(Error::new(
                    PLUGBUS_ERR_TIMEOUT,
                    format!(
                        "{} did not answer event {pending} in time (counted as no change)",
                        o.late.join(", ")
                    ),
                ))
            }
        })
    }
}

/// The last outcome as an encoded `df.plugin.EventResult`: `cancel` set if some plugin
/// cancelled, `update` the merged change; `*len` is 0 if no plugin cancelled or changed the
/// event. Lent until the next outcome is taken.
///
/// # Safety
/// `data` and `len` are writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_outcome_result(
    h: *mut plugbus_host,
    data: *mut *const u8,
    len: *mut usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| {
            if data.is_null() || len.is_null() {
                return Err(Error::null("data or len"));
            }
            data.write(s.outcome_bytes.as_ptr());
            len.write(s.outcome_bytes.len());
            Ok(PLUGBUS_OK)
        })
    }
}

/// The chat message the last outcome sets (a chat event rewritten by a plugin): `PLUGBUS_OK`
/// and `*message` (lent until the next outcome), or `PLUGBUS_NONE` if it sets none.
///
/// # Safety
/// `message` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_outcome_chat(h: *mut plugbus_host, message: *mut plugbus_str) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `message` per the contract.
    unsafe {
        with_host(h, |s| {
            if message.is_null() {
                return Err(Error::null("message"));
            }
            let chat = match &s.outcome.mutation {
                Some(event_result::Update::Chat(c)) => c.message.as_deref(),
                _ => None,
            };
            match chat {
                Some(m) => {
                    message.write(plugbus_str::new(m));
                    Ok(PLUGBUS_OK)
                }
                None => Ok(PLUGBUS_NONE),
            }
        })
    }
}

/// Takes the next action a plugin asked for, in arrival order: `PLUGBUS_OK` and `*out` (lent
/// until the next call of this function), or `PLUGBUS_NONE`. Reads what plugins sent first.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_next_action(h: *mut plugbus_host, out: *mut plugbus_action) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `out` per the contract.
    unsafe {
        with_host(h, |s| {
            if out.is_null() {
                return Err(Error::null("out"));
            }
            if !s.in_tick {
                s.host.poll();
            }
            // The previous action (lent until this call) goes back for reuse.
            if let Some(a) = s.action.take() {
                s.host.recycle_action(a);
            }
            s.action = s.host.next_action();
            let Some(a) = &s.action else {
                return Ok(PLUGBUS_NONE);
            };
            s.action_bytes.clear();
            a.action.encode(&mut s.action_bytes).expect("a Vec grows");
            let kind = a.action.kind.as_ref().map_or(0, action::Kind::field_number);
            out.write(plugbus_action {
                plugin: plugbus_str::new(&a.plugin),
                kind,
                correlation_id: plugbus_str::new(a.action.correlation_id.as_deref().unwrap_or("")),
                data: s.action_bytes.as_ptr(),
                len: s.action_bytes.len(),
            });
            Ok(PLUGBUS_OK)
        })
    }
}

fn current_action(s: &HostState) -> Result<&action::Kind, Error> {
    s.action
        .as_ref()
        .and_then(|a| a.action.kind.as_ref())
        .ok_or_else(|| Error::bad_state("no current action: call plugbus_host_next_action first"))
}

fn wrong_kind(want: &str) -> Error {
    Error::new(
        PLUGBUS_ERR_INVALID_ARGUMENT,
        format!("the current action is not {want} (see plugbus_action.kind)"),
    )
}

/// The current action (the last one `plugbus_host_next_action` returned) as a send-chat:
/// `*target` the player's UUID, `*message` the text (lent as the action).
///
/// # Safety
/// `target` and `message` are NULL (skipped) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_action_send_chat(
    h: *mut plugbus_host,
    target: *mut plugbus_str,
    message: *mut plugbus_str,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| match current_action(s)? {
            action::Kind::SendChat(c) => {
                put_opt(target, plugbus_str::new(&c.target_uuid));
                put_opt(message, plugbus_str::new(&c.message));
                Ok(PLUGBUS_OK)
            }
            _ => Err(wrong_kind("a send-chat")),
        })
    }
}

/// The current action as a teleport: `*player`, `position[3]` (x, y, z) and `rotation[3]` (as
/// the action's `rotation` Vec3), each skipped if NULL.
///
/// # Safety
/// `player` is NULL or writable; `position` and `rotation` are NULL or point to 3 writable
/// doubles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_action_teleport(
    h: *mut plugbus_host,
    player: *mut plugbus_str,
    position: *mut f64,
    rotation: *mut f64,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| match current_action(s)? {
            action::Kind::Teleport(t) => {
                put_opt(player, plugbus_str::new(&t.player_uuid));
                let p = t.position.unwrap_or_default();
                let r = t.rotation.unwrap_or_default();
                if !position.is_null() {
                    std::slice::from_raw_parts_mut(position, 3).copy_from_slice(&[p.x, p.y, p.z]);
                }
                if !rotation.is_null() {
                    std::slice::from_raw_parts_mut(rotation, 3).copy_from_slice(&[r.x, r.y, r.z]);
                }
                Ok(PLUGBUS_OK)
            }
            _ => Err(wrong_kind("a teleport")),
        })
    }
}

/// The current action as a kick: `*player` and `*reason`.
///
/// # Safety
/// `player` and `reason` are NULL (skipped) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_action_kick(
    h: *mut plugbus_host,
    player: *mut plugbus_str,
    reason: *mut plugbus_str,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| match current_action(s)? {
            action::Kind::Kick(k) => {
                put_opt(player, plugbus_str::new(&k.player_uuid));
                put_opt(reason, plugbus_str::new(&k.reason));
                Ok(PLUGBUS_OK)
            }
            _ => Err(wrong_kind("a kick")),
        })
    }
}

/// Sends an `ActionResult` (encoded `df.plugin.ActionResult` bytes, its `correlation_id` the
/// action's) to plugin `plugin_id`. `PLUGBUS_ERR_NOT_FOUND` if that plugin is not connected.
///
/// # Safety
/// Each (pointer, length) pair points to that many readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_send_action_result(
    h: *mut plugbus_host,
    plugin_id: *const c_char,
    plugin_id_len: usize,
    result: *const u8,
    result_len: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the arguments per the contract.
    unsafe {
        with_host(h, |s| {
            let id = arg_str(plugin_id, plugin_id_len, MAX_MESSAGE, "plugin_id")?;
            codec::decode_reuse(
                &mut s.action_result,
                arg_bytes(result, result_len, MAX_MESSAGE, "result")?,
            )
            .map_err(|e| Error::invalid(format!("result does not decode: {e}")))?;
            if s.host.send_action_result_ref(id, &s.action_result) {
                Ok(PLUGBUS_OK)
            } else {
                Err(Error::new(
                    PLUGBUS_ERR_NOT_FOUND,
                    format!("plugin {id:?} is not connected (or not configured)"),
                ))
            }
        })
    }
}

/// Takes the next notice about the plugins (ready, disconnected, restarted, disabled, slow):
/// `PLUGBUS_OK` with `*plugin` and `*text` (one line, lent until the next call), or
/// `PLUGBUS_NONE`.
///
/// # Safety
/// `plugin` and `text` are NULL (skipped) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_next_notice(
    h: *mut plugbus_host,
    plugin: *mut plugbus_str,
    text: *mut plugbus_str,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| {
            let Some(n) = s.host.next_notice() else {
                return Ok(PLUGBUS_NONE);
            };
            s.notice = match n {
                Notice::Ready { id, name } => (id, format!("ready: {name}")),
                Notice::Disconnected {
                    id,
                    reason,
                    undelivered,
                    ..
                } => (id, format!("disconnected: {reason} ({undelivered} events undelivered)")),
                Notice::Restarted { id, attempt } => (id, format!("restarted (attempt {attempt})")),
                Notice::Disabled { id, reason } => (id, format!("disabled: {reason}")),
                Notice::Slow { id, what } => (id, format!("slow: {what}")),
            };
            put_opt(plugin, plugbus_str::new(&s.notice.0));
            put_opt(text, plugbus_str::new(&s.notice.1));
            Ok(PLUGBUS_OK)
        })
    }
}

/// Takes the next log line a plugin sent: `PLUGBUS_OK` with `*plugin`, `*level` and `*message`
/// (lent until the next call), or `PLUGBUS_NONE`.
///
/// # Safety
/// The out-pointers are NULL (skipped) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_next_log(
    h: *mut plugbus_host,
    plugin: *mut plugbus_str,
    level: *mut plugbus_str,
    message: *mut plugbus_str,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the out-pointers per the contract.
    unsafe {
        with_host(h, |s| {
            if !s.in_tick {
                s.host.poll();
            }
            // The previous line (lent until this call) goes back for reuse.
            if let Some(l) = s.log.take() {
                s.host.recycle_log(l);
            }
            s.log = s.host.next_log();
            let Some(l) = &s.log else {
                return Ok(PLUGBUS_NONE);
            };
            put_opt(plugin, plugbus_str::new(&l.plugin));
            put_opt(level, plugbus_str::new(&l.level));
            put_opt(message, plugbus_str::new(&l.message));
            Ok(PLUGBUS_OK)
        })
    }
}

/// The host's metrics as Prometheus text (OpenMetrics), lent in `*text` until the next call.
///
/// # Safety
/// `text` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_metrics(h: *mut plugbus_host, text: *mut plugbus_str) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; `text` per the contract.
    unsafe {
        with_host(h, |s| {
            if text.is_null() {
                return Err(Error::null("text"));
            }
            s.metrics = s.host.metrics().to_prometheus();
            text.write(plugbus_str::new(&s.metrics));
            Ok(PLUGBUS_OK)
        })
    }
}

/// The process id of launched plugin `plugin_id` (`*pid`), or `PLUGBUS_ERR_NOT_FOUND` when it
/// is not running (attached, between restarts, or not configured).
///
/// # Safety
/// `plugin_id` points to `len` readable bytes; `pid` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_plugin_pid(
    h: *mut plugbus_host,
    plugin_id: *const c_char,
    len: usize,
    pid: *mut u32,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the arguments per the contract.
    unsafe {
        with_host(h, |s| {
            if pid.is_null() {
                return Err(Error::null("pid"));
            }
            let id = arg_str(plugin_id, len, MAX_MESSAGE, "plugin_id")?;
            match s.host.pid_of(id) {
                Some(p) => {
                    pid.write(p);
                    Ok(PLUGBUS_OK)
                }
                None => Err(Error::new(
                    PLUGBUS_ERR_NOT_FOUND,
                    format!("plugin {id:?} has no running process"),
                )),
            }
        })
    }
}

/// Whether plugin `plugin_id` is connected and past its handshake: `PLUGBUS_OK` if so,
/// `PLUGBUS_NONE` if not (yet), `PLUGBUS_ERR_NOT_FOUND` if no such plugin is configured. Reads
/// what plugins sent first.
///
/// # Safety
/// `plugin_id` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_plugin_ready(
    h: *mut plugbus_host,
    plugin_id: *const c_char,
    len: usize,
) -> plugbus_status {
    // SAFETY: `with_host` checks `h`; the arguments per the contract.
    unsafe {
        with_host(h, |s| {
            let id = arg_str(plugin_id, len, MAX_MESSAGE, "plugin_id")?;
            if !s.host.plugins().iter().any(|(i, _)| i == id) {
                return Err(Error::new(
                    PLUGBUS_ERR_NOT_FOUND,
                    format!("no plugin {id:?} is configured"),
                ));
            }
            if !s.in_tick {
                s.host.poll();
            }
            Ok(if s.host.is_ready(id) { PLUGBUS_OK } else { PLUGBUS_NONE })
        })
    }
}

/// Shuts the host down: every plugin gets `HostShutdown` with `reason` (may be NULL with
/// `len` 0; bytes that are not UTF-8 are replaced, never a reason not to shut down), launched plugins are given the shutdown grace and then stopped, and the handle is
/// freed (what it lent is gone; later calls with it return `PLUGBUS_ERR_CLOSED`). Passing NULL
/// is allowed and does nothing.
///
/// # Safety
/// `reason` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_shutdown(
    h: *mut plugbus_host,
    reason: *const c_char,
    len: usize,
) -> plugbus_status {
    if h.is_null() {
        return PLUGBUS_OK;
    }
    // SAFETY: `with_host` checks `h`; `reason` per the contract.
    let status = unsafe {
        with_host(h, |s| {
            // A shutdown does not fail on its reason: bytes that are not UTF-8 are replaced.
            let bytes = arg_bytes(reason.cast(), len, MAX_MESSAGE, "reason").unwrap_or_default();
            let reason = String::from_utf8_lossy(bytes);
            s.host.shutdown(if reason.is_empty() {
                "host shutting down"
            } else {
                &reason
            });
            Ok(PLUGBUS_OK)
        })
    };
    if status == PLUGBUS_OK {
        // `with_host` found the token live: it goes stale now, and the host is dropped (which
        // stops whatever is still running) unless another thread's call still holds it, whose
        // call then ends first.
        if let Some(handle) = Token::decode(h, Kind::Host).ok().and_then(|t| HOSTS.remove(t)) {
            let mut st = handle.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.take();
        }
    }
    status
}
