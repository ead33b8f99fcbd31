//! The gRPC adapter with real sockets: plugbus's own plugin runtime over it (batches, packed moves
//! with their flags), a plain tonic client that behaves as the df.plugin SDKs do (one message per
//! event, empty results as acks, actions with correlation ids), refusals, the example chat filter
//! launched over gRPC, and a stalled remote plugin.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugbus::fastpath::{MoveFrameHeader, MoveRecord};
use plugbus::host::{Host, HostConfig, PluginConfig};
use plugbus::plugin::{Context, Handler, Plugin, Reply};
use plugbus::proto::plugin_client::PluginClient;
use plugbus::proto::{
    ActionBatch, ActionResult, ChatEvent, EventEnvelope, EventResult, EventSubscribe, EventType, HostToPlugin,
    PlayerJumpEvent, PluginHello, PluginToHost, action, event_envelope::Payload, event_result, host_to_plugin,
    plugin_to_host,
};
use tokio_stream::wrappers::ReceiverStream;

const STALL: Duration = Duration::from_secs(30);

fn socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plugbus-grpc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("host.sock")
}

fn host_with(plugins: Vec<PluginConfig>, listen: &str) -> Host {
    host_with_config(plugins, listen, |_| {})
}

fn host_with_config(plugins: Vec<PluginConfig>, listen: &str, edit: impl FnOnce(&mut HostConfig)) -> Host {
    let mut cfg = HostConfig::new(plugins);
    edit(&mut cfg);
    cfg.host.listen = vec![listen.to_owned()];
    cfg.host.hello_timeout_ms = STALL.as_millis() as u64;
    cfg.host.response_timeout_ms = STALL.as_millis() as u64;
    cfg.host.shutdown_grace_ms = 5_000;
    Host::start(cfg).expect("host starts")
}

fn grpc_attached(id: &str) -> PluginConfig {
    let mut p = PluginConfig::attached(id);
    p.transport = "grpc".into();
    p
}

fn chat(text: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::Chat(ChatEvent {
            player_uuid: "7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01".into(),
            name: "Steve".into(),
            message: text.into(),
        })),
        ..Default::default()
    }
}

