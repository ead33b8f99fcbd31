//! Events and moves as JSON Lines: the input format of a replay, and the recorder that writes
//! it from a live session.
//!
//! One JSON object per line (blank lines are skipped):
//!
//! ```text
//! {"tick": 12, "event": {"eventId": "7", "type": "CHAT", "expectsResponse": true, "chat": {"name": "Steve", "message": "hi"}}}
//! {"tick": 12, "moves": [{"uuid": "00000000-0000-0000-0000-000000000001", "x": 1.5, "y": 64, "z": -3, "yaw": 90, "pitch": 0}]}
//! ```
//!
//! - `event` is a df.plugin `EventEnvelope` in the protobuf canonical JSON mapping (camelCase
//!   or proto field names, enum value names or numbers, 64-bit integers as strings or numbers,
//!   bytes as base64, `"NaN"`/`"Infinity"`/`"-Infinity"` for non-finite floats). Unknown fields
//!   and unknown enum names are errors.
//! - `moves` is a list of [`MoveRecord`]s: `uuid` (any form [`fastpath::uuid_from_str`]
//!   accepts), `x`, `y`, `z` (required), `yaw`, `pitch` (default 0); numbers, or the strings
//!   `"NaN"`, `"Infinity"`, `"-Infinity"`.
//! - `tick` (optional, a non-negative integer): lines with the same tick belong to the same game
//!   tick; a line without one is a tick of its own.
//!
//! A line carries exactly one of `event` and `moves`; any other key is an error. Errors
//! ([`InputError`]) name the 1-based line and the path of the offending field as written in
//! the line (`event.chat.mesage`, `moves[2].uuid`).
//!
//! Output: [`event_line`] and [`moves_line`] write lines that [`parse_line`] reads back to the
//! same values (64-bit integers as strings, default fields omitted); [`message_json`] gives the
//! same mapping of any df.plugin message, for reports of what plugins decided; [`Recorder`]
//! writes input lines from a live host on a thread of its own, never blocking the caller.

use std::fs::File;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde::de::{self, MapAccess, Unexpected, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_path_to_error::Segment;

use crate::fastpath::{self, MoveRecord};
use crate::proto;

const ENVELOPE: &str = "df.plugin.EventEnvelope";

/// The df.plugin schema ([`proto::DESCRIPTOR_SET`], the `descriptor.bin` build.rs writes),
/// decoded once.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(proto::DESCRIPTOR_SET).expect("proto::DESCRIPTOR_SET decodes"))
}

fn envelope_descriptor() -> &'static MessageDescriptor {
    static DESC: OnceLock<MessageDescriptor> = OnceLock::new();
    DESC.get_or_init(|| {
        descriptor_pool()
            .get_message_by_name(ENVELOPE)
            .expect("df.plugin.EventEnvelope is in the schema")
    })
}

// ------------------------------------------------------------------------------------------
// Input
// ------------------------------------------------------------------------------------------

/// What one input line carries.
// Not boxed: most lines are events, so a box would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum InputItem {
    /// One event for the plugins.
    Event(proto::EventEnvelope),
    /// The movements of one tick (possibly empty).
    Moves(Vec<MoveRecord>),
}

/// One parsed, non-blank input line.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    /// Line number in the input, from 1.
    pub line: usize,
    /// The line's `tick`, if it has one.
    pub tick: Option<u64>,
    /// The event or the moves.
    pub item: InputItem,
}

/// Why an input line was rejected. Displays as ``line 3: field `event.chat.mesage`: message``
/// (without the field part when the error is not about one field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {}{message}", field_prefix(.field))]
pub struct InputError {
    /// Line number, from 1.
    pub line: usize,
    /// Path of the offending field as written in the line (`event.chat.message`,
    /// `moves[2].uuid`, `tick`), when the error is about one.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

fn field_prefix(field: &Option<String>) -> String {
    field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default()
}

/// Parses line number `line` (1-based, used in errors) of an input file. `Ok(None)` for a
/// blank line.
pub fn parse_line(text: &str, line: usize) -> Result<Option<InputLine>, InputError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: RawLine = serde_path_to_error::deserialize(&mut de).map_err(|e| path_error(line, &e))?;
    de.end().map_err(|e| InputError {
        line,
        field: None,
        message: json_message(&e),
    })?;
    let item = match (raw.event, raw.moves) {
        (Some(event), None) => InputItem::Event(event.transcode_to().map_err(|e| InputError {
            line,
            field: Some("event".into()),
            message: format!("does not convert to an EventEnvelope: {e}"),
        })?),
        (None, Some(moves)) => InputItem::Moves(moves),
        (Some(_), Some(_)) => {
            return Err(InputError {
                line,
                field: Some(raw.later.into()),
                message: "a line carries either `event` or `moves`, not both".into(),
            });
        }
        (None, None) => {
            return Err(InputError {
                line,
                field: None,
                message: "a line needs an `event` or a `moves` field".into(),
            });
        }
    };
    Ok(Some(InputLine {
        line,
        tick: raw.tick,
        item,
    }))
}

