//! No allocation per event in steady state, proven with a counting global allocator:
//! - publishing 100 (and 1,000) moves per tick into a frame ring, and reading them back;
//! - building a chat event from an [`EnvelopePool`] and encoding it into the control ring
//!   (alone, and gathered in a [`BatchBuilder`]);
//! - decoding both on the plugin side ([`HostDecoder`], [`fastpath::parse`]);
//! - the same through the real host and plugin runtimes (`Tick::publish_move`,
//!   `Tick::publish`, `end_tick`, `Plugin::poll`), host and plugin in this process;
//! - events that expect a response, through those runtimes: `Tick::dispatch`, two plugins'
//!   answers (`Reply::Ack`, `Reply::Cancel`, `Reply::Mutate`), the host reading them and
//!   merging the outcome (`Host::poll_outcome_into`, `Host::wait_into`);
//! - actions: sent by a plugin through its `Context`, taken by the host (`Host::next_action`,
//!   `Host::recycle_action`), their results sent back (`Host::send_action_result_ref`) and
//!   received by the plugin (`Handler::on_action_result`);
//! - log lines: sent through `Context::log`, taken by the host (`Host::drain_logs`,
//!   `Host::recycle_log`) and written by the host's log thread.
//!
//! The counter is per thread, so the test harness's other threads cannot disturb it; producer
//! and consumer run in the measuring thread. After a warm-up, every iteration must allocate
//! exactly nothing. When one does, the failing iteration is run again with [`trap`] set, which
//! prints the backtrace of each allocation, so the report says where. The host's log thread
//! is the one other thread whose allocations are counted (by its name, in a global counter),
//! since what the tick thread hands it is part of the path; tests that start a host run one at a
//! time ([`HOSTS`]), so that only one log thread runs.

use plugbus::sync::{AtomicBool, AtomicU64, Ordering};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use plugbus::codec::{self, BatchBuilder, BufferPool, EnvelopePool, HostDecoder, HostMessage};
use plugbus::fastpath::{self, MoveFrameHeader, MoveFrameWriter, MoveRecord};
use plugbus::host::{ActionItem, Host, HostConfig, LogItem, Outcome, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply, WaitStrategy};
use plugbus::proto::{
    ActionResult, ActionStatus, EventEnvelope, EventType, PlayerFoodLossMutation, action, event_envelope::Payload,
    event_result,
};
use plugbus::ring::{RegionRef, frame};

// ------------------------------------------------------------------------------------------
// The counting allocator
// ------------------------------------------------------------------------------------------

/// Allocations made by host log threads (`plugbus-plugin-log`), whatever the test.
static LOG_THREAD_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Print a backtrace for each allocation of a log thread.
static LOG_THREAD_TRAP: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread is a host's log thread: 0 not known yet, 1 yes, 2 no.
    static LOG_THREAD: Cell<u8> = const { Cell::new(0) };
    /// Allocations (alloc, alloc_zeroed, realloc) made by this thread.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Print a backtrace for each allocation of this thread.
    static TRAP: Cell<bool> = const { Cell::new(false) };
    /// Inside the trap's own printing (which allocates): do not recurse.
    static IN_TRAP: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

/// Whether the calling thread is a host's log thread, by its name (read with `prctl`, which
/// allocates nothing; the kernel keeps 15 bytes of it). Cached once the thread has a name.
fn is_log_thread() -> bool {
    let known = LOG_THREAD.try_with(Cell::get).unwrap_or(2);
    if known != 0 {
        return known == 1;
    }
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (the name and its NUL) into the buffer whose
    // address it is given; `name` is 16 bytes and lives across the call.
    let r = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
    if r != 0 || name[0] == 0 {
        return false;
    }
    let yes = name.starts_with(b"plugbus-plugin-");
    let _ = LOG_THREAD.try_with(|c| c.set(if yes { 1 } else { 2 }));
    yes
}

