//! The batching rules: per plugin and per tick, events that need no immediate answer are gathered
//! into one `EventBatch` frame, flushed at the end of the tick or earlier when the batch reaches
//! a count (default 100) or a size (default 4 KiB); immediate events (join, quit, chat,
//! commands, `immediate`, and every event that expects a response) go at once, after what was
//! gathered before them; subscription filtering comes before encoding.
//!
//! Two levels:
//! - [`BatchBuilder`] and [`BatchLimits`] directly (the limits, the frame, order);
//! - the host runtime end to end: a real [`Host`] launches this test binary as its plugin
//!   (`--exact child_plugin`, which does nothing unless `PLUGBUS_ADDRESS` is set). The child
//!   connects with the plugin runtime (hello, subscriptions), then reads raw control frames from
//!   its link, so it sees frame boundaries: each frame is one line in a file whose path the
//!   parent passes in [`OUT_VAR`] (the host forwards plugin stdout into its log, so stdout is
//!   not used). The parent publishes tick by tick, waits until the child has seen the tick's
//!   last event, and checks the frames.
//!
//! Every wait gives up after [`STALL`], so a bug fails the test instead of hanging it.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugbus::codec::{self, BatchBuilder, BatchLimits, HostDecoder, HostMessage};
use plugbus::host::{Host, HostConfig, PluginConfig, SlotState};
use plugbus::plugin::Plugin;
use plugbus::proto::{self, EventEnvelope, EventType, event_envelope::Payload, host_to_plugin};
use plugbus::ring::{RegionRef, frame};
use plugbus::transport::ENV_ADDRESS;
use plugbus::transport::{HostState, Incoming, PluginLink};
use prost::Message as _;

/// Path of the child's observation file; set only for the child.
const OUT_VAR: &str = "PLUGBUS_BATCHING_OUT";
/// The plugin id.
const ID: &str = "batching";
/// The one event type the child does not subscribe to.
const UNSUBSCRIBED: EventType = EventType::PlayerJump;
/// How long a wait may take before the test fails.
const STALL: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

/// An event of type `ty` whose `player_uuid` carries `tag` (what the child reports) and whose
/// `name` is `name`.
fn event(ty: EventType, tag: &str, name: &str) -> EventEnvelope {
    let (uuid, name) = (tag.to_owned(), name.to_owned());
    let payload = match ty {
        EventType::PlayerToggleSprint => Payload::PlayerToggleSprint(proto::PlayerToggleSprintEvent {
            player_uuid: uuid,
            name,
            after: true,
        }),
        EventType::PlayerJump => Payload::PlayerJump(proto::PlayerJumpEvent {
            player_uuid: uuid,
            name,
            ..Default::default()
        }),
        EventType::PlayerHeal => Payload::PlayerHeal(proto::PlayerHealEvent {
            player_uuid: uuid,
            name,
            amount: 2.5,
            source: None,
        }),
        EventType::Chat => Payload::Chat(proto::ChatEvent {
            player_uuid: uuid,
            name,
            message: "hello".to_owned(),
        }),
        EventType::PlayerJoin => Payload::PlayerJoin(proto::PlayerJoinEvent {
            player_uuid: uuid,
            name,
            world: None,
        }),
        EventType::PlayerQuit => Payload::PlayerQuit(proto::PlayerQuitEvent {
            player_uuid: uuid,
            name,
        }),
        EventType::Command => Payload::Command(proto::CommandEvent {
            player_uuid: uuid,
            name,
            raw: "/spawn".to_owned(),
            command: "spawn".to_owned(),
            args: Vec::new(),
        }),
        other => panic!("no test event for {other:?}"),
    };
    EventEnvelope {
        r#type: ty as i32,
        payload: Some(payload),
        ..Default::default()
    }
}

