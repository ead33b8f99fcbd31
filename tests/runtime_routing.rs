//! Routing through the host runtime, with real plugin processes (this test binary re-executed
//! as `common::plugin_child`, see `tests/common/mod.rs`): subscription filtering, the merge rule
//! for answers, the response deadline, the order of critical events under load, the
//! conflation of moves for a lagging plugin, the overflow disconnect, and a paced plugin at a
//! steady tick rate.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use plugbus::host::{Host, Notice, SlotState};
use plugbus::proto::{ChatMutation, EventEnvelope, EventType, event_result};

fn chat_update(text: &str) -> Option<event_result::Update> {
    Some(event_result::Update::Chat(ChatMutation {
        message: Some(text.to_owned()),
    }))
}

#[test]
fn an_unsubscribed_plugin_receives_nothing_and_costs_no_encode() {
    init_logging();
    let dir = Scratch::new("filter");
    let (ra, rb) = (dir.file("a.txt"), dir.file("b.txt"));
    let mut host = Host::start(config(vec![
        child_plugin("a", "handler", &ra)
            .env(SUBSCRIBE, "CHAT")
            .env(RECORD_MOVES, "1"),
        child_plugin("b", "handler", &rb)
            .env(SUBSCRIBE, "PLAYER_JOIN")
            .env(RECORD_MOVES, "1"),
    ]))
    .expect("host starts");
    wait_started(&mut host, &[&ra, &rb]);

    let before = host.metrics();
    let (mut chats, mut joins) = (Vec::new(), Vec::new());
    for t in 0..10 {
        let mut tick = host.begin_tick();
        tick.publish_moves(&moves_for_tick(t, 5, |_| true));
        for i in 0..5 {
            let tag = format!("t{t}-{i}");
            tick.publish(&mut join(&format!("join-{tag}")));
            tick.publish(&mut chat(&format!("chat-{tag}"), "hi"));
            // Nobody subscribed to jumps (or to moves).
            tick.publish(&mut jump(&format!("jump-{tag}")));
            joins.push(format!("join-{tag}"));
            chats.push(format!("chat-{tag}"));
        }
        tick.end();
    }
    let after = host.metrics();
    assert_eq!(
        after.host.filtered - before.host.filtered,
        50,
        "the jumps, and only them, are filtered"
    );
    assert_eq!(
        after.host.encoded - before.host.encoded,
        100,
        "joins and chats are encoded once each"
    );
    assert_eq!(after.host.offered[EventType::PlayerJump as usize], 50);
    wait_delivered(&mut host, "a", 50, 0);
    wait_delivered(&mut host, "b", 50, 0);
    let m = host.metrics();
    assert_eq!((m.plugins["a"].moves_sent, m.plugins["b"].moves_sent), (0, 0));
    host.shutdown("done");

    let (la, lb) = (read_lines(&ra), read_lines(&rb));
    let ea = events_of(&la);
    let eb = events_of(&lb);
    assert!(
        ea.iter().all(|(ty, _)| *ty == EventType::Chat as i32),
        "a saw only chats: {ea:?}"
    );
    assert!(
        eb.iter().all(|(ty, _)| *ty == EventType::PlayerJoin as i32),
        "b saw only joins: {eb:?}"
    );
    assert_eq!(ea.into_iter().map(|e| e.1).collect::<Vec<_>>(), chats);
    assert_eq!(eb.into_iter().map(|e| e.1).collect::<Vec<_>>(), joins);
    assert!(move_frames_of(&la).is_empty() && move_frames_of(&lb).is_empty());
    assert_eq!(la.last().map(String::as_str), Some("result ok"));
}

