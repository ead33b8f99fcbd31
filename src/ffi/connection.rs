//! The plugin handle (`plugbus_plugin`, a connection): open, configure, connect, poll, send, close.

use std::cell::{Cell, OnceCell, RefCell};
use std::ffi::c_char;
use std::time::{Duration, Instant};

use prost::Message as _;

use std::sync::Arc;

use super::event::{EventFrame, lend_event};
use super::handles::{Claim, Exclusive, Kind, Registry, Token};
use super::{
    Error, PLUGBUS_ERR_HOST_DIED, PLUGBUS_OK, PLUGBUS_SHUTDOWN, PLUGBUS_WAIT_PACED, PLUGBUS_WAIT_PARK,
    PLUGBUS_WAIT_SPIN, PLUGBUS_WAIT_SPIN_THEN_PARK, arg_bytes, arg_cstr, arg_str, closed_error, guard,
    plugbus_callbacks, plugbus_status, plugbus_str,
};
use crate::fastpath::{MoveFrameHeader, MoveRecord};
use crate::plugin::{Context, Handler, IdleStep, Plugin, PluginBuilder, Reply, WaitStrategy};
use crate::proto::{
    self, ActionResult, CommandSpec, EventEnvelope, EventType, LogMessage, PluginToHost, action, plugin_to_host,
};
use crate::transport::{HostState, PluginLink};

/// Most event types one `plugbus_subscribe` call may name.
const MAX_SUBSCRIPTIONS: usize = 1024;
/// How often an idle `plugbus_poll` checks that the host is alive (and the longest single sleep,
/// so heartbeats go out while a poll waits).
const HEALTH_EVERY: Duration = Duration::from_millis(100);
/// How long `plugbus_poll` keeps handling items before it returns, so one call is bounded.
const MAX_ITEMS_PER_POLL: usize = 4096;

/// A plugin connection, opaque to C: a typed handle (a token checked against the registry of
/// plugin handles, never an address read through). Created by `plugbus_open_env` or
/// `plugbus_open`, closed by `plugbus_close`. Use it from one thread at a time (a call from a
/// second thread while one is in a call is `PLUGBUS_ERR_BAD_STATE`).
pub struct plugbus_plugin {
    _opaque: [u8; 0],
}

/// The live plugin handles; a connection's event handle names the same slot.
static PLUGINS: Registry<Exclusive<PluginHandle>> = Registry::new(Kind::Plugin);

/// What a `plugbus_plugin` token stands for.
pub(crate) struct PluginHandle {
    state: RefCell<State>,
    /// The handler's context while a callback runs (null otherwise): sends made from inside a
    /// callback go through it, since the plugin itself is borrowed by `plugbus_poll` then.
    ctx: Cell<*mut Context<'static>>,
    wait: Cell<WaitStrategy>,
    /// Largest encoded `PluginToHost` the link carries (0 before connect).
    pub(crate) max_message: Cell<usize>,
    boot_id: OnceCell<String>,
}

// SAFETY: the only field that is not `Send` by itself is `ctx`, a pointer to a callback's
// context, non-null only while that callback runs on the thread that called `plugbus_poll`
// (which holds the handle's claim through the callback, so no other thread can use the handle
// then); between calls it is null. The connection state is `Send`.
unsafe impl Send for PluginHandle {}

enum State {
    Configuring(Box<PluginBuilder>),
    Connected(Box<Connected>),
    Closed,
}

struct Connected {
    plugin: Plugin,
    /// Why the host shut down, once `plugbus_poll` saw it.
    shutdown: Option<String>,
    /// The error that ended the connection (returned again by later calls).
    failed: Option<Error>,
    last_health: Instant,
}

impl Connected {
    fn usable(&self) -> Result<(), Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if let Some(reason) = &self.shutdown {
            return Err(Error::bad_state(format!("the host has shut down ({reason})")));
        }
        Ok(())
    }
}

/// Restores the handle's context pointer when a callback returns (or unwinds).
struct CallbackScope<'h> {
    h: &'h PluginHandle,
}

impl Drop for CallbackScope<'_> {
    fn drop(&mut self) {
        self.h.ctx.set(std::ptr::null_mut());
    }
}