/// The tag of an event built by [`event`].
fn tag_of(env: &EventEnvelope) -> &str {
    match &env.payload {
        Some(Payload::PlayerToggleSprint(e)) => &e.player_uuid,
        Some(Payload::PlayerJump(e)) => &e.player_uuid,
        Some(Payload::PlayerHeal(e)) => &e.player_uuid,
        Some(Payload::Chat(e)) => &e.player_uuid,
        Some(Payload::PlayerJoin(e)) => &e.player_uuid,
        Some(Payload::PlayerQuit(e)) => &e.player_uuid,
        Some(Payload::Command(e)) => &e.player_uuid,
        _ => "?",
    }
}

// ------------------------------------------------------------------------------------------
// BatchBuilder and BatchLimits
// ------------------------------------------------------------------------------------------

#[test]
fn default_limits_are_100_events_and_4_kib() {
    assert_eq!(
        BatchLimits::default(),
        BatchLimits {
            max_events: 100,
            max_bytes: 4096
        }
    );
    let settings = plugbus::host::HostSettings::default();
    assert_eq!((settings.batch_max_events, settings.batch_max_bytes), (100, 4096));
}

#[test]
fn count_limit_makes_a_batch_full_at_100_events() {
    let limits = BatchLimits::default();
    let mut batch = BatchBuilder::default();
    let env = event(EventType::PlayerToggleSprint, "t", "n");
    for i in 1..=100 {
        batch.push(&env);
        assert_eq!(batch.len(), i);
        assert!(
            batch.bytes() < limits.max_bytes,
            "small events must not reach the size limit"
        );
        assert_eq!(batch.is_full(&limits), i == 100, "after {i} events");
    }
    // A smaller count limit applies too.
    let tight = BatchLimits {
        max_events: 3,
        max_bytes: 4096,
    };
    batch.clear();
    assert!(batch.is_empty() && batch.bytes() == 0);
    batch.push(&env);
    batch.push(&env);
    assert!(!batch.is_full(&tight));
    batch.push(&env);
    assert!(batch.is_full(&tight));
}

#[test]
fn size_limit_makes_a_batch_full_at_4_kib() {
    let limits = BatchLimits::default();
    let mut batch = BatchBuilder::default();
    let env = event(EventType::PlayerToggleSprint, "t", &"n".repeat(1000));
    let entry = prost::encoding::message::encoded_len(codec::EVENT_BATCH_EVENTS, &env);
    assert!(entry > 1000);
    let mut pushed = 0;
    while !batch.is_full(&limits) {
        assert!(batch.bytes() < limits.max_bytes);
        batch.push(&env);
        pushed += 1;
        assert_eq!(batch.bytes(), pushed * entry, "each push adds one EventBatch entry");
    }
    // Full exactly when the bytes reach 4096: the first push that crosses it.
    assert!(batch.bytes() >= limits.max_bytes);
    assert!(batch.bytes() - entry < limits.max_bytes);
    assert_eq!(pushed, limits.max_bytes.div_ceil(entry));
    assert!(batch.len() < limits.max_events);

    // Exactly at the limit counts as full.
    let exact = BatchLimits {
        max_events: 100,
        max_bytes: 2 * entry,
    };
    batch.clear();
    batch.push(&env);
    assert!(!batch.is_full(&exact));
    batch.push(&env);
    assert!(batch.is_full(&exact));
}