/// Reads and parses a whole input, all or nothing: the first bad line (or read error, such as
/// invalid UTF-8) is returned with its line number.
pub fn parse_input(mut r: impl BufRead) -> Result<Vec<InputLine>, InputError> {
    let mut out = Vec::new();
    let mut text = String::new();
    for line in 1.. {
        text.clear();
        match r.read_line(&mut text) {
            Ok(0) => break,
            Ok(_) => out.extend(parse_line(&text, line)?),
            Err(e) => {
                return Err(InputError {
                    line,
                    field: None,
                    message: format!("read error: {e}"),
                });
            }
        }
    }
    Ok(out)
}

/// serde_json's message without its " at line 1 column N" suffix (every input line is line 1
/// to it), with the column kept.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if e.line() == 0 {
        return s;
    }
    match s.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())) {
        Some(m) => format!("{m} (column {})", e.column()),
        None => s,
    }
}

/// The text between `prefix` (which `s` must start with) and the next `close`.
fn quoted<'a>(s: &'a str, prefix: &str, close: char) -> Option<&'a str> {
    let rest = s.strip_prefix(prefix)?;
    Some(&rest[..rest.find(close)?])
}

fn path_error(line: usize, e: &serde_path_to_error::Error<serde_json::Error>) -> InputError {
    let mut segments: Vec<String> = Vec::new();
    for seg in e.path() {
        match seg {
            Segment::Seq { index } => match segments.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => segments.push(format!("[{index}]")),
            },
            Segment::Map { key } | Segment::Enum { variant: key } => segments.push(key.clone()),
            // A key that failed to parse, e.g. at the end of a truncated line: the path so far
            // says where.
            Segment::Unknown => {}
        }
    }
    let message = json_message(e.inner());
    // Errors about a key are raised by the map that holds it, so the path stops at that map:
    // add the key. (serde's own `unknown field` is raised while reading the key, which the
    // path already holds.)
    let key = quoted(&message, "unrecognized field name '", '\'')
        .or_else(|| quoted(&message, "missing field `", '`'))
        .or_else(|| quoted(&message, "duplicate field `", '`'))
        .or_else(|| {
            quoted(&message, "unknown field `", '`').filter(|k| segments.last().map(String::as_str) != Some(*k))
        });
    if let Some(key) = key {
        segments.push(key.to_owned());
    }
    InputError {
        line,
        field: (!segments.is_empty()).then(|| segments.join(".")),
        message,
    }
}

const LINE_FIELDS: &[&str] = &["tick", "event", "moves"];

/// A line as read, before the one-of-`event`-or-`moves` check.
#[derive(Default)]
struct RawLine {
    tick: Option<u64>,
    event: Option<DynamicMessage>,
    moves: Option<Vec<MoveRecord>>,
    /// Which of `event` and `moves` came last.
    later: &'static str,
}

impl<'de> Deserialize<'de> for RawLine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(LineVisitor)
    }
}

struct LineVisitor;

impl<'de> Visitor<'de> for LineVisitor {
    type Value = RawLine;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object with `event` or `moves`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLine, A::Error> {
        let mut raw = RawLine::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "tick" => {
                    if raw.tick.is_some() {
                        return Err(de::Error::duplicate_field("tick"));
                    }
                    raw.tick = Some(map.next_value()?);
                }
                "event" => {
                    if raw.event.is_some() {
                        return Err(de::Error::duplicate_field("event"));
                    }
                    raw.event = Some(map.next_value_seed(envelope_descriptor().clone())?);
                    raw.later = "event";
                }
                "moves" => {
                    if raw.moves.is_some() {
                        return Err(de::Error::duplicate_field("moves"));
                    }
                    let moves: Vec<MoveJson> = map.next_value()?;
                    raw.moves = Some(moves.into_iter().map(MoveJson::record).collect());
                    raw.later = "moves";
                }
                other => return Err(de::Error::unknown_field(other, LINE_FIELDS)),
            }
        }
        Ok(raw)
    }
}

/// One element of `moves`.
#[derive(Deserialize)]
#[serde(rename = "MoveRecord", deny_unknown_fields)]
struct MoveJson {
    uuid: JsonUuid,
    x: JsonFloat,
    y: JsonFloat,
    z: JsonFloat,
    #[serde(default)]
    yaw: JsonFloat,
    #[serde(default)]
    pitch: JsonFloat,
}

impl MoveJson {
    fn record(self) -> MoveRecord {
        MoveRecord::new(
            self.uuid.0,
            [self.x.0, self.y.0, self.z.0],
            self.yaw.0 as f32,
            self.pitch.0 as f32,
        )
    }
}