impl PluginHandle {
    fn new(builder: PluginBuilder) -> Self {
        Self {
            state: RefCell::new(State::Configuring(Box::new(builder))),
            ctx: Cell::new(std::ptr::null_mut()),
            wait: Cell::new(WaitStrategy::default()),
            max_message: Cell::new(0),
            boot_id: OnceCell::new(),
        }
    }

    /// Publishes `ctx` for the duration of a callback.
    fn enter<'h>(&'h self, ctx: &mut Context<'_>) -> CallbackScope<'h> {
        self.ctx.set(std::ptr::from_mut(ctx).cast::<Context<'static>>());
        CallbackScope { h: self }
    }

    /// Runs `f` on the builder; an error once connected.
    fn configure(&self, what: &str, f: impl FnOnce(PluginBuilder) -> PluginBuilder) -> Result<plugbus_status, Error> {
        let mut st = self.state.try_borrow_mut().map_err(|_| busy(what))?;
        match &mut *st {
            State::Configuring(b) => {
                let taken = std::mem::replace(&mut **b, Plugin::builder("", ""));
                **b = f(taken);
                Ok(PLUGBUS_OK)
            }
            State::Connected(_) => Err(Error::bad_state(format!(
                "{what}: the plugin is already connected; configure it before plugbus_connect"
            ))),
            State::Closed => Err(closed_error()),
        }
    }

    /// Runs `f` with a context to send through: the callback's while one runs, else the
    /// plugin's (and then flushes, so the message leaves now).
    pub(crate) fn with_context<R>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Context<'_>, usize) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let raw = self.ctx.get();
        if !raw.is_null() {
            // SAFETY: `raw` is set only by `enter`, from the `&mut Context` the runtime lends a
            // callback, and cleared when the callback returns. It is non-null, so we are nested
            // in that callback, on its thread (a handle is used from one thread at a time), and
            // the runtime does not touch its reference until the callback returns: this is the
            // only live access to the context.
            let ctx = unsafe { &mut *raw };
            return f(ctx, self.max_message.get());
        }
        let mut st = self.state.try_borrow_mut().map_err(|_| busy(what))?;
        match &mut *st {
            State::Configuring(_) => Err(Error::bad_state(format!(
                "{what}: not connected; call plugbus_connect first"
            ))),
            State::Connected(c) => {
                c.usable()?;
                let r = f(&mut c.plugin.context(), self.max_message.get())?;
                if let Err(e) = c.plugin.flush() {
                    let e = Error::from(e);
                    c.failed = Some(e.clone());
                    return Err(e);
                }
                Ok(r)
            }
            State::Closed => Err(closed_error()),
        }
    }
}

fn busy(what: &str) -> Error {
    Error::bad_state(format!(
        "{what}: the handle is in use by plugbus_poll (this call is not allowed from inside a callback)"
    ))
}

/// The live plugin handle `p` names, claimed for this thread: NULL, a made-up pointer, a handle
/// of another kind and a closed handle are errors (nothing is read through `p`).
pub(crate) fn handle(p: *const plugbus_plugin) -> Result<Claim<PluginHandle>, Error> {
    let t = Token::decode(p, Kind::Plugin)?;
    PLUGINS.get(t)?.claim("plugin handle")
}

/// Whether `t` (a plugin token, or its event's) names a live connection.
pub(crate) fn is_live(t: Token) -> bool {
    PLUGINS.is_live(t)
}

/// Queues a `PluginToHost` payload after checking its encoded size against the ring's largest
/// frame (a message that can never fit would otherwise block every later one).
pub(crate) fn queue(ctx: &mut Context<'_>, max: usize, payload: plugin_to_host::Payload) -> Result<(), Error> {
    let msg = PluginToHost {
        plugin_id: ctx.plugin_id().to_owned(),
        payload: Some(payload),
    };
    let len = msg.encoded_len();
    if len > max {
        return Err(Error::invalid(format!(
            "the message encodes to {len} bytes; the link carries at most {max}"
        )));
    }
    if let Some(payload) = msg.payload {
        ctx.out.push(payload);
    }
    Ok(())
}

/// Makes a handle and stores its token in `*out`.
///
/// # Safety
/// `out` is valid for a write of a pointer.
unsafe fn open(builder: PluginBuilder, out: *mut *mut plugbus_plugin) -> Result<(), Error> {
    let t = PLUGINS.insert(Arc::new(Exclusive::new(PluginHandle::new(builder))))?;
    // SAFETY: valid for a write by this function's contract.
    unsafe { out.write(t.as_ptr()) };
    Ok(())
}

