//! The plugin's side of the gRPC adapter: a tonic client on a runtime thread of its own, and the
//! plugin's end of the link (a bounded queue of what arrived, a channel of what to send).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::convert::{Up, from_wire};
use super::{ENV_SERVER_ADDRESS, ENV_TLS_CA, ENV_TOKEN_FILE, Endpoint, MAX_MESSAGE};
use crate::proto::plugin_client::PluginClient;
use crate::proto::{PluginCapabilities, PluginToHost, plugin_to_host};
use crate::ring::Doorbell;
use crate::transport::{ConnectError, Connector, HostState, Incoming, LinkError, PluginLink};

/// Set to `none`, plugbus's plugin runtime declares no capabilities over gRPC: it gets one
/// message per event, as a df.plugin SDK plugin does (for comparisons).
pub const ENV_CAPABILITIES: &str = "PLUGBUS_GRPC_CAPABILITIES";

/// Messages from the host held for the plugin before the stream stops being read (then gRPC's
/// flow control holds the host back, and the host conflates).
const INCOMING: usize = 256;
/// Messages to the host held before `try_send` says "no room".
const OUTGOING: usize = 1024;

/// Opens gRPC links for plugins: `unix:///path`, `tcp://host:port`, or a bare `host:port`.
#[derive(Debug, Default)]
pub struct GrpcConnector;

impl Connector for GrpcConnector {
    fn schemes(&self) -> &'static [&'static str] {
        &["unix", "tcp", "http", "https"]
    }

    fn claims_bare(&self, address: &str) -> bool {
        Endpoint::parse(address).is_ok()
    }

    fn address_from_env(&self) -> Option<String> {
        let a = std::env::var(ENV_SERVER_ADDRESS).ok().filter(|a| !a.is_empty())?;
        Some(Endpoint::parse(&a).map_or(a, |ep| ep.address()))
    }

    fn check(&self, address: &str) -> Result<(), String> {
        Endpoint::parse(address).map(drop)
    }

    fn connect(&self, address: &str) -> Result<Box<dyn PluginLink>, ConnectError> {
        let ep = Endpoint::parse(address).map_err(|reason| ConnectError::BadAddress {
            address: address.to_owned(),
            reason,
        })?;
        let tls_ca = if address.starts_with("https://") {
            let path = std::env::var_os(ENV_TLS_CA).ok_or_else(|| ConnectError::BadAddress {
                address: address.to_owned(),
                reason: format!("an https:// address needs {ENV_TLS_CA} (the CA certificate to check the host's)"),
            })?;
            Some(std::fs::read(&path).map_err(|e| ConnectError::Io {
                address: address.to_owned(),
                reason: format!("cannot read {ENV_TLS_CA}: {e}"),
            })?)
        } else {
            None
        };
        let token = match std::env::var_os(ENV_TOKEN_FILE) {
            Some(p) => Some(
                super::read_token(std::path::Path::new(&p)).map_err(|reason| ConnectError::Io {
                    address: address.to_owned(),
                    reason,
                })?,
            ),
            None => None,
        };
        Ok(Box::new(GrpcPluginLink::connect(&ep, tls_ca.as_deref(), token)?))
    }
}

/// An error with its causes (tonic's transport errors say little at the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// How the stream from the host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Open,
    /// The host ended it (after its shutdown message, or refusing this plugin).
    Ended,
    /// It failed: the host is gone.
    Failed,
}

struct Shared {
    /// The plugin sleeps on it; the reader task rings it.
    bell: Doorbell,
    stream: Mutex<Stream>,
}

impl Shared {
    fn stream(&self) -> Stream {
        *self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The plugin's end of a gRPC link.
pub struct GrpcPluginLink {
    runtime: Option<tokio::runtime::Runtime>,
    out: mpsc::Sender<PluginToHost>,
    incoming: rtrb::Consumer<Up>,
    shared: Arc<Shared>,
    /// Messages queued before the hello, which the host must see first.
    before_hello: Vec<PluginToHost>,
    hello_sent: bool,
}

impl std::fmt::Debug for GrpcPluginLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPluginLink")
            .field("stream", &self.shared.stream())
            .finish_non_exhaustive()
    }
}