#[test]
fn a_batch_is_one_frame_with_its_events_in_order() {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1 << 16))).expect("ring");
    let mut batch = BatchBuilder::with_capacity(64);
    let events: Vec<EventEnvelope> = (0..37)
        .map(|i| {
            let ty = [EventType::PlayerToggleSprint, EventType::PlayerHeal, EventType::Chat][i % 3];
            event(ty, &format!("e{i}"), &"x".repeat(i))
        })
        .collect();
    // `push` and `push_encoded` (encode once for several plugins) gather the same bytes.
    let mut twin = BatchBuilder::default();
    let mut body = Vec::new();
    for e in &events {
        batch.push(e);
        codec::encode_body(e, &mut body);
        twin.push_encoded(&body);
    }
    assert_eq!(batch.as_bytes(), twin.as_bytes());
    assert_eq!(batch.len(), events.len());

    let mut drained = Vec::new();
    twin.drain_into(&mut drained);
    assert!(twin.is_empty() && twin.bytes() == 0);
    assert_eq!(drained.len(), batch.frame_len());

    batch.flush_to(&mut tx).expect("flush");
    assert!(batch.is_empty() && batch.bytes() == 0, "a flush empties the batch");
    let f = rx.try_read().expect("ring").expect("one frame");
    assert_eq!(f.kind(), codec::KIND_HOST_TO_PLUGIN);
    assert_eq!(f.payload(), drained.as_slice());
    match proto::HostToPlugin::decode(f.payload()).expect("decode").payload {
        Some(host_to_plugin::Payload::Events(b)) => assert_eq!(b.events, events),
        other => panic!("not a batch: {other:?}"),
    }
    let mut seen = Vec::new();
    let n = HostDecoder::default()
        .decode(f.payload(), |m| match m {
            HostMessage::Event(e) => seen.push(e.clone()),
            HostMessage::Other(o) => panic!("{o:?}"),
        })
        .expect("decode");
    assert_eq!(n, events.len());
    assert_eq!(seen, events);
    drop(f);
    assert!(rx.try_read().expect("ring").is_none(), "one frame only");
}

#[test]
fn a_batch_that_does_not_fit_is_kept() {
    let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(1024))).expect("ring");
    let mut batch = BatchBuilder::default();
    let env = event(EventType::PlayerToggleSprint, "t", &"n".repeat(100));
    for _ in 0..3 {
        batch.push(&env);
    }
    // Fill the ring (two 408-byte frames of 1024) so the batch frame cannot be reserved.
    assert!(batch.frame_len() > 1024 - 2 * 408);
    tx.try_push(7, &[0u8; 400]).expect("filler frame");
    tx.try_push(7, &[0u8; 400]).expect("filler frame");
    let before = (batch.len(), batch.as_bytes().to_vec());
    assert!(matches!(batch.flush_to(&mut tx), Err(frame::ReserveError::Full { .. })));
    assert_eq!(
        (batch.len(), batch.as_bytes().to_vec()),
        before,
        "nothing lost on a refused flush"
    );
    drop(rx.try_read().expect("ring").expect("filler"));
    batch.flush_to(&mut tx).expect("fits once the reader caught up");
    let f = rx.try_read().expect("ring").expect("the second filler");
    assert_eq!(f.kind(), 7);
    drop(f);
    let f = rx.try_read().expect("ring").expect("the batch");
    assert_eq!(f.kind(), codec::KIND_HOST_TO_PLUGIN);
    assert_eq!(HostDecoder::default().decode(f.payload(), |_| {}).expect("decode"), 3);
}

// ------------------------------------------------------------------------------------------
// The child: a plugin that reports the frames it receives
// ------------------------------------------------------------------------------------------

