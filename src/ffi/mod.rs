//! The C ABI for plugins: `ffi/plugbus.h` is generated from this module by cbindgen (see
//! `cbindgen.toml`; `tests/ffi_header.rs` checks that the committed header is current).
//!
//! A C plugin opens a handle (from the environment the host sets, or by segment name),
//! configures it (hello, commands, subscriptions, wait strategy), connects, and then calls
//! [`plugbus_poll`] in a loop. `plugbus_poll` runs the Rust
//! [`Plugin`](crate::plugin::Plugin) loop with a [`Handler`](crate::plugin::Handler) that calls
//! the C callbacks: moves are lent in place as `plugbus_move_record` (the same 48 bytes as
//! [`MoveRecord`]), events as a `plugbus_event` handle with accessors and reply helpers.
//!
//! Rules the exported functions keep (and the header states):
//! - every function returns a status code (`PLUGBUS_OK`, `PLUGBUS_SHUTDOWN`, or a negative
//!   `PLUGBUS_ERR_*`); `plugbus_last_error()` gives the message of the last failure on the thread;
//! - a NULL pointer, a bad length, a closed handle, or a call in the wrong state is an error,
//!   never a crash: handles are typed tokens (see [`handles`]), each checked for its kind and
//!   liveness against the registry of its kind before anything is touched, and never read
//!   through, so a handle of another kind, a stale handle or a made-up pointer is
//!   `PLUGBUS_ERR_CLOSED` with a message saying which;
//! - no Rust panic crosses the boundary: each function runs under `catch_unwind`.
#![allow(non_camel_case_types)]

pub mod connection;
pub mod event;
mod handles;
pub mod host;

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::fastpath::MoveRecord;
use crate::plugin::PluginError;
use crate::proto::EventType;
use crate::transport::ConnectError;

pub use connection::*;
pub use event::*;
pub use host::*;

/// A status code: `PLUGBUS_OK` (0), `PLUGBUS_SHUTDOWN` (1), or a negative `PLUGBUS_ERR_*`.
pub type plugbus_status = i32;

/// Success.
pub const PLUGBUS_OK: i32 = 0;
/// `plugbus_poll`: the host shut down (see `plugbus_shutdown_reason`); close the handle and exit.
pub const PLUGBUS_SHUTDOWN: i32 = 1;
/// A required pointer argument was NULL.
pub const PLUGBUS_ERR_NULL_POINTER: i32 = -1;
/// An argument is invalid: a bad length, not UTF-8, an unknown event type or strategy, bytes that
/// do not decode, a message larger than the ring can carry.
pub const PLUGBUS_ERR_INVALID_ARGUMENT: i32 = -2;
/// The call is not allowed now: poll before connect, configure after connect, an event helper
/// outside its callback, a handle call from inside a callback that needs the handle itself.
pub const PLUGBUS_ERR_BAD_STATE: i32 = -3;
/// The handle is not a live plugbus handle of the kind the function takes: already closed
/// (stale), never opened (a made-up or foreign pointer), or a handle of another kind (an event
/// passed to a connection function, a host handle to a plugin function, ...). Nothing is read
/// through such a pointer; `plugbus_last_error` says which case it is.
pub const PLUGBUS_ERR_CLOSED: i32 = -4;
/// Not found: no such segment, or the environment variables a host sets are missing.
pub const PLUGBUS_ERR_NOT_FOUND: i32 = -5;
/// The host refused the handshake, or another process is attached to the segment.
pub const PLUGBUS_ERR_REFUSED: i32 = -6;
/// No `HostHello` within the hello timeout.
pub const PLUGBUS_ERR_TIMEOUT: i32 = -7;
/// The host's process died.
pub const PLUGBUS_ERR_HOST_DIED: i32 = -8;
/// The shared-memory link broke (a ring protocol violation, a message too large for the ring).
pub const PLUGBUS_ERR_LINK: i32 = -9;
/// The host sent bytes that do not decode, or the segment is not a compatible plugbus segment.
pub const PLUGBUS_ERR_PROTOCOL: i32 = -10;
/// The host stopped reading this plugin's replies and too many are queued.
pub const PLUGBUS_ERR_HOST_NOT_READING: i32 = -11;
/// An operating-system call failed.
pub const PLUGBUS_ERR_IO: i32 = -12;
/// A bug in plugbus (a Rust panic, caught at the boundary). The handle is unusable; close it.
pub const PLUGBUS_ERR_INTERNAL: i32 = -13;

