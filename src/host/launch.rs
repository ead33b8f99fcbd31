//! Launching a plugin process and forwarding its output into the host's log. Called on the
//! supervisor thread only.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::config::PluginConfig;
use crate::transport::INHERITED_FD;

/// Environment variable carrying the plugin's configured id.
pub const ENV_PLUGIN_ID: &str = "PLUGBUS_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the plugin id.
pub const ENV_DF_PLUGIN_ID: &str = "DF_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the host's boot id.
pub const ENV_DF_HOST_BOOT_ID: &str = "DF_HOST_BOOT_ID";

/// Spawns a plugin with the environment its link needs (`link_env`): its own process group (so
/// a terminal's Ctrl-C reaches the host, which then shuts plugins down in order), stdin closed,
/// stdout and stderr forwarded to the log. `inherit` (the link's descriptor, if any) becomes the
/// child's [`INHERITED_FD`], and is closed in this process once the child is started.
pub(crate) fn spawn(
    cfg: &PluginConfig,
    link_env: &[(String, String)],
    inherit: Option<OwnedFd>,
    boot_id: &str,
) -> std::io::Result<Child> {
    let command = cfg
        .command
        .as_ref()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut cmd = Command::new(command);
    cmd.args(&cfg.args)
        .envs(&cfg.env)
        .envs(link_env.iter().map(|(k, v)| (k, v)))
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
    // The hook below replaces the child's fd 3. std watches the exec through a pipe it opens
    // after this point, at the lowest free descriptors: hold fd 3 if it is free (the copy lands
    // there), so that pipe cannot be the one replaced. Closed with `inherit` when this returns.
    let inherit = inherit.map(|fd| {
        // SAFETY: F_DUPFD_CLOEXEC takes an int argument (the lowest number to use); `fd` is open.
        let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, INHERITED_FD) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fcntl returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(copy) })
    });
    let inherit = inherit.transpose()?;
    if let Some(fd) = &inherit {
        let src = fd.as_raw_fd();
        // SAFETY: the hook runs in the child between fork and exec, and calls only dup2 and
        // fcntl (async-signal-safe) on descriptors the child holds (`src` is open until this
        // function returns, after the fork); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if src == INHERITED_FD {
                    // dup2 onto itself changes nothing: clear close-on-exec by hand.
                    let flags = libc::fcntl(src, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(src, INHERITED_FD) < 0 {
                    // The new descriptor does not carry close-on-exec: it survives the exec.
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
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

/// How a process ended, in words.
pub(crate) fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".to_owned(),
    }
}