#[test]
fn cancel_and_mutations_merge_by_priority() {
    init_logging();
    let dir = Scratch::new("merge");
    let reports = [
        dir.file("hi.txt"),
        dir.file("tie.txt"),
        dir.file("mid.txt"),
        dir.file("lo.txt"),
    ];
    // Ids sort the other way round from priorities, so the order seen is the priority's doing.
    let mut host = Host::start(config(vec![
        child_plugin("aa_hi", "handler", &reports[0])
            .env(SUBSCRIBE, "CHAT")
            .env(REPLY, "mutate:from hi")
            .env(RULES, "cancel-hi=>cancel;hi-ack=>ack")
            .priority(10)
            .required(true),
        child_plugin("ab_tie", "handler", &reports[1])
            .env(SUBSCRIBE, "CHAT")
            .env(RULES, "tie=>mutate:from tie")
            .priority(10)
            .required(true),
        child_plugin("mm_mid", "handler", &reports[2])
            .env(SUBSCRIBE, "CHAT")
            .priority(5)
            .required(true),
        child_plugin("zz_lo", "handler", &reports[3])
            .env(SUBSCRIBE, "CHAT")
            .env(REPLY, "mutate:from lo")
            .env(RULES, "cancel-lo=>cancel")
            .priority(1)
            .required(true),
    ]))
    .expect("host starts");
    let paths: Vec<&std::path::Path> = reports.iter().map(|p| p.as_path()).collect();
    wait_started(&mut host, &paths);
    let order = ["zz_lo", "mm_mid", "aa_hi", "ab_tie"];

    let ask = |host: &mut Host, text: &str| {
        let mut tick = host.begin_tick();
        let pending = tick.dispatch(&mut chat("p", text));
        tick.end();
        let o = host.wait(&pending, Instant::now() + STALL);
        assert_eq!(o.event_id, pending.event_id());
        assert_eq!(
            o.answered, order,
            "every plugin answered, in ascending priority then id: {o:?}"
        );
        assert!(o.late.is_empty());
        o
    };

    // Two mutations: the higher priority has the final say.
    let o = ask(&mut host, "hello");
    assert!(!o.cancelled);
    assert_eq!(o.mutation, chat_update("from hi"));

    // The top plugin lets it pass: the lower one's mutation stands.
    let o = ask(&mut host, "hi-ack");
    assert_eq!(o.mutation, chat_update("from lo"));

    // One cancels, the others mutate: cancelled, and no mutation is reported.
    for text in ["cancel-lo", "cancel-hi"] {
        let o = ask(&mut host, text);
        assert!(o.cancelled, "{text}: {o:?}");
        assert_eq!(o.mutation, None, "{text}");
    }

    // Equal priorities: ties broken by id, ascending, so `ab_tie` comes last and wins.
    let o = ask(&mut host, "tie");
    assert_eq!(o.mutation, chat_update("from tie"));

    let m = host.metrics();
    for id in order {
        assert_eq!((m.plugins[id].replies, m.plugins[id].late_replies), (5, 0), "{id}");
    }
}

#[test]
fn a_plugin_that_never_answers_is_late_at_the_deadline() {
    init_logging();
    let dir = Scratch::new("deadline");
    let (rf, rs) = (dir.file("fast.txt"), dir.file("silent.txt"));
    let mut cfg = config(vec![
        child_plugin("fast", "handler", &rf)
            .env(SUBSCRIBE, "CHAT")
            .required(true),
        child_plugin("silent", "silent", &rs)
            .env(SUBSCRIBE, "CHAT")
            .required(true),
    ]);
    cfg.host.response_timeout_ms = 2_000;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&rf, &rs]);

    // A caller's deadline before the response timeout: the wait returns at that deadline.
    let mut tick = host.begin_tick();
    let pending = tick.dispatch(&mut chat("p", "anyone?"));
    tick.end();
    assert_eq!(host.poll_outcome(&pending), None, "the silent plugin has not answered");
    let deadline = Instant::now() + Duration::from_millis(1_000);
    let o = host.wait(&pending, deadline);
    assert!(Instant::now() >= deadline, "returned before the deadline: {o:?}");
    assert_eq!(o.answered, ["fast"]);
    assert_eq!(o.late, ["silent"]);
    assert!(!o.cancelled);
    assert_eq!(o.mutation, None);
    assert!(o.elapsed >= Duration::from_millis(1_000), "{o:?}");
    // The outcome was taken: the handle is spent.
    assert_eq!(host.poll_outcome(&pending), None);

    // Without a caller's deadline, the host's response timeout ends the wait.
    let mut tick = host.begin_tick();
    let pending = tick.dispatch(&mut chat("p", "still there?"));
    tick.end();
    let until = Instant::now() + STALL;
    let o = loop {
        if let Some(o) = host.poll_outcome(&pending) {
            break o;
        }
        assert!(Instant::now() < until, "the response timeout never ended the wait");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        (o.answered.as_slice(), o.late.as_slice()),
        (&["fast".to_owned()][..], &["silent".to_owned()][..])
    );
    assert!(o.elapsed >= Duration::from_millis(2_000), "{o:?}");

    let m = host.metrics();
    assert_eq!(m.plugins["silent"].late_replies, 2);
    assert_eq!(
        (
            m.plugins["silent"].replies,
            m.plugins["fast"].late_replies,
            m.plugins["fast"].replies
        ),
        (0, 0, 2)
    );
    // A late plugin is counted, not disconnected.
    assert!(host.is_ready("silent"));
    host.shutdown("done");
    assert_eq!(read_lines(&rs).last().map(String::as_str), Some("result ok"));
}