/// Event type `EVENT_TYPE_ALL`: subscribe to every event.
pub const PLUGBUS_EVENT_ALL: i32 = 1;
/// Event type `PLAYER_JOIN` (accessor: `plugbus_event_join`).
pub const PLUGBUS_EVENT_PLAYER_JOIN: i32 = 10;
/// Event type `PLAYER_QUIT` (accessor: `plugbus_event_quit`).
pub const PLUGBUS_EVENT_PLAYER_QUIT: i32 = 11;
/// `on_moves` flag: the plugin lagged; the records are each player's latest position over
/// several ticks, some of which it never saw.
pub const PLUGBUS_MOVES_CONFLATED: u32 = 1;
/// `on_moves` flag: the tick's records go on in the next `on_moves` call.
pub const PLUGBUS_MOVES_MORE: u32 = 2;

const _: () = {
    assert!(PLUGBUS_MOVES_CONFLATED == crate::fastpath::FLAG_CONFLATED);
    assert!(PLUGBUS_MOVES_MORE == crate::fastpath::FLAG_MORE);
};

/// Event type `PLAYER_MOVE`: moves arrive through `on_moves`, in place.
pub const PLUGBUS_EVENT_PLAYER_MOVE: i32 = 12;
/// Event type `PLAYER_TELEPORT`.
pub const PLUGBUS_EVENT_PLAYER_TELEPORT: i32 = 14;
/// Event type `CHAT` (accessor: `plugbus_event_chat`).
pub const PLUGBUS_EVENT_CHAT: i32 = 18;
/// Event type `PLAYER_DEATH`.
pub const PLUGBUS_EVENT_PLAYER_DEATH: i32 = 22;
/// Event type `PLAYER_BLOCK_BREAK`.
pub const PLUGBUS_EVENT_PLAYER_BLOCK_BREAK: i32 = 27;
/// Event type `PLAYER_BLOCK_PLACE`.
pub const PLUGBUS_EVENT_PLAYER_BLOCK_PLACE: i32 = 28;
/// Event type `COMMAND` (accessors: `plugbus_event_command`, `plugbus_event_command_arg`).
pub const PLUGBUS_EVENT_COMMAND: i32 = 45;

const _: () = {
    assert!(PLUGBUS_EVENT_ALL == EventType::All as i32);
    assert!(PLUGBUS_EVENT_PLAYER_JOIN == EventType::PlayerJoin as i32);
    assert!(PLUGBUS_EVENT_PLAYER_QUIT == EventType::PlayerQuit as i32);
    assert!(PLUGBUS_EVENT_PLAYER_MOVE == EventType::PlayerMove as i32);
    assert!(PLUGBUS_EVENT_PLAYER_TELEPORT == EventType::PlayerTeleport as i32);
    assert!(PLUGBUS_EVENT_CHAT == EventType::Chat as i32);
    assert!(PLUGBUS_EVENT_PLAYER_DEATH == EventType::PlayerDeath as i32);
    assert!(PLUGBUS_EVENT_PLAYER_BLOCK_BREAK == EventType::PlayerBlockBreak as i32);
    assert!(PLUGBUS_EVENT_PLAYER_BLOCK_PLACE == EventType::PlayerBlockPlace as i32);
    assert!(PLUGBUS_EVENT_COMMAND == EventType::Command as i32);
};

/// Wait strategy: busy-poll while waiting (lowest latency, one core at 100%).
pub const PLUGBUS_WAIT_SPIN: i32 = 0;
/// Wait strategy (default): spin 50 µs, then sleep on the doorbell.
pub const PLUGBUS_WAIT_SPIN_THEN_PARK: i32 = 1;
/// Wait strategy: sleep on the doorbell at once (near-zero idle CPU).
pub const PLUGBUS_WAIT_PARK: i32 = 2;
/// Wait strategy: spin-then-park that learns the host's tick rate and is awake 200 µs before
/// each tick, so the host's tick thread pays no wake-up (about 2% of a core at 50 ticks/s).
pub const PLUGBUS_WAIT_PACED: i32 = 3;

/// A string lent by plugbus: `len` bytes of UTF-8 at `ptr`, **not** NUL-terminated (print it
/// with `printf("%.*s", (int)s.len, s.ptr)`). Valid as long as the function that filled it says
/// (for event fields: during the callback). `ptr` is never NULL (an empty string has `len` 0).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct plugbus_str {
    /// The first byte.
    pub ptr: *const c_char,
    /// Length in bytes.
    pub len: usize,
}

impl plugbus_str {
    /// Lends `s` (the caller keeps `s` alive as long as the C side may read it).
    pub fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr().cast(),
            len: s.len(),
        }
    }

    /// The string, for tests and Rust callers.
    ///
    /// # Safety
    /// `self` was filled by plugbus and is still within its validity (see the function that
    /// filled it).
    pub unsafe fn as_str<'a>(&self) -> &'a str {
        // SAFETY: plugbus fills `ptr`/`len` from a live `&str` (UTF-8, `len` bytes, non-null);
        // the caller promises it is still alive.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len)) }
    }
}

