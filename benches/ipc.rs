//! End to end, host process -> plugin process: plugbus against the old design's transport (the
//! "baseline") and, with the `bench-iceoryx2` feature, against iceoryx2, with the same payloads,
//! in one criterion group (`ipc`) so that every ratio comes from one run.
//!
//! # Payloads (one item each, the same for every transport)
//!
//! - `moves/100`: one tick of 100 players' moves (`Throughput::Elements(100)`: one element is one
//!   player's move).
//!   - plugbus: `Tick::publish_moves` of 100 [`MoveRecord`]s, then `Tick::end`: one packed move
//!     frame (48 bytes a record), read in place by the plugin's `Handler::on_moves`;
//!   - baseline: 100 `PlayerMoveEvent` envelopes, each its own length-delimited
//!     `HostToPlugin { event }` written with one `write` (exactly what `plugbus compare` does:
//!     `MoveRecord::to_move_event`, wrap, encode into a fresh buffer); the plugin decodes each one
//!     and turns it back into a record (`MoveRecord::from_move_event`, which parses the UUID);
//!   - iceoryx2: one sample holding a slice of the 100 records (48 bytes each, the same
//!     `#[repr(C)]` layout), written into the loaned sample and read in place: zero-copy, like
//!     plugbus's move frame.
//! - `chat`: one `ChatEvent` envelope (`Throughput::Elements(1)`).
//!   - plugbus: `Host::publish` (a chat is immediate: encoded straight into the control ring, then
//!     the doorbell), decoded by the plugin runtime into a reused envelope;
//!   - baseline: one length-delimited `HostToPlugin { event }` message, one `write`, decoded with
//!     `HostToPlugin::decode`;
//!   - iceoryx2: the prost encoding of the same envelope, encoded straight into a loaned byte-slice
//!     sample, decoded by the plugin into a reused envelope.
//!
//! The plugin reads everything: a checksum over every field of every move record (in order), and
//! over the chat's player, name and message.
//!
//! # What is timed, and the acknowledgement scheme (the same for every transport)
//!
//! A sample of `n` items is one *run*. Untimed, the host announces the run (`run <payload> <n>
//! <every>` as the `correlation_id` of an `ActionResult`, on the transport's own host -> plugin
//! path) and waits for the plugin's `ready`. Then, timed: the host sends the `n` items; the plugin
//! acknowledges after every `every`-th item and after the last one; the clock stops when the host
//! has the acknowledgement of item `n`. So each sample runs from the host's first publish to the
//! host knowing that the plugin process has observed, decoded and read every item.
//!
//! An acknowledgement is what a plugin naturally sends back: a `PluginToHost` with an
//! `ActionBatch` of one `SendChatAction` whose message is `ack <seen> <checksum>`; plugbus sends
//! it with `Context::send_chat` on its replies ring (the host reads it with `Host::poll` and
//! `Host::drain_actions`), the baseline writes it length-delimited on the socket, iceoryx2
//! publishes its bytes as a sample of an `ack` service (and the host announces runs on a `ctl`
//! service, beside the `moves` and `chat` ones). The host checks every acknowledgement:
//! the count, and the checksum (`seen` times the item's checksum), so a lost, repeated or damaged
//! item fails the bench instead of flattering it.
//!
//! Two benchmark functions per payload and transport:
//! - `stream`: a pipelined stream, acknowledged every [`ACK_EVERY`] items, with at most
//!   [`WINDOW`] unacknowledged items in flight (the host waits for an acknowledgement before it
//!   would exceed that). The window is the flow control every transport needs (plugbus conflates
//!   moves and queues events when a ring is full; iceoryx2 would overwrite or block), and it is
//!   far below every ring's and buffer's capacity. Time per item is throughput.
//! - `rtt`: one item, wait for its acknowledgement, repeat (`every` = window = 1). Time per item is
//!   the round trip: host publish -> plugin observes and reads -> acknowledgement -> host.
//!
//! # Waiting
//!
//! Each transport twice where it has a choice, so that a ratio compares like with like:
//! - `plugbus`: the plugin with the default [`WaitStrategy`] (spin 50 µs, then sleep on the
//!   doorbell); `plugbus-spin`: [`WaitStrategy::Spin`] (a core busy-polling).
//! - `baseline`: blocking socket reads on both sides (what a socket plugin does); `baseline-spin`:
//!   reads that busy-poll (`recv` with `MSG_DONTWAIT`) on both sides. The blocking baseline's round
//!   trip is mostly two scheduler wake-ups, whose cost depends on the machine (on an idle VM a
//!   wake-up of a halted vCPU costs tens of µs); `baseline-spin` shows the transport without them.
//! - `iceoryx2`: the plugin busy-polls its subscribers (pub/sub has no wake-up of its own), so
//!   compare it with the `-spin` variants.
//! - The host waits for acknowledgements by spinning (yielding every 64th turn), except the
//!   blocking baseline's, which blocks in `read`.
//!
//! # Processes
//!
//! The plugin is this binary, re-executed with `PLUGBUS_BENCH_ROLE` set (`main` checks it first):
//! plugbus plugins are launched by the `Host` (`PluginConfig::launch`) and attach with
//! `Plugin::from_env`; the baseline and iceoryx2 plugins are spawned with `Command`. Each
//! benchmark function starts its own plugin process on its first call, checks it with an untimed
//! run of [`VERIFY_N`] items plus a few round trips, and stops it when the function is done, so
//! a spinning plugin never steals a core from another function (the bench machine may have two).
//!
//! Run: `cargo bench --bench ipc` (about two minutes), with iceoryx2:
//! `cargo bench --bench ipc --features bench-iceoryx2` (iceoryx2 needs libclang to build).
#![warn(clippy::undocumented_unsafe_blocks)]

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group};
use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply, WaitStrategy};
use plugbus::proto::{
    Action, ActionBatch, ActionResult, ChatEvent, EventEnvelope, EventType, HostToPlugin, PluginToHost, SendChatAction,
    action, event_envelope::Payload, host_to_plugin, plugin_to_host,
};
use prost::Message as _;

