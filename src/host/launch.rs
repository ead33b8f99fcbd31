//! Launching a plugin process and forwarding its output into the host's log. Called on the
//! supervisor thread only.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::config::PluginConfig;

/// Environment variable carrying the plugin's configured id.
pub const ENV_PLUGIN_ID: &str = "PLUGBUS_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the plugin id.
pub const ENV_DF_PLUGIN_ID: &str = "DF_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the host's boot id.
pub const ENV_DF_HOST_BOOT_ID: &str = "DF_HOST_BOOT_ID";

/// Spawns a plugin with the environment its link needs (`link_env`): its own process group (so
/// a terminal's Ctrl-C reaches the host, which then shuts plugins down in order), stdin closed,
/// stdout and stderr forwarded to the log.
pub(crate) fn spawn(cfg: &PluginConfig, link_env: &[(String, String)], boot_id: &str) -> std::io::Result<Child> {
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
