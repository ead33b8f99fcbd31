//! Host configuration, in code or from a TOML file.
//!
//! ```toml
//! [host]
//! hello_timeout_ms = 2000       # wait for a plugin's PluginHello
//! response_timeout_ms = 250     # how long an event that expects a response waits
//! shutdown_grace_ms = 5000      # HostShutdown, then this long, then SIGKILL
//! record = "session.jsonl"      # optional: write every tick's moves and events, for `plugbus replay`
//! heartbeat_timeout_ms = 5000   # a live plugin silent this long is wedged: disconnected
//! # What one plugin can make the host take in per poll, and hold (see HostSettings):
//! poll_max_frames = 1024
//! poll_max_bytes = 1048576
//! poll_max_actions = 4096
//! poll_max_logs = 256
//! max_queued_actions = 16384    # waiting for the server's drain_actions; more: disconnected
//! max_queued_logs = 1024
//! max_queued_bytes = 16777216
//! max_output_line = 4096        # stdout/stderr lines are cut (and marked) past this
//!
//! [[plugin]]
//! id = "chat_filter"
//! name = "Chat filter"
//! command = "target/release/examples/chat_filter"
//! args = ["--banned", "darn"]
//! env = { RUST_LOG = "info" }   # the environment is cleared but for an allowlist, plus these
//! env_allow = ["JAVA_HOME"]     # host variables to pass through as well
//! workdir = "."
//! priority = 10                 # higher priority has the final say on mutations
//! required = true               # the host waits for its hello before it starts
//! transport = "shm"            # the default: shared memory
//! [plugin.queues]               # bytes of buffering per direction, powers of two
//! moves = 4194304
//! control = 1048576
//! replies = 262144
//! ```
//!
//! A plugin with `attach = true` (and no `command`) is not launched: the host makes its link
//! (at `address`, or one it makes up) and waits for a process started by someone else to
//! connect with `PLUGBUS_ADDRESS` set to that address.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::transport::{self, QueueSizes};

