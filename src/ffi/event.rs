//! The event handed to `on_event`: accessors for its fields and the reply helpers.

use std::cell::Cell;
use std::ffi::c_char;

use super::handles::{Kind, Token};
use super::{Error, PLUGBUS_OK, arg_str, guard, plugbus_status, plugbus_str, put_opt};
use crate::plugin::Reply;
use crate::proto::{EventEnvelope, event_envelope::Payload};

/// One event, opaque to C: a typed handle (a token naming its connection's slot, never an
/// address read through). Valid only during the `on_event` callback it was passed to: its
/// accessors and reply helpers return `PLUGBUS_ERR_BAD_STATE` after that, and
/// `PLUGBUS_ERR_CLOSED` once its handle is closed.
pub struct plugbus_event {
    _opaque: [u8; 0],
}

/// What the runtime lends for one `on_event` call, and the reply the C code chooses.
pub(crate) struct EventFrame<'a> {
    pub env: &'a EventEnvelope,
    pub bytes: &'a [u8],
    pub reply: Reply,
    pub max_message: usize,
}

type Lent = (*mut plugbus_event, *mut EventFrame<'static>);

thread_local! {
    /// The event an `on_event` callback on this thread is handling: its token and its frame
    /// (null, null outside callbacks). The accessors compare the token they are given with it,
    /// so the per-event path takes no lock and reads nothing through the caller's pointer.
    static CURRENT: Cell<Lent> = const { Cell::new((std::ptr::null_mut(), std::ptr::null_mut())) };
}

/// Withdraws a lent event when dropped (restoring the one lent before, for a callback that
/// polls another handle).
pub(crate) struct LentEvent {
    previous: Lent,
}

impl Drop for LentEvent {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Lends `frame` to the accessors as event `token` on this thread until the result is dropped.
/// The caller drops it before `frame` ends.
pub(crate) fn lend_event(token: *mut plugbus_event, frame: &mut EventFrame<'_>) -> LentEvent {
    let frame = std::ptr::from_mut(frame).cast::<EventFrame<'static>>();
    LentEvent {
        previous: CURRENT.with(|c| c.replace((token, frame))),
    }
}

/// Runs `f` on the event `ev` names, if it is the one being handled on this thread. `ev` may be
/// any value: it is compared with the lent event's token, never read through.
fn with_event<R>(
    ev: *const plugbus_event,
    f: impl FnOnce(&mut EventFrame<'_>) -> Result<R, Error>,
) -> Result<R, Error> {
    let (token, frame) = CURRENT.with(Cell::get);
    if !ev.is_null() && std::ptr::eq(ev, token) && !frame.is_null() {
        // SAFETY: `lend_event` set `frame` on this thread to the trampoline's stack `EventFrame`
        // just before calling `on_event`, and its guard clears it before that frame ends; it
        // is set, so we are nested in that callback, and the trampoline does not touch the
        // frame until the callback returns: this is the only access.
        return f(unsafe { &mut *frame });
    }
    // Not the event being handled: say why.
    let t = Token::decode(ev, Kind::Event)?;
    if !super::connection::is_live(t) {
        return Err(t.stale_error());
    }
    Err(Error::bad_state(
        "the event is valid only during its on_event callback (read what you need there)",
    ))
}

fn kind(env: &EventEnvelope) -> &'static str {
    env.payload.as_ref().map_or("empty", |p| p.event_type().as_str_name())
}

/// The event's id (`EventEnvelope.event_id`), valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_id(event: *mut plugbus_event, out: *mut plugbus_str) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        with_event(event, |e| {
            // SAFETY: non-null (checked above) and valid for a write by the caller's contract.
            unsafe { out.write(plugbus_str::new(&e.env.event_id)) };
            Ok(PLUGBUS_OK)
        })
    })
}