impl Default for plugbus_str {
    fn default() -> Self {
        Self::new("")
    }
}

/// One player's position and rotation, exactly the 48-byte `MoveRecord` of the moves ring
/// (no padding; the header asserts size and offsets at compile time).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct plugbus_move_record {
    /// The player's UUID, 16 raw bytes (RFC 4122 byte order).
    pub uuid: [u8; 16],
    /// Position x.
    pub x: f64,
    /// Position y.
    pub y: f64,
    /// Position z.
    pub z: f64,
    /// Rotation yaw, degrees.
    pub yaw: f32,
    /// Rotation pitch, degrees.
    pub pitch: f32,
}

// The moves are lent to C as `*const plugbus_move_record` pointing at `MoveRecord`s: the two
// types must have the same size, alignment and field offsets (and the same field types, above).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<plugbus_move_record>() == size_of::<MoveRecord>());
    assert!(size_of::<plugbus_move_record>() == 48);
    assert!(align_of::<plugbus_move_record>() == align_of::<MoveRecord>());
    assert!(offset_of!(plugbus_move_record, uuid) == offset_of!(MoveRecord, uuid));
    assert!(offset_of!(plugbus_move_record, x) == offset_of!(MoveRecord, x));
    assert!(offset_of!(plugbus_move_record, y) == offset_of!(MoveRecord, y));
    assert!(offset_of!(plugbus_move_record, z) == offset_of!(MoveRecord, z));
    assert!(offset_of!(plugbus_move_record, yaw) == offset_of!(MoveRecord, yaw));
    assert!(offset_of!(plugbus_move_record, pitch) == offset_of!(MoveRecord, pitch));
};

impl From<MoveRecord> for plugbus_move_record {
    fn from(m: MoveRecord) -> Self {
        Self {
            uuid: m.uuid,
            x: m.x,
            y: m.y,
            z: m.z,
            yaw: m.yaw,
            pitch: m.pitch,
        }
    }
}

/// The functions `plugbus_poll` calls. Any of them may be NULL (moves are then skipped; events
/// are acknowledged). All run on the thread that called `plugbus_poll`, inside that call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct plugbus_callbacks {
    /// Passed as the first argument of every callback.
    pub user: *mut c_void,
    /// One tick's moves, lent in place from shared memory: `count` records at `records`, valid
    /// only during the call (copy what you keep). `flags` holds `PLUGBUS_MOVES_CONFLATED` when
    /// this plugin lagged and the records are each player's latest position over several ticks
    /// (some skipped), and `PLUGBUS_MOVES_MORE` when the tick's records go on in the next call.
    pub on_moves: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            tick: u64,
            flags: u32,
            records: *const plugbus_move_record,
            count: usize,
        ),
    >,
    /// One event. `event` and everything read from it are valid only during the call; reply to
    /// it (if it expects a response) with `plugbus_reply_*` before returning, or it is acked.
    pub on_event: Option<unsafe extern "C" fn(user: *mut c_void, event: *mut plugbus_event)>,
    /// The `ActionResult` (encoded df.plugin bytes, valid during the call) of an action sent
    /// with a correlation id through `plugbus_send_raw`.
    pub on_action_result: Option<unsafe extern "C" fn(user: *mut c_void, data: *const u8, len: usize)>,
}

/// A failure to report across the boundary: a status code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error {
    pub code: plugbus_status,
    pub message: String,
}