/// One line per control frame:
/// - `batch <count> <body bytes> <last entry bytes> <type>:<tag>:<expects>...`
/// - `event <type>:<tag>:<expects>`
/// - `other <field name>` (hello, shutdown, ...)
fn describe(bytes: &[u8]) -> (String, bool) {
    let one = |e: &EventEnvelope| format!("{}:{}:{}", e.r#type, tag_of(e), u8::from(e.expects_response));
    match proto::HostToPlugin::decode(bytes) {
        Ok(msg) => match msg.payload {
            Some(host_to_plugin::Payload::Events(b)) => {
                let last = b.events.last().map_or(0, |e| {
                    prost::encoding::message::encoded_len(codec::EVENT_BATCH_EVENTS, e)
                });
                let tags: Vec<String> = b.events.iter().map(one).collect();
                (
                    format!(
                        "batch {} {} {last} {}\n",
                        b.events.len(),
                        b.encoded_len(),
                        tags.join(" ")
                    ),
                    false,
                )
            }
            Some(host_to_plugin::Payload::Event(e)) => (format!("event {}\n", one(&e)), false),
            Some(p) => (format!("other {}\n", p.field_name()), p.field_name() == "shutdown"),
            None => ("other none\n".to_owned(), false),
        },
        Err(e) => (format!("error {e}\n"), true),
    }
}

fn run_child(out_path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = File::create(out_path)?;
    let subscriptions: Vec<EventType> = proto::EVENT_PAYLOADS
        .iter()
        .map(|&(n, _, _)| EventType::try_from(n).expect("payload numbers are event types"))
        .filter(|&t| t != UNSUBSCRIBED)
        .collect();
    let mut plugin = Plugin::from_env()?
        .name("batching-observer")
        .subscribe(subscriptions)
        .connect()?;
    out.write_all(b"connected\n")?;
    let link = plugin.link();
    let mut last_beat = Instant::now();
    loop {
        let mut lines = String::new();
        let mut done = false;
        let n = link.poll(64, &mut |inc| match inc {
            Incoming::Host(bytes) => {
                let (line, end) = describe(bytes);
                lines.push_str(&line);
                done |= end;
            }
            Incoming::Moves { .. } => lines.push_str("moves\n"),
        })?;
        out.write_all(lines.as_bytes())?;
        if done {
            return Ok(());
        }
        if last_beat.elapsed() >= Duration::from_millis(50) {
            link.heartbeat();
            last_beat = Instant::now();
        }
        if n == 0 {
            if link.host_state() != HostState::Running {
                out.write_all(b"host stopped\n")?;
                return Ok(());
            }
            link.park(Duration::from_millis(20))?;
        }
    }
}

/// The plugin side of [`batching_rules_through_the_host`]; does nothing in a normal test run.
#[test]
fn child_plugin() {
    if std::env::var_os(ENV_ADDRESS).is_none() {
        return;
    }
    let out = std::env::var(OUT_VAR).expect("the parent passes the observation file");
    if let Err(e) = run_child(&out) {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&out)
            .and_then(|mut f| writeln!(f, "error {e}"));
        panic!("child plugin failed: {e}");
    }
}

// ------------------------------------------------------------------------------------------
// The parent
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Batch {
        body: usize,
        last: usize,
        events: Vec<(i32, String, bool)>,
    },
    Event((i32, String, bool)),
    Other(String),
}

impl Seen {
    fn tags(&self) -> Vec<&str> {
        match self {
            Seen::Batch { events, .. } => events.iter().map(|e| e.1.as_str()).collect(),
            Seen::Event(e) => vec![e.1.as_str()],
            Seen::Other(_) => Vec::new(),
        }
    }
}

fn parse_event(s: &str) -> (i32, String, bool) {
    let mut it = s.splitn(3, ':');
    let ty = it.next().and_then(|t| t.parse().ok()).expect("type");
    let tag = it.next().expect("tag").to_owned();
    let expects = it.next() == Some("1");
    (ty, tag, expects)
}

fn parse(text: &str) -> Vec<Seen> {
    let mut seen = Vec::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        match words.next() {
            Some("batch") => {
                let count: usize = words.next().and_then(|w| w.parse().ok()).expect("count");
                let body = words.next().and_then(|w| w.parse().ok()).expect("body");
                let last = words.next().and_then(|w| w.parse().ok()).expect("last");
                let events: Vec<_> = words.map(parse_event).collect();
                assert_eq!(events.len(), count, "line {line:?}");
                seen.push(Seen::Batch { body, last, events });
            }
            Some("event") => seen.push(Seen::Event(parse_event(words.next().expect("event")))),
            Some("error") => panic!("the child failed: {line}"),
            Some(_) => seen.push(Seen::Other(line.to_owned())),
            None => {}
        }
    }
    seen
}