/// Opens a handle from the environment a plugbus host sets for the processes it launches
/// (`PLUGBUS_ADDRESS`, and `PLUGBUS_PLUGIN_ID` or `DF_PLUGIN_ID`; `PLUGBUS_SEGMENT` may stand
/// for the address when a plugin is started by hand). Not connected yet: configure it, then call
/// `plugbus_connect`. On success `*out` is the handle (free it with `plugbus_close`); on error
/// `*out` is NULL (`PLUGBUS_ERR_NOT_FOUND` if the variables are missing).
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_open_env(out: *mut *mut plugbus_plugin) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: non-null, valid for a write by the caller's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        let builder = Plugin::from_env()?;
        // SAFETY: `out` is non-null and valid for a write (checked above, and by contract).
        unsafe { open(builder, out)? };
        Ok(PLUGBUS_OK)
    })
}

/// Opens a handle for the link at `address` (the address a host printed for an attached
/// plugin, e.g. `shm:plugbus.external`; a bare segment name works too) as plugin `plugin_id`
/// (the id the host configured). Not connected yet; see `plugbus_open_env`.
///
/// # Safety
/// `address` and `plugin_id` are NULL or NUL-terminated strings; `out` is NULL or valid for a
/// write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_open(
    address: *const c_char,
    plugin_id: *const c_char,
    out: *mut *mut plugbus_plugin,
) -> plugbus_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: non-null, valid for a write by the caller's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: the caller's contract on `address` and `plugin_id`.
        let (address, plugin_id) = unsafe { (arg_cstr(address, "address")?, arg_cstr(plugin_id, "plugin_id")?) };
        if address.is_empty() || plugin_id.is_empty() {
            return Err(Error::invalid("address and plugin_id must not be empty"));
        }
        // SAFETY: `out` is non-null and valid for a write (checked above, and by contract).
        unsafe { open(Plugin::builder(address, plugin_id), out)? };
        Ok(PLUGBUS_OK)
    })
}

/// Sets the name and version sent in the hello (default: the plugin id, "0.0.0").
/// `PLUGBUS_ERR_BAD_STATE` once connected.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `name` and `version` are NULL or
/// NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_hello(
    p: *mut plugbus_plugin,
    name: *const c_char,
    version: *const c_char,
) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        // SAFETY: the caller's contract on each string.
        let (name, version) = unsafe { (arg_cstr(name, "name")?, arg_cstr(version, "version")?) };
        h.configure("plugbus_hello", |b| b.name(name).version(version))
    })
}

/// Registers a command (sent in the hello); the host then routes `/name` to this plugin as a
/// `COMMAND` event. `description` may be NULL. `PLUGBUS_ERR_BAD_STATE` once connected.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `name` and `description` are NULL or
/// NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_register_command(
    p: *mut plugbus_plugin,
    name: *const c_char,
    description: *const c_char,
) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        // SAFETY: the caller's contract on `name`.
        let name = unsafe { arg_cstr(name, "name")? };
        let description = if description.is_null() {
            ""
        } else {
            // SAFETY: non-null, so NUL-terminated by the caller's contract.
            unsafe { arg_cstr(description, "description")? }
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(Error::invalid(format!(
                "command name {name:?} is empty or has whitespace"
            )));
        }
        h.configure("plugbus_register_command", |b| {
            b.command(CommandSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                ..Default::default()
            })
        })
    })
}

