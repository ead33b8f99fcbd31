//! Launching plugin processes, forwarding their output into the host's log, and seeing their
//! exit within milliseconds (a supervisor thread polling pidfds).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::PluginConfig;

/// Environment variable naming the segment a plugin attaches to.
pub const ENV_SEGMENT: &str = "PLUGBUS_SEGMENT";
/// Environment variable carrying the plugin's configured id.
pub const ENV_PLUGIN_ID: &str = "PLUGBUS_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the plugin id.
pub const ENV_DF_PLUGIN_ID: &str = "DF_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the host's boot id.
pub const ENV_DF_HOST_BOOT_ID: &str = "DF_HOST_BOOT_ID";

/// Spawns a plugin: its own process group (so a terminal's Ctrl-C reaches the host, which then
/// shuts plugins down in order), stdin closed, stdout and stderr forwarded to the log.
pub(crate) fn spawn(cfg: &PluginConfig, segment: &str, boot_id: &str) -> std::io::Result<Child> {
    let command = cfg
        .command
        .as_ref()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut cmd = Command::new(command);
    cmd.args(&cfg.args)
        .envs(&cfg.env)
        .env(ENV_SEGMENT, segment)
        .env(ENV_PLUGIN_ID, &cfg.id)
        .env(ENV_DF_PLUGIN_ID, &cfg.id)
        .env(ENV_DF_HOST_BOOT_ID, boot_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &cfg.workdir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        forward(out, cfg.id.clone(), "stdout");
    }
    if let Some(err) = child.stderr.take() {
        forward(err, cfg.id.clone(), "stderr");
    }
    Ok(child)
}

/// Forwards each line of a child's stream to tracing, tagged with the plugin id.
fn forward(stream: impl std::io::Read + Send + 'static, plugin: String, name: &'static str) {
    let label = plugin.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("plugbus-log-{plugin}"))
        .spawn(move || {
            let reader = BufReader::new(stream);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                tracing::info!(target: "plugbus::plugin", plugin = %plugin, stream = name, "{line}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the log forwarder of plugin {label}: {e}");
    }
}

/// A child process exited (seen by the supervisor).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exited {
    /// The plugin slot.
    pub slot: usize,
    /// Which launch of that slot.
    pub generation: u64,
    /// When the supervisor saw it.
    pub at: Instant,
}

enum Cmd {
    Watch { fd: OwnedFd, slot: usize, generation: u64 },
    Stop,
}

/// One thread polling a pidfd per launched plugin; reports exits on a channel.
pub(crate) struct Supervisor {
    tx: mpsc::Sender<Cmd>,
    pub(crate) exits: mpsc::Receiver<Exited>,
    thread: Option<JoinHandle<()>>,
}

/// How often the supervisor picks up new children (its poll timeout).
const SUPERVISOR_TICK: Duration = Duration::from_millis(20);

impl Supervisor {
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (exit_tx, exits) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("plugbus-supervisor".into())
            .spawn(move || supervise(&rx, &exit_tx))?;
        Ok(Self {
            tx,
            exits,
            thread: Some(thread),
        })
    }

    /// Watches `child`; its exit is reported with `slot` and `generation`.
    pub(crate) fn watch(&self, child: &Child, slot: usize, generation: u64) -> std::io::Result<()> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
        // is passed. The child is not yet reaped (we own its Child), so the pid is still its.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pidfd_open returned a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        self.tx
            .send(Cmd::Watch { fd, slot, generation })
            .map_err(|_| std::io::Error::other("supervisor stopped"))
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn supervise(rx: &mpsc::Receiver<Cmd>, exits: &mpsc::Sender<Exited>) {
    let mut watched: Vec<(OwnedFd, usize, u64)> = Vec::new();
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    loop {
        loop {
            match rx.try_recv() {
                Ok(Cmd::Watch { fd, slot, generation }) => watched.push((fd, slot, generation)),
                Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if watched.is_empty() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Cmd::Watch { fd, slot, generation }) => watched.push((fd, slot, generation)),
                Ok(Cmd::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            continue;
        }
        pollfds.clear();
        pollfds.extend(watched.iter().map(|(fd, _, _)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: pollfds is a valid, exclusively borrowed array of pollfds.len() entries for the
        // duration of the call.
        let n = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                SUPERVISOR_TICK.as_millis() as i32,
            )
        };
        if n <= 0 {
            continue;
        }
        let at = Instant::now();
        // Remove the ready ones from the highest index down, so swap_remove never moves a
        // ready entry that is still to be handled.
        for i in (0..pollfds.len()).rev() {
            if pollfds[i].revents != 0 {
                let (_, slot, generation) = watched.swap_remove(i);
                let _ = exits.send(Exited { slot, generation, at });
            }
        }
    }
}
