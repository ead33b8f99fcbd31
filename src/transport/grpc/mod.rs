//! The gRPC adapter: the df.plugin ecosystem's own wire, `df.plugin.Plugin/EventStream` (a
//! bidirectional stream, `PluginToHost` up, `HostToPlugin` down) over a Unix socket or TCP.
//! Plugins written for the df.plugin SDKs connect to it unchanged; plugbus's own plugin runtime
//! connects to it when given a `unix://` or `tcp://` address.
//!
//! **Host side** ([`GrpcAcceptor`]): a tonic server on the host's `listen` addresses, on a
//! tokio runtime of the adapter's own (the host's user needs no async). A stream is bound to the
//! configured plugin named by the `plugin_id` of its first message, which must be a hello; an
//! unknown or already connected id, or another first message, ends the call with a status that
//! says why. The tick thread hands each plugin's items to the adapter through a bounded SPSC
//! queue (rtrb) and returns: when the queue is full the host conflates moves and queues the rest,
//! exactly as for shared memory.
//!
//! **What a plugin understands.** By default a plugin gets one `HostToPlugin` message per event,
//! moves as one `PLAYER_MOVE` event each, as the df.plugin host sends them (the SDKs ignore
//! everything else). A plugin whose hello carries `capabilities` (a plugbus addition with new
//! field numbers) gets what it asks for: per-tick `EventBatch`es, `PlayerMovementsPacked` with
//! the tick and flags, `CompressedEventBatch` (snappy) for batches over 1 KiB.
//!
//! **Plugin side** ([`GrpcConnector`]): a tonic client on a runtime thread of its own; the
//! plugin runtime's `Handler` runs unchanged over it.

mod convert;
mod host;
mod plugin;

use std::path::PathBuf;

pub use host::{GrpcAcceptor, GrpcHostLink};
pub use plugin::{ENV_CAPABILITIES, GrpcConnector, GrpcPluginLink};

/// The transport's name in configurations (`transport = "grpc"`).
pub const NAME: &str = "grpc";
/// The df.plugin ecosystem's variable for the host's address, as its SDKs read it.
pub const ENV_SERVER_ADDRESS: &str = "DF_PLUGIN_SERVER_ADDRESS";
/// The CA certificate (PEM) a plugin checks the host's TLS certificate against, for an
/// `https://` address (the host gives its own certificate to the plugins it launches).
pub const ENV_TLS_CA: &str = "PLUGBUS_TLS_CA";
/// A file holding the token a plugin sends (`authorization: Bearer <token>`).
pub const ENV_TOKEN_FILE: &str = "PLUGBUS_TOKEN_FILE";

/// Reads a token file: its first line, trimmed; an error if there is none.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token)
}
/// Batches larger than this go compressed to a plugin that accepts it.
pub const COMPRESS_OVER: usize = 1024;
/// The largest message either side accepts (tonic's default).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Where a gRPC peer is: a Unix socket or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `unix:/path`, `unix:path`, `tcp://host:port`, `http://host:port`,
    /// or a bare `host:port` (TCP) or `/path` (Unix socket).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(format!("{s:?} names no socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let hostport = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("http://"))
            .or_else(|| s.strip_prefix("https://"))
            .unwrap_or(s);
        if hostport.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(hostport)));
        }
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !hostport.contains('/') => {
                Ok(Self::Tcp(hostport.to_owned()))
            }
            _ => Err(format!(
                "{s:?} is not a gRPC address (unix:///path, tcp://host:port or host:port)"
            )),
        }
    }

    /// The address in the form plugbus's plugin runtime reads (`unix:///path`, `tcp://host:port`).
    pub fn address(&self) -> String {
        match self {
            Self::Unix(p) => format!("unix://{}", p.display()),
            Self::Tcp(hp) => format!("tcp://{hp}"),
        }
    }

    /// The address in the form the df.plugin SDKs read from `DF_PLUGIN_SERVER_ADDRESS`: a Unix
    /// socket as `unix:///path`, TCP as `host:port`.
    pub fn sdk_address(&self) -> String {
        match self {
            Self::Unix(p) => format!("unix://{}", p.display()),
            Self::Tcp(hp) => hp.clone(),
        }
    }

    /// Whether a TCP address is on the loopback interface (a Unix socket always is local).
    pub fn is_local(&self) -> bool {
        match self {
            Self::Unix(_) => true,
            Self::Tcp(hp) => {
                let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Endpoint::parse("unix:///tmp/x.sock"),
            Ok(Endpoint::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:/tmp/x.sock"),
            Ok(Endpoint::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(Endpoint::parse("/tmp/x.sock"), Ok(Endpoint::Unix("/tmp/x.sock".into())));
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:50050"),
            Ok(Endpoint::Tcp("127.0.0.1:50050".into()))
        );
        assert_eq!(Endpoint::parse("127.0.0.1:0"), Ok(Endpoint::Tcp("127.0.0.1:0".into())));
        assert!(Endpoint::parse("plugbus.x").is_err());
        assert!(Endpoint::parse("unix:").is_err());
        assert!(Endpoint::parse("tcp://host").is_err());
        assert!(Endpoint::parse("127.0.0.1:50050").unwrap().is_local());
        assert!(Endpoint::parse("[::1]:1").unwrap().is_local());
        assert!(!Endpoint::parse("0.0.0.0:1").unwrap().is_local());
        assert!(!Endpoint::parse("10.1.2.3:1").unwrap().is_local());
    }
}