fn counted() {
    // `try_with`: a thread being torn down has no counter; its allocations are not ours.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    if is_log_thread() {
        // Relaxed: a count, read after the log thread had time to finish.
        LOG_THREAD_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if LOG_THREAD_TRAP.load(Ordering::Relaxed) && !IN_TRAP.try_with(Cell::get).unwrap_or(true) {
            IN_TRAP.set(true);
            eprintln!(
                "allocation on the log thread in steady state:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
            IN_TRAP.set(false);
        }
    }
    if TRAP.try_with(Cell::get).unwrap_or(false) && !IN_TRAP.try_with(Cell::get).unwrap_or(true) {
        IN_TRAP.set(true);
        eprintln!(
            "allocation in steady state:\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        IN_TRAP.set(false);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; counting touches only a const-initialized thread-local
// `Cell` (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted();
        // SAFETY: `ptr` was allocated by `System` (every allocation goes through here) with
        // `layout`; the caller upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through
        // this allocator, which forwards to `System`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, returning its result and the allocations this thread made meanwhile.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.with(Cell::get);
    let r = f();
    (r, ALLOCATIONS.with(Cell::get) - before)
}

/// Runs `f` with every allocation's backtrace printed to stderr.
fn trap<R>(f: impl FnOnce() -> R) -> R {
    TRAP.set(true);
    let r = f();
    TRAP.set(false);
    r
}

/// Warms up with `warmup` iterations, then runs `iterations` more, each of which must make no
/// allocation. On a failure, more iterations run under [`trap`] until one allocates again (at
/// most `iterations`), so the failure shows where the allocations come from.
fn assert_steady_state_allocates_nothing(what: &str, warmup: u64, iterations: u64, mut step: impl FnMut(u64)) {
    for i in 0..warmup {
        step(i);
    }
    let mut total = 0;
    let mut first_bad = None;
    for i in warmup..warmup + iterations {
        let ((), n) = allocations(|| step(i));
        total += n;
        if n > 0 && first_bad.is_none() {
            first_bad = Some((i, n));
        }
    }
    if let Some((i, n)) = first_bad {
        eprintln!("{what}: iteration {i} made {n} allocation(s); running more with backtraces:");
        let start = warmup + iterations;
        for j in start..start + iterations {
            let ((), again) = allocations(|| trap(|| step(j)));
            if again > 0 {
                break;
            }
        }
        panic!("{what}: {total} allocation(s) in {iterations} steady-state iterations (first at {i}: {n})");
    }
}

#[test]
fn the_counter_counts() {
    // The allocator really counts, so a zero below means something.
    let (v, n) = allocations(|| vec![1u8; 100]);
    assert_eq!(n, 1);
    let ((), n) = allocations(|| drop(v));
    assert_eq!(n, 0, "a deallocation is not an allocation");
    let mut s = String::new();
    let ((), n) = allocations(|| s.push_str("grows"));
    assert_eq!(n, 1);
    let ((), n) = allocations(|| s.push_str(&"more".repeat(100)));
    assert!(n >= 2, "repeat's buffer and the realloc: {n}");
}

// ------------------------------------------------------------------------------------------
// Moves
// ------------------------------------------------------------------------------------------

fn players(n: usize) -> Vec<MoveRecord> {
    (0..n)
        .map(|i| {
            let mut uuid = [0u8; 16];
            uuid[..8].copy_from_slice(&(i as u64).to_le_bytes());
            MoveRecord::new(uuid, [i as f64, 64.0, -(i as f64)], i as f32, 0.0)
        })
        .collect()
}

fn moves_per_tick(n: usize, ring_bytes: usize) {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(ring_bytes))).expect("ring");
    let mut records = players(n);
    let mut expected = 0.0;
    let mut read = 0.0;
    assert_steady_state_allocates_nothing(&format!("{n} moves per tick"), 50, 5_000, |tick| {
        // The game moves everyone a little.
        for r in &mut records {
            r.x += 0.5;
            r.yaw += 1.0;
        }
        expected += records.iter().map(|r| r.x).sum::<f64>();
        // Host side: one packed frame per tick.
        let frames = fastpath::write_frame(&mut tx, tick, 0, &records).expect("room for the tick");
        assert_eq!(frames, 1);
        // Plugin side: the records in place.
        let f = rx.try_read().expect("ring").expect("the tick's frame");
        assert_eq!(f.kind(), fastpath::KIND_MOVES);
        let (header, moves) = fastpath::parse(f.payload()).expect("a valid move frame");
        assert_eq!((header.tick, moves.len()), (tick, n));
        read += moves.iter().map(|r| r.x).sum::<f64>();
    });
    assert_eq!(read, expected, "the plugin side read what the host side wrote");
}

#[test]
fn publishing_100_moves_per_tick_allocates_nothing() {
    // 64 KiB: a 4.8 KB frame per tick, so the ring wraps (with padding frames) every 13 ticks.
    moves_per_tick(100, 1 << 16);
}

#[test]
fn publishing_1000_moves_per_tick_allocates_nothing() {
    moves_per_tick(1000, 1 << 20);
}

#[test]
fn moves_written_in_place_allocate_nothing() {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 16))).expect("ring");
    let records = players(100);
    assert_steady_state_allocates_nothing("MoveFrameWriter", 50, 5_000, |tick| {
        let mut w = MoveFrameWriter::begin(&mut tx, tick, records.len()).expect("room");
        for r in &records {
            assert!(w.push(r));
        }
        w.finish();
        let f = rx.try_read().expect("ring").expect("frame");
        let (header, moves) = fastpath::parse(f.payload()).expect("valid");
        assert_eq!((header.tick, moves), (tick, records.as_slice()));
    });
}

// ------------------------------------------------------------------------------------------
// Chat events on the control ring
// ------------------------------------------------------------------------------------------

const MESSAGES: [&str; 4] = [
    "hi",
    "hello there, how is everyone doing today?",
    "gg",
    "a longer chat line that someone typed to see whether long messages reuse their buffers too",
];

/// Builds chat `i` from the pool: type set by the pool, strings written into kept capacity.
fn build_chat(pool: &mut EnvelopePool, i: u64) -> EventEnvelope {
    let mut env = pool.take(EventType::Chat);
    write!(env.event_id, "{}", 1_000_000 + i).expect("write to a String");
    env.expects_response = i % 2 == 0;
    if let Some(Payload::Chat(c)) = &mut env.payload {
        c.player_uuid.push_str("8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10");
        c.name.push_str("Steve");
        c.message.push_str(MESSAGES[i as usize % MESSAGES.len()]);
    }
    env
}