struct JsonUuid([u8; 16]);

impl<'de> Deserialize<'de> for JsonUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        fastpath::uuid_from_str(&s)
            .map(JsonUuid)
            .ok_or_else(|| de::Error::invalid_value(Unexpected::Str(&s), &"a UUID"))
    }
}

/// A number, or one of the protobuf JSON names of the non-finite values.
#[derive(Default)]
struct JsonFloat(f64);

impl<'de> Deserialize<'de> for JsonFloat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FloatVisitor).map(JsonFloat)
    }
}

struct FloatVisitor;

impl Visitor<'_> for FloatVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Output
// ------------------------------------------------------------------------------------------

/// `msg` (a generated df.plugin message whose full protobuf name is `full_name`, such as
/// `"df.plugin.EventResult"` or `"df.plugin.Action"`) in the protobuf canonical JSON mapping:
/// camelCase names, default fields omitted, enum value names, 64-bit integers as strings.
///
/// # Panics
///
/// If `full_name` is not a message of the schema, or `msg`'s encoding does not decode as one
/// (a `full_name` that does not match `M`).
pub fn message_json<M: prost::Message>(msg: &M, full_name: &str) -> serde_json::Value {
    let desc = descriptor_pool()
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is not a message of the df.plugin schema"));
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("message does not decode as {full_name}: {e}"));
    serde_json::to_value(&dynamic).expect("a message maps to JSON")
}

/// The input line (without a newline) of event `env` at tick `tick`; [`parse_line`] reads it
/// back to an equal envelope.
pub fn event_line(tick: u64, env: &proto::EventEnvelope) -> String {
    let dynamic = DynamicMessage::decode(
        envelope_descriptor().clone(),
        prost::Message::encode_to_vec(env).as_slice(),
    )
    .expect("an EventEnvelope decodes as itself");
    let mut out = Vec::new();
    write_event(&mut out, tick, &dynamic).expect("writing to a Vec");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The input line (without a newline) of `moves` at tick `tick`; [`parse_line`] reads it back
/// to equal records (non-finite values as `"NaN"`, `"Infinity"`, `"-Infinity"`).
pub fn moves_line(tick: u64, moves: &[MoveRecord]) -> String {
    let mut out = Vec::new();
    write_moves(&mut out, tick, moves).expect("writing to a Vec");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[derive(Serialize)]
struct EventOut<'a> {
    tick: u64,
    event: &'a DynamicMessage,
}

#[derive(Serialize)]
struct MovesOut<'a> {
    tick: u64,
    moves: MovesSer<'a>,
}

struct MovesSer<'a>(&'a [MoveRecord]);

impl Serialize for MovesSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for m in self.0 {
            seq.serialize_element(&MoveOut {
                uuid: UuidOut(m.uuid),
                x: FloatOut(m.x),
                y: FloatOut(m.y),
                z: FloatOut(m.z),
                yaw: Float32Out(m.yaw),
                pitch: Float32Out(m.pitch),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct MoveOut {
    uuid: UuidOut,
    x: FloatOut,
    y: FloatOut,
    z: FloatOut,
    yaw: Float32Out,
    pitch: Float32Out,
}

/// Serializes as [`fastpath::uuid_to_string`] does, without allocating.
struct UuidOut([u8; 16]);

impl Serialize for UuidOut {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&uuid::Uuid::from_bytes(self.0).hyphenated())
    }
}

fn non_finite_name(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

struct FloatOut(f64);

impl Serialize for FloatOut {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else {
            s.serialize_str(non_finite_name(self.0))
        }
    }
}

struct Float32Out(f32);

impl Serialize for Float32Out {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f32(self.0)
        } else {
            s.serialize_str(non_finite_name(f64::from(self.0)))
        }
    }
}

/// Writes the line of one event, without a newline.
fn write_event(out: &mut impl Write, tick: u64, event: &DynamicMessage) -> io::Result<()> {
    Ok(serde_json::to_writer(&mut *out, &EventOut { tick, event })?)
}

/// Writes the line of one tick's moves, without a newline.
fn write_moves(out: &mut impl Write, tick: u64, moves: &[MoveRecord]) -> io::Result<()> {
    Ok(serde_json::to_writer(
        &mut *out,
        &MovesOut {
            tick,
            moves: MovesSer(moves),
        },
    )?)
}

// ------------------------------------------------------------------------------------------
// Recorder
// ------------------------------------------------------------------------------------------

/// Items [`Recorder::create`] queues before it drops.
pub const RECORDER_QUEUE: usize = 4096;
/// Buffers the writer hands back for reuse (more are freed on the writer thread).
const SPARES: usize = 64;
/// The writer flushes after this long without an item.
const FLUSH_IDLE: Duration = Duration::from_millis(200);

