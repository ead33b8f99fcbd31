//! The host's side of the gRPC adapter: the server, the binding of streams to plugins, and the
//! host's end of each link (two bounded SPSC queues and a wake-up word).

use crate::sync::{AtomicUsize, Ordering};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{Down, to_wire};
use super::{ENV_SERVER_ADDRESS, ENV_TLS_CA, ENV_TOKEN_FILE, Endpoint, MAX_MESSAGE, NAME, read_token};
use crate::codec;
use crate::fastpath::MoveRecord;
use crate::proto::plugin_server::{Plugin as PluginService, PluginServer};
use crate::proto::{HostToPlugin, PluginCapabilities, PluginToHost, plugin_to_host};
use crate::ring::Doorbell;
use crate::sync::FutexWord;
use crate::transport::{
    Acceptor, Downstream, ENV_ADDRESS, HostLink, LinkCounters, LinkError, LinkRequest, ListenSettings, Occupancy,
    OpenError, OpenedLink, PeerHealth,
};

/// Items a plugin's downstream queue holds per KiB of its configured buffering (moves plus
/// control): the queue counts messages, the configuration bytes.
const ITEMS_PER_KIB: u64 = 1;

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Made; no plugin has connected yet.
    Waiting,
    /// A plugin's stream is bound to it.
    Bound,
    /// The plugin's stream ended (the reason, for the host's disconnect).
    Ended(&'static str),
    /// The host is done with it.
    Closed,
}

/// What the tick's end and the adapter's tasks share.
struct Shared {
    /// Tick to writer task: something was queued (or the link closed).
    notify: Notify,
    /// Adapter to host: something arrived (the doorbell protocol, in process memory).
    bell: Doorbell,
    state: Mutex<State>,
    /// Bytes of the plugin's messages queued for the host and not yet taken.
    queued: AtomicUsize,
    /// What may be queued (the replies queue's size): a plugin past it is held back by gRPC flow
    /// control, so the host's memory for one plugin stays bounded whatever it sends. One message
    /// always fits when nothing is queued (a message is at most `MAX_MESSAGE`).
    budget: usize,
}

impl Shared {
    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: State) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Closed is final; Ended keeps its first reason.
        if !matches!(*st, State::Closed | State::Ended(_)) || s == State::Closed {
            *st = s;
        }
        drop(st);
        self.notify.notify_one();
        self.bell.ring();
    }
}

/// The adapter's halves of a link, waiting for the plugin's stream.
struct StreamEnds {
    shared: Arc<Shared>,
    down: rtrb::Consumer<Down>,
    up: rtrb::Producer<Vec<u8>>,
}

/// Plugins the host has made links for, by id.
#[derive(Default)]
struct Registry {
    waiting: Mutex<HashMap<String, StreamEnds>>,
    known: Mutex<HashSet<String>>,
}

impl Registry {
    /// Binds a stream to plugin `id`: its waiting link, or a status that says why not.
    fn take(&self, id: &str) -> Result<StreamEnds, Status> {
        match self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            Some(ends) => Ok(ends),
            None if self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(id) => {
                Err(Status::already_exists(format!("plugin {id:?} is already connected")))
            }
            None => Err(Status::not_found(format!(
                "no plugin {id:?} is configured on this host"
            ))),
        }
    }
}

/// Checks a call's token (`authorization: Bearer <token>`) when the host has one.
fn authorize(token: Option<&str>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(want) = token else { return Ok(req) };
    let got = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the token's length: no early exit on the first wrong byte.
    let same = got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(req)
    } else {
        tracing::warn!("gRPC call refused: missing or wrong token");
        Err(Status::unauthenticated(
            "this host needs a valid token (authorization: Bearer <token>)",
        ))
    }
}

/// TLS for the TCP listeners: the PEM certificate and key, and where the certificate is (for
/// the plugins the host launches).
struct Tls {
    cert: Vec<u8>,
    key: Vec<u8>,
    cert_path: PathBuf,
}