/// Checks a decoded chat against what [`build_chat`] made for `i`, without allocating.
fn check_chat(e: &EventEnvelope, i: u64) {
    assert_eq!(e.r#type, EventType::Chat as i32);
    assert_eq!(e.expects_response, i % 2 == 0);
    let mut id = [0u8; 20];
    let mut w: &mut [u8] = &mut id;
    std::io::Write::write_fmt(&mut w, format_args!("{}", 1_000_000 + i)).expect("fits");
    let len = 20 - w.len();
    assert_eq!(e.event_id.as_bytes(), &id[..len]);
    match &e.payload {
        Some(Payload::Chat(c)) => {
            assert_eq!(c.name, "Steve");
            assert_eq!(c.message, MESSAGES[i as usize % MESSAGES.len()]);
        }
        _ => panic!("not a chat"),
    }
}

#[test]
fn chat_encoded_into_the_control_ring_and_decoded_allocates_nothing() {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 16))).expect("ring");
    let mut pool = EnvelopePool::default();
    let mut decoder = HostDecoder::default();
    assert_steady_state_allocates_nothing("chat in the control ring", 50, 10_000, |i| {
        // Host side: a pooled envelope, encoded straight into a reserved frame.
        let env = build_chat(&mut pool, i);
        codec::encode_event_in_ring(&mut tx, &env).expect("room");
        pool.give(env);
        // Plugin side: decoded into the decoder's reused envelope.
        let f = rx.try_read().expect("ring").expect("frame");
        let mut seen = 0;
        let n = decoder
            .decode(f.payload(), |m| match m {
                HostMessage::Event(e) => {
                    check_chat(e, i);
                    seen += 1;
                }
                HostMessage::Other(_) => panic!("not an event"),
            })
            .expect("decode");
        assert_eq!((n, seen), (1, 1));
    });
}

#[test]
fn chat_batches_encoded_and_decoded_allocate_nothing() {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 18))).expect("ring");
    let mut pool = EnvelopePool::default();
    let mut decoder = HostDecoder::default();
    let mut batch = BatchBuilder::with_capacity(8192);
    let mut twin = BatchBuilder::with_capacity(8192);
    let mut buffers = BufferPool::default();
    const PER_FRAME: u64 = 37;
    assert_steady_state_allocates_nothing("chat batches", 20, 2_000, |round| {
        for k in 0..PER_FRAME {
            let i = round * PER_FRAME + k;
            let env = build_chat(&mut pool, i);
            // Encoded here, and "encode once for several plugins" through a pooled buffer.
            batch.push(&env);
            let mut body = buffers.take();
            codec::encode_body(&env, &mut body);
            twin.push_encoded(&body);
            buffers.give(body);
            pool.give(env);
        }
        assert_eq!(batch.as_bytes(), twin.as_bytes());
        twin.clear();
        batch.flush_to(&mut tx).expect("room");
        let f = rx.try_read().expect("ring").expect("frame");
        let mut k = 0;
        let n = decoder
            .decode(f.payload(), |m| match m {
                HostMessage::Event(e) => {
                    check_chat(e, round * PER_FRAME + k);
                    k += 1;
                }
                HostMessage::Other(_) => panic!("not an event"),
            })
            .expect("decode");
        assert_eq!((n, k), (PER_FRAME as usize, PER_FRAME));
    });
}

#[test]
fn mixed_event_types_decode_without_allocating() {
    // The decoder keeps one envelope per type: after each type was seen once, a stream that
    // alternates types allocates nothing.
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 16))).expect("ring");
    let mut pool = EnvelopePool::default();
    let mut decoder = HostDecoder::default();
    let types = [
        EventType::Chat,
        EventType::PlayerJoin,
        EventType::PlayerQuit,
        EventType::Command,
        EventType::PlayerMove,
    ];
    assert_steady_state_allocates_nothing("mixed types", 50, 5_000, |i| {
        let ty = types[i as usize % types.len()];
        let mut env = pool.take(ty);
        write!(env.event_id, "{i}").expect("write");
        match &mut env.payload {
            Some(Payload::PlayerJoin(e)) => e.name.push_str("Alex"),
            Some(Payload::PlayerQuit(e)) => e.name.push_str("Alex"),
            Some(Payload::Command(e)) => e.raw.push_str("/tp 0 64 0"),
            Some(Payload::Chat(e)) => e.message.push_str("hi"),
            Some(Payload::PlayerMove(e)) => e.world.push_str("overworld"),
            _ => panic!("unexpected payload"),
        }
        codec::encode_event_in_ring(&mut tx, &env).expect("room");
        pool.give(env);
        let f = rx.try_read().expect("ring").expect("frame");
        decoder
            .decode(f.payload(), |m| match m {
                HostMessage::Event(e) => assert_eq!(e.r#type, ty as i32),
                HostMessage::Other(_) => panic!("not an event"),
            })
            .expect("decode");
    });
}

// ------------------------------------------------------------------------------------------
// The host and plugin runtimes, in one process
// ------------------------------------------------------------------------------------------

/// Time between two host ticks in the tests of the runtimes: ticks are spaced as in a game
/// (shorter, to keep the tests short), so the host's health checks (every 50 ms) run inside
/// the measured ticks too.
const TICK_GAP: Duration = Duration::from_micros(500);
/// Ticks measured after the warm-up in each test of the runtimes.
const STEADY_TICKS: u64 = 2_000;