/// Sets the events to receive: `n` df.plugin `EventType` numbers (`PLUGBUS_EVENT_*`;
/// `PLUGBUS_EVENT_PLAYER_MOVE` for the moves, `PLUGBUS_EVENT_ALL` for everything). Replaces any
/// earlier set. Before `plugbus_connect` it is sent with the hello; after, at once (also from
/// inside a callback). `types` may be NULL when `n` is 0; `n` is at most 1024.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); if `n` is at most 1024, `types` is NULL or
/// points to `n` readable `int32_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_subscribe(p: *mut plugbus_plugin, types: *const i32, n: usize) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        if n > MAX_SUBSCRIPTIONS {
            return Err(Error::invalid(format!(
                "plugbus_subscribe: n = {n} exceeds {MAX_SUBSCRIPTIONS}"
            )));
        }
        let list: &[i32] = if n == 0 {
            &[]
        } else if types.is_null() {
            return Err(Error::null("types"));
        } else {
            // SAFETY: non-null, n <= 1024, and the caller promises n readable i32 at `types`.
            unsafe { std::slice::from_raw_parts(types, n) }
        };
        let events = list
            .iter()
            .map(|&t| match EventType::try_from(t) {
                Ok(EventType::Unspecified) | Err(_) => Err(Error::invalid(format!("unknown event type {t}"))),
                Ok(e) => Ok(e),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let configuring = h.ctx.get().is_null()
            && matches!(
                &*h.state.try_borrow().map_err(|_| busy("plugbus_subscribe"))?,
                State::Configuring(_)
            );
        if configuring {
            return h.configure("plugbus_subscribe", |b| b.subscribe(events));
        }
        h.with_context("plugbus_subscribe", |ctx, max| {
            queue(
                ctx,
                max,
                plugin_to_host::Payload::Subscribe(proto::EventSubscribe {
                    events: events.iter().map(|e| *e as i32).collect(),
                }),
            )
        })?;
        Ok(PLUGBUS_OK)
    })
}

/// Sets how `plugbus_poll` waits when nothing has arrived: `PLUGBUS_WAIT_SPIN`,
/// `PLUGBUS_WAIT_SPIN_THEN_PARK` (default), `PLUGBUS_WAIT_PARK` or `PLUGBUS_WAIT_PACED`. Allowed at any time; it
/// applies from the next wait.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_set_wait(p: *mut plugbus_plugin, strategy: i32) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        let w = match strategy {
            PLUGBUS_WAIT_SPIN => WaitStrategy::Spin,
            PLUGBUS_WAIT_SPIN_THEN_PARK => WaitStrategy::default(),
            PLUGBUS_WAIT_PARK => WaitStrategy::Park,
            PLUGBUS_WAIT_PACED => WaitStrategy::PACED,
            _ => return Err(Error::invalid(format!("unknown wait strategy {strategy}"))),
        };
        h.wait.set(w);
        Ok(PLUGBUS_OK)
    })
}

/// Sets how long `plugbus_connect` waits for the host's hello (default 5000 ms; 1 to 3600000).
/// `PLUGBUS_ERR_BAD_STATE` once connected.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_set_hello_timeout(p: *mut plugbus_plugin, timeout_ms: u32) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        if timeout_ms == 0 || timeout_ms > 3_600_000 {
            return Err(Error::invalid(format!(
                "hello timeout {timeout_ms} ms is outside 1..=3600000"
            )));
        }
        h.configure("plugbus_set_hello_timeout", |b| {
            b.hello_timeout(Duration::from_millis(u64::from(timeout_ms)))
        })
    })
}

/// Connects to the host's link, sends the hello and subscriptions, and waits for the host's
/// hello.
/// On failure the handle stays unconnected (fix the cause and call it again, or close it):
/// `PLUGBUS_ERR_NOT_FOUND` (nothing at the address), `PLUGBUS_ERR_REFUSED`, `PLUGBUS_ERR_TIMEOUT`,
/// `PLUGBUS_ERR_HOST_DIED`, ... `PLUGBUS_ERR_BAD_STATE` if already connected.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_connect(p: *mut plugbus_plugin) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        let mut st = h.state.try_borrow_mut().map_err(|_| busy("plugbus_connect"))?;
        let b = match &*st {
            State::Configuring(b) => b,
            State::Connected(_) => {
                return Err(Error::bad_state("plugbus_connect: already connected"));
            }
            State::Closed => return Err(closed_error()),
        };
        let mut plugin = b.clone().wait(h.wait.get()).connect()?;
        let max = max_message(&mut plugin)?;
        h.max_message.set(max);
        let _ = h.boot_id.set(plugin.host_hello().boot_id.clone());
        *st = State::Connected(Box::new(Connected {
            plugin,
            shutdown: None,
            failed: None,
            last_health: Instant::now(),
        }));
        Ok(PLUGBUS_OK)
    })
}

/// The largest encoded `PluginToHost` message the link carries.
fn max_message(plugin: &mut Plugin) -> Result<usize, Error> {
    Ok(plugin.link().max_message())
}

