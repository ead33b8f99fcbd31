//! The codec: encoding and decoding one event, and movement per tick through the fast path
//! against one `PlayerMoveEvent` envelope per player.
//!
//! Groups (competitors side by side, so that each ratio comes from one run):
//!
//! - `encode_chat` (`Throughput::Elements(1)`): one `ChatEvent` envelope encoded
//!   - `fresh_vec`: `encode_to_vec` (a new `Vec` each time),
//!   - `pooled_buffer`: into a buffer from a [`BufferPool`] (taken and given back),
//!   - `in_ring`: straight into a reserved frame of a frame ring with
//!     [`codec::encode_event_in_ring`], then read and released, so the ring never fills.
//! - `decode_chat` (`Throughput::Elements(1)`): the same event as a `HostToPlugin { event }` frame
//!   payload, decoded
//!   - `prost_fresh`: `HostToPlugin::decode` (a new message each time),
//!   - `host_decoder`: [`HostDecoder::decode`] (reused envelopes, no allocation).
//! - `moves` (`Throughput::Elements(players)`, 100 and 1,000 players per tick): one tick's
//!   movement, written by the host side and read by the plugin side, which sums the positions
//!   - `packed/N`: one packed move frame ([`fastpath::write_frame`]) read in place
//!     ([`fastpath::parse`]) — the fast path,
//!   - `envelope/N`: one `PlayerMoveEvent` envelope per player (uuid as text, name, world,
//!     position, rotation: what the df.plugin protocol sends), each encoded into the control ring
//!     as a `HostToPlugin` event frame, then each decoded with [`HostDecoder`] — the reason the
//!     fast path exists.
//!
//! Both sides run in the calling thread, so each iteration times the whole path. Before anything
//! is measured, every competitor runs once and its results are checked (the decoded chat equals
//! the original; both movement paths deliver the same positions).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use plugbus::codec::{self, BufferPool, EnvelopePool, HostDecoder, HostMessage};
use plugbus::fastpath::{self, MoveRecord};
use plugbus::proto::{self, EventEnvelope, EventType, HostToPlugin, event_envelope::Payload, host_to_plugin};
use plugbus::ring::{RegionRef, frame};
use prost::Message as _;

/// Players per tick in the `moves` group.
const PLAYERS: [usize; 2] = [100, 1000];

fn chat() -> EventEnvelope {
    EventEnvelope {
        event_id: "1048576".to_owned(),
        r#type: EventType::Chat as i32,
        expects_response: true,
        immediate: false,
        payload: Some(Payload::Chat(proto::ChatEvent {
            player_uuid: "8d3f0c6e-93c5-4c2f-9b7b-3f1b3c1f2a10".to_owned(),
            name: "Steve".to_owned(),
            message: "hello there, how is everyone doing today?".to_owned(),
        })),
    }
}

fn ring(bytes: usize) -> (frame::Producer, frame::Consumer) {
    frame::channel(RegionRef::heap(frame::region_size(bytes))).expect("frame ring")
}

fn bench_encode(c: &mut Criterion) {
    let env = chat();
    let expected = env.encode_to_vec();

    // Correctness first: the three paths produce the same envelope bytes.
    let mut pool = BufferPool::default();
    let mut buf = pool.take();
    codec::encode_body(&env, &mut buf);
    assert_eq!(buf, expected);
    pool.give(buf);
    let (mut tx, mut rx) = ring(1 << 16);
    codec::encode_event_in_ring(&mut tx, &env).expect("room");
    {
        let f = rx.try_read().expect("ring").expect("frame");
        match HostToPlugin::decode(f.payload()).expect("decode").payload {
            Some(host_to_plugin::Payload::Event(e)) => assert_eq!(e, env),
            other => panic!("frame holds {other:?}"),
        }
    }

    let mut g = c.benchmark_group("encode_chat");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fresh_vec", |b| b.iter(|| black_box(black_box(&env).encode_to_vec())));
    g.bench_function("pooled_buffer", |b| {
        b.iter(|| {
            let mut buf = pool.take();
            codec::encode_body(black_box(&env), &mut buf);
            black_box(&buf);
            pool.give(buf);
        })
    });
    g.bench_function("in_ring", |b| {
        b.iter(|| {
            codec::encode_event_in_ring(&mut tx, black_box(&env)).expect("room");
            let f = rx.try_read().expect("ring").expect("frame");
            black_box(f.payload().len());
        })
    });
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let env = chat();
    let frame_bytes = HostToPlugin {
        plugin_id: String::new(),
        payload: Some(host_to_plugin::Payload::Event(env.clone())),
    }
    .encode_to_vec();

    // Correctness first: both decoders give back the envelope.
    let mut decoder = HostDecoder::default();
    let mut seen = 0;
    decoder
        .decode(&frame_bytes, |m| match m {
            HostMessage::Event(e) => {
                assert_eq!(e, &env);
                seen += 1;
            }
            HostMessage::Other(o) => panic!("decoded as {o:?}"),
        })
        .expect("decode");
    assert_eq!(seen, 1);

    let mut g = c.benchmark_group("decode_chat");
    g.throughput(Throughput::Elements(1));
    g.bench_function("prost_fresh", |b| {
        b.iter(|| black_box(HostToPlugin::decode(black_box(frame_bytes.as_slice())).expect("decode")))
    });
    g.bench_function("host_decoder", |b| {
        b.iter(|| {
            decoder
                .decode(black_box(&frame_bytes), |m| {
                    black_box(m);
                })
                .expect("decode")
        })
    });
    g.finish();
}

