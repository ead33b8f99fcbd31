//! Plugin log text into the host's log, off the tick thread.
//!
//! Plugin text is untrusted: a line with a newline in it could forge a host log line, and
//! terminal escapes could rewrite what an operator sees. Everything a plugin writes reaches the
//! `tracing` log through [`escape`], which turns every control character into a visible escape.
//! `LogMessage`s are handed from the tick thread to a thread of their own through a bounded
//! queue ([`LogSink::send`] never blocks: when the queue is full the line is dropped and
//! counted), so formatting and the subscriber's writes never cost the tick.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use crate::sync::{AtomicU64, Ordering};

/// Lines waiting for the log thread before new ones are dropped.
const QUEUE: usize = 4096;

/// A log level, parsed from the plugin's free-form text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    /// `error`, `warn`/`warning`, `debug`, `trace` (any case); anything else is info.
    pub(crate) fn parse(level: &str) -> Self {
        let is = |name: &str| level.eq_ignore_ascii_case(name);
        if is("error") {
            Level::Error
        } else if is("warn") || is("warning") {
            Level::Warn
        } else if is("debug") {
            Level::Debug
        } else if is("trace") {
            Level::Trace
        } else {
            Level::Info
        }
    }
}

struct Line {
    plugin: Arc<str>,
    level: Level,
    message: String,
}

/// The tick thread's end of the log thread.
pub(crate) struct LogSink {
    tx: Option<SyncSender<Line>>,
    dropped: Arc<AtomicU64>,
}

impl LogSink {
    /// Starts the log thread. Without a thread (it could not be spawned), lines are dropped
    /// and counted.
    pub(crate) fn start() -> Self {
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("plugbus-plugin-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    emit(&line.plugin, line.level, "log", &line.message);
                }
            });
        let tx = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!("cannot start the plugin log thread ({e}): plugin log lines go only to drain_logs");
                None
            }
        };
        Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues one line for the log thread; never blocks.
    pub(crate) fn send(&self, plugin: &Arc<str>, level: Level, message: String) {
        let Some(tx) = &self.tx else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let line = Line {
            plugin: plugin.clone(),
            level,
            message,
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                // Relaxed: a statistic, read with no other memory depending on it.
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped because the log thread could not keep up.
    pub(crate) fn dropped(&self) -> u64 {
        // Relaxed: pairs with the Relaxed increments; a statistic.
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes one line of plugin text to the log, escaped, tagged with the plugin and its source
/// (`log` for `LogMessage`s, `stdout`, `stderr`).
pub(crate) fn emit(plugin: &str, level: Level, source: &'static str, text: &str) {
    let text = escape(text);
    let text: &str = &text;
    match level {
        Level::Error => tracing::error!(target: "plugbus::plugin", plugin = %plugin, source, "{text}"),
        Level::Warn => tracing::warn!(target: "plugbus::plugin", plugin = %plugin, source, "{text}"),
        Level::Info => tracing::info!(target: "plugbus::plugin", plugin = %plugin, source, "{text}"),
        Level::Debug => tracing::debug!(target: "plugbus::plugin", plugin = %plugin, source, "{text}"),
        Level::Trace => tracing::trace!(target: "plugbus::plugin", plugin = %plugin, source, "{text}"),
    }
}

/// `text` with every control character (newlines, carriage returns, escapes, C1 controls,
/// and the Unicode line and paragraph separators) written as a visible escape (`\n`, `\r`,
/// `\t`, `\u{1b}`...), and backslashes doubled so an escape cannot be forged. Borrowed when
/// there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\\' || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_lines() {
        assert_eq!(escape("plain text é"), "plain text é");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nINFO plugbus: forged\r\x1b[2Jz"),
            "a\\nINFO plugbus: forged\\r\\u{1b}[2Jz"
        );
        assert_eq!(escape("back\\nslash"), "back\\\\nslash");
        assert_eq!(escape("x\u{2028}y\u{85}"), "x\\u{2028}y\\u{85}");
        for s in ["\n", "a\u{0}b", "\u{7f}", "\u{9b}31m"] {
            assert!(!escape(s).chars().any(char::is_control), "{s:?}");
        }
    }

    #[test]
    fn levels_parse_case_blind() {
        assert_eq!(Level::parse("ERROR"), Level::Error);
        assert_eq!(Level::parse("Warning"), Level::Warn);
        assert_eq!(Level::parse("debug"), Level::Debug);
        assert_eq!(Level::parse("trace"), Level::Trace);
        assert_eq!(Level::parse("whatever"), Level::Info);
    }
}