impl Drop for GrpcPluginLink {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl GrpcPluginLink {
    /// Connects to the host at `ep` (over TLS checked against `tls_ca` when given, sending
    /// `token` when given) and opens the stream (its first message is the hello the plugin
    /// runtime sends next).
    pub fn connect(ep: &Endpoint, tls_ca: Option<&[u8]>, token: Option<String>) -> Result<Self, ConnectError> {
        let address = ep.address();
        let fail = |reason: String| ConnectError::NotFound {
            address: address.clone(),
            reason,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("plugbus-grpc-client")
            .enable_all()
            .build()
            .map_err(|e| ConnectError::Io {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let channel = runtime
            .block_on(async {
                match ep {
                    Endpoint::Tcp(hp) => match tls_ca {
                        Some(ca) => {
                            let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
                            tonic::transport::Endpoint::from_shared(format!("https://{hp}"))?
                                .tls_config(
                                    tonic::transport::ClientTlsConfig::new()
                                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                                        .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
                                )?
                                .connect()
                                .await
                        }
                        None => {
                            tonic::transport::Endpoint::from_shared(format!("http://{hp}"))?
                                .connect()
                                .await
                        }
                    },
                    Endpoint::Unix(path) => {
                        let path = path.clone();
                        // The URI is not used: the connector dials the socket.
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
                }
            })
            .map_err(|e| fail(format!("cannot connect: {}", error_chain(&e))))?;
        let (out_tx, out_rx) = mpsc::channel::<PluginToHost>(OUTGOING);
        let (mut in_tx, in_rx) = rtrb::RingBuffer::<Up>::new(INCOMING);
        let shared = Arc::new(Shared {
            bell: Doorbell::new(),
            stream: Mutex::new(Stream::Open),
        });
        let task_shared = shared.clone();
        runtime.spawn(async move {
            let shared = task_shared;
            let bearer = token.map(|t| format!("Bearer {t}"));
            let mut client = PluginClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(b) = &bearer {
                    let v = b
                        .parse()
                        .map_err(|_| tonic::Status::invalid_argument("the token is not valid in a header"))?;
                    req.metadata_mut().insert("authorization", v);
                }
                Ok(req)
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
            let end = |s: Stream| {
                *shared.stream.lock().unwrap_or_else(|p| p.into_inner()) = s;
                shared.bell.ring();
            };
            let mut inbound = match client.event_stream(ReceiverStream::new(out_rx)).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tracing::warn!("the host refused the gRPC stream: {}", status.message());
                    return end(Stream::Ended);
                }
            };
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let mut item = match from_wire(msg) {
                            Ok(i) => i,
                            Err(e) => {
                                tracing::error!("malformed message from the host: {e}");
                                return end(Stream::Failed);
                            }
                        };
                        // The plugin is behind: stop reading (gRPC flow control holds the host).
                        loop {
                            match in_tx.push(item) {
                                Ok(()) => break,
                                Err(rtrb::PushError::Full(back)) => {
                                    item = back;
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                            }
                        }
                        shared.bell.ring();
                    }
                    Ok(None) => return end(Stream::Ended),
                    Err(status) => {
                        tracing::debug!("the gRPC stream from the host failed: {status}");
                        return end(Stream::Failed);
                    }
                }
            }
        });
        Ok(Self {
            runtime: Some(runtime),
            out: out_tx,
            incoming: in_rx,
            shared,
            before_hello: Vec::new(),
            hello_sent: false,
        })
    }

    fn send(&mut self, msg: PluginToHost) -> Result<bool, LinkError> {
        match self.out.try_send(msg) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LinkError::Closed),
        }
    }
}

impl PluginLink for GrpcPluginLink {
    fn poll(&mut self, max: usize, f: &mut dyn FnMut(Incoming<'_>)) -> Result<usize, LinkError> {
        let mut n = 0;
        while n < max {
            let Ok(item) = self.incoming.pop() else { break };
            match &item {
                Up::Host(bytes) => f(Incoming::Host(bytes)),
                Up::Moves(header, records) => f(Incoming::Moves {
                    header: *header,
                    records,
                }),
            }
            n += 1;
        }
        Ok(n)
    }

    fn try_send(&mut self, msg: &PluginToHost) -> Result<bool, LinkError> {
        let mut msg = msg.clone();
        if !self.hello_sent {
            match &mut msg.payload {
                Some(plugin_to_host::Payload::Hello(h)) => {
                    // plugbus's own runtime understands batches, packed moves and compression
                    // (unless told to speak as a df.plugin SDK plugin does, for comparisons).
                    if std::env::var(ENV_CAPABILITIES).as_deref() != Ok("none") {
                        // The subscriptions queued before the hello go with it, so the host
                        // routes to this plugin from the moment it is ready (as over shm,
                        // where the subscribe goes first).
                        let subscribe = self
                            .before_hello
                            .iter()
                            .rev()
                            .find_map(|m| match &m.payload {
                                Some(plugin_to_host::Payload::Subscribe(s)) => Some(s.events.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        h.capabilities.get_or_insert(PluginCapabilities {
                            event_batches: true,
                            packed_movements: true,
                            compressed_batches: true,
                            subscribe,
                        });
                    }
                    if !self.send(msg)? {
                        return Ok(false);
                    }
                    self.hello_sent = true;
                    for m in std::mem::take(&mut self.before_hello) {
                        if !self.send(m)? {
                            return Err(LinkError::Broken(
                                "the gRPC send queue filled during the handshake".into(),
                            ));
                        }
                    }
                    return Ok(true);
                }
                // The host binds the stream by its first message, which must be the hello.
                _ => {
                    self.before_hello.push(msg);
                    return Ok(true);
                }
            }
        }
        self.send(msg)
    }

    fn try_send_encoded(&mut self, payload: &[u8]) -> Result<bool, LinkError> {
        let msg = PluginToHost::decode(payload).map_err(|e| LinkError::Protocol(format!("bad PluginToHost: {e}")))?;
        self.try_send(&msg)
    }

    fn max_message(&self) -> usize {
        MAX_MESSAGE
    }

    fn has_incoming(&mut self) -> Result<bool, LinkError> {
        Ok(!self.incoming.is_empty())
    }

    fn park(&mut self, timeout: Duration) -> Result<(), LinkError> {
        self.shared.bell.prepare_sleep();
        if !self.incoming.is_empty() || self.shared.stream() != Stream::Open {
            self.shared.bell.cancel_sleep();
            return Ok(());
        }
        self.shared.bell.sleep(Some(timeout));
        Ok(())
    }

    fn wake_host(&mut self) {}

    fn heartbeat(&mut self) {}

    fn host_state(&self) -> HostState {
        match self.shared.stream() {
            // Whatever came before the end is read first (the shutdown message among it).
            _ if !self.incoming.is_empty() => HostState::Running,
            Stream::Open => HostState::Running,
            Stream::Ended => HostState::ShuttingDown,
            Stream::Failed => HostState::Dead,
        }
    }

    fn failure(&self) -> Option<&'static str> {
        None
    }

    fn host_pid(&self) -> u32 {
        0
    }

    fn publish_counters(&mut self, _events: u64, _move_frames: u64, _replies: u64) {}
}