impl Error {
    pub fn new(code: plugbus_status, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Self {
        Self::new(PLUGBUS_ERR_NULL_POINTER, format!("{what} is NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(PLUGBUS_ERR_INVALID_ARGUMENT, message)
    }
    pub fn bad_state(message: impl Into<String>) -> Self {
        Self::new(PLUGBUS_ERR_BAD_STATE, message)
    }
}

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        let code = match &e {
            PluginError::MissingEnv(_) => PLUGBUS_ERR_NOT_FOUND,
            PluginError::Connect(c) => match c {
                ConnectError::NotFound { .. } => PLUGBUS_ERR_NOT_FOUND,
                ConnectError::BadAddress { .. } => PLUGBUS_ERR_INVALID_ARGUMENT,
                ConnectError::Taken { .. } => PLUGBUS_ERR_REFUSED,
                ConnectError::Io { .. } => PLUGBUS_ERR_IO,
                ConnectError::Refused { .. } => PLUGBUS_ERR_PROTOCOL,
            },
            PluginError::Refused(_) => PLUGBUS_ERR_REFUSED,
            PluginError::HelloTimeout(_) => PLUGBUS_ERR_TIMEOUT,
            PluginError::HostDied { .. } => PLUGBUS_ERR_HOST_DIED,
            PluginError::Link(_) | PluginError::Broken(_) => PLUGBUS_ERR_LINK,
            PluginError::Decode(_) => PLUGBUS_ERR_PROTOCOL,
            PluginError::HostNotReading(_) => PLUGBUS_ERR_HOST_NOT_READING,
        };
        Self::new(code, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs the body of an exported function: its error becomes the status and the thread's last
/// error; a panic becomes `PLUGBUS_ERR_INTERNAL` instead of unwinding into C.
pub(crate) fn guard(f: impl FnOnce() -> Result<plugbus_status, Error>) -> plugbus_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last_error(&format!("internal error in plugbus (please report): {what}"));
            PLUGBUS_ERR_INTERNAL
        }
    }
}

pub(crate) fn closed_error() -> Error {
    Error::new(PLUGBUS_ERR_CLOSED, "the handle was already closed with plugbus_close")
}

/// The message of the last failed plugbus call on this thread ("" if none failed yet): a
/// NUL-terminated string owned by plugbus, valid until the next plugbus call on this thread.
/// Never NULL. Successful calls leave it unchanged.
#[unsafe(no_mangle)]
pub extern "C" fn plugbus_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status code (`"PLUGBUS_OK"`, `"PLUGBUS_ERR_BAD_STATE"`, ...), a static
/// NUL-terminated string; `"PLUGBUS_UNKNOWN"` for a number that is not a status.
#[unsafe(no_mangle)]
pub extern "C" fn plugbus_status_name(status: plugbus_status) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        PLUGBUS_OK => c"PLUGBUS_OK",
        PLUGBUS_SHUTDOWN => c"PLUGBUS_SHUTDOWN",
        PLUGBUS_ERR_NULL_POINTER => c"PLUGBUS_ERR_NULL_POINTER",
        PLUGBUS_ERR_INVALID_ARGUMENT => c"PLUGBUS_ERR_INVALID_ARGUMENT",
        PLUGBUS_ERR_BAD_STATE => c"PLUGBUS_ERR_BAD_STATE",
        PLUGBUS_ERR_CLOSED => c"PLUGBUS_ERR_CLOSED",
        PLUGBUS_ERR_NOT_FOUND => c"PLUGBUS_ERR_NOT_FOUND",
        PLUGBUS_ERR_REFUSED => c"PLUGBUS_ERR_REFUSED",
        PLUGBUS_ERR_TIMEOUT => c"PLUGBUS_ERR_TIMEOUT",
        PLUGBUS_ERR_HOST_DIED => c"PLUGBUS_ERR_HOST_DIED",
        PLUGBUS_ERR_LINK => c"PLUGBUS_ERR_LINK",
        PLUGBUS_ERR_PROTOCOL => c"PLUGBUS_ERR_PROTOCOL",
        PLUGBUS_ERR_HOST_NOT_READING => c"PLUGBUS_ERR_HOST_NOT_READING",
        PLUGBUS_ERR_IO => c"PLUGBUS_ERR_IO",
        PLUGBUS_ERR_INTERNAL => c"PLUGBUS_ERR_INTERNAL",
        _ => c"PLUGBUS_UNKNOWN",
    };
    s.as_ptr()
}

/// Reads a NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn arg_cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string valid for the call.
    let c = unsafe { std::ffi::CStr::from_ptr(p) };
    c.to_str()
        .map_err(|e| Error::invalid(format!("{what} is not UTF-8: {e}")))
}

/// Reads a (pointer, length) argument of at most `max` bytes. The length is checked before the
/// pointer is used, so a garbage length is an error, not a read out of bounds.
///
/// # Safety
/// If `len` is at most `max` and `p` is not NULL, `p` points to `len` readable bytes valid for
/// the call.
pub(crate) unsafe fn arg_bytes<'a>(p: *const u8, len: usize, max: usize, what: &str) -> Result<&'a [u8], Error> {
    if len > max {
        return Err(Error::invalid(format!(
            "{what}: length {len} exceeds the limit of {max} bytes"
        )));
    }
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: non-null, `len` <= `max` <= isize::MAX (callers pass limits below 1 GiB), and the
    // caller promises `len` readable bytes at `p` for the duration of the call.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// [`arg_bytes`], as UTF-8.
///
/// # Safety
/// As [`arg_bytes`].
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, len: usize, max: usize, what: &str) -> Result<&'a str, Error> {
    // SAFETY: forwarded contract.
    let b = unsafe { arg_bytes(p.cast(), len, max, what) }?;
    std::str::from_utf8(b).map_err(|e| Error::invalid(format!("{what} is not UTF-8: {e}")))
}

/// Writes `v` to an out-parameter that may be NULL (skipped).
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
pub(crate) unsafe fn put_opt<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: non-null and, by the caller's contract, valid for a write of T.
        unsafe { out.write(v) };
    }
}
