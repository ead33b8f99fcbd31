//! One ordered stream per plugin: whatever the queues underneath, a plugin observes every item
//! of tick t (events and moves) before any item of tick t + 1, events in publish order, a
//! tick's moves after its events, and never a player's move after its quit.
//!
//! - `a_plugin_held_back_sees_every_tick_in_order` (and its gRPC twin): a real plugin process is
//!   stopped (SIGSTOP) for many ticks of joins, quits, chats, jumps and moves, then resumed.
//! - `random_schedules_keep_the_order`: a property test over random schedules of publish,
//!   dispatch and lag, with the plugin in this process (attached over shared memory), checked
//!   against a model of what the plugin may see.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use plugbus::fastpath::{FLAG_CONFLATED, MoveFrameHeader, MoveRecord, uuid_to_string};
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply};
use plugbus::proto::{
    ChatEvent, EventEnvelope, EventType, PlayerJoinEvent, PlayerJumpEvent, PlayerQuitEvent, event_envelope::Payload,
};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------
// The model: what was published, and what the plugin may observe
// ------------------------------------------------------------------------------------------

/// An event as published: its tick, type and player.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    tick: u64,
    ty: i32,
    player: u64,
}

/// One thing a plugin observed.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event {
        ty: i32,
        player: u64,
    },
    /// A move frame: its tick label, flags, and `(player, tick the record was published)`.
    Moves {
        tick: u64,
        flags: u32,
        records: Vec<(u64, u64)>,
    },
}

/// Everything the host was given, tick by tick.
#[derive(Debug, Default)]
struct Model {
    events: Vec<Published>,
    /// Per tick: the moves published, `(player, tick)`, in order.
    moves: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Per player: (tick, joined?) in publish order.
    presence: HashMap<u64, Vec<(u64, bool)>>,
    /// Players online at the start.
    initially_online: BTreeSet<u64>,
}

impl Model {
    /// Whether `p` is online at the end of tick `t`, and since which tick.
    fn online_since(&self, p: u64, t: u64) -> Option<u64> {
        let mut since = self.initially_online.contains(&p).then_some(0);
        for (tick, joined) in self.presence.get(&p).into_iter().flatten() {
            if *tick > t {
                break;
            }
            since = joined.then_some(*tick);
        }
        since
    }

    /// For each player, the ticks at which a move of it was published, in order.
    fn publish_ticks(&self) -> HashMap<u64, Vec<u64>> {
        let mut by_player: HashMap<u64, Vec<u64>> = HashMap::new();
        for (t, ms) in &self.moves {
            for &(p, _) in ms {
                by_player.entry(p).or_default().push(*t);
            }
        }
        by_player
    }