mod common;
#[path = "../cli/src/wire.rs"]
mod wire;
use common::{Backoff, die_with_parent};
use wire::read_message;

/// Players per tick in the `moves` payload.
const PLAYERS: usize = 100;
/// In `stream`, the plugin acknowledges every this many items.
const ACK_EVERY: u64 = 16;
/// In `stream`, at most this many items are unacknowledged (a multiple of `ACK_EVERY`). 64 ticks
/// of moves are 0.3 MB of move frames, against a 4 MiB moves ring.
const WINDOW: u64 = 4 * ACK_EVERY;
/// Items in the untimed correctness run: not a multiple of `ACK_EVERY`, many times `WINDOW`.
const VERIFY_N: u64 = 1_003;
/// How long the host waits for one acknowledgement before it declares the plugin stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable that turns this binary into a plugin; its value names the role.
const ROLE_ENV: &str = "PLUGBUS_BENCH_ROLE";
/// The bench process's pid, so that a plugin can make sure it dies with it.
const PARENT_ENV: &str = "PLUGBUS_BENCH_PARENT";
/// The baseline's socket path.
const SOCKET_ENV: &str = "PLUGBUS_BENCH_SOCKET";
/// The plugbus plugin id.
const PLUGIN_ID: &str = "ipc-bench";

const _: () = assert!(WINDOW % ACK_EVERY == 0);

// ---- payloads ----

/// Which payload a run carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Moves,
    Chat,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Moves => "moves/100",
            Kind::Chat => "chat",
        }
    }

    /// The checksum of one item, as the plugin computes it.
    fn item_sum(self) -> u64 {
        match self {
            Kind::Moves => moves().iter().fold(MoveSum::default(), |s, r| s.add(r)).0,
            Kind::Chat => match &chat().payload {
                Some(Payload::Chat(c)) => chat_sum(c),
                _ => unreachable!("chat() is a chat"),
            },
        }
    }
}

/// One tick's moves: 100 distinct players, every field different from player to player.
fn moves() -> Vec<MoveRecord> {
    (0..PLAYERS)
        .map(|i| {
            let uuid = (0x8d3f_0c6e_93c5_4c2f_9b7b_3f1b_0000_0000_u128 + i as u128 * 0x1_0001).to_be_bytes();
            let f = i as f64;
            MoveRecord::new(
                uuid,
                [f * 1.25 - 60.0, 64.0 + (i % 7) as f64, 30.5 - f * 0.75],
                (i * 3) as f32,
                -10.0 + i as f32 * 0.125,
            )
        })
        .collect()
}

/// The chat event (the same as benches/codec.rs's, published rather than dispatched).
fn chat() -> EventEnvelope {
    EventEnvelope {
        event_id: String::new(),
        r#type: EventType::Chat as i32,
        expects_response: false,
        immediate: false,
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: "8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10".to_owned(),
            name: "Steve".to_owned(),
            message: "hello there, how is everyone doing today?".to_owned(),
        })),
    }
}

/// An order-sensitive checksum over every field of a tick's records.
#[derive(Debug, Default, Clone, Copy)]
struct MoveSum(u64);

