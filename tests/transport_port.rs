//! The transport port is enough to write an adapter from: a small in-process adapter ("loop",
//! two mutex-guarded queues and two futex words), written against `plugbus::transport` alone,
//! carries a real `Host` and a real `Plugin` runtime and the same `Handler` as shared memory
//! does: handshake, subscriptions, moves with their flags, events in order, answers merged,
//! actions, and `Host::wait` sleeping on the adapter's wake-up word.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply};
use plugbus::proto::{ChatEvent, EventEnvelope, EventType, HostToPlugin, PluginToHost, event_envelope::Payload};
use plugbus::sync::{FutexWord, Ordering};
use plugbus::transport::{
    Acceptor, Downstream, HostLink, HostState, Incoming, LinkCounters, LinkError, LinkRequest, Occupancy, OpenError,
    OpenedLink, PeerHealth, PluginLink, Transports,
};
use prost::Message as _;

// ------------------------------------------------------------------------------------------
// The adapter
// ------------------------------------------------------------------------------------------

enum Item {
    Moves(MoveFrameHeader, Vec<MoveRecord>),
    Host(Vec<u8>),
}

/// What both ends share. `down` holds at most `limit` items (the link's "room").
struct Shared {
    down: Mutex<VecDeque<Item>>,
    up: Mutex<VecDeque<Vec<u8>>>,
    /// The host sleeps on it: 1 while it announced a sleep, 0 otherwise.
    host_word: FutexWord,
    closed: Mutex<bool>,
    limit: usize,
}

const SLEEPING: u32 = 1;

struct LoopHost {
    shared: Arc<Shared>,
    address: String,
}

struct LoopPlugin {
    shared: Arc<Shared>,
}

fn encoded(msg: &HostToPlugin) -> Vec<u8> {
    msg.encode_to_vec()
}

impl HostLink for LoopHost {
    fn try_send_moves(&mut self, tick: u64, flags: u32, records: &[MoveRecord]) -> Result<bool, LinkError> {
        let mut q = self.shared.down.lock().unwrap();
        if q.len() >= self.shared.limit {
            return Ok(false);
        }
        let header = MoveFrameHeader {
            tick,
            count: records.len() as u32,
            flags,
        };
        q.push_back(Item::Moves(header, records.to_vec()));
        Ok(true)
    }

    fn try_send(&mut self, item: Downstream<'_>) -> Result<bool, LinkError> {
        let mut q = self.shared.down.lock().unwrap();
        if q.len() >= self.shared.limit {
            return Ok(false);
        }
        let bytes = match item {
            Downstream::Event(env) => encoded(&HostToPlugin {
                payload: Some(plugbus::proto::host_to_plugin::Payload::Event(env.clone())),
                ..Default::default()
            }),
            Downstream::EncodedEvent(body) => {
                let env = EventEnvelope::decode(body).map_err(|e| LinkError::Protocol(e.to_string()))?;
                encoded(&HostToPlugin {
                    payload: Some(plugbus::proto::host_to_plugin::Payload::Event(env)),
                    ..Default::default()
                })
            }
            Downstream::Batch { body, .. } => {
                let batch = plugbus::proto::EventBatch::decode(body).map_err(|e| LinkError::Protocol(e.to_string()))?;
                encoded(&HostToPlugin {
                    payload: Some(plugbus::proto::host_to_plugin::Payload::Events(batch)),
                    ..Default::default()
                })
            }
            Downstream::Message(m) => encoded(m),
            Downstream::Encoded(b) => b.to_vec(),
        };
        q.push_back(Item::Host(bytes));
        Ok(true)
    }