/// The gRPC service: binds each stream, then pumps it.
struct Service {
    registry: Arc<Registry>,
}

#[tonic::async_trait]
impl PluginService for Service {
    type EventStreamStream = ReceiverStream<Result<HostToPlugin, Status>>;

    async fn event_stream(
        &self,
        request: Request<Streaming<PluginToHost>>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let mut inbound = request.into_inner();
        // The host sends nothing before the plugin's first message: SDK clients queue their
        // hello before the response headers arrive.
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before a PluginHello"))?;
        let refuse = |status: Status| {
            tracing::warn!(plugin = %first.plugin_id, "gRPC stream refused: {}", status.message());
            Err(status)
        };
        let caps = match &first.payload {
            Some(plugin_to_host::Payload::Hello(h)) => h.capabilities.clone().unwrap_or_default(),
            _ => return refuse(Status::failed_precondition("the first message must be a PluginHello")),
        };
        if first.plugin_id.is_empty() {
            return refuse(Status::invalid_argument("the PluginHello carries no plugin_id"));
        }
        let ends = match self.registry.take(&first.plugin_id) {
            Ok(e) => e,
            Err(s) => return refuse(s),
        };
        let StreamEnds { shared, down, mut up } = ends;
        shared.set(State::Bound);
        push_up(&mut up, first.encode_to_vec(), &shared).await;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(read_plugin(inbound, up, shared.clone()));
        tokio::spawn(write_plugin(down, shared, caps, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Hands one message to the host; waits (the plugin's stream stops being read, so gRPC flow
/// control holds the plugin back) while the host's queue is full.
async fn push_up(up: &mut rtrb::Producer<Vec<u8>>, mut bytes: Vec<u8>, shared: &Shared) {
    loop {
        let queued = shared.queued.load(Ordering::Acquire);
        if queued == 0 || queued + bytes.len() <= shared.budget {
            // Counted before the push: the host may take it at once.
            let len = bytes.len();
            shared.queued.fetch_add(len, Ordering::AcqRel);
            match up.push(bytes) {
                Ok(()) => {
                    shared.bell.ring();
                    return;
                }
                Err(rtrb::PushError::Full(b)) => {
                    shared.queued.fetch_sub(len, Ordering::AcqRel);
                    bytes = b;
                }
            }
        }
        if shared.state() == State::Closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The plugin's messages, to the host.
async fn read_plugin(mut inbound: Streaming<PluginToHost>, mut up: rtrb::Producer<Vec<u8>>, shared: Arc<Shared>) {
    loop {
        match inbound.message().await {
            Ok(Some(m)) => push_up(&mut up, m.encode_to_vec(), &shared).await,
            Ok(None) => {
                shared.set(State::Ended("the plugin closed its gRPC stream"));
                return;
            }
            Err(e) => {
                tracing::debug!("gRPC stream from a plugin failed: {e}");
                shared.set(State::Ended("the plugin's gRPC stream failed"));
                return;
            }
        }
        if shared.state() == State::Closed {
            return;
        }
    }
}

/// The host's items, to the plugin, as it understands them.
async fn write_plugin(
    mut down: rtrb::Consumer<Down>,
    shared: Arc<Shared>,
    caps: PluginCapabilities,
    tx: mpsc::Sender<Result<HostToPlugin, Status>>,
) {
    let mut out = Vec::new();
    loop {
        let closed = shared.state() == State::Closed;
        // Everything queued before the link closed still goes (the shutdown message last).
        while let Ok(item) = down.pop() {
            out.clear();
            if let Err(e) = to_wire(&item, &caps, &mut out) {
                tracing::error!("gRPC adapter: {e}");
                continue;
            }
            for m in out.drain(..) {
                if tx.send(Ok(m)).await.is_err() {
                    shared.set(State::Ended("the plugin's gRPC stream closed"));
                    return;
                }
            }
        }
        if closed || matches!(shared.state(), State::Ended(_)) {
            return; // dropping `tx` ends the response stream
        }
        shared.notify.notified().await;
    }
}

/// A running server: its runtime, its listeners, the plugins it expects.
struct Server {
    /// Its threads run the listeners and the streams; shut down with the server.
    runtime: Option<tokio::runtime::Runtime>,
    registry: Arc<Registry>,
    /// The bound addresses (a TCP port of 0 resolved), in the order configured.
    bound: Vec<Endpoint>,
    /// Socket files to remove at the end.
    sockets: Vec<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(200));
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Server {
    fn start(listen: &[Endpoint], tls: Option<&Tls>, token: Option<Arc<str>>) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("plugbus-grpc")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the gRPC runtime: {e}"))?;
        let registry = Arc::new(Registry::default());
        let mut bound = Vec::new();
        let mut sockets = Vec::new();
        for ep in listen {
            let svc = PluginServer::new(Service {
                registry: registry.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
            let token = token.clone();
            let svc =
                tonic::service::interceptor::InterceptedService::new(svc, move |req| authorize(token.as_deref(), req));
            let mut builder = tonic::transport::Server::builder();
            if let (Some(tls), Endpoint::Tcp(_)) = (tls, ep) {
                builder = builder
                    .tls_config(
                        tonic::transport::ServerTlsConfig::new()
                            .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key)),
                    )
                    .map_err(|e| format!("bad TLS certificate or key: {e}"))?;
            }
            let router = builder.add_service(svc);
            match ep {
                Endpoint::Unix(path) => {
                    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                    // A socket left by an earlier run: remove it (never another kind of file).
                    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                        let _ = std::fs::remove_file(path);
                    }
                    let listener = runtime
                        .block_on(async { tokio::net::UnixListener::bind(path) })
                        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("cannot restrict {} to its owner: {e}", path.display()))?;
                    sockets.push(path.clone());
                    runtime.spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
                    bound.push(ep.clone());
                }
                Endpoint::Tcp(hp) => {
                    let listener = runtime
                        .block_on(tokio::net::TcpListener::bind(hp.as_str()))
                        .map_err(|e| format!("cannot listen on {hp}: {e}"))?;
                    let local = listener
                        .local_addr()
                        .map_err(|e| format!("cannot listen on {hp}: {e}"))?;
                    runtime.spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
                    bound.push(Endpoint::Tcp(local.to_string()));
                }
            }
        }
        Ok(Self {
            runtime: Some(runtime),
            registry,
            bound,
            sockets,
        })
    }
}

/// Makes gRPC links: listens on the host's `listen` addresses (from the first plugin that needs
/// it) and waits there for each plugin's stream.
#[derive(Default)]
pub struct GrpcAcceptor {
    listen: Vec<Endpoint>,
    tls: Option<Tls>,
    /// The token and the file it came from (handed to launched plugins).
    token: Option<(Arc<str>, PathBuf)>,
    server: Option<Server>,
}

impl std::fmt::Debug for GrpcAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAcceptor")
            .field("listen", &self.listen)
            .field("running", &self.server.is_some())
            .finish()
    }
}

impl GrpcAcceptor {
    /// The addresses it listens on once started (a TCP port of 0 resolved).
    pub fn bound(&self) -> Vec<Endpoint> {
        self.server.as_ref().map(|s| s.bound.clone()).unwrap_or_default()
    }
}

impl Acceptor for GrpcAcceptor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn clean_stale(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn listen(&mut self, settings: &ListenSettings) -> Result<(), String> {
        self.tls = match &settings.tls {
            Some((cert, key)) => Some(Tls {
                cert: std::fs::read(cert)
                    .map_err(|e| format!("cannot read the TLS certificate {}: {e}", cert.display()))?,
                key: std::fs::read(key).map_err(|e| format!("cannot read the TLS key {}: {e}", key.display()))?,
                cert_path: cert.clone(),
            }),
            None => None,
        };
        self.token = match &settings.token_file {
            Some(path) => Some((read_token(path)?.into(), path.clone())),
            None => None,
        };
        let mut listen = Vec::new();
        for a in &settings.addresses {
            let ep = Endpoint::parse(a)?;
            if !ep.is_local() && (self.tls.is_none() || self.token.is_none()) {
                return Err(format!(
                    "{a:?} is not a loopback address: plugins on other machines need TLS and a token (set tls_cert, tls_key and token_file)"
                ));
            }
            listen.push(ep);
        }
        self.listen = listen;
        Ok(())
    }

    fn open(&mut self, request: &LinkRequest<'_>) -> Result<OpenedLink, OpenError> {
        if self.listen.is_empty() {
            return Err(OpenError(
                "the grpc transport needs an address to listen on: set [host] listen (e.g. [\"unix:///tmp/plugbus.sock\"])".into(),
            ));
        }
        if self.server.is_none() {
            let token = self.token.as_ref().map(|(t, _)| t.clone());
            self.server = Some(Server::start(&self.listen, self.tls.as_ref(), token).map_err(OpenError)?);
        }
        let server = self.server.as_ref().expect("started");
        let ep = &server.bound[0];
        let items = (request.queues.moves + request.queues.control) / 1024 * ITEMS_PER_KIB;
        let (down_tx, down_rx) = rtrb::RingBuffer::new(items.clamp(64, 1 << 16) as usize);
        let (up_tx, up_rx) = rtrb::RingBuffer::new((request.queues.replies / 256).clamp(64, 1 << 16) as usize);
        let shared = Arc::new(Shared {
            notify: Notify::new(),
            bell: Doorbell::new(),
            state: Mutex::new(State::Waiting),
            queued: AtomicUsize::new(0),
            budget: request.queues.replies as usize,
        });
        let id = request.plugin_id.to_owned();
        server
            .registry
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        // A new incarnation replaces a link no plugin ever took.
        server
            .registry
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                StreamEnds {
                    shared: shared.clone(),
                    down: down_rx,
                    up: up_tx,
                },
            );
        // A launched plugin runs here: an unspecified listen address (0.0.0.0) is reached on
        // loopback.
        let local = match ep {
            Endpoint::Tcp(hp) => Endpoint::Tcp(
                hp.parse::<std::net::SocketAddr>()
                    .ok()
                    .filter(|a| a.ip().is_unspecified())
                    .map_or_else(|| hp.clone(), |a| format!("127.0.0.1:{}", a.port())),
            ),
            unix => unix.clone(),
        };
        let mut env = Vec::new();
        let address = match (&local, &self.tls) {
            (Endpoint::Tcp(hp), Some(tls)) => {
                env.push((ENV_TLS_CA.to_owned(), tls.cert_path.display().to_string()));
                format!("https://{hp}")
            }
            _ => local.address(),
        };
        if let Some((_, path)) = &self.token {
            env.push((ENV_TOKEN_FILE.to_owned(), path.display().to_string()));
        }
        // The df.plugin SDKs read their host's address here; a plugin entry may give another
        // spelling (client libraries differ).
        let sdk = request.address.map_or_else(|| local.sdk_address(), str::to_owned);
        env.push((ENV_ADDRESS.to_owned(), address.clone()));
        env.push((ENV_SERVER_ADDRESS.to_owned(), sdk));
        Ok(OpenedLink {
            link: Box::new(GrpcHostLink {
                shared,
                down: down_tx,
                up: up_rx,
                address: address.clone(),
                plugin_id: request.plugin_id.to_owned(),
                registry: server.registry.clone(),
            }),
            env,
            address,
            inherit: None,
        })
    }
}

/// The host's end of a gRPC link.
pub struct GrpcHostLink {
    shared: Arc<Shared>,
    down: rtrb::Producer<Down>,
    up: rtrb::Consumer<Vec<u8>>,
    address: String,
    plugin_id: String,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for GrpcHostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcHostLink")
            .field("address", &self.address)
            .field("state", &self.shared.state())
            .finish()
    }
}