/// Kinds of events in [`critical_events_keep_their_order_under_load`].
fn mixed_event(seq: u64) -> (EventEnvelope, bool) {
    let tag = format!("e{seq}");
    // A cheap deterministic shuffle of kinds.
    match (seq.wrapping_mul(2_654_435_761) >> 7) % 10 {
        0 | 1 => (join(&tag), true),
        2 | 3 => (quit(&tag), true),
        4 | 5 => (chat(&tag, "a message of some length, to fill the ring"), true),
        6 => (command(&tag, "spawn"), true),
        _ => (jump(&tag), false),
    }
}

#[test]
fn critical_events_keep_their_order_under_load() {
    init_logging();
    let dir = Scratch::new("order");
    let report = dir.file("rec.txt");
    let mut cfg = config(vec![
        child_plugin("rec", "handler", &report)
            .env(SUBSCRIBE, "EVENT_TYPE_ALL")
            // Asleep on the first event, so that the host has to queue behind a full ring.
            .env(FIRST_EVENT_SLEEP_MS, "300")
            .queues(small_rings(1 << 16, 1 << 16))
            .required(true),
    ]);
    cfg.host.overflow_frames = 1 << 20;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&report]);

    const TICKS: u64 = 12;
    const PER_TICK: u64 = 2_500;
    let mut published = Vec::new();
    let mut critical = Vec::new();
    for t in 0..TICKS {
        let mut tick = host.begin_tick();
        for i in 0..PER_TICK {
            let seq = t * PER_TICK + i;
            let (mut env, is_critical) = mixed_event(seq);
            tick.publish(&mut env);
            published.push(format!("e{seq}"));
            if is_critical {
                critical.push(format!("e{seq}"));
            }
        }
        tick.end();
    }
    let total = TICKS * PER_TICK;
    assert!(host.is_ready("rec"), "the plugin was not disconnected");
    assert!(
        host.metrics().plugins["rec"].overflowed_frames > 0,
        "the overflow queue was used"
    );
    wait_delivered(&mut host, "rec", total, 0);
    let m = host.metrics();
    assert_eq!(m.plugins["rec"].disconnects.len(), 0);
    host.shutdown("done");

    let lines = read_lines(&report);
    let seen = events_of(&lines);
    let critical_types = [
        EventType::PlayerJoin,
        EventType::PlayerQuit,
        EventType::Chat,
        EventType::Command,
    ]
    .map(|t| t as i32);
    let seen_critical: Vec<&str> = seen
        .iter()
        .filter(|(ty, _)| critical_types.contains(ty))
        .map(|(_, tag)| tag.as_str())
        .collect();
    assert_eq!(seen_critical.len(), critical.len(), "no critical event is missing");
    assert!(seen_critical == critical, "critical events arrive in publish order");
    // The batched ones too keep their place among them: the whole stream is in order.
    let all: Vec<&str> = seen.iter().map(|(_, tag)| tag.as_str()).collect();
    assert!(
        all == published,
        "every event, once, in publish order ({} seen, {} published)",
        all.len(),
        published.len()
    );
}