/// The host's boot id (from its hello), valid until `plugbus_close`.
/// `PLUGBUS_ERR_BAD_STATE` before `plugbus_connect`.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_host_boot_id(p: *mut plugbus_plugin, out: *mut plugbus_str) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let id = h.boot_id.get().ok_or_else(|| Error::bad_state("not connected"))?;
        // SAFETY: non-null and valid for a write by the caller's contract.
        unsafe { out.write(plugbus_str::new(id)) };
        Ok(PLUGBUS_OK)
    })
}

/// The C callbacks as a Rust [`Handler`].
struct Trampoline<'h> {
    cb: plugbus_callbacks,
    h: &'h PluginHandle,
    /// The token passed to `on_event`: the connection's slot, as an event.
    event: *mut super::plugbus_event,
}

impl Handler for Trampoline<'_> {
    fn on_moves(&mut self, ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let Some(f) = self.cb.on_moves else { return };
        let _scope = self.h.enter(ctx);
        // SAFETY: `f` is the caller's function with the declared signature. `plugbus_move_record`
        // has the layout of `MoveRecord` (asserted at compile time), so the pointer is to
        // `moves.len()` valid records, readable for the call, which is all the header promises.
        unsafe {
            f(
                self.cb.user,
                frame.tick,
                frame.flags,
                moves.as_ptr().cast(),
                moves.len(),
            )
        };
    }

    fn on_event_bytes(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope, bytes: &[u8]) -> Reply {
        let Some(f) = self.cb.on_event else {
            return Reply::Ack;
        };
        let mut frame = EventFrame {
            env: event,
            bytes,
            reply: Reply::Ack,
            max_message: self.h.max_message.get(),
        };
        let scope = self.h.enter(ctx);
        let lent = lend_event(self.event, &mut frame);
        // SAFETY: `f` is the caller's function with the declared signature; the event is a
        // token (never dereferenced), resolved by the accessors to `frame` through this
        // thread's lent event, which `lent` withdraws before `frame` goes out of scope.
        unsafe { f(self.cb.user, self.event) };
        drop(lent);
        drop(scope);
        frame.reply
    }

    fn on_action_result(&mut self, ctx: &mut Context<'_>, result: &ActionResult) {
        let Some(f) = self.cb.on_action_result else {
            return;
        };
        let bytes = result.encode_to_vec();
        let _scope = self.h.enter(ctx);
        // SAFETY: `f` is the caller's function with the declared signature; `bytes` is valid
        // for the call.
        unsafe { f(self.cb.user, bytes.as_ptr(), bytes.len()) };
    }
}

/// Handles everything that has arrived (calling the callbacks, sending replies, beating the
/// heartbeat); if nothing had arrived, waits up to `timeout_ms` (0: do not wait; negative: until
/// something arrives) for the host's doorbell, and handles what then arrives. Returns
/// `PLUGBUS_OK` (also when the timeout passed with nothing), `PLUGBUS_SHUTDOWN` when the host
/// shut down (`plugbus_shutdown_reason` says why; later calls return it again), or an error
/// (`PLUGBUS_ERR_HOST_DIED`, `PLUGBUS_ERR_LINK`, ...; the connection is then over).
/// `PLUGBUS_ERR_BAD_STATE` before `plugbus_connect` or from inside a callback.
///
/// Call it at least every 100 ms or so: the heartbeat the host watches is beaten here.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `callbacks` is NULL or points to a
/// `plugbus_callbacks` whose non-NULL function pointers have the declared signatures and may be
/// called with its `user` during this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_poll(
    p: *mut plugbus_plugin,
    callbacks: *const plugbus_callbacks,
    timeout_ms: i32,
) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        let event = Token::decode(p, Kind::Plugin)?.as_kind(Kind::Event).as_ptr();
        if callbacks.is_null() {
            return Err(Error::null("callbacks"));
        }
        // SAFETY: non-null and pointing to a valid struct by the caller's contract (copied).
        let cb = unsafe { callbacks.read() };
        let mut st = h.state.try_borrow_mut().map_err(|_| busy("plugbus_poll"))?;
        let State::Connected(c) = &mut *st else {
            return Err(Error::bad_state(
                "plugbus_poll: not connected; call plugbus_connect first",
            ));
        };
        if let Some(e) = &c.failed {
            return Err(e.clone());
        }
        if c.shutdown.is_some() {
            return Ok(PLUGBUS_SHUTDOWN);
        }
        let r = poll(c, &mut Trampoline { cb, h: &h, event }, h.wait.get(), timeout_ms);
        if let Err(e) = &r {
            c.failed = Some(e.clone());
        }
        r
    })
}