/// Waits until the child has reported an event tagged `tag` (polling the host meanwhile, as a
/// game loop would), and returns everything it reported.
fn wait_for(host: &mut Host, path: &Path, tag: &str) -> Vec<Seen> {
    let deadline = Instant::now() + STALL;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let seen = parse(&text);
        if seen.iter().any(|s| s.tags().contains(&tag)) {
            return seen;
        }
        let state = host.plugins().into_iter().find(|(id, _)| id == ID).map(|(_, s)| s);
        assert!(
            matches!(state, Some(SlotState::Ready)),
            "plugin not ready ({state:?}) while waiting for {tag}; it reported:\n{text}"
        );
        assert!(
            Instant::now() < deadline,
            "no event {tag} within {STALL:?}; the child reported:\n{text}"
        );
        host.poll();
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The frames reported after the one holding `after` (exclusive), up to the one holding
/// `last` (inclusive).
fn frames_between(seen: &[Seen], after: &str, last: &str) -> Vec<Seen> {
    let start = seen
        .iter()
        .position(|s| s.tags().contains(&after))
        .expect("start tag seen")
        + 1;
    let end = seen
        .iter()
        .position(|s| s.tags().contains(&last))
        .expect("end tag seen");
    seen[start..=end].to_vec()
}

/// The limits rule for one batch frame: it went out no later than the push that reached a
/// limit (without its last event, it was below both limits).
fn assert_flushed_in_time(s: &Seen, limits: &BatchLimits) {
    let Seen::Batch { body, last, events } = s else {
        panic!("not a batch: {s:?}")
    };
    assert!(events.len() <= limits.max_events, "batch of {} events", events.len());
    assert!(
        events.len() - 1 < limits.max_events && body - last < limits.max_bytes,
        "batch of {} events, {body} bytes, was full before its last event",
        events.len()
    );
}

/// The frames of one tick of [`batching_rules_through_the_host`] with an immediate event `tag`
/// published after `before` batched ones and followed by `after` batched ones.
fn assert_immediate_after_gathered(frames: &[Seen], prefix: &str, before: usize, after: usize) {
    let tag = |i: usize| format!("{prefix}{i}");
    assert_eq!(
        frames.len(),
        3,
        "gathered batch, immediate event, end-of-tick batch: {frames:#?}"
    );
    assert_eq!(
        frames[0].tags(),
        (0..before).map(tag).collect::<Vec<_>>(),
        "the events gathered before the immediate one go first, as one batch"
    );
    assert!(matches!(frames[0], Seen::Batch { .. }));
    assert!(
        matches!(&frames[1], Seen::Event((_, t, _)) if *t == tag(before)),
        "then the immediate event alone: {:?}",
        frames[1]
    );
    assert_eq!(
        frames[2].tags(),
        (before + 1..before + 1 + after).map(tag).collect::<Vec<_>>(),
        "then the rest of the tick at its end"
    );
    assert!(matches!(frames[2], Seen::Batch { .. }));
}

#[test]
fn batching_rules_through_the_host() {
    let dir = std::env::temp_dir().join(format!("plugbus-batching-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out: PathBuf = dir.join("frames.txt");
    let _ = std::fs::remove_file(&out);
    let exe = std::env::current_exe().expect("test binary path");
    let mut config = HostConfig::new(vec![
        PluginConfig::launch(ID, exe)
            .args(["--exact", "child_plugin", "--nocapture", "--test-threads=1"])
            .env(OUT_VAR, out.to_str().expect("utf-8 temp path"))
            .required(true),
    ]);
    // A loaded machine may take a while to start the test binary.
    config.host.hello_timeout_ms = 30_000;
    let limits = BatchLimits {
        max_events: config.host.batch_max_events,
        max_bytes: config.host.batch_max_bytes,
    };
    assert_eq!(limits, BatchLimits::default());
    let mut host = Host::start(config).expect("host starts and the plugin says hello");

    // The hello and the subscription are two messages: the host may have seen only the first
    // when `start` returned. Probe with chats until one is not filtered.
    let deadline = Instant::now() + STALL;
    loop {
        host.poll();
        let before = host.metrics().host.filtered;
        let mut tick = host.begin_tick();
        tick.publish(&mut event(EventType::Chat, "probe", "p"));
        tick.end();
        if host.metrics().host.filtered == before {
            break;
        }
        assert!(Instant::now() < deadline, "the plugin's subscription never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = wait_for(&mut host, &out, "probe");
    assert!(matches!(seen.last(), Some(Seen::Event((18, t, false))) if t == "probe"));

    // 1. Count limit: 250 small events in one tick arrive as frames of 100, 100, then 50 at the
    //    end of the tick, in order.
    let mut tick = host.begin_tick();
    for i in 0..250 {
        tick.publish(&mut event(EventType::PlayerToggleSprint, &format!("a{i:03}"), "n"));
    }
    tick.end();
    let seen = wait_for(&mut host, &out, "a249");
    let frames = frames_between(&seen, "probe", "a249");
    let counts: Vec<usize> = frames.iter().map(|f| f.tags().len()).collect();
    assert_eq!(counts, [100, 100, 50], "frames: {frames:#?}");
    for f in &frames {
        assert_flushed_in_time(f, &limits);
        let Seen::Batch { body, .. } = f else { unreachable!() };
        assert!(*body < limits.max_bytes, "these frames were cut by count, not size");
    }
    let tags: Vec<&str> = frames.iter().flat_map(Seen::tags).collect();
    let expected: Vec<String> = (0..250).map(|i| format!("a{i:03}")).collect();
    assert_eq!(tags, expected, "every event once, in order");

    // 2. Size limit: events of about 1 KiB go out as soon as the batch reaches 4 KiB; the rest
    //    at the end of the tick.
    let mut tick = host.begin_tick();
    for i in 0..22 {
        tick.publish(&mut event(
            EventType::PlayerToggleSprint,
            &format!("b{i:02}"),
            &"n".repeat(1000),
        ));
    }
    tick.end();
    let seen = wait_for(&mut host, &out, "b21");
    let frames = frames_between(&seen, "a249", "b21");
    let tags: Vec<&str> = frames.iter().flat_map(Seen::tags).collect();
    let expected: Vec<String> = (0..22).map(|i| format!("b{i:02}")).collect();
    assert_eq!(tags, expected, "every event once, in order");
    assert!(frames.len() >= 3, "{frames:#?}");
    let (last, full) = frames.split_last().expect("frames");
    for f in full {
        assert_flushed_in_time(f, &limits);
        let Seen::Batch { body, events, .. } = f else {
            unreachable!()
        };
        assert!(
            *body >= limits.max_bytes,
            "flushed before the end of the tick, so at 4 KiB"
        );
        assert!(events.len() < limits.max_events);
    }
    assert_flushed_in_time(last, &limits);
    assert_eq!(
        last.tags(),
        ["b20", "b21"],
        "the end of the tick flushes the rest: {frames:#?}"
    );

    // 3. Immediate events go at once, after what was gathered before them. One tick each: five
    //    batched events, the immediate one, three batched events.
    let immediates: [(&str, EventType, bool, bool); 7] = [
        // (prefix, type, `immediate` flag, dispatched: expects a response)
        ("chat", EventType::Chat, false, false),
        ("join", EventType::PlayerJoin, false, false),
        ("quit", EventType::PlayerQuit, false, false),
        ("cmd", EventType::Command, false, false),
        ("flag", EventType::PlayerToggleSprint, true, false),
        ("disp", EventType::PlayerHeal, false, true),
        ("resp", EventType::PlayerToggleSprint, false, false),
    ];
    let mut previous = "b21".to_owned();
    for (prefix, ty, flag, dispatched) in immediates {
        let mut tick = host.begin_tick();
        for i in 0..5 {
            tick.publish(&mut event(EventType::PlayerToggleSprint, &format!("{prefix}{i}"), "n"));
        }
        let mut imm = event(ty, &format!("{prefix}5"), "n");
        imm.immediate = flag;
        if prefix == "resp" {
            // Published (not dispatched) but flagged as expecting a response.
            imm.expects_response = true;
        }
        if dispatched {
            let _pending = tick.dispatch(&mut imm);
        } else {
            tick.publish(&mut imm);
        }
        for i in 6..9 {
            tick.publish(&mut event(EventType::PlayerHeal, &format!("{prefix}{i}"), "n"));
        }
        tick.end();
        let last = format!("{prefix}8");
        let seen = wait_for(&mut host, &out, &last);
        let frames = frames_between(&seen, &previous, &last);
        assert_immediate_after_gathered(&frames, prefix, 5, 3);
        if let Seen::Event((t, _, expects)) = &frames[1] {
            assert_eq!(*t, ty as i32);
            assert_eq!(*expects, dispatched || prefix == "resp");
        }
        previous = last;
    }

    // 4. Filtering before encoding: an event type the plugin did not subscribe to is never
    //    delivered, counts as filtered, and is not encoded.
    let before = host.metrics().host;
    let mut tick = host.begin_tick();
    tick.publish(&mut event(EventType::PlayerToggleSprint, "d0", "n"));
    tick.publish(&mut event(UNSUBSCRIBED, "d1", "n"));
    tick.publish(&mut event(EventType::PlayerToggleSprint, "d2", "n"));
    let unanswerable = tick.dispatch(&mut event(UNSUBSCRIBED, "d3", "n"));
    tick.publish(&mut event(EventType::Chat, "d4", "n"));
    tick.publish(&mut event(UNSUBSCRIBED, "d5", "n"));
    tick.publish(&mut event(EventType::PlayerToggleSprint, "d6", "n"));
    tick.end();
    let after = host.metrics().host;
    assert_eq!(
        after.filtered - before.filtered,
        3,
        "three events of an unsubscribed type"
    );
    assert_eq!(
        after.encoded - before.encoded,
        4,
        "only the delivered events are encoded"
    );
    let jump = UNSUBSCRIBED as usize;
    assert_eq!(after.offered[jump] - before.offered[jump], 3);
    let outcome = host
        .poll_outcome(&unanswerable)
        .expect("nobody to wait for: done at once");
    assert!(outcome.answered.is_empty() && outcome.late.is_empty() && !outcome.cancelled);
    let seen = wait_for(&mut host, &out, "d6");
    let frames = frames_between(&seen, &previous, "d6");
    let tags: Vec<Vec<&str>> = frames.iter().map(Seen::tags).collect();
    assert_eq!(tags, [vec!["d0", "d2"], vec!["d4"], vec!["d6"]], "{frames:#?}");

    // Nothing of the unsubscribed type was ever delivered, and nothing came twice.
    let all_events: Vec<(i32, String, bool)> = seen
        .iter()
        .flat_map(|s| match s {
            Seen::Batch { events, .. } => events.clone(),
            Seen::Event(e) => vec![e.clone()],
            Seen::Other(_) => Vec::new(),
        })
        .collect();
    assert!(
        all_events.iter().all(|e| e.0 != UNSUBSCRIBED as i32),
        "an unsubscribed event was delivered"
    );
    let mut tags: Vec<&str> = all_events.iter().map(|e| e.1.as_str()).collect();
    let n = tags.len();
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), n, "an event was delivered twice");
    let stats = &host.metrics().plugins[ID];
    assert_eq!(
        stats.events_sent, n as u64,
        "the host's count matches what the plugin saw"
    );

    host.shutdown("batching test done");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.lines().any(|l| l == "other shutdown" || l == "host stopped"),
        "the child saw the shutdown:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