#[test]
fn moves_are_conflated_for_a_plugin_that_sleeps() {
    init_logging();
    let dir = Scratch::new("conflate");
    let report = dir.file("sleepy.txt");
    let mut host = Host::start(config(vec![
        child_plugin("sleepy", "handler", &report)
            .env(SUBSCRIBE, "PLAYER_MOVE")
            .env(RECORD_MOVES, "1")
            .env(MOVE_SLEEP_MS, "20")
            .queues(small_rings(1 << 16, 1 << 12))
            .required(true),
    ]))
    .expect("host starts");
    wait_started(&mut host, &[&report]);

    const PLAYERS: u64 = 200;
    const TICKS: u64 = 300;
    // Not every player moves every tick; the last position of each is where it last moved.
    let moved = |p: u64, t: u64| (p + t) % 3 != 0 || t == 1;
    let mut last: HashMap<u64, [f64; 3]> = HashMap::new();
    let mut offered = 0;
    for t in 1..=TICKS {
        let mut tick = host.begin_tick();
        let n = tick.number();
        let moves = moves_for_tick(n, PLAYERS, |p| moved(p, t));
        for m in &moves {
            last.insert(player_of(&m.uuid), [m.x, m.y, m.z]);
        }
        offered += moves.len() as u64;
        tick.publish_moves(&moves);
        // The tick never waits for the plugin: this returns while it sleeps.
        tick.end();
    }
    assert!(host.is_ready("sleepy"));
    let conflated = host.metrics().plugins["sleepy"].moves_conflated;
    assert!(conflated > 0, "a plugin that sleeps gets conflated moves");
    // Keep ticking (without moves) until the latest positions have gone out and been read.
    wait_delivered(&mut host, "sleepy", 0, offered);
    let m = host.metrics();
    let s = &m.plugins["sleepy"];
    assert!(s.moves_sent < offered, "fewer records were sent than offered");
    assert_eq!(s.moves_sent + s.moves_conflated, offered);
    host.shutdown("done");

    let lines = read_lines(&report);
    let frames = move_frames_of(&lines);
    assert_eq!(
        frames.iter().map(|f| f.1 as u64).sum::<u64>(),
        m.plugins["sleepy"].moves_sent
    );
    assert!(
        frames.windows(2).all(|w| w[0].0 < w[1].0),
        "frames arrive in tick order"
    );
    let seen = positions_of(&lines);
    assert_eq!(seen.len(), last.len(), "every player that moved was seen");
    for (p, pos) in &last {
        assert_eq!(
            seen.get(p),
            Some(pos),
            "player {p}: the last position seen is the last published"
        );
    }
}