    /// Checks what a plugin saw against what was published; `Err` says what is wrong.
    fn check(&self, seen: &[Seen]) -> Result<(), String> {
        let published_at = self.publish_ticks();
        // The latest tick <= t at which player p's move was published.
        let latest = |p: u64, t: u64| -> Option<u64> {
            let ticks = published_at.get(&p)?;
            let n = ticks.partition_point(|x| *x <= t);
            n.checked_sub(1).map(|i| ticks[i])
        };
        let events: Vec<(i32, u64)> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Event { ty, player } => Some((*ty, *player)),
                Seen::Moves { .. } => None,
            })
            .collect();
        let published: Vec<(i32, u64)> = self.events.iter().map(|e| (e.ty, e.player)).collect();
        if events != published {
            return Err(format!(
                "events differ from the published ones: {} seen, {} published; first difference at {}",
                events.len(),
                published.len(),
                events.iter().zip(&published).take_while(|(a, b)| a == b).count()
            ));
        }
        // Walk the stream: the tick of each item never goes back.
        let mut last_tick = 0;
        let mut events_before = 0usize;
        let mut last_record: HashMap<u64, u64> = HashMap::new();
        for (k, s) in seen.iter().enumerate() {
            match s {
                Seen::Event { .. } => {
                    let t = self.events[events_before].tick;
                    if t < last_tick {
                        return Err(format!(
                            "item {k}: an event of tick {t} after an item of tick {last_tick}"
                        ));
                    }
                    last_tick = t;
                    events_before += 1;
                }
                Seen::Moves { tick, flags, records } => {
                    let t = *tick;
                    if t < last_tick {
                        return Err(format!("item {k}: moves of tick {t} after an item of tick {last_tick}"));
                    }
                    last_tick = t;
                    // Every event of ticks up to t came before it.
                    let due = self.events.iter().filter(|e| e.tick <= t).count();
                    if events_before != due {
                        return Err(format!(
                            "item {k}: moves of tick {t} after {events_before} events, but {due} were published up to that tick"
                        ));
                    }
                    if flags & FLAG_CONFLATED == 0 {
                        let expected = self.moves.get(&t).cloned().unwrap_or_default();
                        if *records != expected {
                            return Err(format!(
                                "item {k}: an unconflated frame of tick {t} is not that tick's moves"
                            ));
                        }
                    }
                    for &(p, tp) in records {
                        let Some(since) = self.online_since(p, t) else {
                            return Err(format!("item {k}: player {p} moves at tick {t}, after it quit"));
                        };
                        if tp > t || tp < since {
                            return Err(format!(
                                "item {k}: player {p}'s record of tick {tp} in the frame of tick {t} (online since {since})"
                            ));
                        }
                        // Each player's latest record as of t: nothing it published in (tp, t].
                        if latest(p, t) != Some(tp) {
                            return Err(format!(
                                "item {k}: player {p}'s record of tick {tp} in the frame of tick {t} is not its latest"
                            ));
                        }
                        if last_record.get(&p).is_some_and(|prev| *prev > tp) {
                            return Err(format!("item {k}: player {p}'s records go back in time"));
                        }
                        last_record.insert(p, tp);
                    }
                }
            }
        }
        // Nothing lost but conflated moves: each player's last published record was seen, unless
        // it quit after it.
        let end = self.moves.keys().next_back().copied().unwrap_or(0).max(last_tick);
        for (&p, ticks) in &published_at {
            let tp = *ticks.last().expect("at least one");
            if self.online_since(p, end).is_some_and(|since| since <= tp) && last_record.get(&p) != Some(&tp) {
                return Err(format!("player {p}'s last record (tick {tp}) was never seen"));
            }
        }
        Ok(())
    }
}

fn player_uuid(p: u64) -> String {
    uuid_to_string(&uuid_of(p))
}

fn player_of_text(uuid: &str) -> u64 {
    player_of(&plugbus::fastpath::uuid_from_str(uuid).expect("a UUID"))
}

fn event(ty: EventType, p: u64) -> EventEnvelope {
    let uuid = player_uuid(p);
    let name = format!("player{p}");
    let payload = match ty {
        EventType::PlayerJoin => Payload::PlayerJoin(PlayerJoinEvent {
            player_uuid: uuid,
            name,
            world: None,
        }),
        EventType::PlayerQuit => Payload::PlayerQuit(PlayerQuitEvent {
            player_uuid: uuid,
            name,
        }),
        EventType::Chat => Payload::Chat(ChatEvent {
            player_uuid: uuid,
            name,
            message: "hello".into(),
        }),
        _ => Payload::PlayerJump(PlayerJumpEvent {
            player_uuid: uuid,
            name,
            world: "overworld".into(),
            position: None,
        }),
    };
    EventEnvelope {
        payload: Some(payload),
        ..Default::default()
    }
}

/// Publishes (or, for a chat, dispatches) event `ty` of player `p`, and notes it in the model.
fn send(tick: &mut plugbus::host::Tick<'_>, model: &mut Model, ty: EventType, p: u64) {
    let mut env = event(ty, p);
    if ty == EventType::Chat {
        let _ = tick.dispatch(&mut env);
    } else {
        tick.publish(&mut env);
    }
    model.events.push(Published {
        tick: tick.number(),
        ty: ty as i32,
        player: p,
    });
}

fn player_in(env: &EventEnvelope) -> u64 {
    let uuid = match &env.payload {
        Some(Payload::PlayerJoin(e)) => &e.player_uuid,
        Some(Payload::PlayerQuit(e)) => &e.player_uuid,
        Some(Payload::Chat(e)) => &e.player_uuid,
        Some(Payload::PlayerJump(e)) => &e.player_uuid,
        other => panic!("unexpected event {other:?}"),
    };
    player_of_text(uuid)
}