/// A configuration error, naming the file, the plugin and the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}{}{}{message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default(), plugin.as_ref().map(|p| format!("plugin `{p}`: ")).unwrap_or_default(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The file, when loaded from one.
    pub file: Option<PathBuf>,
    /// The plugin id (or `plugin[N]` when the id itself is missing).
    pub plugin: Option<String>,
    /// The field.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(plugin: Option<&str>, field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            file: None,
            plugin: plugin.map(str::to_owned),
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// Settings for the whole host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSettings {
    /// How long to wait for a plugin's hello, ms (default 2000).
    pub hello_timeout_ms: u64,
    /// How long an event that expects a response waits for answers, ms (default 250).
    pub response_timeout_ms: u64,
    /// Grace between HostShutdown and SIGKILL, ms (default 5000).
    pub shutdown_grace_ms: u64,
    /// A ready plugin whose heartbeat is older than this while its process lives is wedged:
    /// it is disconnected (and restarted per the restart policy), ms (default 5000; plugins
    /// beat about every 100 ms whenever their loop runs).
    pub heartbeat_timeout_ms: u64,
    /// A heartbeat older than this gets the plugin reported slow, ms (default 600).
    pub slow_heartbeat_ms: u64,
    /// Restarts allowed per window before a launched plugin is disabled (default 3).
    pub restart_max: u32,
    /// The restart window, seconds (default 60).
    pub restart_window_s: u64,
    /// Frames a plugin's overflow queue may hold before it is disconnected (default 4096).
    pub overflow_frames: usize,
    /// Events per batch before an early flush (default 100).
    pub batch_max_events: usize,
    /// Encoded bytes per batch before an early flush (default 4096).
    pub batch_max_bytes: usize,
    /// Plugin messages (frames) taken in per plugin per poll (default 1024); the rest waits
    /// in the plugin's link (the plugin is held back), so no plugin can stall a tick.
    pub poll_max_frames: usize,
    /// Bytes of plugin messages taken in per plugin per poll (default 1 MiB; one message more
    /// may cross it).
    pub poll_max_bytes: usize,
    /// Actions taken in per plugin per poll (default 4096; the message that crosses it is
    /// taken whole, then reading stops until the next poll).
    pub poll_max_actions: usize,
    /// Log lines taken in per plugin per poll (default 256; as for actions).
    pub poll_max_logs: usize,
    /// Actions of one plugin waiting for the server to take them
    /// ([`Host::drain_actions`](super::Host::drain_actions)); a plugin that makes the host
    /// hold more is disconnected with the reason (default 16384).
    pub max_queued_actions: usize,
    /// Log lines of one plugin waiting for the server to take them
    /// ([`Host::drain_logs`](super::Host::drain_logs)); a plugin that makes the host hold
    /// more is disconnected with the reason (default 1024).
    pub max_queued_logs: usize,
    /// Bytes (encoded size) of one plugin's waiting actions and log lines together; past it
    /// the plugin is disconnected (default 16 MiB).
    pub max_queued_bytes: usize,
    /// Longest line of a launched plugin's stdout or stderr forwarded to the log, bytes; a
    /// longer line is cut there and marked (default 4096).
    pub max_output_line: usize,
    /// Makes the host process non-dumpable (`PR_SET_DUMPABLE` 0) at start, so a plugin
    /// running as the same user cannot ptrace it or read its memory through /proc (default
    /// true). This also turns off core dumps of the host process.
    pub protect_memory: bool,
    /// Hand wake-ups of sleeping plugins to a wake thread that is awake when a tick is due, so
    /// the tick thread makes no system call for them (default true). The wake thread learns
    /// the tick's cadence and spins for about 300 µs around each expected tick end; without a
    /// steady cadence, or for a tick outside its window, the tick thread wakes plugins itself.
    pub wake_thread: bool,
    /// Reply latency above which a plugin is reported slow, ms (default 50).
    pub slow_reply_ms: u64,
    /// Buffer fill (0..1) above which a plugin is reported slow (default 0.75).
    pub slow_occupancy: f64,
    /// Where plugins of a network transport (`transport = "grpc"`) connect: `unix:///path`
    /// (created 0600) or `tcp://host:port` (default: none). A TCP address off the loopback
    /// interface needs `tls_cert`, `tls_key` and `token_file`.
    pub listen: Vec<String>,
    /// TLS certificate (PEM) for TCP listeners; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for TCP listeners; with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A file holding the token every network plugin must send (`authorization: Bearer ...`).
    pub token_file: Option<PathBuf>,
    /// Write every tick's moves and events to this file, in the input format of
    /// `plugbus replay` (JSON Lines; see [`crate::jsonl`]). A writer thread does the writing;
    /// the tick only queues, and drops (counting them) what the writer cannot keep up with.
    pub record: Option<PathBuf>,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            hello_timeout_ms: 2000,
            response_timeout_ms: 250,
            shutdown_grace_ms: 5000,
            heartbeat_timeout_ms: 5000,
            slow_heartbeat_ms: 600,
            restart_max: 3,
            restart_window_s: 60,
            overflow_frames: 4096,
            batch_max_events: 100,
            batch_max_bytes: 4096,
            poll_max_frames: 1024,
            poll_max_bytes: 1 << 20,
            poll_max_actions: 4096,
            poll_max_logs: 256,
            max_queued_actions: 16384,
            max_queued_logs: 1024,
            max_queued_bytes: 16 << 20,
            max_output_line: 4096,
            protect_memory: true,
            wake_thread: true,
            slow_reply_ms: 50,
            slow_occupancy: 0.75,
            listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
            token_file: None,
            record: None,
        }
    }
}

impl HostSettings {
    /// The settings network transports take.
    pub fn listen_settings(&self) -> crate::transport::ListenSettings {
        crate::transport::ListenSettings {
            addresses: self.listen.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            token_file: self.token_file.clone(),
        }
    }