impl MoveSum {
    #[inline]
    fn add(self, r: &MoveRecord) -> Self {
        let (a, b) = r.uuid.split_at(8);
        let a = u64::from_le_bytes(a.try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let v = a
            ^ b.rotate_left(7)
            ^ r.x.to_bits()
            ^ r.y.to_bits().rotate_left(13)
            ^ r.z.to_bits().rotate_left(29)
            ^ ((u64::from(r.yaw.to_bits()) << 32) | u64::from(r.pitch.to_bits()));
        Self(self.0.wrapping_mul(0x0000_0100_0000_01b3).wrapping_add(v))
    }
}

/// FNV-1a over a chat's player, name and message.
fn chat_sum(c: &ChatEvent) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for part in [&c.player_uuid, &c.name, &c.message] {
        for &byte in part.as_bytes().iter().chain(&[0xff]) {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

// ---- the run protocol ----

/// One run: `n` items of `kind`, acknowledged every `every` items and after the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    kind: Kind,
    n: u64,
    every: u64,
}

impl Run {
    fn encode(&self) -> String {
        let kind = match self.kind {
            Kind::Moves => "moves",
            Kind::Chat => "chat",
        };
        format!("run {kind} {} {}", self.n, self.every)
    }

    fn parse(s: &str) -> Option<Self> {
        let mut w = s.split(' ');
        if w.next()? != "run" {
            return None;
        }
        let kind = match w.next()? {
            "moves" => Kind::Moves,
            "chat" => Kind::Chat,
            _ => return None,
        };
        let n = w.next()?.parse().ok()?;
        let every = w.next()?.parse().ok().filter(|&e| e > 0)?;
        Some(Self { kind, n, every })
    }
}

/// The announcement of a run, as every transport's host -> plugin control message.
fn run_message(run: &Run) -> HostToPlugin {
    HostToPlugin {
        plugin_id: PLUGIN_ID.to_owned(),
        payload: Some(host_to_plugin::Payload::ActionResult(ActionResult {
            correlation_id: run.encode(),
            ..Default::default()
        })),
    }
}

/// An acknowledgement (or `ready`, or `error ...`), as every transport's plugin -> host message.
fn ack_message(text: String) -> PluginToHost {
    PluginToHost {
        plugin_id: PLUGIN_ID.to_owned(),
        payload: Some(plugin_to_host::Payload::Actions(ActionBatch {
            actions: vec![Action {
                correlation_id: None,
                kind: Some(action::Kind::SendChat(SendChatAction {
                    target_uuid: String::new(),
                    message: text,
                })),
            }],
        })),
    }
}

/// The acknowledgement texts in a `PluginToHost` message.
fn ack_texts(msg: PluginToHost, out: &mut VecDeque<String>) {
    if let Some(plugin_to_host::Payload::Actions(batch)) = msg.payload {
        out.extend(batch.actions.into_iter().filter_map(|a| match a.kind {
            Some(action::Kind::SendChat(c)) => Some(c.message),
            _ => None,
        }));
    }
}

/// The plugin's side of the protocol: counts items and their checksums, says when to ack.
#[derive(Debug, Default)]
struct Counter {
    run: Option<Run>,
    seen: u64,
    sum: u64,
}

impl Counter {
    /// A control message: the reply to send.
    fn control(&mut self, text: &str) -> String {
        match Run::parse(text) {
            Some(run) => {
                *self = Self {
                    run: Some(run),
                    seen: 0,
                    sum: 0,
                };
                "ready".to_owned()
            }
            None => format!("error: bad control message {text:?}"),
        }
    }

    /// One item seen: the acknowledgement to send, if one is due.
    #[inline]
    fn item(&mut self, kind: Kind, sum: u64) -> Option<String> {
        let Some(run) = self.run else {
            return Some(format!("error: {kind:?} item outside a run"));
        };
        if kind != run.kind || self.seen == run.n {
            return Some(format!(
                "error: unexpected {kind:?} item in {run:?} after {}",
                self.seen
            ));
        }
        self.seen += 1;
        self.sum = self.sum.wrapping_add(sum);
        (self.seen % run.every == 0 || self.seen == run.n).then(|| format!("ack {} {}", self.seen, self.sum))
    }
}

/// The host's side of one transport.
trait Transport {
    /// Sends the announcement of `run` (the caller then waits for `ready`).
    fn announce(&mut self, run: &Run);
    /// Sends one item.
    fn send(&mut self, kind: Kind);
    /// Waits for the next acknowledgement text from the plugin.
    fn next_ack(&mut self) -> String;
}

/// Waits for the next acknowledgement and checks it is `ack <expect> <expect * item_sum>`.
fn expect_ack(t: &mut impl Transport, expect: u64, item_sum: u64) {
    let text = t.next_ack();
    let want = format!("ack {expect} {}", item_sum.wrapping_mul(expect));
    assert_eq!(text, want, "wrong acknowledgement from the plugin");
}

/// One run of `n` items with at most `window` unacknowledged: announce and wait for `ready`
/// (untimed), then time from the first send until the acknowledgement of the last item.
fn drive(t: &mut impl Transport, kind: Kind, item_sum: u64, n: u64, every: u64, window: u64) -> Duration {
    let run = Run { kind, n, every };
    t.announce(&run);
    let ready = t.next_ack();
    assert_eq!(ready, "ready", "the plugin did not accept {run:?}");
    let start = Instant::now();
    let mut acked = 0;
    for sent in 0..n {
        while sent - acked >= window {
            acked = (acked + every).min(n);
            expect_ack(t, acked, item_sum);
        }
        t.send(kind);
    }
    while acked < n {
        acked = (acked + every).min(n);
        expect_ack(t, acked, item_sum);
    }
    start.elapsed()
}

// ---- plugbus ----

/// The host, with one launched plugin subscribed to chat and moves.
struct PlugbusHost {
    host: Host,
    records: Vec<MoveRecord>,
    chat: EventEnvelope,
    acks: VecDeque<String>,
}

impl PlugbusHost {
    fn start(role: &str) -> Self {
        let exe = std::env::current_exe().expect("path of the bench binary");
        let cfg = PluginConfig::launch(PLUGIN_ID, exe)
            .env(ROLE_ENV, role)
            .env(PARENT_ENV, &std::process::id().to_string())
            .required(true);
        let mut config = HostConfig::new(vec![cfg]);
        config.host.hello_timeout_ms = 10_000;
        let mut host = Host::start(config).unwrap_or_else(|e| panic!("plugbus host: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(host.is_subscribed(PLUGIN_ID, EventType::PlayerMove) && host.is_subscribed(PLUGIN_ID, EventType::Chat))
        {
            assert!(Instant::now() < deadline, "the plugbus plugin did not subscribe");
            host.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        Self {
            host,
            records: moves(),
            chat: chat(),
            acks: VecDeque::new(),
        }
    }
}

impl Transport for PlugbusHost {
    fn announce(&mut self, run: &Run) {
        let Some(host_to_plugin::Payload::ActionResult(r)) = run_message(run).payload else {
            unreachable!("run_message is an ActionResult")
        };
        assert!(self.host.send_action_result(PLUGIN_ID, r), "the plugbus plugin is gone");
    }

    #[inline]
    fn send(&mut self, kind: Kind) {
        match kind {
            Kind::Moves => {
                let mut tick = self.host.begin_tick();
                tick.publish_moves(&self.records);
                tick.end();
            }
            Kind::Chat => self.host.publish(&mut self.chat),
        }
    }

    fn next_ack(&mut self) -> String {
        let (mut backoff, started) = (Backoff(0), Instant::now());
        loop {
            if let Some(text) = self.acks.pop_front() {
                return text;
            }
            self.host.poll();
            self.acks
                .extend(self.host.drain_actions().filter_map(|a| match a.action.kind {
                    Some(action::Kind::SendChat(c)) => Some(c.message),
                    _ => None,
                }));
            if self.acks.is_empty() && backoff.snooze() {
                let notices: Vec<_> = self.host.drain_notices().collect();
                assert!(self.host.is_ready(PLUGIN_ID), "the plugbus plugin is gone: {notices:?}");
                assert!(
                    started.elapsed() < ACK_TIMEOUT,
                    "no acknowledgement from the plugbus plugin"
                );
            }
        }
    }
}

/// The plugbus plugin's handler.
#[derive(Debug, Default)]
struct BenchHandler {
    counter: Counter,
}

impl Handler for BenchHandler {
    fn on_moves(&mut self, ctx: &mut Context<'_>, _frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let sum = moves.iter().fold(MoveSum::default(), |s, r| s.add(r)).0;
        let reply = if moves.len() == PLAYERS {
            self.counter.item(Kind::Moves, sum)
        } else {
            Some(format!("error: a move frame of {} records", moves.len()))
        };
        if let Some(text) = reply {
            ctx.send_chat("", &text);
        }
    }

    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        let reply = match &event.payload {
            Some(Payload::Chat(c)) => self.counter.item(Kind::Chat, chat_sum(c)),
            other => Some(format!("error: unexpected event {other:?}")),
        };
        if let Some(text) = reply {
            ctx.send_chat("", &text);
        }
        Reply::Ack
    }

    fn on_action_result(&mut self, ctx: &mut Context<'_>, result: &ActionResult) {
        let text = self.counter.control(&result.correlation_id);
        ctx.send_chat("", &text);
    }
}

fn plugbus_plugin(wait: WaitStrategy) {
    let mut handler = BenchHandler::default();
    let r = Plugin::from_env().and_then(|b| {
        b.name("ipc-bench")
            .subscribe([EventType::Chat, EventType::PlayerMove])
            .wait(wait)
            .run(&mut handler)
    });
    if let Err(e) = r {
        eprintln!("ipc bench plugin: {e}");
        std::process::exit(1);
    }
}

// ---- the baseline: one length-delimited prost message per event on a Unix socket ----

struct BaselineHost {
    child: Child,
    out: UnixStream,
    acks_in: BufReader<SocketRead>,
    acks: VecDeque<String>,
    records: Vec<MoveRecord>,
    chat: EventEnvelope,
    env: EventEnvelope,
    tick: u64,
    next_id: u64,
    buf: Vec<u8>,
}

impl BaselineHost {
    /// The baseline with blocking reads on both sides (`spin`: busy-polling reads).
    fn start(spin: bool) -> Self {
        let sock = std::env::temp_dir().join(format!("plugbus-ipc-bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap_or_else(|e| panic!("bind {}: {e}", sock.display()));
        let child = Command::new(std::env::current_exe().expect("path of the bench binary"))
            .env(ROLE_ENV, if spin { "baseline-spin" } else { "baseline" })
            .env(PARENT_ENV, std::process::id().to_string())
            .env(SOCKET_ENV, &sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the baseline plugin");
        let (out, _) = listener.accept().expect("accept the baseline plugin");
        let _ = std::fs::remove_file(&sock);
        out.set_read_timeout(Some(ACK_TIMEOUT)).expect("socket read timeout");
        let acks_in = BufReader::new(SocketRead {
            stream: out.try_clone().expect("clone the socket"),
            spin,
        });
        Self {
            child,
            out,
            acks_in,
            acks: VecDeque::new(),
            records: moves(),
            chat: chat(),
            env: EventEnvelope::default(),
            tick: 0,
            next_id: 1,
            buf: Vec::new(),
        }
    }

    /// What the old bridge does per event (as `plugbus compare`): wrap, marshal into a fresh
    /// buffer, one write.
    #[inline]
    fn send_event(out: &mut UnixStream, buf: &mut Vec<u8>, env: &EventEnvelope) {
        let msg = HostToPlugin {
            plugin_id: String::new(),
            payload: Some(host_to_plugin::Payload::Event(env.clone())),
        };
        *buf = msg.encode_length_delimited_to_vec();
        out.write_all(buf).expect("baseline write");
    }
}

impl Transport for BaselineHost {
    fn announce(&mut self, run: &Run) {
        let bytes = run_message(run).encode_length_delimited_to_vec();
        self.out.write_all(&bytes).expect("baseline write");
    }

    #[inline]
    fn send(&mut self, kind: Kind) {
        match kind {
            Kind::Moves => {
                self.tick += 1;
                for (i, m) in self.records.iter().enumerate() {
                    let mut env = std::mem::take(&mut self.env);
                    env.event_id = format!("{}.{i}", self.tick);
                    env.r#type = EventType::PlayerMove as i32;
                    env.payload = Some(Payload::PlayerMove(m.to_move_event("", "overworld")));
                    Self::send_event(&mut self.out, &mut self.buf, &env);
                    self.env = env;
                }
            }
            Kind::Chat => {
                self.chat.event_id = self.next_id.to_string();
                self.next_id += 1;
                Self::send_event(&mut self.out, &mut self.buf, &self.chat);
            }
        }
    }

    fn next_ack(&mut self) -> String {
        while self.acks.is_empty() {
            read_message(&mut self.acks_in, &mut self.buf)
                .expect("baseline: reading an acknowledgement")
                .expect("baseline: the plugin closed the socket");
            ack_texts(
                PluginToHost::decode(self.buf.as_slice()).expect("baseline: decode"),
                &mut self.acks,
            );
        }
        self.acks.pop_front().expect("not empty")
    }
}

impl Drop for BaselineHost {
    fn drop(&mut self) {
        // End of stream: the plugin exits.
        let _ = self.out.shutdown(std::net::Shutdown::Write);
        wait_or_kill(&mut self.child);
    }
}

/// The read half of the baseline's socket: blocking `read`s, or (`spin`) `recv` with
/// `MSG_DONTWAIT`, spinning on `EAGAIN`: the baseline's counterpart of `WaitStrategy::Spin`.
/// (`MSG_DONTWAIT` rather than `O_NONBLOCK`, which would make the writes of the same socket
/// non-blocking too.)
struct SocketRead {
    stream: UnixStream,
    spin: bool,
}

impl Read for SocketRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.spin {
            return self.stream.read(buf);
        }
        let (mut backoff, started) = (Backoff(0), Instant::now());
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call, and the
            // descriptor is open: `self.stream` owns it.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => {
                    if backoff.snooze() && started.elapsed() > ACK_TIMEOUT {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                }
                std::io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

/// The baseline plugin: reads each length-delimited `HostToPlugin`, decodes it, acknowledges.
/// `spin`: busy-polling reads.
fn baseline_plugin(spin: bool) {
    let sock = std::env::var_os(SOCKET_ENV).expect("PLUGBUS_BENCH_SOCKET is set");
    let stream = UnixStream::connect(&sock).expect("connect to the bench host");
    let mut out = stream.try_clone().expect("clone the socket");
    let mut reader = BufReader::with_capacity(1 << 16, SocketRead { stream, spin });
    let (mut counter, mut tick, mut in_tick) = (Counter::default(), MoveSum::default(), 0);
    let mut buf = Vec::new();
    while read_message(&mut reader, &mut buf)
        .expect("baseline plugin: read")
        .is_some()
    {
        let msg = HostToPlugin::decode(buf.as_slice()).expect("baseline plugin: decode");
        let reply = match msg.payload {
            Some(host_to_plugin::Payload::Event(env)) => match &env.payload {
                Some(Payload::PlayerMove(m)) => match MoveRecord::from_move_event(m) {
                    Some(r) => {
                        tick = tick.add(&r);
                        in_tick += 1;
                        if in_tick == PLAYERS {
                            in_tick = 0;
                            counter.item(Kind::Moves, std::mem::take(&mut tick).0)
                        } else {
                            None
                        }
                    }
                    None => Some(format!("error: bad move {m:?}")),
                },
                Some(Payload::Chat(c)) => counter.item(Kind::Chat, chat_sum(c)),
                other => Some(format!("error: unexpected event {other:?}")),
            },
            Some(host_to_plugin::Payload::ActionResult(r)) => Some(counter.control(&r.correlation_id)),
            _ => None,
        };
        if let Some(text) = reply {
            let bytes = ack_message(text).encode_length_delimited_to_vec();
            out.write_all(&bytes).expect("baseline plugin: write");
        }
    }
}

// ---- iceoryx2 ----

#[cfg(feature = "bench-iceoryx2")]
mod iox {
    //! iceoryx2 publish-subscribe: a `[IoxMove]` service for moves, `[u8]` services for the chat
    //! envelope, the control messages (host -> plugin) and the acknowledgements (plugin -> host).
    //! Lossless: no safe overflow, and the subscribers' buffers hold a whole window.

    use std::collections::VecDeque;
    use std::fmt::Write as _;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use iceoryx2::port::publisher::Publisher;
    use iceoryx2::port::subscriber::Subscriber;
    use iceoryx2::prelude::*;
    use iceoryx2::service::port_factory::publish_subscribe::PortFactory;
    use plugbus::fastpath::MoveRecord;
    use plugbus::proto::{EventEnvelope, HostToPlugin, PluginToHost, event_envelope::Payload, host_to_plugin};
    use prost::Message as _;

    use super::{
        ACK_TIMEOUT, Backoff, Counter, Kind, MoveSum, PARENT_ENV, PLAYERS, ROLE_ENV, Run, Transport, WINDOW,
        ack_message, ack_texts, chat, chat_sum, moves, run_message, wait_or_kill,
    };

    /// The service name prefix.
    const PREFIX_ENV: &str = "PLUGBUS_BENCH_IOX";
    /// Largest byte sample (a chat envelope, a control message, an acknowledgement).
    const MAX_BYTES: usize = 1024;

    /// A move record as an iceoryx2 payload element.
    #[repr(transparent)]
    #[derive(Debug, Clone, Copy)]
    pub struct IoxMove(pub MoveRecord);

    // SAFETY: `MoveRecord` is `#[repr(C)]`, 48 bytes of integers and floats with no padding and
    // no pointers or references (its layout is asserted in src/fastpath.rs), so its bytes mean
    // the same in any process; `repr(transparent)` gives `IoxMove` that layout. Both ends are
    // this binary, so the type name names the same type.
    unsafe impl ZeroCopySend for IoxMove {}

    type Svc = ipc::Service;

    /// The four services, created by the host and opened by the plugin with the same settings.
    struct Services {
        moves: PortFactory<Svc, [IoxMove], ()>,
        chat: PortFactory<Svc, [u8], ()>,
        ctl: PortFactory<Svc, [u8], ()>,
        ack: PortFactory<Svc, [u8], ()>,
        _node: Node<Svc>,
    }

    impl Services {
        fn new(prefix: &str, create: bool) -> Self {
            set_log_level(LogLevel::Error);
            let node = NodeBuilder::new().create::<Svc>().expect("iceoryx2 node");
            let name = |s: &str| -> ServiceName { format!("{prefix}/{s}").as_str().try_into().expect("service name") };
            macro_rules! service {
                ($ty:ty, $name:expr) => {{
                    let b = node
                        .service_builder(&name($name))
                        .publish_subscribe::<$ty>()
                        .enable_safe_overflow(false)
                        .subscriber_max_buffer_size(WINDOW as usize)
                        .history_size(0)
                        .max_publishers(1)
                        .max_subscribers(1);
                    let what = concat!("iceoryx2 service ", $name);
                    if create {
                        b.create().expect(what)
                    } else {
                        b.open().expect(what)
                    }
                }};
            }
            Self {
                moves: service!([IoxMove], "moves"),
                chat: service!([u8], "chat"),
                ctl: service!([u8], "ctl"),
                ack: service!([u8], "ack"),
                _node: node,
            }
        }
    }

    fn publisher<T: std::fmt::Debug + ZeroCopySend>(
        f: &PortFactory<Svc, [T], ()>,
        max_len: usize,
    ) -> Publisher<Svc, [T], ()> {
        f.publisher_builder()
            .initial_max_slice_len(max_len)
            .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
            .create()
            .expect("iceoryx2 publisher")
    }

    fn subscriber<T: std::fmt::Debug + ZeroCopySend>(f: &PortFactory<Svc, [T], ()>) -> Subscriber<Svc, [T], ()> {
        f.subscriber_builder()
            .buffer_size(WINDOW as usize)
            .create()
            .expect("iceoryx2 subscriber")
    }

    fn send_bytes(p: &Publisher<Svc, [u8], ()>, bytes: &[u8]) {
        let sample = p.loan_slice_uninit(bytes.len()).expect("iceoryx2 loan");
        sample.write_from_slice(bytes).send().expect("iceoryx2 send");
    }

    pub struct IoxHost {
        moves: Publisher<Svc, [IoxMove], ()>,
        chat: Publisher<Svc, [u8], ()>,
        ctl: Publisher<Svc, [u8], ()>,
        ack: Subscriber<Svc, [u8], ()>,
        child: Child,
        acks: VecDeque<String>,
        records: Vec<MoveRecord>,
        env: EventEnvelope,
        next_id: u64,
        // Dropped after the ports.
        _services: Services,
    }

    impl IoxHost {
        pub fn start() -> Self {
            let prefix = format!("plugbus-ipc-bench/{}/{}", std::process::id(), unique());
            let services = Services::new(&prefix, true);
            let ack = subscriber(&services.ack);
            let child = Command::new(std::env::current_exe().expect("path of the bench binary"))
                .env(ROLE_ENV, "iceoryx2")
                .env(PARENT_ENV, std::process::id().to_string())
                .env(PREFIX_ENV, &prefix)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn the iceoryx2 plugin");
            let mut h = Self {
                moves: publisher(&services.moves, PLAYERS),
                chat: publisher(&services.chat, MAX_BYTES),
                ctl: publisher(&services.ctl, MAX_BYTES),
                ack,
                child,
                acks: VecDeque::new(),
                records: moves(),
                env: chat(),
                next_id: 1,
                _services: services,
            };
            // The plugin says hello once its subscribers exist: from then on, what the host
            // publishes reaches it.
            assert_eq!(h.next_ack(), "hello", "the iceoryx2 plugin did not start");
            h
        }
    }

    /// A number unique within this process, for service names.
    fn unique() -> u64 {
        use plugbus::sync::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    impl Transport for IoxHost {
        fn announce(&mut self, run: &Run) {
            send_bytes(&self.ctl, &run_message(run).encode_to_vec());
        }

        #[inline]
        fn send(&mut self, kind: Kind) {
            match kind {
                Kind::Moves => {
                    let records = &self.records;
                    let sample = self.moves.loan_slice_uninit(records.len()).expect("iceoryx2 loan");
                    sample
                        .write_from_fn(|i| IoxMove(records[i]))
                        .send()
                        .expect("iceoryx2 send");
                }
                Kind::Chat => {
                    // As plugbus does: a fresh event id, then encoded straight into shared memory.
                    self.env.event_id.clear();
                    let _ = write!(self.env.event_id, "{}", self.next_id);
                    self.next_id += 1;
                    let sample = self
                        .chat
                        .loan_slice_uninit(self.env.encoded_len())
                        .expect("iceoryx2 loan");
                    let mut sample = sample.write_from_fn(|_| 0);
                    let mut dst: &mut [u8] = sample.payload_mut();
                    self.env.encode(&mut dst).expect("the loan has encoded_len bytes");
                    sample.send().expect("iceoryx2 send");
                }
            }
        }

        fn next_ack(&mut self) -> String {
            let (mut backoff, started) = (Backoff(0), Instant::now());
            loop {
                if let Some(text) = self.acks.pop_front() {
                    return text;
                }
                if let Some(s) = self.ack.receive().expect("iceoryx2 receive") {
                    ack_texts(
                        PluginToHost::decode(s.payload()).expect("iceoryx2: decode"),
                        &mut self.acks,
                    );
                } else if backoff.snooze() {
                    if let Some(status) = self.child.try_wait().expect("waitpid") {
                        panic!("the iceoryx2 plugin exited: {status}");
                    }
                    assert!(
                        started.elapsed() < ACK_TIMEOUT,
                        "no acknowledgement from the iceoryx2 plugin"
                    );
                }
            }
        }
    }

    impl Drop for IoxHost {
        fn drop(&mut self) {
            let quit = HostToPlugin {
                plugin_id: String::new(),
                payload: Some(host_to_plugin::Payload::Shutdown(Default::default())),
            };
            send_bytes(&self.ctl, &quit.encode_to_vec());
            wait_or_kill(&mut self.child);
        }
    }

    /// The iceoryx2 plugin: busy-polls its three subscribers.
    pub fn plugin() {
        let prefix = std::env::var(PREFIX_ENV).expect("PLUGBUS_BENCH_IOX is set");
        let services = Services::new(&prefix, false);
        let moves = subscriber(&services.moves);
        let chat = subscriber(&services.chat);
        let ctl = subscriber(&services.ctl);
        let ack = publisher(&services.ack, MAX_BYTES);
        let reply = |text: String| send_bytes(&ack, &ack_message(text).encode_to_vec());
        reply("hello".to_owned());
        let (mut counter, mut env) = (Counter::default(), EventEnvelope::default());
        loop {
            let mut idle = true;
            while let Some(s) = ctl.receive().expect("iceoryx2 receive") {
                idle = false;
                match HostToPlugin::decode(s.payload()).ok().and_then(|m| m.payload) {
                    Some(host_to_plugin::Payload::ActionResult(r)) => reply(counter.control(&r.correlation_id)),
                    Some(host_to_plugin::Payload::Shutdown(_)) => return,
                    other => reply(format!("error: unexpected control {other:?}")),
                }
            }
            while let Some(s) = moves.receive().expect("iceoryx2 receive") {
                idle = false;
                let records = s.payload();
                let r = if records.len() == PLAYERS {
                    let sum = records.iter().fold(MoveSum::default(), |acc, m| acc.add(&m.0)).0;
                    counter.item(Kind::Moves, sum)
                } else {
                    Some(format!("error: a move sample of {} records", records.len()))
                };
                drop(s);
                if let Some(text) = r {
                    reply(text);
                }
            }
            while let Some(s) = chat.receive().expect("iceoryx2 receive") {
                idle = false;
                env.clear();
                let r = match env.merge(s.payload()) {
                    Ok(()) => match &env.payload {
                        Some(Payload::Chat(c)) => counter.item(Kind::Chat, chat_sum(c)),
                        other => Some(format!("error: unexpected event {other:?}")),
                    },
                    Err(e) => Some(format!("error: decode: {e}")),
                };
                drop(s);
                if let Some(text) = r {
                    reply(text);
                }
            }
            if idle {
                std::hint::spin_loop();
            }
        }
    }
}

/// Waits up to 5 s for a plugin to exit by itself, then kills it.
fn wait_or_kill(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---- the group ----

#[derive(Debug, Clone, Copy)]
enum Mode {
    Stream,
    Rtt,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Rtt => "rtt",
        }
    }

    /// (ack every, window)
    fn pacing(self) -> (u64, u64) {
        match self {
            Mode::Stream => (ACK_EVERY, WINDOW),
            Mode::Rtt => (1, 1),
        }
    }
}

/// One benchmark function: starts the transport on its first call (and checks it, untimed),
/// measures, and stops it when the function is done.
fn bench<T: Transport>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, kind: Kind, mode: Mode, start: fn() -> T) {
    let item_sum = kind.item_sum();
    let (every, window) = mode.pacing();
    let mut transport: Option<T> = None;
    let mut id = String::new();
    let _ = write!(id, "{}/{}/{name}", kind.label(), mode.label());
    g.bench_function(id, |b| {
        let t = transport.get_or_insert_with(|| {
            let mut t = start();
            drive(&mut t, kind, item_sum, VERIFY_N, ACK_EVERY, WINDOW);
            drive(&mut t, kind, item_sum, 3, 1, 1);
            t
        });
        b.iter_custom(|n| drive(t, kind, item_sum, n, every, window));
    });
    drop(transport);
}

fn bench_ipc(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipc");
    g.sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    for kind in [Kind::Moves, Kind::Chat] {
        g.throughput(Throughput::Elements(match kind {
            Kind::Moves => PLAYERS as u64,
            Kind::Chat => 1,
        }));
        for mode in [Mode::Stream, Mode::Rtt] {
            bench(&mut g, "plugbus", kind, mode, || PlugbusHost::start("plugbus"));
            bench(&mut g, "plugbus-spin", kind, mode, || {
                PlugbusHost::start("plugbus-spin")
            });
            bench(&mut g, "baseline", kind, mode, || BaselineHost::start(false));
            bench(&mut g, "baseline-spin", kind, mode, || BaselineHost::start(true));
            #[cfg(feature = "bench-iceoryx2")]
            bench(&mut g, "iceoryx2", kind, mode, iox::IoxHost::start);
        }
    }
    g.finish();
}

criterion_group!(benches, bench_ipc);

fn main() {
    // Re-executed as a plugin: serve, and do not touch criterion.
    if let Ok(role) = std::env::var(ROLE_ENV) {
        die_with_parent(std::env::var(PARENT_ENV).ok().and_then(|p| p.parse().ok()));
        match role.as_str() {
            "plugbus" => plugbus_plugin(WaitStrategy::default()),
            "plugbus-spin" => plugbus_plugin(WaitStrategy::Spin),
            "baseline" => baseline_plugin(false),
            "baseline-spin" => baseline_plugin(true),
            #[cfg(feature = "bench-iceoryx2")]
            "iceoryx2" => iox::plugin(),
            other => panic!("unknown {ROLE_ENV} {other:?}"),
        }
        return;
    }
    // Plugin output (forwarded by the host) and host warnings, on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,plugbus::plugin=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // What criterion_main! would generate.
    benches();
    Criterion::default().configure_from_args().final_summary();
}