    fn wake(&mut self) -> bool {
        false // the plugin end polls
    }

    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let Some(b) = self.shared.up.lock().unwrap().pop_front() else {
                break;
            };
            f(&b);
            n += 1;
        }
        Ok(n)
    }

    fn prepare_wait(&mut self) -> Result<bool, LinkError> {
        self.shared.host_word.swap(SLEEPING, Ordering::AcqRel);
        if self.shared.up.lock().unwrap().is_empty() {
            Ok(true)
        } else {
            self.shared.host_word.swap(0, Ordering::AcqRel);
            Ok(false)
        }
    }

    fn wait_word(&self) -> (&FutexWord, u32) {
        (&self.shared.host_word, SLEEPING)
    }

    fn finish_wait(&mut self) {
        self.shared.host_word.swap(0, Ordering::AcqRel);
    }

    fn heartbeat(&mut self) {}

    fn peer(&self) -> PeerHealth {
        PeerHealth {
            heartbeat_age_ns: 0,
            pid: 0,
        }
    }

    fn occupancy(&mut self) -> Result<Occupancy, LinkError> {
        let fill = self.shared.down.lock().unwrap().len() as f64 / self.shared.limit as f64;
        Ok(Occupancy {
            moves: fill,
            control: fill,
        })
    }

    fn failure(&self) -> Option<&'static str> {
        None
    }

    fn close(&mut self) {
        *self.shared.closed.lock().unwrap() = true;
    }

    fn publish_counters(&mut self, _c: &LinkCounters) {}

    fn address(&self) -> &str {
        &self.address
    }
}

impl PluginLink for LoopPlugin {
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let Some(item) = self.shared.down.lock().unwrap().pop_front() else {
                break;
            };
            match &item {
                Item::Moves(header, records) => f(Incoming::Moves {
                    header: *header,
                    records,
                }),
                Item::Host(b) => f(Incoming::Host(b)),
            }
            n += 1;
        }
        Ok(n)
    }

    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError> {
        self.try_send_encoded(&msg.encode_to_vec())
    }

    fn try_send_encoded(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        self.shared.up.lock().unwrap().push_back(payload.to_vec());
        Ok(true)
    }

    fn max_message(&self) -> usize {
        1 << 20
    }

    fn has_incoming(&mut self) -> Result<bool, LinkError> {
        Ok(!self.shared.down.lock().unwrap().is_empty())
    }

    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        std::thread::sleep(timeout.min(Duration::from_micros(200)));
        Ok(())
    }

    fn wake_host(&mut self) {
        // The doorbell protocol: the host's announced sleep ends with our swap.
        if self.shared.host_word.swap(0, Ordering::AcqRel) == SLEEPING {
            self.shared.host_word.wake_all();
        }
    }

    fn heartbeat(&mut self) {}

    fn host_state(&self) -> HostState {
        if *self.shared.closed.lock().unwrap() {
            HostState::ShuttingDown
        } else {
            HostState::Running
        }
    }

    fn failure(&self) -> Option<&'static str> {
        None
    }

    fn host_pid(&self) -> u32 {
        std::process::id()
    }

    fn publish_counters(&mut self, _events: u64, _move_frames: u64, _replies: u64) {}
}

/// Plugin ends waiting to be picked up by address (an in-process "listener").
fn registry() -> &'static Mutex<HashMap<String, LoopPlugin>> {
    static R: OnceLock<Mutex<HashMap<String, LoopPlugin>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

struct LoopAcceptor {
    next: u64,
    limit: usize,
}

impl Acceptor for LoopAcceptor {
    fn name(&self) -> &'static str {
        "loop"
    }

    fn clean_stale(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn open(&mut self, request: &LinkRequest<'_>) -> Result<OpenedLink, OpenError> {
        if !request.attach {
            return Err(OpenError(
                "the loop transport carries in-process (attached) plugins only".into(),
            ));
        }
        self.next += 1;
        let address = format!("loop:{}.{}.{}", std::process::id(), request.plugin_id, self.next);
        let shared = Arc::new(Shared {
            down: Mutex::new(VecDeque::new()),
            up: Mutex::new(VecDeque::new()),
            host_word: FutexWord::new(0),
            closed: Mutex::new(false),
            limit: self.limit,
        });
        registry()
            .lock()
            .unwrap()
            .insert(address.clone(), LoopPlugin { shared: shared.clone() });
        Ok(OpenedLink {
            link: Box::new(LoopHost {
                shared,
                address: address.clone(),
            }),
            env: Vec::new(),
            address,
            inherit: None,
        })
    }
}

// ------------------------------------------------------------------------------------------
// The same runtimes over it
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Filter {
    seen: Vec<String>,
}

impl Handler for Filter {
    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let conflated = if frame.is_conflated() { " conflated" } else { "" };
        self.seen
            .push(format!("moves {} {}{conflated}", frame.tick, moves.len()));
    }

    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        let Some(Payload::Chat(c)) = &event.payload else {
            return Reply::Ack;
        };
        self.seen.push(format!("chat {}", c.message));
        if c.message.contains("darn") {
            ctx.send_chat(&c.player_uuid, "blocked");
            Reply::Cancel
        } else {
            Reply::chat_message(c.message.to_uppercase())
        }
    }
}