fn jump(tag: &str) -> EventEnvelope {
    EventEnvelope {
        payload: Some(Payload::PlayerJump(PlayerJumpEvent {
            player_uuid: tag.into(),
            name: "Steve".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn wait_until(host: &mut Host, what: &str, mut done: impl FnMut(&mut Host) -> bool) {
    let deadline = Instant::now() + STALL;
    while !done(host) {
        host.begin_tick().end();
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ------------------------------------------------------------------------------------------
// plugbus's own runtime over gRPC
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    items: Vec<String>,
}

struct Recorder(Arc<Mutex<Seen>>);

impl Handler for Recorder {
    fn on_moves(&mut self, _ctx: &mut Context<'_>, frame: MoveFrameHeader, moves: &[MoveRecord]) {
        let c = if frame.is_conflated() { " conflated" } else { "" };
        self.0
            .lock()
            .unwrap()
            .items
            .push(format!("moves {} {}{c}", frame.tick, moves.len()));
    }

    fn on_event(&mut self, ctx: &mut Context<'_>, event: &EventEnvelope) -> Reply {
        match &event.payload {
            Some(Payload::Chat(c)) => {
                self.0.lock().unwrap().items.push(format!("chat {}", c.message));
                if c.message.contains("darn") {
                    ctx.send_chat(&c.player_uuid, "blocked");
                    Reply::Cancel
                } else {
                    Reply::chat_message(c.message.to_uppercase())
                }
            }
            Some(Payload::PlayerJump(j)) => {
                self.0.lock().unwrap().items.push(format!("jump {}", j.player_uuid));
                Reply::Ack
            }
            _ => Reply::Ack,
        }
    }

    fn on_shutdown(&mut self, reason: &str) {
        self.0.lock().unwrap().items.push(format!("shutdown {reason}"));
    }
}

/// Runs a plugbus plugin over gRPC in a thread; `hold` stops it reading.
fn spawn_plugin(address: String, id: &str) -> (std::thread::JoinHandle<()>, Arc<Mutex<Seen>>, Arc<Mutex<bool>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hold = Arc::new(Mutex::new(false));
    let (s, h) = (seen.clone(), hold.clone());
    let id = id.to_owned();
    let t = std::thread::spawn(move || {
        let mut plugin = Plugin::builder(&address, &id)
            .subscribe([EventType::Chat, EventType::PlayerMove, EventType::PlayerJump])
            .hello_timeout(STALL)
            .connect()
            .expect("connects over gRPC");
        let mut handler = Recorder(s);
        let started = Instant::now();
        while plugin.shutdown_reason().is_none() && started.elapsed() < Duration::from_secs(120) {
            if *h.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            match plugin.poll(&mut handler) {
                Ok(0) => std::thread::sleep(Duration::from_micros(200)),
                Ok(_) => {}
                Err(e) => panic!("plugin: {e}"),
            }
        }
        if let Some(r) = plugin.shutdown_reason() {
            handler.on_shutdown(r);
        }
    });
    (t, seen, hold)
}

#[test]
fn the_plugbus_runtime_over_grpc_gets_batches_and_packed_moves() {
    let sock = socket("runtime");
    let listen = format!("unix://{}", sock.display());
    let small = plugbus::host::QueueSizes {
        moves: 1 << 16,
        control: 1 << 12,
        replies: 1 << 16,
    };
    let mut host = host_with(vec![grpc_attached("g").queues(small)], &listen);
    let address = host.address_of("g").expect("configured").to_owned();
    assert_eq!(address, listen);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "the socket is its owner's only"
    );
    let (plugin, seen, hold) = spawn_plugin(address, "g");
    wait_until(&mut host, "the plugin's subscriptions", |h| {
        h.is_subscribed("g", EventType::Chat) && h.is_subscribed("g", EventType::PlayerJump)
    });

    // One tick: two jumps (batched), a chat that expects an answer, and moves.
    let mut tick = host.begin_tick();
    let t1 = tick.number();
    tick.publish(&mut jump("j1"));
    tick.publish(&mut jump("j2"));
    let darn = tick.dispatch(&mut chat("oh darn"));
    tick.publish_move(MoveRecord::new([1; 16], [1.5, 64.0, 2.5], 90.0, 0.0));
    tick.end();
    let o = host.wait(&darn, Instant::now() + STALL);
    assert!(o.cancelled && o.answered == ["g"], "{o:?}");
    let mut tick = host.begin_tick();
    let hello = tick.dispatch(&mut chat("hello"));
    tick.end();
    let o = host.wait(&hello, Instant::now() + STALL);
    assert_eq!(
        o.mutation,
        Some(event_result::Update::Chat(plugbus::proto::ChatMutation {
            message: Some("HELLO".into())
        }))
    );
    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1, "the block notice");

    // A stalled plugin: its queue fills, moves are conflated, and it is told so.
    *hold.lock().unwrap() = true;
    let before = host.metrics().plugins["g"].moves_conflated;
    // Big ticks (500 players), so that the socket's buffers fill too.
    for i in 0..20_000u32 {
        let mut tick = host.begin_tick();
        for p in 0..500u32 {
            let mut uuid = [0u8; 16];
            uuid[..4].copy_from_slice(&p.to_le_bytes());
            uuid[15] = if p < 2 { 1 + p as u8 } else { 9 };
            tick.publish_move(MoveRecord::new(uuid, [f64::from(i), 64.0, 0.0], 0.0, 0.0));
        }
        tick.end();
        if i % 50 == 0 && host.metrics().plugins["g"].moves_conflated > before {
            break;
        }
    }
    assert!(
        host.metrics().plugins["g"].moves_conflated > before,
        "moves were conflated"
    );
    *hold.lock().unwrap() = false;
    wait_until(&mut host, "the conflated moves", |_| {
        seen.lock().unwrap().items.iter().any(|s| s.ends_with("500 conflated"))
    });
    assert!(host.is_ready("g"));
    host.shutdown("test over");
    plugin.join().expect("plugin thread");
    let items = seen.lock().unwrap().items.clone();
    // The tick's events in publish order, then its moves (packed: the tick arrives with them).
    assert_eq!(
        &items[..4],
        ["jump j1", "jump j2", "chat oh darn", &format!("moves {t1} 1")],
        "{items:?}"
    );
    assert_eq!(items.last().map(String::as_str), Some("shutdown test over"));
}

// ------------------------------------------------------------------------------------------
// A plain tonic client, as the SDKs behave
// ------------------------------------------------------------------------------------------

/// A df.plugin SDK-style plugin: hello first (no capabilities), subscribe, answer every event
/// that expects a response with an empty result (or cancel "darn"), send an action with a
/// correlation id, ignore anything else. Returns what it received.
/// A gRPC channel over the Unix socket at `path`, as an SDK client opens one.
async fn unix_channel(path: PathBuf) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

async fn sdk_plugin(path: PathBuf, id: &str, received: Arc<Mutex<Vec<HostToPlugin>>>) -> Result<(), String> {
    let channel = unix_channel(path).await.map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(64);
    let send = |p: plugin_to_host::Payload| PluginToHost {
        plugin_id: id.to_owned(),
        payload: Some(p),
    };
    // The hello is queued before the stream opens: the host must read it without sending first.
    tx.send(send(plugin_to_host::Payload::Hello(PluginHello {
        name: "sdk-style".into(),
        version: "1.0.0".into(),
        api_version: "v1".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    tx.send(send(plugin_to_host::Payload::Subscribe(EventSubscribe {
        events: vec![
            EventType::Chat as i32,
            EventType::PlayerJump as i32,
            EventType::PlayerMove as i32,
        ],
    })))
    .await
    .unwrap();
    let mut inbound = PluginClient::new(channel)
        .event_stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("refused: {s}"))?
        .into_inner();
    while let Some(msg) = inbound.message().await.map_err(|e| e.to_string())? {
        received.lock().unwrap().push(msg.clone());
        match msg.payload {
            Some(host_to_plugin::Payload::Event(e)) if e.expects_response => {
                let cancel = matches!(&e.payload, Some(Payload::Chat(c)) if c.message.contains("darn"));
                if cancel {
                    let action = plugbus::proto::Action {
                        correlation_id: Some("corr-1".into()),
                        kind: Some(action::Kind::SendChat(plugbus::proto::SendChatAction {
                            target_uuid: "p".into(),
                            message: "no swearing".into(),
                        })),
                    };
                    tx.send(send(plugin_to_host::Payload::Actions(ActionBatch {
                        actions: vec![action],
                    })))
                    .await
                    .unwrap();
                }
                tx.send(send(plugin_to_host::Payload::EventResult(EventResult {
                    event_id: e.event_id.clone(),
                    cancel: cancel.then_some(true),
                    update: None,
                })))
                .await
                .unwrap();
            }
            Some(host_to_plugin::Payload::Shutdown(_)) => {}
            _ => {} // unknown payloads are ignored, as the SDKs do
        }
    }
    Ok(())
}

#[test]
fn an_sdk_style_client_gets_one_message_per_event() {
    let sock = socket("sdk");
    let mut host = host_with(vec![grpc_attached("sdk")], &format!("unix://{}", sock.display()));
    let received = Arc::new(Mutex::new(Vec::new()));
    let r = received.clone();
    let path = sock.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sdk_plugin(path, "sdk", r))
    });
    wait_until(&mut host, "the SDK-style plugin", |h| {
        h.is_subscribed("sdk", EventType::PlayerMove)
    });

    let mut tick = host.begin_tick();
    tick.publish(&mut jump("j1"));
    tick.publish(&mut jump("j2"));
    tick.publish_move(MoveRecord::new([1; 16], [1.0, 2.0, 3.0], 0.0, 0.0));
    tick.publish_move(MoveRecord::new([2; 16], [1.0, 2.0, 3.0], 0.0, 0.0));
    let darn = tick.dispatch(&mut chat("darn it"));
    tick.end();
    let o = host.wait(&darn, Instant::now() + STALL);
    assert!(o.cancelled && o.answered == ["sdk"], "{o:?}");
    let mut tick = host.begin_tick();
    let fine = tick.dispatch(&mut chat("fine"));
    tick.end();
    let o = host.wait(&fine, Instant::now() + STALL);
    assert!(
        !o.cancelled && o.mutation.is_none() && o.late.is_empty(),
        "an empty result is an ack: {o:?}"
    );

    let actions: Vec<_> = host.drain_actions().collect();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].action.correlation_id.as_deref(), Some("corr-1"));
    assert!(host.send_action_result(
        "sdk",
        ActionResult {
            correlation_id: "corr-1".into(),
            ..Default::default()
        }
    ));
    wait_until(&mut host, "the action result to arrive", |_| {
        received.lock().unwrap().iter().any(
            |m| matches!(&m.payload, Some(host_to_plugin::Payload::ActionResult(r)) if r.correlation_id == "corr-1"),
        )
    });
    host.shutdown("bye");
    client.join().expect("client thread").expect("the stream ends cleanly");

    let got = received.lock().unwrap().clone();
    let kinds: Vec<String> = got
        .iter()
        .map(|m| match &m.payload {
            Some(host_to_plugin::Payload::Hello(h)) => format!("hello {}", h.api_version),
            Some(host_to_plugin::Payload::Event(e)) => match &e.payload {
                Some(Payload::PlayerJump(j)) => format!("jump {}", j.player_uuid),
                Some(Payload::Chat(c)) => format!("chat {}", c.message),
                Some(Payload::PlayerMove(m)) => format!("move {}", m.player_uuid),
                other => format!("event {other:?}"),
            },
            Some(host_to_plugin::Payload::ActionResult(r)) => format!("result {}", r.correlation_id),
            Some(host_to_plugin::Payload::Shutdown(s)) => format!("shutdown {}", s.reason),
            other => format!("other {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "hello v1",
            "jump j1",
            "jump j2",
            "chat darn it",
            "move 01010101-0101-0101-0101-010101010101",
            "move 02020202-0202-0202-0202-020202020202",
            "chat fine",
            "result corr-1",
            "shutdown bye"
        ],
        "one HostToPlugin per event, moves as PLAYER_MOVE events, never a batch"
    );
}

#[test]
fn streams_that_cannot_be_bound_are_refused_with_a_status() {
    let sock = socket("refuse");
    let mut host = host_with(vec![grpc_attached("known")], &format!("unix://{}", sock.display()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let open = |first: PluginToHost| {
        let path = sock.clone();
        rt.block_on(async move {
            let channel = unix_channel(path).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(4);
            tx.send(first).await.unwrap();
            let r = PluginClient::new(channel).event_stream(ReceiverStream::new(rx)).await;
            (r.map(|_| ()), tx)
        })
    };
    let hello = |id: &str| PluginToHost {
        plugin_id: id.into(),
        payload: Some(plugin_to_host::Payload::Hello(PluginHello {
            api_version: "v1".into(),
            ..Default::default()
        })),
    };
    let (r, _) = open(hello("stranger"));
    let s = r.expect_err("an unknown id is refused");
    assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
    assert!(s.message().contains("stranger"));

    let (r, _) = open(PluginToHost {
        plugin_id: "known".into(),
        payload: Some(plugin_to_host::Payload::Subscribe(EventSubscribe { events: vec![1] })),
    });
    assert_eq!(
        r.expect_err("not a hello first").code(),
        tonic::Code::FailedPrecondition
    );

    let (r, _first) = open(hello("known"));
    r.expect("the configured id binds");
    wait_until(&mut host, "the hello", |h| h.is_ready("known"));
    let (r, _) = open(hello("known"));
    assert_eq!(
        r.expect_err("a second stream for one plugin").code(),
        tonic::Code::AlreadyExists
    );
    assert!(host.is_ready("known"), "the first stream is unaffected");
    host.shutdown("done");
}

#[test]
fn a_non_loopback_listen_address_is_refused() {
    let mut cfg = HostConfig::new(vec![grpc_attached("x")]);
    cfg.host.listen = vec!["tcp://0.0.0.0:0".into()];
    let e = Host::start(cfg).expect_err("a non-loopback address without TLS");
    let msg = e.to_string();
    assert!(msg.contains("host.listen") && msg.contains("loopback"), "{msg}");
}

/// The example chat filter, launched by the host over gRPC (TCP on loopback): the same Handler
/// as over shared memory; killed, it is seen and restarted.
#[test]
fn the_example_chat_filter_runs_launched_over_grpc() {
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/chat_filter");
    let mut p = PluginConfig::launch("chat", example).required(true);
    p.transport = "grpc".into();
    let mut host = host_with(vec![p], "tcp://127.0.0.1:0");
    assert!(host.address_of("chat").unwrap().starts_with("tcp://127.0.0.1:"));
    wait_until(&mut host, "subscriptions", |h| h.is_subscribed("chat", EventType::Chat));
    let mut tick = host.begin_tick();
    let darn = tick.dispatch(&mut chat("darn"));
    let heck = tick.dispatch(&mut chat("what the heck"));
    tick.end();
    assert!(host.wait(&darn, Instant::now() + STALL).cancelled);
    assert_eq!(
        host.wait(&heck, Instant::now() + STALL).mutation,
        Some(event_result::Update::Chat(plugbus::proto::ChatMutation {
            message: Some("what the h*ck".into())
        }))
    );
    let pid = host.pid_of("chat").expect("launched");
    assert!(host.kill_plugin("chat"));
    wait_until(&mut host, "the restart", |h| {
        h.is_ready("chat") && h.pid_of("chat").is_some_and(|p| p != pid)
    });
    wait_until(&mut host, "subscriptions again", |h| {
        h.is_subscribed("chat", EventType::Chat)
    });
    let mut tick = host.begin_tick();
    let again = tick.dispatch(&mut chat("darn again"));
    tick.end();
    assert!(
        host.wait(&again, Instant::now() + STALL).cancelled,
        "the restarted plugin answers"
    );
    assert_eq!(host.metrics().plugins["chat"].restarts, 1);
    host.shutdown("done");
}

/// Opens a stream over TLS (checking the host's certificate against `ca`) with `token`, sends a
/// hello as `id`; returns the status the call ended with, or `Ok` once it is bound.
async fn tls_hello(port: u16, ca: Vec<u8>, token: Option<&str>, id: &str) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("127.0.0.1"),
        )
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut client = PluginClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(b) = &bearer {
            req.metadata_mut().insert("authorization", b.parse().unwrap());
        }
        Ok(req)
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(4);
    tx.send(PluginToHost {
        plugin_id: id.into(),
        payload: Some(plugin_to_host::Payload::Hello(PluginHello {
            api_version: "v1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client.event_stream(ReceiverStream::new(rx)).await?.into_inner();
    // Bound: the host's hello comes back.
    let first = inbound.message().await?;
    assert!(matches!(
        first.and_then(|m| m.payload),
        Some(host_to_plugin::Payload::Hello(_))
    ));
    drop(tx);
    Ok(())
}

/// Plugins on other machines: the host listens on every interface over TLS with a token. The
/// example chat filter, launched with the certificate and the token file, works; a client with
/// a wrong or no token gets UNAUTHENTICATED; a client without TLS gets nothing.
#[test]
fn tls_and_a_token_admit_plugins_and_refuse_the_rest() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = std::env::temp_dir().join(format!("plugbus-grpc-{}-tls", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, token) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("token"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // A server certificate, not a CA's (rustls refuses a CA certificate as the server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (is it installed?)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    std::fs::write(&token, "s3cret-t0ken\n").unwrap();

    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/chat_filter");
    let mut chat_filter = PluginConfig::launch("chat", example).required(true);
    chat_filter.transport = "grpc".into();
    let mut cfg = HostConfig::new(vec![chat_filter, grpc_attached("remote")]);
    cfg.host.listen = vec!["tcp://0.0.0.0:0".into()];
    cfg.host.tls_cert = Some(cert.clone());
    cfg.host.tls_key = Some(key.clone());
    cfg.host.token_file = Some(token.clone());
    cfg.host.hello_timeout_ms = STALL.as_millis() as u64;
    cfg.host.response_timeout_ms = STALL.as_millis() as u64;
    let mut host = Host::start(cfg).expect("host starts with TLS and a token");
    let address = host.address_of("chat").unwrap().to_owned();
    assert!(address.starts_with("https://127.0.0.1:"), "{address}");
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();

    wait_until(&mut host, "the chat filter over TLS", |h| {
        h.is_subscribed("chat", EventType::Chat)
    });
    let mut tick = host.begin_tick();
    let darn = tick.dispatch(&mut chat("darn"));
    tick.end();
    assert!(host.wait(&darn, Instant::now() + STALL).cancelled);

    let ca = std::fs::read(&cert).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wrong = rt.block_on(tls_hello(port, ca.clone(), Some("guess"), "remote"));
    assert_eq!(wrong.expect_err("a wrong token").code(), tonic::Code::Unauthenticated);
    let none = rt.block_on(tls_hello(port, ca.clone(), None, "remote"));
    assert_eq!(none.expect_err("no token").code(), tonic::Code::Unauthenticated);
    let plain = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let (_tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(1);
            PluginClient::new(channel)
                .event_stream(ReceiverStream::new(rx))
                .await
                .map(drop)
        })
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 10 s")))
    });
    assert!(plain.is_err(), "a plaintext client gets no stream");
    assert!(!host.is_ready("remote"));
    // The right token: bound, and the host's hello comes back (the host answers as it polls).
    let remote = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(tls_hello(port, ca, Some("s3cret-t0ken"), "remote"))
    });
    wait_until(&mut host, "the remote plugin's hello", |_| remote.is_finished());
    remote.join().unwrap().expect("the right token binds");
    host.shutdown("done");
}

#[test]
fn a_non_loopback_address_with_tls_but_no_token_is_refused() {
    let mut cfg = HostConfig::new(vec![grpc_attached("x")]);
    cfg.host.listen = vec!["tcp://0.0.0.0:0".into()];
    cfg.host.tls_cert = Some("/nonexistent/cert.pem".into());
    cfg.host.tls_key = Some("/nonexistent/key.pem".into());
    let msg = Host::start(cfg).expect_err("refused").to_string();
    assert!(msg.contains("cert.pem"), "the unreadable certificate is named: {msg}");
}

// ------------------------------------------------------------------------------------------
// A flooding remote plugin
// ------------------------------------------------------------------------------------------

/// The process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Sends action batches of about 1 MiB as fast as the stream takes them until `stop`.
async fn flooder(path: PathBuf, sent: Arc<plugbus::sync::AtomicU64>, stop: Arc<plugbus::sync::AtomicBool>) {
    use plugbus::sync::Ordering;
    let channel = unix_channel(path).await.expect("connects");
    // A short client-side queue: what piles up, piles up in the host.
    let (tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(1);
    let msg = |p: plugin_to_host::Payload| PluginToHost {
        plugin_id: "flood".into(),
        payload: Some(p),
    };
    tx.send(msg(plugin_to_host::Payload::Hello(PluginHello {
        name: "flood".into(),
        api_version: "v1".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = PluginClient::new(channel)
        .event_stream(ReceiverStream::new(rx))
        .await
        .expect("bound")
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let action = plugbus::proto::Action {
        correlation_id: None,
        kind: Some(action::Kind::SendChat(plugbus::proto::SendChatAction {
            target_uuid: "7d0e8c4e-2f4a-4b44-9a8f-3c1f5d2b6a01".into(),
            message: "x".repeat(100),
        })),
    };
    let batch = msg(plugin_to_host::Payload::Actions(ActionBatch {
        actions: vec![action; 7_000],
    }));
    let size = prost::Message::encoded_len(&batch) as u64;
    while !stop.load(Ordering::Relaxed) {
        if tx.send(batch.clone()).await.is_err() {
            return;
        }
        sent.fetch_add(size, Ordering::Relaxed);
    }
}

/// A remote plugin that sends actions as fast as it can while the game ticks at 20 tps: gRPC flow
/// control holds it back once the host's queue for it holds its budget, so the host's memory
/// stays bounded, and a well-behaved plugin beside it answers every tick on time.
///
/// The game takes its actions every tick, and the per-plugin bound on held actions is raised
/// here, so that what holds the flood back is the adapter's byte budget and the per-poll
/// budgets, not a disconnection (that one is `tests/hostile.rs`'s).
#[test]
fn a_flooding_plugin_is_held_back_and_the_others_go_on() {
    use plugbus::sync::{AtomicBool, AtomicU64, Ordering};
    let sock = socket("flood");
    let mut host = host_with_config(
        vec![grpc_attached("flood"), grpc_attached("calm")],
        &format!("unix://{}", sock.display()),
        |c| {
            c.host.max_queued_actions = 1 << 20;
            c.host.max_queued_bytes = 1 << 30;
        },
    );
    let (calm, _seen, _hold) = spawn_plugin(format!("unix://{}", sock.display()), "calm");
    wait_until(&mut host, "the calm plugin", |h| {
        h.is_subscribed("calm", EventType::Chat)
    });
    let before = rss_kib();

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let path = sock.clone();
    let (s, st) = (sent.clone(), stop.clone());
    let flood = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(flooder(path, s, st));
    });

    let mut peak = before;
    let mut taken = 0u64;
    let started = Instant::now();
    let mut ticks = 0;
    while started.elapsed() < Duration::from_secs(3) || sent.load(Ordering::Relaxed) < (64 << 20) {
        assert!(started.elapsed() < STALL, "the flood never got going");
        let mut tick = host.begin_tick();
        let p = tick.dispatch(&mut chat("hello"));
        tick.end();
        let o = host.wait(&p, Instant::now() + STALL);
        assert_eq!(o.answered, ["calm"], "tick {ticks}: {o:?}");
        assert!(o.late.is_empty() && o.mutation.is_some(), "tick {ticks}: {o:?}");
        taken += host.drain_actions().filter(|a| a.plugin == "flood").count() as u64;
        peak = peak.max(rss_kib());
        ticks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sent.load(Ordering::Relaxed);
    host.shutdown("done");
    flood.join().expect("flooder");
    calm.join().expect("calm plugin");

    let growth_mib = (peak.saturating_sub(before)) / 1024;
    eprintln!(
        "flood: {} MiB offered in {ticks} ticks, {taken} actions taken, resident memory +{growth_mib} MiB",
        sent >> 20
    );
    assert!(taken > 0, "the flooding plugin's actions reach the game too");
    assert!(
        growth_mib < 64,
        "the host's memory grew by {growth_mib} MiB while a plugin offered {} MiB",
        sent >> 20
    );
}

/// A plugbus plugin over gRPC is subscribed from the moment it is ready: its subscriptions go
/// with its hello (the stream's first message must be the hello), so the first event after
/// `is_ready` reaches it. Without that, the EventSubscribe that follows the hello raced the
/// game's first dispatch (seen as a flaky replay comparison under load).
#[test]
fn a_grpc_plugin_is_subscribed_as_soon_as_it_is_ready() {
    for round in 0..10 {
        let sock = socket(&format!("ready-{round}"));
        let mut host = host_with(vec![grpc_attached("r")], &format!("unix://{}", sock.display()));
        let (plugin, seen, _hold) = spawn_plugin(format!("unix://{}", sock.display()), "r");
        wait_until(&mut host, "the plugin's hello", |h| h.is_ready("r"));
        let mut tick = host.begin_tick();
        let p = tick.dispatch(&mut chat("first"));
        tick.end();
        let o = host.wait(&p, Instant::now() + STALL);
        assert_eq!(o.answered, ["r"], "round {round}: {o:?}");
        host.shutdown("done");
        plugin.join().expect("plugin thread");
        assert!(seen.lock().unwrap().items.iter().any(|i| i == "chat first"));
    }
}

/// The host side of the same rule, without a race to win: a client whose hello carries
/// `capabilities.subscribe` and that never sends an EventSubscribe gets the chat it subscribed
/// to in its hello, and answers it.
#[test]
fn subscriptions_in_the_hello_hold_from_the_start() {
    let sock = socket("caps-subscribe");
    let mut host = host_with(vec![grpc_attached("caps")], &format!("unix://{}", sock.display()));
    let path = sock.clone();
    let client = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let channel = unix_channel(path).await.expect("connects");
                let (tx, rx) = tokio::sync::mpsc::channel::<PluginToHost>(8);
                let msg = |p: plugin_to_host::Payload| PluginToHost {
                    plugin_id: "caps".into(),
                    payload: Some(p),
                };
                tx.send(msg(plugin_to_host::Payload::Hello(PluginHello {
                    api_version: "v1".into(),
                    capabilities: Some(plugbus::proto::PluginCapabilities {
                        subscribe: vec![EventType::Chat as i32],
                        ..Default::default()
                    }),
                    ..Default::default()
                })))
                .await
                .unwrap();
                let mut inbound = PluginClient::new(channel)
                    .event_stream(ReceiverStream::new(rx))
                    .await
                    .expect("bound")
                    .into_inner();
                let mut chats = Vec::new();
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(host_to_plugin::Payload::Event(e)) = m.payload {
                        if let Some(Payload::Chat(c)) = &e.payload {
                            chats.push(c.message.clone());
                        }
                        tx.send(msg(plugin_to_host::Payload::EventResult(EventResult {
                            event_id: e.event_id,
                            ..Default::default()
                        })))
                        .await
                        .unwrap();
                    }
                }
                chats
            })
    });
    wait_until(&mut host, "the hello", |h| h.is_ready("caps"));
    assert!(host.is_subscribed("caps", EventType::Chat), "subscribed by its hello");
    let mut tick = host.begin_tick();
    let p = tick.dispatch(&mut chat("hi"));
    tick.end();
    assert_eq!(host.wait(&p, Instant::now() + STALL).answered, ["caps"]);
    host.shutdown("done");
    assert_eq!(client.join().expect("client"), ["hi"]);
}