// ------------------------------------------------------------------------------------------
// A real plugin process, stopped and resumed
// ------------------------------------------------------------------------------------------

fn seen_from_report(lines: &[String]) -> Vec<Seen> {
    let mut seen = Vec::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("ev ") {
            let (ty, tag) = rest.split_once(' ').expect("ev <type> <tag>");
            seen.push(Seen::Event {
                ty: ty.parse().expect("type"),
                player: player_of_text(tag),
            });
        } else if let Some(rest) = l.strip_prefix("mp ") {
            let mut it = rest.split(' ');
            let tick = it.next().expect("tick").parse().expect("tick");
            let flags = it.next().expect("flags").parse().expect("flags");
            let records = it
                .map(|r| {
                    let (p, t) = r.split_once('@').expect("player@tick");
                    (p.parse().expect("player"), t.parse().expect("tick"))
                })
                .collect();
            seen.push(Seen::Moves { tick, flags, records });
        }
    }
    seen
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("signal the plugin");
}

#[test]
fn a_plugin_held_back_sees_every_tick_in_order() {
    held_back("shm");
}

/// The same over gRPC: the plugin's stream stops being read, the adapter's queue fills, and the
/// host conflates and queues as for shared memory; moves arrive packed with their tick and flags.
#[test]
fn a_grpc_plugin_held_back_sees_every_tick_in_order() {
    held_back("grpc");
}

fn held_back(transport: &str) {
    init_logging();
    let dir = Scratch::new(&format!("held-back-{transport}"));
    let report = dir.file("held.txt");
    let mut plugin = child_plugin("held", "handler", &report)
        .env(SUBSCRIBE, "EVENT_TYPE_ALL")
        .env(RECORD_PLAYERS, "1")
        // The smallest queues: the moves ring holds a few ticks, the control ring a few dozen
        // events (over gRPC: the adapter's queue holds 68 messages), so both fill while the
        // plugin is stopped.
        .queues(small_rings(1 << 16, 1 << 12))
        .required(true);
    plugin.transport = transport.to_owned();
    let mut cfg = config(vec![plugin]);
    if transport == "grpc" {
        cfg.host.listen = vec![format!("unix://{}", dir.file("host.sock").display())];
    }
    cfg.host.overflow_frames = 1 << 20;
    cfg.host.heartbeat_timeout_ms = 60_000;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&report]);
    let pid = host.pid_of("held").expect("launched");

    const PLAYERS: u64 = 120;
    let mut model = Model {
        initially_online: (0..PLAYERS).collect(),
        ..Default::default()
    };
    let mut online: BTreeSet<u64> = (0..PLAYERS).collect();
    let tick_no = |host: &mut Host, model: &mut Model, online: &mut BTreeSet<u64>, i: u64| {
        let mut tick = host.begin_tick();
        let t = tick.number();
        // Churn: a player leaves or comes back every tick; chats and jumps in between.
        let p = (i * 7) % PLAYERS;
        let mut events = vec![
            (EventType::Chat, (i * 11) % PLAYERS),
            (EventType::PlayerJump, (i * 13) % PLAYERS),
        ];
        events.insert(
            (i % 2) as usize,
            if online.remove(&p) {
                (EventType::PlayerQuit, p)
            } else {
                online.insert(p);
                (EventType::PlayerJoin, p)
            },
        );
        for (ty, p) in events {
            send(&mut tick, model, ty, p);
            if matches!(ty, EventType::PlayerJoin | EventType::PlayerQuit) {
                model
                    .presence
                    .entry(p)
                    .or_default()
                    .push((t, ty == EventType::PlayerJoin));
            }
        }
        // Most online players move; each tick a different few stand still.
        let moving: Vec<u64> = online.iter().copied().filter(|q| (q + i) % 5 != 0).collect();
        let moves: Vec<MoveRecord> = moving
            .iter()
            .map(|&q| MoveRecord::new(uuid_of(q), position(q, t), 0.0, 0.0))
            .collect();
        tick.publish_moves(&moves);
        model.moves.insert(t, moving.iter().map(|&q| (q, t)).collect());
        tick.end();
    };

    // A few ticks with the plugin awake, then stopped for 150 ticks, then resumed.
    let mut i = 0;
    for _ in 0..20 {
        i += 1;
        tick_no(&mut host, &mut model, &mut online, i);
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(pid, rustix::process::Signal::STOP);
    // Over gRPC the socket and the HTTP/2 windows also hold a few hundred kilobytes.
    let stopped_ticks = if transport == "grpc" { 1_000 } else { 150 };
    for _ in 0..stopped_ticks {
        i += 1;
        tick_no(&mut host, &mut model, &mut online, i);
        std::thread::sleep(Duration::from_millis(1));
    }
    let m = host.metrics();
    let s = &m.plugins["held"];
    assert!(s.moves_conflated > 0, "the moves ring filled: moves were conflated");
    assert!(
        s.overflowed_frames > 0,
        "the control ring filled: messages waited in the host"
    );
    signal(pid, rustix::process::Signal::CONT);
    for _ in 0..40 {
        i += 1;
        tick_no(&mut host, &mut model, &mut online, i);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(host.is_ready("held"), "the plugin was not disconnected");
    let events = model.events.len() as u64;
    let offered: u64 = model.moves.values().map(|m| m.len() as u64).sum();
    wait_delivered(&mut host, "held", events, offered);
    host.shutdown("done");

    let seen = seen_from_report(&read_lines(&report));
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Moves { flags, .. } if flags & FLAG_CONFLATED != 0)),
        "the plugin was told which frames were conflated"
    );
    if let Err(e) = model.check(&seen) {
        panic!("{e}");
    }
}