fn poll(
    c: &mut Connected,
    handler: &mut Trampoline<'_>,
    wait: WaitStrategy,
    timeout_ms: i32,
) -> Result<plugbus_status, Error> {
    let started = Instant::now();
    let deadline = u64::try_from(timeout_ms)
        .ok()
        .map(|ms| started + Duration::from_millis(ms));
    let mut handled = 0;
    loop {
        let n = c.plugin.poll(handler)?;
        if let Some(reason) = c.plugin.shutdown_reason() {
            c.shutdown = Some(reason.to_owned());
            return Ok(PLUGBUS_SHUTDOWN);
        }
        handled += n;
        if n > 0 && handled < MAX_ITEMS_PER_POLL {
            continue;
        }
        if handled > 0 {
            return Ok(PLUGBUS_OK);
        }
        let now = Instant::now();
        let expired = deadline.is_some_and(|d| now >= d);
        let left = deadline.map_or(HEALTH_EVERY, |d| d.saturating_duration_since(now).min(HEALTH_EVERY));
        let step = c.plugin.idle_step(wait, started, now, left);
        let park = matches!(step, IdleStep::Park(_));
        // Host liveness: before sleeping, before returning idle, and every 100 ms when spinning.
        if park || expired || now.duration_since(c.last_health) >= HEALTH_EVERY {
            c.last_health = now;
            match c.plugin.link().host_state() {
                HostState::Running => {}
                HostState::Dead => {
                    let pid = c.plugin.link().host_pid();
                    return Err(Error::new(PLUGBUS_ERR_HOST_DIED, format!("the host (pid {pid}) died")));
                }
                HostState::ShuttingDown => {
                    // The HostShutdown message may already be in the ring: one more poll.
                    c.plugin.poll(handler)?;
                    let reason = c.plugin.shutdown_reason().unwrap_or("host shutting down");
                    c.shutdown = Some(reason.to_owned());
                    return Ok(PLUGBUS_SHUTDOWN);
                }
            }
        }
        if expired {
            return Ok(PLUGBUS_OK);
        }
        match step {
            IdleStep::Park(t) => {
                let asked = Instant::now();
                c.plugin.link().park(t).map_err(crate::plugin::PluginError::from)?;
                c.plugin.note_park(t, asked);
            }
            IdleStep::Spin => crate::sync::spin_loop(),
        }
    }
}

/// Why the host shut down, after `plugbus_poll` returned `PLUGBUS_SHUTDOWN`; valid until
/// `plugbus_close`. `PLUGBUS_ERR_BAD_STATE` if it has not.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `reason` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_shutdown_reason(p: *mut plugbus_plugin, reason: *mut plugbus_str) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        if reason.is_null() {
            return Err(Error::null("reason"));
        }
        let st = h.state.try_borrow().map_err(|_| busy("plugbus_shutdown_reason"))?;
        let State::Connected(c) = &*st else {
            return Err(Error::bad_state("not connected"));
        };
        let Some(r) = &c.shutdown else {
            return Err(Error::bad_state("the host has not shut down"));
        };
        // SAFETY: non-null and valid for a write by the caller's contract. The string lives in
        // the handle and is never changed once set, so it stays valid until plugbus_close.
        unsafe { reason.write(plugbus_str::new(r)) };
        Ok(PLUGBUS_OK)
    })
}

/// Sends a chat message to player `target_uuid` (its text form, as events carry it), or to
/// everyone if `target_len` is 0 (`target_uuid` may then be NULL). Works inside callbacks and
/// outside (then it is sent at once). The strings need not be NUL-terminated. Each call is one
/// `ActionBatch` message; a message larger than the replies ring can carry is
/// `PLUGBUS_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `target_uuid` is NULL or points to
/// `target_len` readable bytes, `message` NULL or to `message_len` readable bytes (when those
/// lengths are within the ring's limit).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_send_chat(
    p: *mut plugbus_plugin,
    target_uuid: *const c_char,
    target_len: usize,
    message: *const c_char,
    message_len: usize,
) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        h.with_context("plugbus_send_chat", |ctx, max| {
            // SAFETY: the caller's contract on the strings; lengths are checked first.
            let (target, message) = unsafe {
                (
                    arg_str(target_uuid, target_len, max, "target_uuid")?,
                    arg_str(message, message_len, max, "message")?,
                )
            };
            let kind = action::Kind::SendChat(proto::SendChatAction {
                target_uuid: target.to_owned(),
                message: message.to_owned(),
            });
            queue(ctx, max, actions(kind))
        })?;
        Ok(PLUGBUS_OK)
    })
}