/// A tick's players.
struct World {
    records: Vec<MoveRecord>,
    names: Vec<String>,
}

impl World {
    fn new(n: usize) -> Self {
        let records = (0..n)
            .map(|i| {
                let mut uuid = [0u8; 16];
                uuid[..8].copy_from_slice(&(i as u64 * 0x9E37_79B9_7F4A_7C15).to_le_bytes());
                uuid[8..].copy_from_slice(&(i as u64).to_le_bytes());
                MoveRecord::new(uuid, [i as f64 * 0.5, 64.0 + i as f64, -(i as f64)], i as f32, 1.5)
            })
            .collect();
        let names = (0..n).map(|i| format!("Player{i}")).collect();
        Self { records, names }
    }
}

/// The fast path: one packed frame per tick, read in place. Returns the sum of positions.
fn packed_tick(tx: &mut frame::Producer, rx: &mut frame::Consumer, tick: u64, records: &[MoveRecord]) -> f64 {
    fastpath::write_frame(tx, tick, 0, records).expect("room for the tick");
    let f = rx.try_read().expect("ring").expect("the tick's frame");
    let (_, moves) = fastpath::parse(f.payload()).expect("valid move frame");
    moves.iter().map(|r| r.x + r.y + r.z).sum()
}

/// One `PlayerMoveEvent` envelope per player: built in a pooled envelope (strings reused),
/// encoded into the control ring, then every frame decoded. Returns the sum of positions.
fn envelope_tick(
    tx: &mut frame::Producer,
    rx: &mut frame::Consumer,
    env: &mut EventEnvelope,
    decoder: &mut HostDecoder,
    world: &World,
    first_id: u64,
) -> f64 {
    for (k, (r, name)) in world.records.iter().zip(&world.names).enumerate() {
        env.event_id.clear();
        write!(env.event_id, "{}", first_id + k as u64).expect("write to a String");
        let Some(Payload::PlayerMove(m)) = &mut env.payload else {
            unreachable!("a move envelope")
        };
        m.player_uuid.clear();
        let mut text = uuid::Uuid::encode_buffer();
        m.player_uuid
            .push_str(uuid::Uuid::from_bytes(r.uuid).hyphenated().encode_lower(&mut text));
        m.name.clear();
        m.name.push_str(name);
        m.world.clear();
        m.world.push_str("overworld");
        m.position = Some(proto::Vec3 { x: r.x, y: r.y, z: r.z });
        m.rotation = Some(proto::Rotation {
            yaw: r.yaw,
            pitch: r.pitch,
        });
        codec::encode_event_in_ring(tx, env).expect("room for the tick");
    }
    let mut sum = 0.0;
    while let Some(f) = rx.try_read().expect("ring") {
        decoder
            .decode(f.payload(), |m| {
                if let HostMessage::Event(e) = m {
                    if let Some(Payload::PlayerMove(m)) = &e.payload {
                        let p = m.position.unwrap_or_default();
                        sum += p.x + p.y + p.z;
                    }
                }
            })
            .expect("decode");
    }
    sum
}

fn bench_moves(c: &mut Criterion) {
    let mut g = c.benchmark_group("moves");
    for n in PLAYERS {
        let world = World::new(n);
        let (mut ptx, mut prx) = ring(1 << 20);
        let (mut etx, mut erx) = ring(1 << 22);
        let mut pool = EnvelopePool::default();
        let mut env = pool.take(EventType::PlayerMove);
        let mut decoder = HostDecoder::default();

        // Correctness first: both paths deliver the same positions, and every envelope decodes
        // back to its record.
        let want: f64 = world.records.iter().map(|r| r.x + r.y + r.z).sum();
        assert_eq!(packed_tick(&mut ptx, &mut prx, 0, &world.records), want);
        assert_eq!(
            envelope_tick(&mut etx, &mut erx, &mut env, &mut decoder, &world, 0),
            want
        );
        let e = env.clone();
        let Some(Payload::PlayerMove(last)) = &e.payload else {
            unreachable!()
        };
        assert_eq!(MoveRecord::from_move_event(last), world.records.last().copied());

        g.throughput(Throughput::Elements(n as u64));
        let mut tick = 1;
        g.bench_with_input(BenchmarkId::new("packed", n), &world, |b, world| {
            b.iter(|| {
                tick += 1;
                black_box(packed_tick(&mut ptx, &mut prx, tick, black_box(&world.records)))
            })
        });
        let mut next_id = 1 << 20;
        g.bench_with_input(BenchmarkId::new("envelope", n), &world, |b, world| {
            b.iter(|| {
                next_id += n as u64;
                black_box(envelope_tick(
                    &mut etx,
                    &mut erx,
                    &mut env,
                    &mut decoder,
                    world,
                    next_id,
                ))
            })
        });
        pool.give(env);
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_encode, bench_decode, bench_moves
}
criterion_main!(benches);
