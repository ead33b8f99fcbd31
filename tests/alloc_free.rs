//! No allocation per event in steady state, proven with a counting global allocator:
//! - publishing 100 (and 1,000) moves per tick into a frame ring, and reading them back;
//! - building a chat event from an [`EnvelopePool`] and encoding it into the control ring
//!   (alone, and gathered in a [`BatchBuilder`]);
//! - decoding both on the plugin side ([`HostDecoder`], [`fastpath::parse`]);
//! - the same through the real host and plugin runtimes (`Tick::publish_move`,
//!   `Tick::publish`, `end_tick`, `Plugin::poll`), host and plugin in this process.
//!
//! The counter is per thread, so the test harness's other threads cannot disturb it; producer
//! and consumer run in the measuring thread. After a warm-up, every iteration must allocate
//! exactly nothing. When one does, the failing iteration is run again with [`trap`] set, which
//! prints the backtrace of each allocation, so the report says where.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::time::Duration;

use plugbus::codec::{self, BatchBuilder, BufferPool, EnvelopePool, HostDecoder, HostMessage};
use plugbus::fastpath::{self, MoveFrameHeader, MoveFrameWriter, MoveRecord};
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply, WaitStrategy};
use plugbus::proto::{EventEnvelope, EventType, event_envelope::Payload};
use plugbus::ring::{RegionRef, frame};

// ------------------------------------------------------------------------------------------
// The counting allocator
// ------------------------------------------------------------------------------------------

thread_local! {
    /// Allocations (alloc, alloc_zeroed, realloc) made by this thread.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Print a backtrace for each allocation of this thread.
    static TRAP: Cell<bool> = const { Cell::new(false) };
    /// Inside the trap's own printing (which allocates): do not recurse.
    static IN_TRAP: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

fn counted() {
    // `try_with`: a thread being torn down has no counter; its allocations are not ours.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
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

/// Time between two host ticks in [`host_ticks_with_100_moves_and_a_chat_allocate_nothing`].
const TICK_GAP: Duration = Duration::from_millis(2);

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

#[test]
fn host_ticks_with_100_moves_and_a_chat_allocate_nothing() {
    let mut host = Host::start(HostConfig::new(vec![PluginConfig::attached("alloc_free")])).expect("host");
    let segment = host
        .address_of("alloc_free")
        .expect("segment")
        .trim_start_matches("shm:")
        .to_owned();
    let mut plugin = std::thread::scope(|s| {
        let connecting = s.spawn(|| {
            Plugin::builder(&segment, "alloc_free")
                .subscribe([EventType::PlayerMove, EventType::Chat])
                .wait(WaitStrategy::Spin)
                .hello_timeout(Duration::from_secs(30))
                .connect()
        });
        assert!(host.wait_ready(Duration::from_secs(30)), "the plugin connects");
        connecting.join().expect("connect thread").expect("handshake")
    });
    // The subscription may arrive after the hello: wait until a chat is no longer filtered.
    let mut pool = EnvelopePool::default();
    let mut handler = Counter::default();
    for attempt in 0.. {
        assert!(attempt < 10_000, "the plugin's subscription never arrived");
        let before = host.metrics().host.filtered;
        let mut chat = build_chat(&mut pool, 0);
        chat.expects_response = false;
        host.begin_tick().publish(&mut chat);
        pool.give(chat);
        plugin.poll(&mut handler).expect("plugin poll");
        if host.metrics().host.filtered == before {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let mut records = players(100);
    let mut sent_x = 0.0;
    let chats_before = handler.chats;
    let mut steady_ticks = 0;
    let started = std::time::Instant::now();
    assert_steady_state_allocates_nothing("host tick with 100 moves and a chat", 50, 400, |i| {
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
        // Ticks are spaced as in a game (shorter, to keep the test short): the host's health
        // checks (every 50 ms) then run inside the measured ticks too.
        std::thread::sleep(TICK_GAP);
    });
    assert_eq!(handler.chats - chats_before, steady_ticks, "every chat arrived");
    assert_eq!(handler.moves, 100 * steady_ticks, "every move arrived");
    assert_eq!(handler.x, sent_x, "the plugin read the positions the host published");
    eprintln!("{steady_ticks} ticks in {:?}", started.elapsed());
    host.shutdown("done");
}