enum Job {
    Event(u64, Vec<u8>),
    Moves(u64, Vec<MoveRecord>),
}

/// Writes input lines from a live host, for a later replay, without ever blocking the caller.
///
/// [`event`](Self::event) and [`moves`](Self::moves) copy their argument into a buffer (reused
/// from earlier calls once the writer has handed it back) and queue it with `try_send` on a
/// bounded channel; a writer thread converts to JSON and writes through a `BufWriter`, flushed
/// after 200 ms without items and at the end. When the queue is full (or the
/// writer stopped after an I/O error) the item is dropped and counted in
/// [`dropped`](Self::dropped). [`finish`](Self::finish) (or drop) ends the thread.
pub struct Recorder {
    tx: Option<SyncSender<Job>>,
    spare_bytes: Receiver<Vec<u8>>,
    spare_moves: Receiver<Vec<MoveRecord>>,
    /// A buffer whose item was dropped, kept for the next call.
    stash_bytes: Vec<u8>,
    stash_moves: Vec<MoveRecord>,
    dropped: u64,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("running", &self.thread.is_some())
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates (or truncates) `path` and starts the writer thread, with a queue of
    /// [`RECORDER_QUEUE`] items.
    pub fn create(path: &Path) -> io::Result<Recorder> {
        Self::with_writer(File::create(path)?, RECORDER_QUEUE)
    }

    /// A recorder writing to `out`, queueing at most `capacity` items (0: an item is accepted
    /// only while the writer waits for one).
    pub fn with_writer<W: Write + Send + 'static>(out: W, capacity: usize) -> io::Result<Recorder> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let spares = capacity.clamp(1, SPARES);
        let (bytes_back, spare_bytes) = mpsc::sync_channel(spares);
        let (moves_back, spare_moves) = mpsc::sync_channel(spares);
        let thread = std::thread::Builder::new()
            .name("plugbus-record".into())
            .spawn(move || write_loop(out, &rx, &bytes_back, &moves_back))?;
        Ok(Recorder {
            tx: Some(tx),
            spare_bytes,
            spare_moves,
            stash_bytes: Vec::new(),
            stash_moves: Vec::new(),
            dropped: 0,
            thread: Some(thread),
        })
    }

    /// Records one event at tick `tick`, given as the protobuf encoding of its
    /// `EventEnvelope`. Never blocks; drops the event if the queue is full.
    pub fn event(&mut self, tick: u64, encoded_envelope: &[u8]) {
        let mut buf = if self.stash_bytes.capacity() > 0 {
            std::mem::take(&mut self.stash_bytes)
        } else {
            self.spare_bytes.try_recv().unwrap_or_default()
        };
        buf.clear();
        buf.extend_from_slice(encoded_envelope);
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = self.send(Job::Event(tick, buf)) {
            self.dropped += 1;
            if let Job::Event(_, b) = job {
                self.stash_bytes = b;
            }
        }
    }

    /// Records the moves of tick `tick` as one line (nothing for an empty slice). Never
    /// blocks; drops them if the queue is full.
    pub fn moves(&mut self, tick: u64, moves: &[MoveRecord]) {
        if moves.is_empty() {
            return;
        }
        let mut buf = if self.stash_moves.capacity() > 0 {
            std::mem::take(&mut self.stash_moves)
        } else {
            self.spare_moves.try_recv().unwrap_or_default()
        };
        buf.clear();
        buf.extend_from_slice(moves);
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = self.send(Job::Moves(tick, buf)) {
            self.dropped += 1;
            if let Job::Moves(_, b) = job {
                self.stash_moves = b;
            }
        }
    }

    fn send(&self, job: Job) -> Result<(), TrySendError<Job>> {
        match &self.tx {
            Some(tx) => tx.try_send(job),
            None => Err(TrySendError::Disconnected(job)),
        }
    }

    /// Items dropped so far: the queue was full, or the writer had stopped on an I/O error.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes what is queued, flushes, joins the writer and returns the number of lines
    /// written, or the writer's first I/O error. Envelopes that do not decode are skipped
    /// (with a warning) and not counted.
    pub fn finish(mut self) -> io::Result<u64> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<u64> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the recorder's writer thread panicked"))),
            None => Ok(0),
        }
    }
}

impl Drop for Recorder {
    /// Finishes (see [`Recorder::finish`]), logging an I/O error.
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.stop() {
                tracing::warn!("recorder: {e}");
            }
        }
    }
}