    /// Hello timeout.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    /// Event response timeout.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    /// Shutdown grace.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// One plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique id: `[A-Za-z0-9_-]`, at most 48 characters.
    pub id: String,
    /// Display name (defaults to the id).
    #[serde(default)]
    pub name: String,
    /// Program to launch (absent in attach mode).
    #[serde(default)]
    pub command: Option<PathBuf>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables. A launched plugin starts with a cleared environment:
    /// these, the host's `PATH`, `HOME`, `LANG`, `LC_ALL`, `TZ`, `RUST_LOG` and `RUST_BACKTRACE`,
    /// the host variables named in `env_allow`, and the bus's own variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of further host environment variables passed to a launched plugin.
    #[serde(default)]
    pub env_allow: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Mutation priority: higher has the final say (default 0).
    #[serde(default)]
    pub priority: i32,
    /// Whether the host waits for its hello before starting (default false).
    #[serde(default)]
    pub required: bool,
    /// Attach mode: do not launch; wait for an external process.
    #[serde(default)]
    pub attach: bool,
    /// The transport (default `shm`, shared memory).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// The address the plugin connects to (attach mode, e.g. `shm:plugbus.external`); made up
    /// by the transport when absent.
    #[serde(default)]
    pub address: Option<String>,
    /// Buffer sizes of its link.
    #[serde(default)]
    pub queues: QueueSizes,
}

fn default_transport() -> String {
    transport::DEFAULT_TRANSPORT.to_owned()
}

impl PluginConfig {
    /// A launched plugin running `command`.
    pub fn launch(id: &str, command: impl Into<PathBuf>) -> Self {
        Self {
            id: id.to_owned(),
            name: String::new(),
            command: Some(command.into()),
            args: Vec::new(),
            env: BTreeMap::new(),
            env_allow: Vec::new(),
            workdir: None,
            priority: 0,
            required: false,
            attach: false,
            transport: default_transport(),
            address: None,
            queues: QueueSizes::default(),
        }
    }

    /// An attached plugin (started by someone else).
    pub fn attached(id: &str) -> Self {
        Self {
            command: None,
            attach: true,
            ..Self::launch(id, "")
        }
    }

    /// Sets the arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }

    /// Marks the plugin required.
    pub fn required(mut self, r: bool) -> Self {
        self.required = r;
        self
    }

    /// Sets the buffer sizes of its link.
    pub fn queues(mut self, queues: QueueSizes) -> Self {
        self.queues = queues;
        self
    }

    /// Sets the address an attached plugin connects to.
    pub fn address(mut self, address: &str) -> Self {
        self.address = Some(address.to_owned());
        self
    }

    /// Display name (the id when none is set).
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() { &self.id } else { &self.name }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let id = Some(self.id.as_str());
        if self.id.is_empty()
            || self.id.len() > 48
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                id,
                Some("id"),
                "must be 1 to 48 characters of A-Z a-z 0-9 _ -",
            ));
        }
        match (&self.command, self.attach) {
            (None, false) => {
                return Err(ConfigError::new(id, Some("command"), "missing (or set attach = true)"));
            }
            (Some(c), false) if c.as_os_str().is_empty() => {
                return Err(ConfigError::new(id, Some("command"), "is empty"));
            }
            (Some(_), true) => {
                return Err(ConfigError::new(
                    id,
                    Some("attach"),
                    "an attached plugin has no command",
                ));
            }
            _ => {}
        }
        if let Some(a) = &self.address {
            if let Err(e) = transport::check_address(a) {
                return Err(ConfigError::new(id, Some("address"), e.to_string()));
            }
        }
        if let Err((field, message)) = self.queues.validate() {
            return Err(ConfigError::new(id, Some(&format!("queues.{field}")), message));
        }
        Ok(())
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostConfig {
    /// Host-wide settings.
    pub host: HostSettings,
    /// Plugins, in the order given.
    pub plugins: Vec<PluginConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    host: Option<toml::Value>,
    #[serde(default)]
    plugin: Vec<toml::Value>,
}

