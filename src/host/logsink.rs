//! Plugin log text into the host's log, off the tick thread.
//!
//! Plugin text is untrusted: a line with a newline in it could forge a host log line, and
//! terminal escapes could rewrite what an operator sees. Everything a plugin writes reaches the
//! `tracing` log through [`escape`], which turns every control character into a visible escape.
//! `LogMessage`s are handed from the tick thread to a thread of their own through a bounded
//! queue ([`LogSink::send`] never blocks: when the queue is full the line is dropped and
//! counted), so formatting and the subscriber's writes never cost the tick. The text travels in
//! a `String` that the log thread sends back when it is done with it, through a second bounded
//! queue, for a later line: in steady state neither thread allocates per line (beyond what the
//! `tracing` subscriber itself does).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use crate::sync::{AtomicU64, Ordering};

/// Lines waiting for the log thread before new ones are dropped.
const QUEUE: usize = 4096;
/// Idle text buffers the log thread hands back for reuse, at most.
const SPARE: usize = 256;
/// A text buffer larger than this is dropped rather than handed back.
const SPARE_MAX_BYTES: usize = 4096;
/// Buffers made at start, so that a log thread a little behind (this many lines) does not make
/// the tick thread allocate; and their capacity (most log lines fit).
const SPARE_PREFILL: usize = 64;
const SPARE_PREFILL_BYTES: usize = 256;

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
    /// Buffers the log thread is done with.
    spare: Option<Receiver<String>>,
    dropped: Arc<AtomicU64>,
}

impl LogSink {
    /// Starts the log thread. Without a thread (it could not be spawned), lines are dropped
    /// and counted.
    pub(crate) fn start() -> Self {
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let (spare_tx, spare_rx) = sync_channel::<String>(SPARE);
        for _ in 0..SPARE_PREFILL {
            let _ = spare_tx.try_send(String::with_capacity(SPARE_PREFILL_BYTES));
        }
        let spawned = std::thread::Builder::new()
            .name("plugbus-plugin-log".into())
            .spawn(move || {
                let mut escaped = String::new();
                while let Ok(line) = rx.recv() {
                    emit_with(&line.plugin, line.level, "log", &line.message, &mut escaped);
                    if line.message.capacity() <= SPARE_MAX_BYTES {
                        // Full (the tick thread has enough) or gone: the buffer is dropped.
                        let _ = spare_tx.try_send(line.message);
                    }
                    if escaped.capacity() > SPARE_MAX_BYTES {
                        escaped = String::new();
                    }
                }
            });
        let (tx, spare) = match spawned {
            Ok(_) => (Some(tx), Some(spare_rx)),
            Err(e) => {
                tracing::warn!("cannot start the plugin log thread ({e}): plugin log lines go only to drain_logs");
                (None, None)
            }
        };
        Self {
            tx,
            spare,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues one line for the log thread; never blocks.
    pub(crate) fn send(&self, plugin: &Arc<str>, level: Level, text: &str) {
        let (Some(tx), Some(spare)) = (&self.tx, &self.spare) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // A buffer the log thread gave back, else a new one (when more than the prefilled
        // buffers are in flight: the log thread is behind).
        let mut message = spare.try_recv().unwrap_or_default();
        message.clear();
        message.push_str(text);
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
    emit_with(plugin, level, source, text, &mut String::new());
}

/// [`emit`], escaping into `buf` (reused: nothing is allocated when the text needs no escape,
/// or `buf` has room for it).
fn emit_with(plugin: &str, level: Level, source: &'static str, text: &str, buf: &mut String) {
    let text = escape_into(text, buf);
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
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    escape_to(text, &mut out);
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\\' || c == '\u{2028}' || c == '\u{2029}'
}

/// [`escape`] with `buf` as the owned result's storage: `text` itself when there is nothing
/// to escape, else `buf` (cleared first) holding the escaped text.
fn escape_into<'a>(text: &'a str, buf: &'a mut String) -> &'a str {
    if !text.chars().any(needs_escape) {
        return text;
    }
    buf.clear();
    escape_to(text, buf);
    buf
}

/// Appends `text`, escaped, to `out`.
fn escape_to(text: &str, out: &mut String) {
    let needs = needs_escape;
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