fn write_loop<W: Write>(
    out: W,
    rx: &Receiver<Job>,
    bytes_back: &SyncSender<Vec<u8>>,
    moves_back: &SyncSender<Vec<MoveRecord>>,
) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 16, out);
    let desc = envelope_descriptor();
    let mut lines = 0u64;
    let mut dirty = false;
    loop {
        let job = match rx.recv_timeout(FLUSH_IDLE) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if dirty {
                    out.flush()?;
                    dirty = false;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match job {
            Job::Event(tick, buf) => {
                match DynamicMessage::decode(desc.clone(), buf.as_slice()) {
                    Ok(event) => {
                        write_event(&mut out, tick, &event)?;
                        out.write_all(b"\n")?;
                        lines += 1;
                        dirty = true;
                    }
                    Err(e) => tracing::warn!(tick, "recorder: skipping an envelope that does not decode: {e}"),
                }
                let _ = bytes_back.try_send(buf);
            }
            Job::Moves(tick, buf) => {
                write_moves(&mut out, tick, &buf)?;
                out.write_all(b"\n")?;
                lines += 1;
                dirty = true;
                let _ = moves_back.try_send(buf);
            }
        }
    }
    out.flush()?;
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{EventType, event_envelope::Payload};

    const UUID: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    fn env(id: &str, payload: Payload) -> proto::EventEnvelope {
        proto::EventEnvelope {
            event_id: id.into(),
            r#type: payload.event_type() as i32,
            expects_response: true,
            immediate: false,
            payload: Some(payload),
        }
    }

    fn event_of(l: Option<InputLine>) -> proto::EventEnvelope {
        match l.expect("a line").item {
            InputItem::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn err(text: &str, line: usize) -> InputError {
        parse_line(text, line).expect_err(text)
    }

    #[test]
    fn example_line_parses() {
        let text = r#"{"eventId": "7", "type": "CHAT", "expectsResponse": true, "chat": {"playerUuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "name": "Steve", "message": "hi"}}"#;
        let l = parse_line(&format!(r#"{{"tick": 3, "event": {text}}}"#), 5)
            .unwrap()
            .unwrap();
        assert_eq!((l.line, l.tick), (5, Some(3)));
        let e = event_of(Some(l));
        assert_eq!(e.event_id, "7");
        assert_eq!(e.r#type, EventType::Chat as i32);
        assert!(e.expects_response && !e.immediate);
        let Some(Payload::Chat(c)) = e.payload else {
            panic!("not a chat: {:?}", e.payload)
        };
        assert_eq!(
            (c.player_uuid.as_str(), c.name.as_str(), c.message.as_str()),
            (UUID, "Steve", "hi")
        );
        // Without a tick, and with proto field names and enum numbers (also accepted).
        let l = parse_line(r#"{"event": {"event_id": "7", "type": 18, "chat": {}}}"#, 1)
            .unwrap()
            .unwrap();
        assert_eq!(l.tick, None);
        let e = event_of(Some(l));
        assert_eq!((e.event_id.as_str(), e.r#type), ("7", EventType::Chat as i32));
        assert_eq!(e.payload, Some(Payload::Chat(Default::default())));
    }

    #[test]
    fn int64_as_string_or_number() {
        for v in [r#""-42""#, "-42"] {
            let text = format!(r#"{{"event": {{"playerHurt": {{"attackImmunityMs": {v}}}}}}}"#);
            let Some(Payload::PlayerHurt(h)) = event_of(parse_line(&text, 1).unwrap()).payload else {
                panic!("not a hurt event")
            };
            assert_eq!(h.attack_immunity_ms, -42);
        }
    }

    #[test]
    fn hand_built_events_round_trip() {
        let events = [
            env(
                "1",
                Payload::Chat(proto::ChatEvent {
                    player_uuid: UUID.into(),
                    name: "Steve".into(),
                    message: "hi \"there\"\n✓".into(),
                }),
            ),
            env(
                "2",
                Payload::Command(proto::CommandEvent {
                    player_uuid: UUID.into(),
                    name: "Alex".into(),
                    raw: "/tp 1 2 3".into(),
                    command: "tp".into(),
                    args: vec!["1".into(), "2".into(), "3".into()],
                }),
            ),
            env(
                "3",
                Payload::PlayerJoin(proto::PlayerJoinEvent {
                    player_uuid: UUID.into(),
                    name: "Steve".into(),
                    world: Some(Default::default()),
                }),
            ),
            env(
                "4",
                Payload::PlayerQuit(proto::PlayerQuitEvent {
                    player_uuid: UUID.into(),
                    name: "Steve".into(),
                }),
            ),
            env(
                "18446744073709551615",
                Payload::PlayerMove(proto::PlayerMoveEvent {
                    player_uuid: UUID.into(),
                    name: "Steve".into(),
                    world: "overworld".into(),
                    position: Some(proto::Vec3 {
                        x: 0.1,
                        y: -64.0,
                        z: 1e300,
                    }),
                    rotation: Some(proto::Rotation { yaw: 90.1, pitch: -0.0 }),
                }),
            ),
            // Defaults everywhere, the payload set but empty: must stay set.
            proto::EventEnvelope {
                payload: Some(Payload::PlayerQuit(Default::default())),
                ..Default::default()
            },
            proto::EventEnvelope::default(),
        ];
        for (i, e) in events.iter().enumerate() {
            let text = event_line(i as u64 * 1000, e);
            assert!(!text.contains('\n'), "{text}");
            let back = parse_line(&text, i + 1).unwrap().unwrap();
            assert_eq!(back.tick, Some(i as u64 * 1000));
            assert_eq!(&event_of(Some(back)), e, "{text}");
        }
        assert!(
            event_line(1, &events[0])
                .starts_with(r#"{"tick":1,"event":{"eventId":"1","type":"CHAT","expectsResponse":true,"chat":{"#)
        );
    }

    #[test]
    fn non_finite_floats_round_trip() {
        let e = env(
            "1",
            Payload::PlayerMove(proto::PlayerMoveEvent {
                position: Some(proto::Vec3 {
                    x: f64::NAN,
                    y: f64::INFINITY,
                    z: f64::NEG_INFINITY,
                }),
                ..Default::default()
            }),
        );
        let Some(Payload::PlayerMove(m)) = event_of(parse_line(&event_line(0, &e), 1).unwrap()).payload else {
            panic!("not a move")
        };
        let p = m.position.unwrap();
        assert!(p.x.is_nan() && p.y == f64::INFINITY && p.z == f64::NEG_INFINITY);

        let moves = [MoveRecord::new(
            [1; 16],
            [f64::NAN, f64::INFINITY, f64::NEG_INFINITY],
            f32::NAN,
            f32::INFINITY,
        )];
        let InputItem::Moves(back) = parse_line(&moves_line(0, &moves), 1).unwrap().unwrap().item else {
            panic!("not moves")
        };
        let r = back[0];
        assert!(r.x.is_nan() && r.y == f64::INFINITY && r.z == f64::NEG_INFINITY && r.yaw.is_nan());
        assert_eq!(r.pitch, f32::INFINITY);
    }

    #[test]
    fn moves_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in [0usize, 1, 3, 200] {
            let moves: Vec<MoveRecord> = (0..n)
                .map(|_| {
                    let mut uuid = [0u8; 16];
                    uuid[..8].copy_from_slice(&next().to_le_bytes());
                    uuid[8..].copy_from_slice(&next().to_le_bytes());
                    // Arbitrary finite bit patterns, not only "nice" decimals.
                    let f = |b: u64| {
                        let v = f64::from_bits(b);
                        if v.is_finite() { v } else { b as f64 }
                    };
                    let g = |b: u64| {
                        let v = f32::from_bits(b as u32);
                        if v.is_finite() { v } else { (b >> 40) as f32 }
                    };
                    MoveRecord::new(uuid, [f(next()), f(next()), -1.25], g(next()), g(next()))
                })
                .collect();
            let text = moves_line(u64::MAX, &moves);
            let l = parse_line(&text, 9).unwrap().unwrap();
            assert_eq!((l.line, l.tick), (9, Some(u64::MAX)));
            let InputItem::Moves(back) = l.item else {
                panic!("not moves")
            };
            assert_eq!(back.len(), moves.len());
            for (a, b) in back.iter().zip(&moves) {
                assert_eq!(a.uuid, b.uuid);
                assert_eq!(
                    [a.x.to_bits(), a.y.to_bits(), a.z.to_bits()],
                    [b.x.to_bits(), b.y.to_bits(), b.z.to_bits()],
                    "{text}"
                );
                assert_eq!(
                    [a.yaw.to_bits(), a.pitch.to_bits()],
                    [b.yaw.to_bits(), b.pitch.to_bits()],
                    "{text}"
                );
            }
        }
        // The written form, and a hand-written one with defaults and another UUID form.
        let m = MoveRecord::new(fastpath::uuid_from_str(UUID).unwrap(), [1.5, 64.0, -3.0], 90.0, 0.0);
        assert_eq!(
            moves_line(4, &[m]),
            format!(r#"{{"tick":4,"moves":[{{"uuid":"{UUID}","x":1.5,"y":64.0,"z":-3.0,"yaw":90.0,"pitch":0.0}}]}}"#)
        );
        let l = parse_line(
            r#"{"moves": [{"uuid": "6ba7b8109dad11d180b400c04fd430c8", "x": 1.5, "y": 64, "z": -3}]}"#,
            1,
        );
        let back = l.unwrap().unwrap();
        assert_eq!(
            (back.tick, back.item),
            (None, InputItem::Moves(vec![MoveRecord { yaw: 0.0, ..m }]))
        );
    }

    #[test]
    fn blank_lines() {
        assert_eq!(parse_line("", 1), Ok(None));
        assert_eq!(parse_line("  \t\r\n", 1), Ok(None));
        let input = "\n{\"moves\": []}\r\n\n  \n{\"tick\": 2, \"moves\": []}\n";
        let lines = parse_input(input.as_bytes()).unwrap();
        assert_eq!(
            lines,
            vec![
                InputLine {
                    line: 2,
                    tick: None,
                    item: InputItem::Moves(vec![])
                },
                InputLine {
                    line: 5,
                    tick: Some(2),
                    item: InputItem::Moves(vec![])
                },
            ]
        );
    }

    /// (line text, expected field, a piece of the expected message)
    const BAD: &[(&str, Option<&str>, &str)] = &[
        (
            r#"{"event": {"chat": {"mesage": "hi"}}}"#,
            Some("event.chat.mesage"),
            "unrecognized field name 'mesage'",
        ),
        (
            r#"{"event": {"chat": {"message": 5}}}"#,
            Some("event.chat.message"),
            "invalid type: integer `5`",
        ),
        (
            r#"{"event": {"type": "CHATTER"}}"#,
            Some("event.type"),
            "unrecognized enum value 'CHATTER'",
        ),
        (
            r#"{"event": {"typo": 1}}"#,
            Some("event.typo"),
            "unrecognized field name",
        ),
        (
            r#"{"event": {"command": {"args": ["a", 7]}}}"#,
            Some("event.command.args[1]"),
            "invalid type: integer `7`",
        ),
        (
            r#"{"event": {"playerHurt": {"attackImmunityMs": "soon"}}}"#,
            Some("event.playerHurt.attackImmunityMs"),
            "",
        ),
        (
            r#"{"event": {"chat": {}, "command": {}}}"#,
            Some("event"),
            "multiple fields provided for oneof 'payload'",
        ),
        (r#"{"event": 3}"#, Some("event"), "invalid type: integer `3`"),
        (
            r#"{"moves": [{"uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "x": 1, "y": 2, "z": 3}, {"uuid": "x", "x": 1, "y": 2, "z": 3}]}"#,
            Some("moves[1].uuid"),
            "invalid value: string \"x\", expected a UUID",
        ),
        (
            r#"{"moves": [{"uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "x": 1, "y": 2}]}"#,
            Some("moves[0].z"),
            "missing field `z`",
        ),
        (
            r#"{"moves": [{"uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "x": 1, "y": 2, "z": 3, "w": 4}]}"#,
            Some("moves[0].w"),
            "unknown field `w`",
        ),
        (
            r#"{"moves": [{"uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "x": true, "y": 2, "z": 3}]}"#,
            Some("moves[0].x"),
            "invalid type: boolean `true`",
        ),
        (r#"{"moves": {}}"#, Some("moves"), "invalid type: map"),
        (
            r#"{"tick": -1, "moves": []}"#,
            Some("tick"),
            "invalid value: integer `-1`",
        ),
        (r#"{"tick": "1", "moves": []}"#, Some("tick"), "invalid type: string"),
        (
            r#"{"tick": 1, "tick": 2, "moves": []}"#,
            Some("tick"),
            "duplicate field `tick`",
        ),
        (r#"{"moves": [], "color": 1}"#, Some("color"), "unknown field `color`"),
        (r#"{"moves": [], "event": {}}"#, Some("event"), "not both"),
        (r#"{"event": {}, "moves": []}"#, Some("moves"), "not both"),
        (r#"{"tick": 1}"#, None, "needs an `event` or a `moves`"),
        (r#"[1]"#, None, "expected a JSON object"),
        (r#"{"moves": []} x"#, None, "trailing characters (column 15)"),
        (
            r#"{"event": {"chat": {"message": "hi""#,
            Some("event.chat"),
            "EOF while parsing an object",
        ),
    ];

    #[test]
    fn errors_name_line_and_field() {
        for (i, (text, field, piece)) in BAD.iter().enumerate() {
            let line = 3 + i * 7;
            let e = err(text, line);
            assert_eq!(e.line, line, "{text}: {e}");
            assert_eq!(e.field.as_deref(), *field, "{text}: {e}");
            assert!(e.message.contains(piece), "{text}: {e}");
            let shown = e.to_string();
            match field {
                Some(f) => assert!(shown.starts_with(&format!("line {line}: field `{f}`: ")), "{shown}"),
                None => assert!(shown.starts_with(&format!("line {line}: ")) && !shown.contains("field `")),
            }
        }
        assert_eq!(
            err(r#"{"event": {"chat": {"mesage": "hi"}}}"#, 3).to_string(),
            "line 3: field `event.chat.mesage`: unrecognized field name 'mesage' (column 28)"
        );
    }

    #[test]
    fn parse_input_is_all_or_nothing() {
        let good = event_line(1, &env("1", Payload::Chat(Default::default())));
        let input = format!("{good}\n\n{good}\n{}\n{good}\n", BAD[0].0);
        let e = parse_input(input.as_bytes()).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (4, Some("event.chat.mesage")));
        // Invalid UTF-8 on line 2.
        let mut bytes = format!("{good}\n").into_bytes();
        bytes.extend_from_slice(b"{\"moves\": [\xff]}\n");
        let e = parse_input(bytes.as_slice()).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (2, None));
        assert!(e.message.starts_with("read error: "), "{e}");
        let lines = parse_input(format!("{good}\n{good}").as_bytes()).unwrap();
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn message_json_maps_any_message() {
        let r = proto::EventResult {
            event_id: "9".into(),
            cancel: Some(true),
            ..Default::default()
        };
        let v = message_json(&r, "df.plugin.EventResult");
        assert_eq!(v, serde_json::json!({"eventId": "9", "cancel": true}));
        let e = env("5", Payload::Chat(Default::default()));
        assert_eq!(
            message_json(&e, ENVELOPE),
            serde_json::json!({"eventId": "5", "type": "CHAT", "expectsResponse": true, "chat": {}})
        );
    }

    #[test]
    #[should_panic(expected = "not a message of the df.plugin schema")]
    fn message_json_unknown_name_panics() {
        message_json(&proto::EventResult::default(), "df.plugin.NoSuchThing");
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("plugbus-jsonl-{}-{name}.jsonl", std::process::id()))
    }

    #[test]
    fn recorder_writes_what_parse_input_reads() {
        let path = temp_path("unit");
        let events: Vec<proto::EventEnvelope> = (0..50)
            .map(|i| {
                env(
                    &i.to_string(),
                    Payload::Chat(proto::ChatEvent {
                        player_uuid: UUID.into(),
                        name: format!("p{i}"),
                        message: "x".repeat(i),
                    }),
                )
            })
            .collect();
        let moves = [MoveRecord::new([3; 16], [1.0, 2.0, 3.0], 4.0, 5.0)];
        let mut rec = Recorder::create(&path).unwrap();
        let mut buf = Vec::new();
        for (i, e) in events.iter().enumerate() {
            buf.clear();
            prost::Message::encode(e, &mut buf).unwrap();
            rec.event(i as u64 / 10, &buf);
            if i % 10 == 9 {
                rec.moves(i as u64 / 10, &moves);
                rec.moves(i as u64 / 10, &[]);
            }
        }
        rec.event(99, b"\xff\xff not an envelope");
        assert_eq!(rec.dropped(), 0);
        assert_eq!(rec.finish().unwrap(), 55);

        let lines = parse_input(io::BufReader::new(File::open(&path).unwrap())).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut expected = Vec::new();
        for (i, e) in events.iter().enumerate() {
            expected.push((Some(i as u64 / 10), InputItem::Event(e.clone())));
            if i % 10 == 9 {
                expected.push((Some(i as u64 / 10), InputItem::Moves(moves.to_vec())));
            }
        }
        let got: Vec<_> = lines.into_iter().map(|l| (l.tick, l.item)).collect();
        assert_eq!(got, expected);
    }

    /// A writer that blocks in `write` until the test releases it.
    struct Gate {
        entered: mpsc::Sender<()>,
        release: Receiver<()>,
        inner: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            self.inner.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn recorder_drops_instead_of_blocking() {
        let (entered_tx, entered) = mpsc::channel();
        let (release_tx, release) = mpsc::channel();
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let gate = Gate {
            entered: entered_tx,
            release,
            inner: written.clone(),
        };
        let mut rec = Recorder::with_writer(gate, 4).unwrap();
        let m = |i: u8| [MoveRecord::new([i; 16], [f64::from(i), 0.0, 0.0], 0.0, 0.0)];
        // The first item reaches the writer, which blocks in its idle flush.
        rec.moves(0, &m(0));
        entered.recv().unwrap();
        let start = std::time::Instant::now();
        for i in 1..=10 {
            rec.moves(u64::from(i), &m(i));
        }
        assert!(start.elapsed() < Duration::from_secs(1), "the caller blocked");
        assert_eq!(rec.dropped(), 6);
        // Release every write from now on.
        drop(release_tx);
        assert_eq!(rec.finish().unwrap(), 5);
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines = parse_input(text.as_bytes()).unwrap();
        let ticks: Vec<_> = lines.iter().map(|l| l.tick.unwrap()).collect();
        assert_eq!(ticks, [0, 1, 2, 3, 4]);
        assert_eq!(lines[4].item, InputItem::Moves(m(4).to_vec()));
    }

    #[test]
    fn recorder_reports_io_errors() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut rec = Recorder::with_writer(Broken, 8).unwrap();
        rec.moves(1, &[MoveRecord::default()]);
        let e = rec.finish().unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }
}