impl Drop for GrpcHostLink {
    fn drop(&mut self) {
        self.shared.set(State::Closed);
        // A link no plugin took: forget it, so the id is free for the next incarnation.
        let mut waiting = self.registry.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting
            .get(&self.plugin_id)
            .is_some_and(|e| Arc::ptr_eq(&e.shared, &self.shared))
        {
            waiting.remove(&self.plugin_id);
        }
    }
}

impl GrpcHostLink {
    fn push(&mut self, item: Down) -> Result<bool, LinkError> {
        match self.shared.state() {
            State::Ended(why) => return Err(LinkError::Broken(why.to_owned())),
            State::Closed => return Err(LinkError::Closed),
            State::Waiting | State::Bound => {}
        }
        Ok(self.down.push(item).is_ok())
    }
}

/// `body` as field `tag` of an enclosing message: the `HostToPlugin` encoding.
fn wrapped(tag: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

impl HostLink for GrpcHostLink {
    fn try_send_moves(&mut self, tick: u64, flags: u32, records: &[MoveRecord]) -> Result<bool, LinkError> {
        if self.down.is_full() {
            return Ok(false);
        }
        self.push(Down::Moves {
            tick,
            flags,
            records: records.to_vec(),
        })
    }

    fn try_send(&mut self, item: Downstream<'_>) -> Result<bool, LinkError> {
        if self.down.is_full() {
            return Ok(false);
        }
        let bytes = match item {
            Downstream::Event(env) => {
                let mut out = Vec::new();
                prost::encoding::message::encode(codec::HOST_TO_PLUGIN_EVENT, env, &mut out);
                out
            }
            Downstream::EncodedEvent(body) => wrapped(codec::HOST_TO_PLUGIN_EVENT, body),
            Downstream::Batch { body, .. } => wrapped(codec::HOST_TO_PLUGIN_EVENTS, body),
            Downstream::Message(m) => m.encode_to_vec(),
            Downstream::Encoded(b) => b.to_vec(),
        };
        if bytes.len() > MAX_MESSAGE {
            return Err(LinkError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE,
            });
        }
        self.push(Down::Encoded(bytes))
    }

    fn wake(&mut self) -> bool {
        // Wakes the writer task (its runtime thread, if parked): not counted as a plugin wake-up.
        self.shared.notify.notify_one();
        false
    }

    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let Ok(bytes) = self.up.pop() else { break };
            self.shared.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
            f(&bytes);
            n += 1;
        }
        Ok(n)
    }

    fn prepare_wait(&mut self) -> Result<bool, LinkError> {
        self.shared.bell.prepare_sleep();
        if self.up.is_empty() && matches!(self.shared.state(), State::Waiting | State::Bound) {
            Ok(true)
        } else {
            self.shared.bell.cancel_sleep();
            Ok(false)
        }
    }

    fn wait_word(&self) -> (&FutexWord, u32) {
        self.shared.bell.sleep_word()
    }

    fn finish_wait(&mut self) {
        self.shared.bell.cancel_sleep();
    }

    fn heartbeat(&mut self) {}

    fn peer(&self) -> PeerHealth {
        // A live stream is the heartbeat: the stream's end is reported as a failure.
        PeerHealth {
            heartbeat_age_ns: 0,
            pid: 0,
        }
    }

    fn occupancy(&mut self) -> Result<Occupancy, LinkError> {
        let fill = 1.0 - self.down.slots() as f64 / self.down.buffer().capacity() as f64;
        Ok(Occupancy {
            moves: fill,
            control: fill,
        })
    }

    fn failure(&self) -> Option<&'static str> {
        match self.shared.state() {
            State::Ended(why) => Some(why),
            _ => None,
        }
    }

    fn close(&mut self) {
        self.shared.set(State::Closed);
    }

    fn publish_counters(&mut self, _c: &LinkCounters) {}

    fn address(&self) -> &str {
        &self.address
    }
}