#[derive(Default)]
struct Counter {
    moves: u64,
    x: f64,
    chats: u64,
}

impl Handler for Counter {
    fn on_moves(&mut self, _ctx: &mut Context<'_>, _frame: MoveFrameHeader, moves: &[MoveRecord]) {
        self.moves += moves.len() as u64;
        self.x += moves.iter().map(|r| r.x).sum::<f64>();
    }
    fn on_event(&mut self, _ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        if matches!(event.payload, Some(Payload::Chat(_))) {
            self.chats += 1;
        }
        Reply::Ack
    }
}

/// Tests that start a host take this lock: one host (and one log thread) at a time, and the
/// two cores of a CI machine are not shared by several spinning hosts.
static HOSTS: Mutex<()> = Mutex::new(());

/// A host with one attached plugin per `(id, priority)`, each connected in this process
/// (driven by `Plugin::poll` on the test's thread) and subscribed to `events`.
fn host_with_plugins(plugins: &[(&str, i32)], events: &[EventType]) -> (Host, Vec<Plugin>) {
    let configs = plugins
        .iter()
        .map(|&(id, priority)| PluginConfig::attached(id).priority(priority))
        .collect();
    let mut host = Host::start(HostConfig::new(configs)).expect("host");
    let segments: Vec<String> = plugins
        .iter()
        .map(|(id, _)| {
            host.address_of(id)
                .expect("segment")
                .trim_start_matches("shm:")
                .to_owned()
        })
        .collect();
    let connected = std::thread::scope(|s| {
        let connecting: Vec<_> = plugins
            .iter()
            .zip(&segments)
            .map(|(&(id, _), segment)| {
                s.spawn(move || {
                    Plugin::builder(segment, id)
                        .subscribe(events.iter().copied())
                        .wait(WaitStrategy::Spin)
                        .hello_timeout(Duration::from_secs(30))
                        .connect()
                })
            })
            .collect();
        assert!(host.wait_ready(Duration::from_secs(30)), "the plugins connect");
        connecting
            .into_iter()
            .map(|c| c.join().expect("connect thread").expect("handshake"))
            .collect::<Vec<_>>()
    });
    // The subscriptions may arrive after the hello: wait until each plugin is subscribed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !plugins
        .iter()
        .all(|(id, _)| events.iter().all(|&e| host.is_subscribed(id, e)))
    {
        assert!(Instant::now() < deadline, "the plugins' subscriptions never arrived");
        host.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    (host, connected)
}

#[test]
fn host_ticks_with_100_moves_and_a_chat_allocate_nothing() {
    let _one_host = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let (mut host, mut plugins) = host_with_plugins(&[("alloc_free", 0)], &[EventType::PlayerMove, EventType::Chat]);
    let mut plugin = plugins.pop().expect("one plugin");
    let mut pool = EnvelopePool::default();
    let mut handler = Counter::default();
    let mut records = players(100);
    let mut sent_x = 0.0;
    let chats_before = handler.chats;
    let mut steady_ticks = 0;
    let started = std::time::Instant::now();
    assert_steady_state_allocates_nothing("host tick with 100 moves and a chat", 50, STEADY_TICKS, |i| {
        for r in &mut records {
            r.x += 0.25;
        }
        let mut tick = host.begin_tick();
        for r in &records {
            tick.publish_move(*r);
        }
        let mut chat = build_chat(&mut pool, i);
        chat.expects_response = false;
        tick.publish(&mut chat);
        pool.give(chat);
        tick.end();
        // Everything is in the rings already (same thread): one poll reads it.
        plugin.poll(&mut handler).expect("plugin poll");
        sent_x += records.iter().map(|r| r.x).sum::<f64>();
        steady_ticks += 1;
        std::thread::sleep(TICK_GAP);
    });
    assert_eq!(handler.chats - chats_before, steady_ticks, "every chat arrived");
    assert_eq!(handler.moves, 100 * steady_ticks, "every move arrived");
    assert_eq!(handler.x, sent_x, "the plugin read the positions the host published");
    eprintln!("{steady_ticks} ticks in {:?}", started.elapsed());
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Events that expect a response: dispatch, answers, the merged outcome
// ------------------------------------------------------------------------------------------

/// Answers as plugin `who` (0 or 1) of [`dispatch_answers_and_outcomes_allocate_nothing`]:
/// plugin 0 cancels every "gg" chat; on a food loss to `k`, plugin 0 changes it to `k - 1` and
/// plugin 1 (which merges last) to `k - 2` when `k` is even, else it acks.
struct Answerer {
    who: u8,
    answered: u64,
    commands: u64,
}

/// The arguments of the command [`dispatch_answers_and_outcomes_allocate_nothing`] publishes.
const COMMAND_ARGS: [&str; 3] = ["Alex", "a longer argument, with spaces", "-3.5"];

impl Handler for Answerer {
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        self.answered += 1;
        match &event.payload {
            Some(Payload::Chat(c)) if self.who == 0 && c.message == "gg" => Reply::Cancel,
            // A chat filter: the new text is written into the storage of the last one sent.
            Some(Payload::Chat(c)) if self.who == 1 => {
                let mut text = ctx.recycled_string();
                text.push_str(&c.message);
                text.push('!');
                Reply::chat_message(text)
            }
            Some(Payload::Command(c)) => {
                assert_eq!(c.args, COMMAND_ARGS, "command arguments");
                self.commands += 1;
                Reply::Ack
            }
            Some(Payload::PlayerFoodLoss(f)) if self.who == 0 => {
                Reply::Mutate(event_result::Update::PlayerFoodLoss(PlayerFoodLossMutation {
                    to: Some(f.to - 1),
                }))
            }
            Some(Payload::PlayerFoodLoss(f)) if f.to % 2 == 0 => {
                Reply::Mutate(event_result::Update::PlayerFoodLoss(PlayerFoodLossMutation {
                    to: Some(f.to - 2),
                }))
            }
            _ => Reply::Ack,
        }
    }
}

fn check_answered(o: &Outcome, id: u64) {
    assert_eq!(o.event_id, id);
    assert!(o.late.is_empty(), "late: {:?}", o.late);
    // Merge order: ascending priority.
    assert_eq!(o.answered.len(), 2);
    assert_eq!(
        (o.answered[0].as_str(), o.answered[1].as_str()),
        ("answer_a", "answer_b")
    );
}

#[test]
fn dispatch_answers_and_outcomes_allocate_nothing() {
    let _one_host = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let (mut host, mut plugins) = host_with_plugins(
        &[("answer_a", 1), ("answer_b", 2)],
        &[EventType::Chat, EventType::PlayerFoodLoss, EventType::Command],
    );
    let mut handlers = [
        Answerer {
            who: 0,
            answered: 0,
            commands: 0,
        },
        Answerer {
            who: 1,
            answered: 0,
            commands: 0,
        },
    ];
    let mut pool = EnvelopePool::default();
    // A command with arguments, published each tick: the plugins decode its arguments into
    // strings kept from the previous command.
    let mut command = pool.take(EventType::Command);
    if let Some(Payload::Command(c)) = &mut command.payload {
        c.player_uuid.push_str("8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10");
        c.command.push_str("tp");
        c.args = COMMAND_ARGS.iter().map(|a| (*a).to_owned()).collect();
    }
    // Kept from one event to the next: its lists, names and mutation are reused.
    let mut out = Outcome::default();
    let (mut cancelled, mut mutated) = (0, 0);
    let started = Instant::now();
    assert_steady_state_allocates_nothing("dispatch, answers and outcomes", 50, STEADY_TICKS, |i| {
        let mut tick = host.begin_tick();
        let mut chat = build_chat(&mut pool, i);
        let chat_pending = tick.dispatch(&mut chat);
        pool.give(chat);
        let mut food = pool.take(EventType::PlayerFoodLoss);
        if let Some(Payload::PlayerFoodLoss(f)) = &mut food.payload {
            f.player_uuid.push_str("8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10");
            f.name.push_str("Steve");
            f.from = 20;
            f.to = (i % 20) as i32;
        }
        let food_pending = tick.dispatch(&mut food);
        pool.give(food);
        tick.publish(&mut command);
        tick.end();
        // Both plugins answer (their replies are in the host's rings when `poll` returns).
        for (p, h) in plugins.iter_mut().zip(&mut handlers) {
            p.poll(h).expect("plugin poll");
        }
        // Polled: every plugin answered, so the outcome is complete.
        assert!(host.poll_outcome_into(&chat_pending, &mut out), "chat outcome complete");
        check_answered(&out, chat_pending.event_id());
        let said = MESSAGES[i as usize % MESSAGES.len()];
        assert_eq!(out.cancelled, said == "gg");
        // The second plugin's new text wins unless the first cancelled.
        match &out.mutation {
            None => assert!(out.cancelled, "chat outcome without the mutation"),
            Some(event_result::Update::Chat(m)) => {
                let text = m.message.as_deref().expect("the mutation's text");
                assert!(text.len() == said.len() + 1 && text.starts_with(said) && text.ends_with('!'));
            }
            Some(other) => panic!("chat outcome: {other:?}"),
        }
        cancelled += u64::from(out.cancelled);
        // Waited for: returns at once, complete.
        host.wait_into(&food_pending, Instant::now() + Duration::from_secs(5), &mut out);
        check_answered(&out, food_pending.event_id());
        assert!(!out.cancelled);
        let k = (i % 20) as i32;
        let want = if k % 2 == 0 { k - 2 } else { k - 1 };
        match &out.mutation {
            Some(event_result::Update::PlayerFoodLoss(m)) => assert_eq!(m.to, Some(want)),
            other => panic!("food loss outcome: {other:?}"),
        }
        mutated += 1;
        assert!(!host.is_pending(&chat_pending) && !host.is_pending(&food_pending));
        std::thread::sleep(TICK_GAP);
    });
    assert!(cancelled >= STEADY_TICKS / 4, "cancelled {cancelled}");
    assert!(mutated >= STEADY_TICKS);
    assert!(handlers.iter().all(|h| h.answered >= 2 * STEADY_TICKS));
    assert!(handlers.iter().all(|h| h.commands >= STEADY_TICKS));
    eprintln!(
        "{STEADY_TICKS} ticks of 2 dispatches to 2 plugins in {:?}",
        started.elapsed()
    );
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Actions and their results
// ------------------------------------------------------------------------------------------

/// Answers each chat with three actions, and counts the results that come back.
#[derive(Default)]
struct Actor {
    results: u64,
    ok: u64,
}

impl Handler for Actor {
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        if let Some(Payload::Chat(c)) = &event.payload {
            ctx.send_chat(&c.player_uuid, &c.message);
            ctx.teleport(&c.player_uuid, [1.0, 64.0, -3.5], 90.0, 0.0);
            ctx.execute_command(&c.player_uuid, "/say hi");
        }
        Reply::Ack
    }
    fn on_action_result(&mut self, _ctx: &mut Context<'_>, result: &ActionResult) {
        assert!(result.correlation_id.starts_with('r'), "{:?}", result.correlation_id);
        self.results += 1;
        self.ok += u64::from(result.status.as_ref().is_some_and(|s| s.ok));
    }
}

#[test]
fn actions_and_action_results_allocate_nothing() {
    let _one_host = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let (mut host, mut plugins) = host_with_plugins(&[("actor", 0)], &[EventType::Chat]);
    let mut plugin = plugins.pop().expect("one plugin");
    let mut handler = Actor::default();
    let mut pool = EnvelopePool::default();
    let mut result = ActionResult {
        status: Some(ActionStatus { ok: true, error: None }),
        ..Default::default()
    };
    let mut taken: Vec<ActionItem> = Vec::with_capacity(16);
    let mut actions = 0;
    let started = Instant::now();
    assert_steady_state_allocates_nothing("actions and action results", 50, STEADY_TICKS, |i| {
        let mut tick = host.begin_tick();
        let mut chat = build_chat(&mut pool, i);
        chat.expects_response = false;
        tick.publish(&mut chat);
        pool.give(chat);
        tick.end();
        plugin.poll(&mut handler).expect("plugin poll");
        host.poll();
        // Taken one at a time on even ticks, drained into a reused list on odd ones; every item
        // given back.
        if i % 2 == 0 {
            while let Some(item) = host.next_action() {
                taken.push(item);
            }
        } else {
            taken.extend(host.drain_actions());
        }
        assert_eq!(taken.len(), 3, "three actions per chat");
        for (n, item) in taken.drain(..).enumerate() {
            assert_eq!(item.plugin, "actor");
            match (n, &item.action.kind) {
                (0, Some(action::Kind::SendChat(a))) => {
                    assert_eq!(a.message, MESSAGES[i as usize % MESSAGES.len()]);
                }
                (1, Some(action::Kind::Teleport(a))) => {
                    assert_eq!(a.position.map(|p| p.y), Some(64.0));
                }
                (2, Some(action::Kind::ExecuteCommand(a))) => assert_eq!(a.command, "/say hi"),
                other => panic!("unexpected action {other:?}"),
            }
            result.correlation_id.clear();
            write!(result.correlation_id, "r{i}-{n}").expect("write");
            assert!(host.send_action_result_ref(&item.plugin, &result));
            host.recycle_action(item);
            actions += 1;
        }
        // The plugin reads its results.
        plugin.poll(&mut handler).expect("plugin poll");
        std::thread::sleep(TICK_GAP);
    });
    // Warm-up and steady ticks alike.
    assert_eq!(actions, 3 * (50 + STEADY_TICKS));
    assert!(handler.results == actions && handler.ok == handler.results);
    eprintln!(
        "{STEADY_TICKS} ticks of 3 actions and results in {:?}",
        started.elapsed()
    );
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// Log lines
// ------------------------------------------------------------------------------------------

/// Logs two lines per chat, one of which the host's log thread must escape.
struct Logger;

const ESCAPED_LINE: &str = "two\nlines, a \u{1b}[2J and a back\\slash";

impl Handler for Logger {
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        if let Some(Payload::Chat(c)) = &event.payload {
            ctx.log("info", &c.message);
            ctx.log("warn", ESCAPED_LINE);
        }
        Reply::Ack
    }
}

#[test]
fn plugin_logs_allocate_nothing_on_the_tick_and_log_threads() {
    let _one_host = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let (mut host, mut plugins) = host_with_plugins(&[("logger", 0)], &[EventType::Chat]);
    let mut plugin = plugins.pop().expect("one plugin");
    let mut pool = EnvelopePool::default();
    let mut taken: Vec<LogItem> = Vec::with_capacity(16);
    let mut lines = 0;
    let mut tick = |host: &mut Host, i: u64| {
        let mut t = host.begin_tick();
        let mut chat = build_chat(&mut pool, i);
        chat.expects_response = false;
        t.publish(&mut chat);
        pool.give(chat);
        t.end();
        plugin.poll(&mut Logger).expect("plugin poll");
        host.poll();
        if i % 2 == 0 {
            taken.extend(host.drain_logs());
        } else {
            while let Some(item) = host.next_log() {
                taken.push(item);
            }
        }
        assert_eq!(taken.len(), 2, "two lines per chat");
        for item in taken.drain(..) {
            assert_eq!(item.plugin, "logger");
            match item.level.as_str() {
                "info" => assert_eq!(item.message, MESSAGES[i as usize % MESSAGES.len()]),
                "warn" => assert_eq!(item.message, ESCAPED_LINE),
                other => panic!("level {other:?}"),
            }
            host.recycle_log(item);
            lines += 1;
        }
        std::thread::sleep(TICK_GAP);
    };
    let warmup = 50;
    for i in 0..warmup {
        tick(&mut host, i);
    }
    // Counted from here on, on the log thread too (it had a tick gap to finish the warm-up).
    let log_thread_before = LOG_THREAD_ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    assert_steady_state_allocates_nothing("plugin log lines", 0, STEADY_TICKS, |i| tick(&mut host, warmup + i));
    std::thread::sleep(Duration::from_millis(50));
    let on_log_thread = LOG_THREAD_ALLOCATIONS.load(Ordering::Relaxed) - log_thread_before;
    if on_log_thread > 0 {
        eprintln!("the log thread allocated {on_log_thread} time(s); more ticks with its backtraces:");
        LOG_THREAD_TRAP.store(true, Ordering::Relaxed);
        let start = warmup + STEADY_TICKS;
        for i in start..start + 100 {
            tick(&mut host, i);
        }
        std::thread::sleep(Duration::from_millis(50));
        LOG_THREAD_TRAP.store(false, Ordering::Relaxed);
        panic!(
            "the log thread allocated {on_log_thread} time(s) for {} steady-state lines",
            2 * STEADY_TICKS
        );
    }
    assert!(lines >= 2 * STEADY_TICKS);
    assert_eq!(host.metrics().host.logs_dropped, 0, "the log thread kept up");
    eprintln!("{STEADY_TICKS} ticks of 2 log lines in {:?}", started.elapsed());
    host.shutdown("done");
}

// ------------------------------------------------------------------------------------------
// The host's C API (what the Go package calls)
// ------------------------------------------------------------------------------------------

/// Cancels chats that say "gg", answers commands, and for each chat sends an action and a log
/// line; counts the action results that come back.
#[derive(Default)]
struct CPlugin {
    answered: u64,
    results: u64,
}

impl Handler for CPlugin {
    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        self.answered += 1;
        match &event.payload {
            Some(Payload::Chat(c)) => {
                ctx.send_chat(&c.player_uuid, "seen");
                ctx.log("info", "chat seen");
                if c.message == "gg" { Reply::Cancel } else { Reply::Ack }
            }
            _ => Reply::Ack,
        }
    }
    fn on_action_result(&mut self, _ctx: &mut Context<'_>, _result: &ActionResult) {
        self.results += 1;
    }
}