/// The event's df.plugin `EventType` number (`PLUGBUS_EVENT_*`).
///
/// # Safety
/// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_type(event: *mut plugbus_event, out: *mut i32) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: `out` is non-null (checked above) and valid for a write by the caller's contract.
        unsafe {
            with_event(event, |e| {
                let t = e.env.payload.as_ref().map_or(e.env.r#type, |p| p.event_type() as i32);
                out.write(t);
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// Whether the host waits for this plugin's answer (a reply helper's choice, or an ack).
///
/// # Safety
/// `event` is any value (checked, never read through); `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_expects_response(event: *mut plugbus_event, out: *mut bool) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: `out` is non-null (checked above) and valid for a write by the caller's contract.
        unsafe {
            with_event(event, |e| {
                out.write(e.env.expects_response);
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// The event's encoded df.plugin `EventEnvelope` (decode it with any protobuf library for the
/// fields the accessors do not cover). The bytes are valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); `data` and `len` are NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_bytes(
    event: *mut plugbus_event,
    data: *mut *const u8,
    len: *mut usize,
) -> plugbus_status {
    guard(|| {
        if data.is_null() || len.is_null() {
            return Err(Error::null("data or len"));
        }
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                data.write(e.bytes.as_ptr());
                len.write(e.bytes.len());
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// The fields of a `CHAT` event: `player_uuid` the sender's UUID, `player_name` the sender's
/// name (`ChatEvent.name`), `message` the text. `PLUGBUS_ERR_INVALID_ARGUMENT` for another type.
/// Each out pointer may be NULL (skipped). The strings are valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_chat(
    event: *mut plugbus_event,
    player_uuid: *mut plugbus_str,
    player_name: *mut plugbus_str,
    message: *mut plugbus_str,
) -> plugbus_status {
    guard(|| {
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                let Some(Payload::Chat(c)) = &e.env.payload else {
                    return Err(Error::invalid(format!("not a CHAT event: {}", kind(e.env))));
                };
                put_opt(player_uuid, plugbus_str::new(&c.player_uuid));
                put_opt(player_name, plugbus_str::new(&c.name));
                put_opt(message, plugbus_str::new(&c.message));
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// The fields of a `COMMAND` event: `player_uuid` the UUID of the player who typed it,
/// `player_name` that player's name (`CommandEvent.name`), `command` the command's name without
/// the slash (`filterstats`; match on this), `raw` the whole line typed (`/filterstats a b`),
/// `arg_count` the number of arguments (read each with `plugbus_event_command_arg`).
/// `PLUGBUS_ERR_INVALID_ARGUMENT` for another type. Each out pointer may be NULL (skipped). The
/// strings are valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_command(
    event: *mut plugbus_event,
    player_uuid: *mut plugbus_str,
    player_name: *mut plugbus_str,
    command: *mut plugbus_str,
    raw: *mut plugbus_str,
    arg_count: *mut usize,
) -> plugbus_status {
    guard(|| {
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                let Some(Payload::Command(c)) = &e.env.payload else {
                    return Err(Error::invalid(format!("not a COMMAND event: {}", kind(e.env))));
                };
                put_opt(player_uuid, plugbus_str::new(&c.player_uuid));
                put_opt(player_name, plugbus_str::new(&c.name));
                put_opt(command, plugbus_str::new(&c.command));
                put_opt(raw, plugbus_str::new(&c.raw));
                put_opt(arg_count, c.args.len());
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// Argument `index` (from 0) of a `COMMAND` event; `PLUGBUS_ERR_INVALID_ARGUMENT` if `index` is
/// not below the count or the event is another type. Valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); `arg` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_command_arg(
    event: *mut plugbus_event,
    index: usize,
    arg: *mut plugbus_str,
) -> plugbus_status {
    guard(|| {
        if arg.is_null() {
            return Err(Error::null("arg"));
        }
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                let Some(Payload::Command(c)) = &e.env.payload else {
                    return Err(Error::invalid(format!("not a COMMAND event: {}", kind(e.env))));
                };
                let a = c.args.get(index).ok_or_else(|| {
                    Error::invalid(format!(
                        "argument index {index} out of range (the command has {})",
                        c.args.len()
                    ))
                })?;
                arg.write(plugbus_str::new(a));
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// The fields of a `PLAYER_JOIN` event: `player_uuid` the joining player's UUID, `player_name`
/// that player's name (`PlayerJoinEvent.name`). `PLUGBUS_ERR_INVALID_ARGUMENT` for another
/// type. Each out pointer may be NULL (skipped). The strings are valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_join(
    event: *mut plugbus_event,
    player_uuid: *mut plugbus_str,
    player_name: *mut plugbus_str,
) -> plugbus_status {
    guard(|| {
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                let Some(Payload::PlayerJoin(j)) = &e.env.payload else {
                    return Err(Error::invalid(format!("not a PLAYER_JOIN event: {}", kind(e.env))));
                };
                put_opt(player_uuid, plugbus_str::new(&j.player_uuid));
                put_opt(player_name, plugbus_str::new(&j.name));
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// The fields of a `PLAYER_QUIT` event: `player_uuid` the leaving player's UUID, `player_name`
/// that player's name (`PlayerQuitEvent.name`). `PLUGBUS_ERR_INVALID_ARGUMENT` for another
/// type. Each out pointer may be NULL (skipped). The strings are valid during the callback.
///
/// # Safety
/// `event` is any value (checked, never read through); each out pointer is NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_event_quit(
    event: *mut plugbus_event,
    player_uuid: *mut plugbus_str,
    player_name: *mut plugbus_str,
) -> plugbus_status {
    guard(|| {
        // SAFETY: the caller's contract on each out pointer (the event is checked, not read through).
        unsafe {
            with_event(event, |e| {
                let Some(Payload::PlayerQuit(q)) = &e.env.payload else {
                    return Err(Error::invalid(format!("not a PLAYER_QUIT event: {}", kind(e.env))));
                };
                put_opt(player_uuid, plugbus_str::new(&q.player_uuid));
                put_opt(player_name, plugbus_str::new(&q.name));
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// Answers the event with "no change" (what happens anyway if no reply helper is called).
/// The last reply helper called during the callback wins. Replies to events that do not expect
/// a response are accepted and ignored.
///
/// # Safety
/// None: `event` may be any value (checked, never read through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_reply_ack(event: *mut plugbus_event) -> plugbus_status {
    set_reply(event, Reply::Ack)
}

/// Answers the event with "cancel it" (the host drops a cancelled chat message, ...).
///
/// # Safety
/// None: `event` may be any value (checked, never read through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_reply_cancel(event: *mut plugbus_event) -> plugbus_status {
    set_reply(event, Reply::Cancel)
}

/// Records `reply` as the answer to `event`.
fn set_reply(event: *mut plugbus_event, reply: Reply) -> plugbus_status {
    guard(move || {
        with_event(event, move |e| {
            e.reply = reply;
            Ok(PLUGBUS_OK)
        })
    })
}

/// Answers a `CHAT` event with "replace the message by `message`" (`len` bytes of UTF-8, not
/// necessarily NUL-terminated; copied). `PLUGBUS_ERR_INVALID_ARGUMENT` for another event type,
/// text that is not UTF-8, or a message larger than the replies ring carries.
///
/// # Safety
/// `event` is any value (checked, never read through); `message` is NULL or points to `len`
/// readable bytes (when `len` is within the ring's limit).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_reply_set_chat_message(
    event: *mut plugbus_event,
    message: *const c_char,
    len: usize,
) -> plugbus_status {
    guard(|| {
        // SAFETY: the caller's contract on `message`; the length is checked first.
        unsafe {
            with_event(event, |e| {
                if !matches!(e.env.payload, Some(Payload::Chat(_))) {
                    return Err(Error::invalid(format!("not a CHAT event: {}", kind(e.env))));
                }
                // Room for the message around the text: the ids (a plugin id is at most 48 bytes), tags
                // and lengths.
                let overhead = 128 + e.env.event_id.len();
                let max = e.max_message.saturating_sub(overhead);
                let text = arg_str(message, len, max, "message")?;
                e.reply = Reply::chat_message(text);
                Ok(PLUGBUS_OK)
            })
        }
    })
}

/// Calls `f` with an event handle lent over `env` (whose encoding is `bytes`), as `on_event`
/// is called, and returns what `f` returned with the reply it chose. For the fuzz harnesses
/// (fuzz/, tests/fuzz_*.rs), which call the accessors and reply helpers on events decoded from
/// arbitrary bytes without a host; not part of the API.
#[doc(hidden)]
pub fn with_event_for_fuzzing<R>(
    env: &EventEnvelope,
    bytes: &[u8],
    max_message: usize,
    f: impl FnOnce(*mut plugbus_event) -> R,
) -> (R, Reply) {
    let mut frame = EventFrame {
        env,
        bytes,
        reply: Reply::Ack,
        max_message,
    };
    let token = Token::unregistered_event().as_ptr::<plugbus_event>();
    let r = {
        // Lent for the call only, as a connection lends it to on_event (the guard ends the
        // loan when `f` returns or unwinds).
        let _lent = lend_event(token, &mut frame);
        f(token)
    };
    (r, frame.reply)
}