fn actions(kind: action::Kind) -> plugin_to_host::Payload {
    plugin_to_host::Payload::Actions(proto::ActionBatch {
        actions: vec![proto::Action {
            correlation_id: None,
            kind: Some(kind),
        }],
    })
}

/// Writes a line into the host's log, tagged with this plugin's id. `level` is "error",
/// "warn", "info", "debug" or "trace" (NUL-terminated); `message` need not be.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `level` is NULL or NUL-terminated; `message`
/// is NULL or points to `len` readable bytes (when `len` is within the ring's limit).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_log(
    p: *mut plugbus_plugin,
    level: *const c_char,
    message: *const c_char,
    len: usize,
) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        // SAFETY: the caller's contract on `level`.
        let level = unsafe { arg_cstr(level, "level")? };
        if !["error", "warn", "info", "debug", "trace"].contains(&level) {
            return Err(Error::invalid(format!("unknown log level {level:?}")));
        }
        h.with_context("plugbus_log", |ctx, max| {
            // SAFETY: the caller's contract on `message`; the length is checked first.
            let message = unsafe { arg_str(message, len, max, "message")? };
            queue(
                ctx,
                max,
                plugin_to_host::Payload::Log(LogMessage {
                    level: level.to_owned(),
                    message: message.to_owned(),
                }),
            )
        })?;
        Ok(PLUGBUS_OK)
    })
}

/// Sends any df.plugin `PluginToHost` message, given encoded (for actions, queries and
/// messages the C API has no helper for). The bytes are decoded first: bytes that are not a
/// `PluginToHost` with a payload are `PLUGBUS_ERR_INVALID_ARGUMENT` and nothing is sent. The
/// message's `plugin_id` is replaced by this plugin's id. Works inside callbacks and outside.
///
/// # Safety
/// `p` is any value (checked, never read through: NULL, a closed handle or one of another kind is an error); `data` is NULL or points to `len` readable
/// bytes (when `len` is within the ring's limit).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_send_raw(p: *mut plugbus_plugin, data: *const u8, len: usize) -> plugbus_status {
    guard(|| {
        let h = handle(p)?;
        h.with_context("plugbus_send_raw", |ctx, max| {
            // SAFETY: the caller's contract on `data`; the length is checked first.
            let bytes = unsafe { arg_bytes(data, len, max, "data")? };
            let msg = PluginToHost::decode(bytes)
                .map_err(|e| Error::invalid(format!("the bytes are not a df.plugin PluginToHost message: {e}")))?;
            let payload = msg
                .payload
                .ok_or_else(|| Error::invalid("the PluginToHost message has no payload"))?;
            queue(ctx, max, payload)
        })?;
        Ok(PLUGBUS_OK)
    })
}

/// Closes the handle: detaches from the link and frees what the handle holds. NULL is
/// allowed (nothing happens). The handle (and its event) is then stale: passing it again, to
/// this or any function, is `PLUGBUS_ERR_CLOSED`, also after a newer handle was opened (each
/// handle carries a generation). Closing from inside a callback is `PLUGBUS_ERR_BAD_STATE`
/// (nothing is closed).
///
/// # Safety
/// `p` is NULL or any pointer (it is checked before use; nothing is read through it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugbus_close(p: *mut plugbus_plugin) -> plugbus_status {
    guard(|| {
        if p.is_null() {
            return Ok(PLUGBUS_OK);
        }
        let t = Token::decode(p, Kind::Plugin)?;
        let h = PLUGINS.get(t)?.claim("plugin handle")?;
        if !h.ctx.get().is_null() {
            return Err(busy("plugbus_close"));
        }
        let mut st = h.state.try_borrow_mut().map_err(|_| busy("plugbus_close"))?;
        // Drops the connection: detaches from the link (shared memory: unmaps it), frees the buffers.
        *st = State::Closed;
        drop(st);
        // The token goes stale; the handle's memory goes with the last claim (`h`, below).
        PLUGINS.remove(t);
        Ok(PLUGBUS_OK)
    })
}