#[test]
fn a_plugin_that_never_reads_is_disconnected_with_its_count() {
    init_logging();
    let dir = Scratch::new("overflow");
    let report = dir.file("stuck.txt");
    let mut cfg = config(vec![
        child_plugin("stuck", "silent", &report)
            .env(SUBSCRIBE, "CHAT")
            .queues(small_rings(1 << 16, 1 << 12))
            .required(true),
    ]);
    cfg.host.overflow_frames = 8;
    cfg.host.restart_max = 0;
    let mut host = Host::start(cfg).expect("host starts");
    wait_started(&mut host, &[&report]);

    let mut published = 0u64;
    let mut notices = Vec::new();
    let disconnected = loop {
        let mut tick = host.begin_tick();
        tick.publish(&mut chat(
            &format!("c{published}"),
            "a chat message nobody will ever read",
        ));
        tick.end();
        published += 1;
        notices.extend(host.drain_notices());
        if let Some(n) = notices.iter().find(|n| matches!(n, Notice::Disconnected { .. })) {
            break n.clone();
        }
        assert!(published < 100_000, "never disconnected: {notices:#?}");
    };
    let Notice::Disconnected {
        id,
        reason,
        undelivered,
        ..
    } = disconnected
    else {
        unreachable!()
    };
    assert_eq!(id, "stuck");
    assert!(reason.contains("overflow"), "{reason}");
    let m = host.metrics();
    let s = &m.plugins["stuck"];
    assert!(undelivered > 0);
    assert_eq!(
        undelivered,
        published - s.events_sent,
        "undelivered = published - written to the ring"
    );
    assert_eq!(undelivered, 9, "the queue limit plus the one that did not fit");
    assert!(
        reason.contains(&format!("{undelivered} events undelivered")),
        "{reason}"
    );
    assert_eq!(s.disconnects.get("overflow"), Some(&1));
    // restart_max = 0: disabled at once; later chats are filtered, not queued.
    assert!(
        notices
            .iter()
            .any(|n| matches!(n, Notice::Disabled { id, .. } if id == "stuck")),
        "{notices:#?}"
    );
    assert!(matches!(state_of(&host, "stuck"), SlotState::Disabled(_)));
    let filtered = m.host.filtered;
    let mut tick = host.begin_tick();
    tick.publish(&mut chat("late", "x"));
    tick.end();
    assert_eq!(host.metrics().host.filtered, filtered + 1);
    assert!(host.pid_of("stuck").is_none(), "the process was stopped");
}

#[test]
fn a_paced_plugin_misses_nothing_at_a_steady_tick_rate() {
    // A paced plugin sleeps on timers of its own between ticks and spins through their arrival;
    // whether its timers are on time or not, nothing may be lost, reordered or left unanswered.
    init_logging();
    let dir = Scratch::new("paced");
    let report = dir.file("paced.txt");
    let mut host = Host::start(config(vec![
        child_plugin("paced", "handler", &report)
            .env(SUBSCRIBE, "EVENT_TYPE_ALL")
            .env(WAIT, "paced")
            .env(RECORD_MOVES, "1")
            .env(RULES, "rewrite=>mutate:rewritten")
            .required(true),
    ]))
    .expect("host starts");
    wait_started(&mut host, &[&report]);

    const TICKS: u64 = 100;
    let period = Duration::from_millis(20);
    let mut next = Instant::now();
    let mut ticks = Vec::new();
    let mut jumps = 0;
    for t in 0..TICKS {
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let moves = moves_for_tick(t, 10, |_| true);
        let mut tick = host.begin_tick();
        ticks.push(tick.number());
        tick.publish_moves(&moves);
        tick.publish(&mut jump(&format!("j{t}")));
        jumps += 1;
        let pending = (t % 10 == 9).then(|| tick.dispatch(&mut chat(&format!("c{t}"), "rewrite me")));
        tick.end();
        if let Some(p) = pending {
            let o = host.wait(&p, Instant::now() + STALL);
            assert!(o.late.is_empty(), "answered in time: {o:?}");
            assert_eq!(o.mutation, chat_update("rewritten"), "tick {t}");
        }
        host.poll();
    }
    let chats = TICKS / 10;
    wait_delivered(&mut host, "paced", jumps + chats, TICKS * 10);
    let wakeups = host.metrics().plugins["paced"].wakeups;
    host.shutdown("done");
    eprintln!("paced plugin: {wakeups} futex wake-ups from the host over {TICKS} ticks");

    let lines = read_lines(&report);
    let frames = move_frames_of(&lines);
    assert_eq!(
        frames,
        ticks.iter().map(|&t| (t, 10)).collect::<Vec<_>>(),
        "one frame of 10 moves per tick, in order"
    );
    let seen: Vec<String> = events_of(&lines).into_iter().map(|(_, tag)| tag).collect();
    let expected: Vec<String> = (0..TICKS)
        .flat_map(|t| {
            let mut v = vec![format!("j{t}")];
            if t % 10 == 9 {
                v.push(format!("c{t}"));
            }
            v
        })
        .collect();
    assert_eq!(seen, expected, "every event once, in order");
}
