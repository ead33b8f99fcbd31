//! Launching a plugin process and forwarding its output into the host's log. Called on the
//! supervisor thread only.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::config::PluginConfig;
use super::logsink::{self, Level};
use crate::transport::INHERITED_FD;

/// Environment variable carrying the plugin's configured id.
pub const ENV_PLUGIN_ID: &str = "PLUGBUS_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the plugin id.
pub const ENV_DF_PLUGIN_ID: &str = "DF_PLUGIN_ID";
/// The df.plugin ecosystem's variable for the host's boot id.
pub const ENV_DF_HOST_BOOT_ID: &str = "DF_HOST_BOOT_ID";

/// Host environment variables every launched plugin gets (when the host has them). Everything
/// else of the host's environment (tokens, credentials, the host's own settings) stays out,
/// unless a plugin's `env_allow` names it.
pub const ENV_ALLOWLIST: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "RUST_LOG", "RUST_BACKTRACE"];

/// Spawns a plugin:
/// - with a cleared environment, then [`ENV_ALLOWLIST`], the plugin's `env_allow` and `env`,
///   the variables its link needs (`link_env`) and the plugin id and boot id;
/// - in its own process group (so a terminal's Ctrl-C reaches the host, which then shuts
///   plugins down in order, and so the supervisor can signal the plugin with its children);
/// - with `PR_SET_PDEATHSIG` SIGKILL: if the supervisor thread (so the host) dies without
///   stopping it, the kernel kills the plugin;
/// - stdin closed, stdout and stderr forwarded to the log line by line, each line cut at
///   `max_line` bytes and escaped;
/// - `inherit` (the link's descriptor, if any) as the child's [`INHERITED_FD`], closed in this
///   process once the child is started.
pub(crate) fn spawn(
    cfg: &PluginConfig,
    link_env: &[(String, String)],
    inherit: Option<OwnedFd>,
    boot_id: &str,
    max_line: usize,
) -> std::io::Result<Child> {
    let command = cfg
        .command
        .as_ref()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut cmd = Command::new(command);
    cmd.args(&cfg.args).env_clear();
    for name in ENV_ALLOWLIST
        .iter()
        .copied()
        .chain(cfg.env_allow.iter().map(String::as_str))
    {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    cmd.envs(&cfg.env)
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
    let parent = rustix::process::getpid();
    // SAFETY: the hook runs in the child between fork and exec, so it may only make
    // async-signal-safe calls: prctl and getppid are plain system calls (no allocation, no
    // locks); the error path builds an io::Error from an errno, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The host may have died between fork and prctl: then nothing would kill us.
            if rustix::process::getppid() != Some(parent) {
                // (ESRCH: the host is gone; an errno, so nothing is allocated here.)
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        forward(out, cfg.id.clone(), "stdout", max_line);
    }
    if let Some(err) = child.stderr.take() {
        forward(err, cfg.id.clone(), "stderr", max_line);
    }
    Ok(child)
}

/// Forwards each line of a child's stream to tracing, tagged with the plugin id: at most
/// `max_line` bytes of each (the rest of a longer line is skipped and the cut is marked), with
/// control characters escaped so a plugin cannot forge host log lines.
fn forward(stream: impl std::io::Read + Send + 'static, plugin: String, name: &'static str, max_line: usize) {
    let label = plugin.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("plugbus-log-{plugin}"))
        .spawn(move || {
            let mut reader = BufReader::with_capacity(max_line.clamp(64, 64 << 10), stream);
            let mut line = Vec::with_capacity(max_line.min(4096));
            loop {
                line.clear();
                match read_line_bounded(&mut reader, &mut line, max_line) {
                    Ok(None) => break,
                    Ok(Some(cut)) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.strip_suffix('\r').unwrap_or(&text);
                        if cut == 0 {
                            logsink::emit(&plugin, Level::Info, name, text);
                        } else {
                            let marked = format!("{text} [line cut: {cut} more bytes]");
                            logsink::emit(&plugin, Level::Info, name, &marked);
                        }
                    }
                    Err(_) => break,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the log forwarder of plugin {label}: {e}");
    }
}

/// Reads one line (without its `\n`) into `line`, keeping at most `max` bytes and skipping the
/// rest. `Ok(None)` at the end of the stream with nothing read; otherwise the bytes skipped.
/// Memory stays bounded by `max` and the reader's buffer, whatever the child writes.
fn read_line_bounded(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<Option<u64>> {
    let mut skipped = 0u64;
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(skipped));
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(n) => (&buf[..n], Some(n + 1)),
            None => (buf, None),
        };
        let room = if skipped > 0 { 0 } else { max - line.len() };
        let keep = chunk.len().min(room);
        // Do not split a UTF-8 character at the cut.
        let keep = if keep < chunk.len() {
            (0..=keep)
                .rev()
                .find(|&k| k == 0 || (chunk[k] & 0xC0) != 0x80)
                .unwrap_or(0)
        } else {
            keep
        };
        line.extend_from_slice(&chunk[..keep]);
        skipped += (chunk.len() - keep) as u64;
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(skipped));
        }
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

#[cfg(test)]
mod tests {
    use super::read_line_bounded;

    fn lines(input: &[u8], max: usize) -> Vec<(String, u64)> {
        let mut r = std::io::BufReader::with_capacity(16, input);
        let mut out = Vec::new();
        let mut line = Vec::new();
        while let Some(cut) = read_line_bounded(&mut r, &mut line, max).unwrap() {
            out.push((String::from_utf8(line.clone()).unwrap(), cut));
            line.clear();
        }
        out
    }

    #[test]
    fn long_lines_are_cut_and_counted() {
        assert_eq!(lines(b"ab\ncd", 10), vec![("ab".into(), 0), ("cd".into(), 0)]);
        let long = [b'x'; 100];
        let mut input = long.to_vec();
        input.extend_from_slice(b"\nok\n");
        assert_eq!(lines(&input, 8), vec![("x".repeat(8), 92), ("ok".into(), 0)]);
        // No newline at all: one cut line at the end.
        assert_eq!(lines(&long, 8), vec![("x".repeat(8), 92)]);
        // A multi-byte character is not split.
        assert_eq!(lines("aé".as_bytes(), 2), vec![("a".into(), 2)]);
        assert!(lines(b"", 8).is_empty());
    }
}