// ------------------------------------------------------------------------------------------
// Random schedules, the plugin in this process
// ------------------------------------------------------------------------------------------

/// The in-process plugin's handler: what it saw, in order.
#[derive(Default)]
struct Observer {
    seen: Vec<Seen>,
}

impl Handler for Observer {
    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        self.seen.push(Seen::Moves {
            tick: frame.tick,
            flags: frame.flags,
            records: moves.iter().map(|m| (player_of(&m.uuid), tick_of(m))).collect(),
        });
    }

    fn on_event(&mut self, _ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        self.seen.push(Seen::Event {
            ty: event.r#type,
            player: player_in(event),
        });
        Reply::Ack
    }
}

/// One step of a schedule.
#[derive(Debug, Clone)]
struct Step {
    /// Events: (kind 0 = join/quit toggle, 1 = chat dispatched, 2 = jump; player).
    events: Vec<(u8, u64)>,
    /// Which online players move (bit per player).
    moving: u16,
    /// How many times the plugin polls after the tick (each poll handles up to 256 items).
    polls: u8,
}

const PROP_PLAYERS: u64 = 12;

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec((0u8..3, 0..PROP_PLAYERS), 0..5),
        any::<u16>(),
        prop_oneof![3 => Just(0u8), 1 => 1u8..3],
    )
        .prop_map(|(events, moving, polls)| Step { events, moving, polls })
}

/// Starts a host with one attached plugin `order` and connects it from this process.
fn host_and_plugin(events_ring: u64) -> (Host, Plugin) {
    let mut config = HostConfig::new(vec![
        PluginConfig::attached("order").queues(small_rings(1 << 16, events_ring)),
    ]);
    config.host.overflow_frames = 1 << 20;
    config.host.heartbeat_timeout_ms = 60_000;
    let mut host = Host::start(config).expect("host starts");
    let address = host.address_of("order").expect("configured").to_owned();
    let connecting = std::thread::spawn(move || {
        Plugin::builder(&address, "order")
            .subscribe([EventType::All])
            .hello_timeout(STALL)
            .connect()
    });
    let deadline = Instant::now() + STALL;
    while !connecting.is_finished() {
        host.poll();
        assert!(Instant::now() < deadline, "the plugin did not connect");
        std::thread::sleep(Duration::from_micros(200));
    }
    let plugin = connecting.join().expect("connect thread").expect("plugin connects");
    // The subscription arrives with the hello; let the host take both.
    while !host.is_subscribed("order", EventType::PlayerMove) {
        host.poll();
        assert!(Instant::now() < deadline, "no subscription");
    }
    (host, plugin)
}