/// A status of the C API, checked.
fn ok(what: &str, status: i32) {
    if status != plugbus::ffi::PLUGBUS_OK {
        // SAFETY: the last error is a NUL-terminated string owned by this thread.
        let why = unsafe { std::ffi::CStr::from_ptr(plugbus::ffi::plugbus_last_error()) };
        panic!("{what}: status {status}: {}", why.to_string_lossy());
    }
}

#[test]
fn c_api_host_dispatch_outcomes_actions_and_logs_allocate_nothing() {
    use plugbus::ffi::{self, plugbus_action, plugbus_host, plugbus_outcome, plugbus_str};
    use prost::Message as _;
    let _one_host = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let segment = format!("plugbus.capi-alloc-{}", std::process::id());
    let toml = format!("[[plugin]]\nid = \"capi\"\nattach = true\naddress = \"shm:{segment}\"\n");
    let mut h: *mut plugbus_host = std::ptr::null_mut();
    // SAFETY: the text and the out-pointer are valid for the call.
    ok("start", unsafe {
        ffi::plugbus_host_start(toml.as_ptr().cast(), toml.len(), &mut h)
    });
    // The host answers the hello as it runs: ticks here while the plugin connects.
    let idle_tick = |h: *mut plugbus_host| {
        let mut tick = 0;
        // SAFETY: `h` is the live host; `tick` is writable.
        unsafe {
            ok("begin", ffi::plugbus_host_begin_tick(h, &mut tick));
            ok("end", ffi::plugbus_host_end_tick(h));
        }
    };
    let mut plugin = std::thread::scope(|sc| {
        let connecting = sc.spawn(|| {
            Plugin::builder(&segment, "capi")
                .subscribe([EventType::Chat, EventType::Command, EventType::PlayerJoin])
                .wait(WaitStrategy::Spin)
                .hello_timeout(Duration::from_secs(30))
                .connect()
        });
        while !connecting.is_finished() {
            idle_tick(h);
            std::thread::sleep(Duration::from_millis(1));
        }
        connecting.join().expect("connect thread").expect("handshake")
    });
    let mut handler = CPlugin::default();
    // Ready, and subscribed: a join published reaches the plugin.
    let id = "capi";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // SAFETY: `h` is the live host; the id is valid for the call.
        let ready = unsafe { ffi::plugbus_host_plugin_ready(h, id.as_ptr().cast(), id.len()) } == ffi::PLUGBUS_OK;
        let mut tick = 0;
        // SAFETY: as above.
        unsafe {
            ok("begin", ffi::plugbus_host_begin_tick(h, &mut tick));
            let (u, n) = ("8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10", "Steve");
            ok(
                "join",
                ffi::plugbus_host_publish_join(h, u.as_ptr().cast(), u.len(), n.as_ptr().cast(), n.len()),
            );
            ok("end", ffi::plugbus_host_end_tick(h));
        }
        plugin.poll(&mut handler).expect("plugin poll");
        if ready && handler.answered > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the plugin never got ready and subscribed");
        std::thread::sleep(Duration::from_millis(1));
    }
    // One encoded chat envelope, published as bytes every tick (the host gives it an id).
    let mut pool = EnvelopePool::default();
    let chat_bytes = build_chat(&mut pool, 0).encode_to_vec();
    let result_bytes = ActionResult {
        correlation_id: "r1".into(),
        status: Some(ActionStatus { ok: true, error: None }),
        result: None,
    }
    .encode_to_vec();
    let (mut cancelled, mut actions, mut logs) = (0u64, 0u64, 0u64);
    let mut outcome = plugbus_outcome::default();
    assert_steady_state_allocates_nothing("the host's C API", 50, STEADY_TICKS, |i| {
        let (u, n) = ("8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10", "Steve");
        let msg = MESSAGES[i as usize % MESSAGES.len()];
        // With arguments, a different number each tick: the host splits them into the
        // strings of the previous command, the plugin decodes them into kept strings.
        let line = if i % 2 == 0 { "/tp Alex 10 64 -3" } else { "/spawn here" };
        let (mut chat, mut command, mut tick) = (0u64, 0u64, 0u64);
        // SAFETY: `h` is the live host; every (pointer, length) pair is valid for its call and
        // every out-pointer writable.
        unsafe {
            ok("begin", ffi::plugbus_host_begin_tick(h, &mut tick));
            ok(
                "publish",
                ffi::plugbus_host_publish_event(h, chat_bytes.as_ptr(), chat_bytes.len()),
            );
            ok(
                "chat",
                ffi::plugbus_host_dispatch_chat(
                    h,
                    u.as_ptr().cast(),
                    u.len(),
                    n.as_ptr().cast(),
                    n.len(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    &mut chat,
                ),
            );
            ok(
                "command",
                ffi::plugbus_host_dispatch_command(
                    h,
                    u.as_ptr().cast(),
                    u.len(),
                    n.as_ptr().cast(),
                    n.len(),
                    line.as_ptr().cast(),
                    line.len(),
                    &mut command,
                ),
            );
            ok("end", ffi::plugbus_host_end_tick(h));
        }
        plugin.poll(&mut handler).expect("plugin poll");
        // SAFETY: as above.
        unsafe {
            ok("wait chat", ffi::plugbus_host_wait(h, chat, 5_000_000, &mut outcome));
            assert_eq!(outcome.event_id, chat);
            assert_eq!(outcome.cancelled, msg == "gg");
            cancelled += u64::from(outcome.cancelled);
            let (mut data, mut len) = (std::ptr::null(), 0usize);
            ok("result", ffi::plugbus_host_outcome_result(h, &mut data, &mut len));
            assert_eq!(len > 0, msg == "gg", "an encoded result exactly when cancelled");
            let status = ffi::plugbus_host_poll_outcome(h, command, &mut outcome);
            if status == ffi::PLUGBUS_PENDING {
                ok(
                    "wait command",
                    ffi::plugbus_host_wait(h, command, 5_000_000, &mut outcome),
                );
            } else {
                ok("poll command", status);
            }
            assert_eq!((outcome.event_id, outcome.cancelled), (command, false));
            let mut action = plugbus_action {
                plugin: plugbus_str {
                    ptr: std::ptr::null(),
                    len: 0,
                },
                kind: 0,
                correlation_id: plugbus_str {
                    ptr: std::ptr::null(),
                    len: 0,
                },
                data: std::ptr::null(),
                len: 0,
            };
            while ffi::plugbus_host_next_action(h, &mut action) == ffi::PLUGBUS_OK {
                assert_eq!(action.kind, ffi::PLUGBUS_ACTION_SEND_CHAT);
                let (mut target, mut text) = (action.plugin, action.plugin);
                ok(
                    "send chat",
                    ffi::plugbus_host_action_send_chat(h, &mut target, &mut text),
                );
                ok(
                    "action result",
                    ffi::plugbus_host_send_action_result(
                        h,
                        id.as_ptr().cast(),
                        id.len(),
                        result_bytes.as_ptr(),
                        result_bytes.len(),
                    ),
                );
                actions += 1;
            }
            let (mut who, mut level, mut text) = (action.plugin, action.plugin, action.plugin);
            while ffi::plugbus_host_next_log(h, &mut who, &mut level, &mut text) == ffi::PLUGBUS_OK {
                logs += 1;
            }
        }
        // The plugin takes its action results.
        plugin.poll(&mut handler).expect("plugin poll");
        std::thread::sleep(TICK_GAP);
    });
    assert!(cancelled >= STEADY_TICKS / 4, "cancelled {cancelled}");
    assert!(
        actions >= STEADY_TICKS && logs >= STEADY_TICKS,
        "actions {actions}, logs {logs}"
    );
    assert!(handler.results >= STEADY_TICKS, "results {}", handler.results);
    // SAFETY: `h` is the live host; shut down once.
    ok("shutdown", unsafe {
        ffi::plugbus_host_shutdown(h, "done".as_ptr().cast(), 4)
    });
}