impl HostConfig {
    /// A configuration with default settings and these plugins.
    pub fn new(plugins: Vec<PluginConfig>) -> Self {
        Self {
            host: HostSettings::default(),
            plugins,
        }
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            plugin: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::new(None, None, e.message().to_owned()))?;
        let host = match raw.host {
            Some(v) => serde_path_to_error::deserialize(v).map_err(|e| field_error(None, "host", &e))?,
            None => HostSettings::default(),
        };
        let mut plugins = Vec::new();
        for (i, v) in raw.plugin.into_iter().enumerate() {
            let label = v
                .get("id")
                .and_then(toml::Value::as_str)
                .map_or_else(|| format!("plugin[{i}]"), str::to_owned);
            let p: PluginConfig = serde_path_to_error::deserialize(v).map_err(|e| field_error(Some(&label), "", &e))?;
            plugins.push(p);
        }
        let cfg = Self { host, plugins };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every plugin and the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.host;
        if h.response_timeout_ms == 0 || h.hello_timeout_ms == 0 {
            return Err(ConfigError::new(None, Some("host"), "timeouts must be positive"));
        }
        if h.batch_max_events == 0 || h.batch_max_bytes == 0 || h.overflow_frames == 0 {
            return Err(ConfigError::new(
                None,
                Some("host"),
                "batch and overflow limits must be positive",
            ));
        }
        for (field, v) in [
            ("host.poll_max_frames", h.poll_max_frames),
            ("host.poll_max_bytes", h.poll_max_bytes),
            ("host.poll_max_actions", h.poll_max_actions),
            ("host.poll_max_logs", h.poll_max_logs),
            ("host.max_queued_actions", h.max_queued_actions),
            ("host.max_queued_logs", h.max_queued_logs),
            ("host.max_queued_bytes", h.max_queued_bytes),
            ("host.max_output_line", h.max_output_line),
        ] {
            if v == 0 {
                return Err(ConfigError::new(None, Some(field), "must be positive"));
            }
        }
        if h.heartbeat_timeout_ms == 0 {
            return Err(ConfigError::new(
                None,
                Some("host.heartbeat_timeout_ms"),
                "must be positive",
            ));
        }
        if h.tls_cert.is_some() != h.tls_key.is_some() {
            return Err(ConfigError::new(
                None,
                Some(if h.tls_cert.is_some() {
                    "host.tls_key"
                } else {
                    "host.tls_cert"
                }),
                "TLS needs both a certificate and its key",
            ));
        }
        if !(0.0..=1.0).contains(&h.slow_occupancy) {
            return Err(ConfigError::new(
                None,
                Some("host.slow_occupancy"),
                "must be between 0 and 1",
            ));
        }
        let mut ids = HashSet::new();
        for p in &self.plugins {
            p.validate()?;
            if !ids.insert(p.id.as_str()) {
                return Err(ConfigError::new(Some(&p.id), Some("id"), "duplicate plugin id"));
            }
        }
        Ok(())
    }
}

/// Turns a deserialization error into one naming the field (its path inside the table).
fn field_error(plugin: Option<&str>, prefix: &str, e: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    let mut field = match (prefix.is_empty(), path.as_str()) {
        (true, ".") => None,
        (true, p) => Some(p.to_owned()),
        (false, ".") => Some(prefix.to_owned()),
        (false, p) => Some(format!("{prefix}.{p}")),
    };
    let message = e.inner().message().to_owned();
    // A missing field is reported at its parent's path (an unknown one already at its own):
    // name the field itself, once.
    if let Some(name) = message.split('`').nth(1) {
        let named = field
            .as_deref()
            .is_some_and(|f| f == name || f.ends_with(&format!(".{name}")));
        if (message.starts_with("unknown field") || message.starts_with("missing field")) && !named {
            field = Some(match field {
                Some(f) => format!("{f}.{name}"),
                None => name.to_owned(),
            });
        }
    }
    ConfigError {
        file: None,
        plugin: plugin.map(str::to_owned),
        field,
        message,
    }
}