fn chat(text: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: "p".into(),
            name: "Steve".into(),
            message: text.into(),
        })),
        ..Default::default()
    }
}

#[test]
fn a_new_adapter_written_from_the_port_alone_carries_both_runtimes() {
    let mut cfg = PluginConfig::attached("looped");
    cfg.transport = "loop".into();
    let transports = Transports::standard().with(Box::new(LoopAcceptor { next: 0, limit: 4 }));
    let mut host = Host::start_with(HostConfig::new(vec![cfg]), transports).expect("host starts");
    let address = host.address_of("looped").expect("configured").to_owned();
    assert!(address.starts_with("loop:"), "{address}");
    let link = registry().lock().unwrap().remove(&address).expect("the plugin end");

    // The plugin runtime over it, in a thread of its own: the same Handler as over shm. While
    // `hold` is set it does not read (a busy plugin).
    let hold = Arc::new(Mutex::new(false));
    let held = hold.clone();
    let plugin = std::thread::spawn(move || {
        let mut p = Plugin::handshake(
            Box::new(link) as Box<dyn PluginLink>,
            Plugin::builder(&address, "looped")
                .subscribe([EventType::Chat, EventType::PlayerMove])
                .hello_timeout(Duration::from_secs(30)),
        )
        .expect("handshake over the loop adapter");
        let mut filter = Filter::default();
        let started = Instant::now();
        while p.shutdown_reason().is_none()
            && p.link().host_state() == HostState::Running
            && started.elapsed() < Duration::from_secs(60)
        {
            if *held.lock().unwrap() || p.poll(&mut filter).expect("poll") == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        filter.seen
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !host.is_subscribed("looped", EventType::Chat) {
        host.poll();
        assert!(Instant::now() < deadline, "no hello over the loop adapter");
        std::thread::sleep(Duration::from_millis(1));
    }

    // A tick with moves and two chats that expect an answer.
    let mut tick = host.begin_tick();
    tick.publish_move(MoveRecord::new([1; 16], [1.0, 2.0, 3.0], 0.0, 0.0));
    let darn = tick.dispatch(&mut chat("oh darn"));
    let hello = tick.dispatch(&mut chat("hello"));
    tick.end();
    let o = host.wait(&darn, Instant::now() + Duration::from_secs(30));
    assert!(o.cancelled && o.late.is_empty(), "{o:?}");
    let o = host.wait(&hello, Instant::now() + Duration::from_secs(30));
    let Some(plugbus::proto::event_result::Update::Chat(m)) = o.mutation else {
        panic!("{o:?}");
    };
    assert_eq!(m.message.as_deref(), Some("HELLO"));
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1, "the block notice");

    // The adapter's room is 4 items: ticks while the plugin is busy are conflated, and the
    // plugin is told so.
    *hold.lock().unwrap() = true;
    for t in 0..20 {
        let mut tick = host.begin_tick();
        tick.publish_move(MoveRecord::new([1; 16], [t as f64, 2.0, 3.0], 0.0, 0.0));
        tick.publish_move(MoveRecord::new([2; 16], [t as f64, 2.0, 3.0], 0.0, 0.0));
        tick.end();
    }
    assert!(host.metrics().plugins["looped"].moves_conflated > 0);
    *hold.lock().unwrap() = false;
    let waited = Instant::now();
    while host.metrics().plugins["looped"].moves_sent + host.metrics().plugins["looped"].moves_conflated < 41 {
        host.begin_tick().end();
        assert!(waited.elapsed() < Duration::from_secs(30), "moves never drained");
        std::thread::sleep(Duration::from_millis(1));
    }
    host.shutdown("done");
    let seen = plugin.join().expect("plugin thread");
    // The tick's events in publish order, then its moves.
    assert_eq!(&seen[..3], ["chat oh darn", "chat hello", "moves 1 1"], "{seen:?}");
    assert!(
        seen.iter().any(|s| s.ends_with("2 conflated")),
        "the conflated frame (both players' latest) is flagged: {seen:?}"
    );
}