fn run_schedule(steps: &[Step], events_ring: u64) -> Result<(), TestCaseError> {
    let (mut host, mut plugin) = host_and_plugin(events_ring);
    let mut observer = Observer::default();
    let mut model = Model {
        initially_online: (0..PROP_PLAYERS).collect(),
        ..Default::default()
    };
    let mut online: BTreeSet<u64> = (0..PROP_PLAYERS).collect();
    for (i, s) in steps.iter().enumerate() {
        let mut tick = host.begin_tick();
        let t = tick.number();
        let moving: Vec<u64> = online.iter().copied().filter(|p| s.moving & (1 << p) != 0).collect();
        // Moves staged before the events of the same tick: a quit among them removes them.
        let staged = |p: u64| MoveRecord::new(uuid_of(p), position(p, t), 0.0, i as f32);
        let (early, late) = moving.split_at(moving.len() / 2);
        for &p in early {
            tick.publish_move(staged(p));
        }
        // Players that quit during the tick (even if they came back in it).
        let mut left: BTreeSet<u64> = BTreeSet::new();
        for &(kind, p) in &s.events {
            let ty = match kind {
                0 if online.remove(&p) => EventType::PlayerQuit,
                0 => {
                    online.insert(p);
                    EventType::PlayerJoin
                }
                1 => EventType::Chat,
                _ => EventType::PlayerJump,
            };
            send(&mut tick, &mut model, ty, p);
            match ty {
                EventType::PlayerQuit => {
                    left.insert(p);
                    model.presence.entry(p).or_default().push((t, false));
                }
                EventType::PlayerJoin => {
                    model.presence.entry(p).or_default().push((t, true));
                }
                _ => {}
            }
        }
        // Only players still online publish the second half of their moves.
        let late: Vec<u64> = late.iter().copied().filter(|p| online.contains(p)).collect();
        for &p in &late {
            tick.publish_move(staged(p));
        }
        tick.end();
        // What the host delivers for the tick: the early moves of players that did not quit
        // during it (a quit removes a player's staged moves), and the late ones.
        let mut delivered: Vec<(u64, u64)> = early
            .iter()
            .copied()
            .filter(|p| !left.contains(p))
            .map(|p| (p, t))
            .collect();
        delivered.extend(late.iter().map(|&p| (p, t)));
        model.moves.insert(t, delivered);
        for _ in 0..s.polls {
            plugin
                .poll(&mut observer)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
    // Catch up: keep ticking (nothing new) and reading until nothing is left anywhere.
    let events = model.events.len() as u64;
    let offered: u64 = model.moves.values().map(|m| m.len() as u64).sum();
    let deadline = Instant::now() + STALL;
    loop {
        host.begin_tick().end();
        while plugin
            .poll(&mut observer)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            > 0
        {}
        let m = host.metrics();
        let s = &m.plugins["order"];
        if s.events_sent == events
            && s.moves_sent + s.moves_conflated >= offered
            && !plugin.link().has_incoming().unwrap()
        {
            break;
        }
        prop_assert!(Instant::now() < deadline, "the stream did not drain");
    }
    let m = host.metrics();
    let s = &m.plugins["order"];
    prop_assert_eq!(
        s.moves_sent + s.moves_conflated,
        offered,
        "every record sent or conflated, once"
    );
    host.shutdown("done");
    model.check(&observer.seen).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random ticks of moves, joins, quits, chats (dispatched) and jumps (batched), with the
    /// plugin lagging at random: a 4 KiB events ring overflows into the host's queue and the
    /// 64 KiB moves ring is conflated, in many interleavings.
    #[test]
    fn random_schedules_keep_the_order(steps in proptest::collection::vec(step(), 1..120)) {
        run_schedule(&steps, 1 << 12)?;
    }
}

/// A fixed schedule that exercises a quit after its player's moves were staged, and a long lag,
/// so the model's checks are known to run on such cases whatever proptest draws.
#[test]
fn a_quit_removes_the_moves_staged_before_it() {
    let mut steps = vec![
        Step {
            events: vec![(0, 3)],
            moving: 0xFFFF,
            polls: 0,
        };
        60
    ];
    steps.push(Step {
        events: vec![(1, 5), (2, 6)],
        moving: 0xFFFF,
        polls: 2,
    });
    run_schedule(&steps, 1 << 12).expect("the order holds");
}
