//! Envelopes on the rings: prost messages encoded straight into reserved frames, pools so that
//! steady state allocates nothing, per-tick batches, and decoding into reused messages.
//!
//! Frame kinds on the control and replies rings:
//! - [`KIND_HOST_TO_PLUGIN`]: one `df.plugin.HostToPlugin` message (a single event, a batch of
//!   events as `HostToPlugin.events`, a hello, a shutdown, an action result);
//! - [`KIND_PLUGIN_TO_HOST`]: one `df.plugin.PluginToHost` message;
//! - [`crate::fastpath::KIND_MOVES`] (moves ring): a packed move frame.
//!
//! Every frame payload is a complete df.plugin message, so any df.plugin decoder reads it.
//!
//! ```
//! use plugbus::codec::{self, EnvelopePool, HostDecoder, HostMessage};
//! use plugbus::proto::{self, event_envelope::Payload, EventType};
//! use plugbus::ring::{frame, RegionRef};
//!
//! let (mut tx, mut rx) = frame::channel(RegionRef::heap(frame::region_size(4096))).unwrap();
//! let mut pool = EnvelopePool::default();
//! let mut env = pool.take(EventType::Chat);
//! if let Some(Payload::Chat(chat)) = &mut env.payload {
//!     chat.message.push_str("hello");
//! }
//! codec::encode_event_in_ring(&mut tx, &env).unwrap();
//! pool.give(env);
//!
//! let mut decoder = HostDecoder::default();
//! let f = rx.try_read().unwrap().unwrap();
//! decoder.decode(f.payload(), |m| match m {
//!     HostMessage::Event(e) => assert!(matches!(&e.payload, Some(Payload::Chat(c)) if c.message == "hello")),
//!     HostMessage::Other(_) => unreachable!(),
//! }).unwrap();
//! ```

mod batch;
mod pool;

pub use batch::{BatchBuilder, BatchLimits, encode_body};
pub use pool::{BufferPool, EnvelopePool, PoolStats};

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{DecodeContext, WireType, decode_key, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::proto::{self, EventEnvelope, HostToPlugin, PluginToHost};
use crate::ring::frame::{self, ReserveError};

/// Frame kind: a `df.plugin.HostToPlugin` message.
pub const KIND_HOST_TO_PLUGIN: u32 = 1;
/// Frame kind: a `df.plugin.PluginToHost` message.
pub const KIND_PLUGIN_TO_HOST: u32 = 2;

/// `HostToPlugin.event` field number.
pub const HOST_TO_PLUGIN_EVENT: u32 = 20;
/// `HostToPlugin.events` (EventBatch) field number.
pub const HOST_TO_PLUGIN_EVENTS: u32 = 22;
/// `EventBatch.events` field number.
pub const EVENT_BATCH_EVENTS: u32 = 1;

/// Why a message could not be written to a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The ring refused the frame (full, too large, or broken).
    #[error(transparent)]
    Ring(#[from] ReserveError),
}

/// Why a frame's bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The protobuf bytes are malformed.
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A length inside the frame runs past its end, or a required field is missing.
    #[error("malformed frame: {0}")]
    Framing(&'static str),
}

/// Encodes `msg` as one frame of `kind`: encoded length, reserve, encode in place, commit. No
/// intermediate buffer.
#[inline]
pub fn encode_in_ring<M: Message>(producer: &mut frame::Producer, kind: u32, msg: &M) -> Result<usize, EncodeError> {
    let len = msg.encoded_len();
    let mut grant = producer.try_reserve(len)?;
    let mut out: &mut [u8] = grant.bytes_mut();
    msg.encode_raw(&mut out);
    debug_assert!(out.is_empty(), "encoded_len and encode_raw disagree");
    grant.commit(kind);
    Ok(len)
}

/// Length of `msg` encoded as field `tag` of an enclosing message (key, length, body).
#[inline]
pub fn field_len<M: Message>(tag: u32, msg: &M) -> usize {
    let body = msg.encoded_len();
    key_len(tag) + encoded_len_varint(body as u64) + body
}

/// Encodes `msg` as field `tag` of an enclosing message into one frame of `kind`: the frame is
/// then a valid enclosing message holding only that field (e.g. `HostToPlugin { event }`),
/// without building the enclosing message.
#[inline]
pub fn encode_field_in_ring<M: Message>(
    producer: &mut frame::Producer,
    kind: u32,
    tag: u32,
    msg: &M,
) -> Result<usize, EncodeError> {
    let body = msg.encoded_len();
    let len = key_len(tag) + encoded_len_varint(body as u64) + body;
    let mut grant = producer.try_reserve(len)?;
    let mut out: &mut [u8] = grant.bytes_mut();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(body as u64, &mut out);
    msg.encode_raw(&mut out);
    debug_assert!(out.is_empty(), "encoded_len and encode_raw disagree");
    grant.commit(kind);
    Ok(len)
}

/// Writes one event as a `HostToPlugin { event }` frame, encoded in place.
#[inline]
pub fn encode_event_in_ring(producer: &mut frame::Producer, env: &EventEnvelope) -> Result<usize, EncodeError> {
    encode_field_in_ring(producer, KIND_HOST_TO_PLUGIN, HOST_TO_PLUGIN_EVENT, env)
}

/// Writes `body` (an already encoded message) as field `tag` of an enclosing message, into one
/// frame of `kind`: used to send one encoding to several plugins.
#[inline]
pub fn write_field_frame(producer: &mut frame::Producer, kind: u32, tag: u32, body: &[u8]) -> Result<(), ReserveError> {
    let len = key_len(tag) + encoded_len_varint(body.len() as u64) + body.len();
    let mut grant = producer.try_reserve(len)?;
    let mut out: &mut [u8] = grant.bytes_mut();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(body.len() as u64, &mut out);
    out.copy_from_slice(body);
    grant.commit(kind);
    Ok(())
}

/// A message that can be decoded into again without giving back its allocations: the oneof
/// keeps its variant (and that variant's strings keep their capacity).
pub trait Reusable: Message {
    /// Resets every field to its default, keeping the oneof variant (with cleared contents).
    fn reset_keep(&mut self);
    /// The field number of the oneof variant present, if any.
    fn oneof_number(&self) -> Option<i32>;
    /// Removes the oneof variant.
    fn clear_oneof(&mut self);
    /// Lowest field number of the oneof (every known field at or above it belongs to the oneof;
    /// a field unknown to this schema may have any number).
    const ONEOF_MIN: u32 = 10;
    /// Moves the strings that [`Reusable::reset_keep`] would drop (an `optional string`'s
    /// value, the items of a `repeated string`, where this type reuses them) into `spare`.
    #[inline]
    fn keep_strings(&mut self, _spare: &mut StringSpare) {}
    /// Merges one field, as `merge_field` does, taking the strings it needs from `spare`.
    #[inline]
    fn merge_field_keep(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut &[u8],
        _spare: &mut StringSpare,
    ) -> Result<(), DecodeError>
    where
        Self: Sized,
    {
        Ok(self.merge_field(tag, wire_type, buf, DecodeContext::default())?)
    }
}

/// Most strings a [`StringSpare`] keeps.
const MAX_SPARE_STRINGS: usize = 64;

/// Strings taken out of messages as they are reset for reuse, handed to the next decode that
/// needs one: prost's reset drops an `optional string`'s value and the items of a `repeated
/// string`, and its merge allocates them anew. With a spare, a chat mutation's text and a
/// command's arguments decode without allocating in steady state. Holds at most 64 strings.
#[derive(Debug)]
pub struct StringSpare {
    strings: Vec<String>,
    max: usize,
}

impl Default for StringSpare {
    fn default() -> Self {
        Self {
            strings: Vec::new(),
            max: MAX_SPARE_STRINGS,
        }
    }
}

impl StringSpare {
    /// A spare that keeps nothing (what [`decode_reuse`] uses).
    pub const fn none() -> Self {
        Self {
            strings: Vec::new(),
            max: 0,
        }
    }

    /// Keeps `s` (cleared) for a later decode, if it has storage and there is room.
    #[inline]
    pub fn give(&mut self, mut s: String) {
        if s.capacity() > 0 && self.strings.len() < self.max {
            s.clear();
            self.strings.push(s);
        }
    }

    /// Keeps every string of `v`, leaving it empty.
    #[inline]
    pub fn give_all(&mut self, v: &mut Vec<String>) {
        for s in v.drain(..) {
            self.give(s);
        }
    }

    /// An empty string, with storage if one was kept.
    #[inline]
    pub fn take(&mut self) -> String {
        self.strings.pop().unwrap_or_default()
    }
}

/// Merges the body of the length-delimited field whose key was just read from `buf` into `m`,
/// field by field through `merge` (what prost's nested-message merge does, with a merge of our
/// own per field).
#[inline]
fn merge_nested_keep<T>(
    m: &mut T,
    buf: &mut &[u8],
    mut merge: impl FnMut(&mut T, u32, WireType, &mut &[u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut body = take_len_delimited(buf, "nested message runs past its field")?;
    while body.has_remaining() {
        let (tag, wire_type) = decode_key(&mut body)?;
        merge(m, tag, wire_type, &mut body)?;
    }
    Ok(())
}

/// Merges string field `field` of `m` into the string `slot` gives (taken from the spare),
/// and any other field as prost merges it. `ChatMutation.message` (optional) and
/// `CommandEvent.args` (repeated) are merged with it, each with its own `slot`.
#[inline]
fn merge_string_keep<M: Message>(
    m: &mut M,
    field: u32,
    slot: impl for<'m> FnOnce(&'m mut M, &mut StringSpare) -> &'m mut String,
    (tag, wire_type): (u32, WireType),
    buf: &mut &[u8],
    spare: &mut StringSpare,
) -> Result<(), DecodeError> {
    if tag == field && wire_type == WireType::LengthDelimited {
        prost::encoding::string::merge(wire_type, slot(m, spare), buf, DecodeContext::default())?;
        return Ok(());
    }
    Ok(m.merge_field(tag, wire_type, buf, DecodeContext::default())?)
}

/// `ChatMutation.message` field number.
const CHAT_MUTATION_MESSAGE: u32 = 1;
/// `CommandEvent.args` field number.
const COMMAND_EVENT_ARGS: u32 = 5;
/// `EventResult.chat` field number.
const EVENT_RESULT_CHAT: u32 = 10;
/// `EventEnvelope.command` field number.
const EVENT_ENVELOPE_COMMAND: u32 = 45;
/// `PluginToHost.event_result` field number.
const PLUGIN_TO_HOST_EVENT_RESULT: u32 = 40;

/// The body of `merge_field_keep` for a type whose oneof has one variant that keeps strings:
/// field `$number` (that variant) is merged field by field with `$merge`, taking strings from
/// the spare; any other field as prost merges it.
macro_rules! merge_variant_keep {
    ($this:ident, $tag:ident, $wire_type:ident, $buf:ident, $spare:ident, $number:expr, $oneof:ident, $variant:path, $merge:expr) => {{
        if $tag != $number || $wire_type != WireType::LengthDelimited {
            return Ok($this.merge_field($tag, $wire_type, $buf, DecodeContext::default())?);
        }
        // As prost merges a oneof field: into the variant if present, else into a new one.
        if !matches!($this.$oneof, Some($variant(_))) {
            $this.$oneof = Some($variant(Default::default()));
        }
        let Some($variant(m)) = &mut $this.$oneof else {
            unreachable!("set above")
        };
        merge_nested_keep(m, $buf, |m, t, w, b| $merge(m, t, w, b, $spare))
    }};
}

macro_rules! reusable {
    ($ty:ty, $field:ident, |$this:ident| { $($reset:tt)* } $($extra:item)*) => {
        impl Reusable for $ty {
            $($extra)*
            #[inline]
            fn reset_keep(&mut self) {
                let $this = self;
                $($reset)*
                if let Some(v) = &mut $this.$field {
                    v.reset_keep();
                }
            }
            #[inline]
            fn oneof_number(&self) -> Option<i32> {
                self.$field.as_ref().map(|v| v.field_number())
            }
            #[inline]
            fn clear_oneof(&mut self) {
                self.$field = None;
            }
        }
    };
}

reusable!(EventEnvelope, payload, |this| {
    this.event_id.clear();
    this.r#type = 0;
    this.expects_response = false;
    this.immediate = false;
}
    fn keep_strings(&mut self, spare: &mut StringSpare) {
        if let Some(proto::event_envelope::Payload::Command(c)) = &mut self.payload {
            spare.give_all(&mut c.args);
        }
    }
    fn merge_field_keep(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut &[u8],
        spare: &mut StringSpare,
    ) -> Result<(), DecodeError> {
        merge_variant_keep!(self, tag, wire_type, buf, spare, EVENT_ENVELOPE_COMMAND, payload, proto::event_envelope::Payload::Command, |c: &mut proto::CommandEvent, t, w, b, spare| {
            merge_string_keep(
                c,
                COMMAND_EVENT_ARGS,
                |c, spare| {
                    c.args.push(spare.take());
                    let last = c.args.len() - 1;
                    &mut c.args[last]
                },
                (t, w),
                b,
                spare,
            )
        })
    }
);
reusable!(HostToPlugin, payload, |this| {
    this.plugin_id.clear();
});
reusable!(PluginToHost, payload, |this| {
    this.plugin_id.clear();
}
    fn keep_strings(&mut self, spare: &mut StringSpare) {
        if let Some(proto::plugin_to_host::Payload::EventResult(r)) = &mut self.payload {
            r.keep_strings(spare);
        }
    }
    fn merge_field_keep(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut &[u8],
        spare: &mut StringSpare,
    ) -> Result<(), DecodeError> {
        merge_variant_keep!(self, tag, wire_type, buf, spare, PLUGIN_TO_HOST_EVENT_RESULT, payload, proto::plugin_to_host::Payload::EventResult, <proto::EventResult as Reusable>::merge_field_keep)
    }
);
reusable!(proto::EventResult, update, |this| {
    this.event_id.clear();
    this.cancel = None;
}
    fn keep_strings(&mut self, spare: &mut StringSpare) {
        if let Some(proto::event_result::Update::Chat(c)) = &mut self.update {
            if let Some(s) = c.message.take() {
                spare.give(s);
            }
        }
    }
    fn merge_field_keep(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut &[u8],
        spare: &mut StringSpare,
    ) -> Result<(), DecodeError> {
        merge_variant_keep!(self, tag, wire_type, buf, spare, EVENT_RESULT_CHAT, update, proto::event_result::Update::Chat, |c: &mut proto::ChatMutation, t, w, b, spare| {
            merge_string_keep(
                c,
                CHAT_MUTATION_MESSAGE,
                |c, spare| c.message.get_or_insert_with(|| spare.take()),
                (t, w),
                b,
                spare,
            )
        })
    }
);
reusable!(proto::Action, kind, |this| {
    this.correlation_id = None;
});
reusable!(proto::ActionResult, result, |this| {
    this.correlation_id.clear();
    this.status = None;
});

/// Decodes `bytes` into `msg`, reusing its allocations: the result equals a fresh decode.
///
/// Plain `Message::decode` builds a new message, and `clear` + `merge` would drop the oneof's
/// variant (and its strings). This resets fields in place, merges, and then fixes the one case
/// where reuse differs from a fresh decode: a oneof variant left over that the input did not
/// carry.
///
/// The input set the oneof when merging a field left that field's number as the variant; a
/// field this schema does not know (from a newer peer) is skipped by the merge and does not
/// count, even when its number is at or above [`Reusable::ONEOF_MIN`].
pub fn decode_reuse<M: Reusable>(msg: &mut M, bytes: &[u8]) -> Result<(), DecodeError> {
    decode_reuse_spare(msg, bytes, &mut StringSpare::none())
}

/// [`decode_reuse`] that also keeps the strings a reset would drop (see [`StringSpare`]) and
/// takes the strings the decode needs from `spare`.
pub fn decode_reuse_spare<M: Reusable>(
    msg: &mut M,
    mut bytes: &[u8],
    spare: &mut StringSpare,
) -> Result<(), DecodeError> {
    msg.keep_strings(spare);
    msg.reset_keep();
    let mut oneof_seen = false;
    while bytes.has_remaining() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        msg.merge_field_keep(tag, wire_type, &mut bytes, spare)?;
        if tag >= M::ONEOF_MIN && msg.oneof_number() == i32::try_from(tag).ok() {
            oneof_seen = true;
        }
    }
    if !oneof_seen {
        msg.clear_oneof();
    }
    Ok(())
}

/// Merges `bytes` (an encoding of `M`, or of some of its fields) into `msg` as prost's `merge`
/// does, taking the strings it needs from `spare`.
pub fn merge_keep<M: Reusable>(msg: &mut M, mut bytes: &[u8], spare: &mut StringSpare) -> Result<(), DecodeError> {
    while bytes.has_remaining() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        msg.merge_field_keep(tag, wire_type, &mut bytes, spare)?;
    }
    Ok(())
}

/// Whether `tag` is a variant of `HostToPlugin.payload`.
fn is_host_to_plugin_variant(tag: u32) -> bool {
    i32::try_from(tag)
        .ok()
        .and_then(proto::host_to_plugin::Payload::default_for)
        .is_some()
}

/// Whether `tag` is a variant of `EventEnvelope.payload`.
fn is_event_payload_variant(tag: u32) -> bool {
    i32::try_from(tag)
        .ok()
        .and_then(proto::event_envelope::Payload::default_for)
        .is_some()
}

/// The field number of the oneof variant `bytes` (an encoded [`Reusable`] message) carries, if
/// any: the last field that `is_variant` accepts, as a decoder would keep. Fields this schema
/// does not know are skipped, as a decoder skips them.
fn peek_oneof(mut bytes: &[u8], is_variant: fn(u32) -> bool) -> Result<Option<u32>, DecodeError> {
    let mut last = None;
    while bytes.has_remaining() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        if is_variant(tag) {
            last = Some(tag);
        }
        prost::encoding::skip_field(wire_type, tag, &mut bytes, DecodeContext::default())?;
    }
    Ok(last)
}

/// What a plugin receives on its control ring, lent to a callback.
#[derive(Debug)]
pub enum HostMessage<'a> {
    /// One event (alone, or one of a batch, in order).
    Event(&'a EventEnvelope),
    /// Anything else: hello, shutdown, action result, server info.
    Other(&'a HostToPlugin),
}

/// Most distinct event payload field numbers kept decoded (one reusable envelope each).
const SLOTS: usize = 128;

/// Decodes encoded `EventEnvelope`s without allocating in steady state: each into a reusable
/// envelope kept per payload type (a string or message a type once needed keeps its storage
/// for the next event of that type).
pub struct EnvelopeDecoder {
    slots: Vec<Option<EventEnvelope>>,
    spare: StringSpare,
}

impl Default for EnvelopeDecoder {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| None).collect(),
            spare: StringSpare::default(),
        }
    }
}

impl std::fmt::Debug for EnvelopeDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeDecoder").finish_non_exhaustive()
    }
}

impl EnvelopeDecoder {
    /// Decodes `body` (an encoded `EventEnvelope`); the envelope is lent until the next call.
    /// Equal to a fresh `EventEnvelope::decode`.
    pub fn decode(&mut self, body: &[u8]) -> Result<&mut EventEnvelope, DecodeError> {
        let number = peek_oneof(body, is_event_payload_variant)?.unwrap_or(0);
        let slot = &mut self.slots[(number as usize).min(SLOTS - 1)];
        let env = slot.get_or_insert_with(|| EventEnvelope {
            payload: proto::event_envelope::Payload::default_for(number as i32),
            ..Default::default()
        });
        decode_reuse_spare(env, body, &mut self.spare)?;
        Ok(env)
    }
}

/// Plugin-side decoder of `HostToPlugin` frames that allocates nothing in steady state: each
/// event is decoded by an [`EnvelopeDecoder`], handed to the callback, and kept for the next
/// event of that type; batches are walked in place without building an `EventBatch`.
#[derive(Default)]
pub struct HostDecoder {
    events: EnvelopeDecoder,
    other: HostToPlugin,
}

impl std::fmt::Debug for HostDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDecoder").finish_non_exhaustive()
    }
}

impl HostDecoder {
    /// Decodes one `HostToPlugin` frame payload, calling `f` for each message in order (each
    /// event of a batch separately). Returns the number of events.
    pub fn decode(&mut self, bytes: &[u8], mut f: impl FnMut(HostMessage<'_>)) -> Result<usize, DecodeError> {
        self.decode_raw(bytes, |m, _| f(m))
    }

    /// Like [`HostDecoder::decode`], also lending the encoded bytes of each message: an event's
    /// `EventEnvelope` encoding, or the whole `HostToPlugin` for other messages (for callers
    /// that hand the bytes on, such as the C API).
    pub fn decode_raw(
        &mut self,
        bytes: &[u8],
        mut f: impl FnMut(HostMessage<'_>, &[u8]),
    ) -> Result<usize, DecodeError> {
        match peek_oneof(bytes, is_host_to_plugin_variant)? {
            Some(HOST_TO_PLUGIN_EVENT) => {
                let body = last_field(bytes, HOST_TO_PLUGIN_EVENT)?;
                self.event(body, &mut f)?;
                Ok(1)
            }
            Some(HOST_TO_PLUGIN_EVENTS) => {
                let mut batch = last_field(bytes, HOST_TO_PLUGIN_EVENTS)?;
                let mut n = 0;
                while batch.has_remaining() {
                    let (tag, wire_type) = decode_key(&mut batch)?;
                    if tag == EVENT_BATCH_EVENTS && wire_type == WireType::LengthDelimited {
                        let len = prost::encoding::decode_varint(&mut batch)?;
                        let len = usize::try_from(len)
                            .ok()
                            .filter(|&l| l <= batch.len())
                            .ok_or(DecodeError::Framing("event batch entry runs past the frame"))?;
                        let (body, rest) = batch.split_at(len);
                        batch = rest;
                        self.event(body, &mut f)?;
                        n += 1;
                    } else {
                        prost::encoding::skip_field(wire_type, tag, &mut batch, DecodeContext::default())?;
                    }
                }
                Ok(n)
            }
            _ => {
                decode_reuse(&mut self.other, bytes)?;
                f(HostMessage::Other(&self.other), bytes);
                Ok(0)
            }
        }
    }

    fn event(&mut self, body: &[u8], f: &mut impl FnMut(HostMessage<'_>, &[u8])) -> Result<(), DecodeError> {
        let env = self.events.decode(body)?;
        f(HostMessage::Event(env), body);
        Ok(())
    }
}

/// The body of the last occurrence of length-delimited field `tag` in `bytes`.
fn last_field(mut bytes: &[u8], tag: u32) -> Result<&[u8], DecodeError> {
    let mut found: Option<&[u8]> = None;
    while bytes.has_remaining() {
        let (t, wire_type) = decode_key(&mut bytes)?;
        if t == tag && wire_type == WireType::LengthDelimited {
            let len = prost::encoding::decode_varint(&mut bytes)?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= bytes.len())
                .ok_or(DecodeError::Framing("field runs past the frame"))?;
            let (body, rest) = bytes.split_at(len);
            found = Some(body);
            bytes = rest;
        } else {
            prost::encoding::skip_field(wire_type, t, &mut bytes, DecodeContext::default())?;
        }
    }
    found.ok_or(DecodeError::Framing("field missing"))
}

/// `PluginToHost.actions` (ActionBatch) field number.
pub const PLUGIN_TO_HOST_ACTIONS: u32 = 20;
/// `ActionBatch.actions` field number.
pub const ACTION_BATCH_ACTIONS: u32 = 1;

/// Whether `tag` is a variant of `PluginToHost.payload`.
fn is_plugin_to_host_variant(tag: u32) -> bool {
    i32::try_from(tag)
        .ok()
        .and_then(proto::plugin_to_host::Payload::default_for)
        .is_some()
}

/// Whether `tag` is a variant of `Action.kind`.
fn is_action_kind(tag: u32) -> bool {
    i32::try_from(tag)
        .ok()
        .and_then(proto::action::Kind::default_for)
        .is_some()
}

/// The field number of the `PluginToHost.payload` variant an encoded `PluginToHost` carries,
/// as a decoder would keep it (the last variant field), if any.
pub fn peek_plugin_to_host(bytes: &[u8]) -> Result<Option<u32>, DecodeError> {
    peek_oneof(bytes, is_plugin_to_host_variant)
}

/// The field number of the `Action.kind` variant an encoded `Action` carries, if any.
pub fn peek_action_kind(bytes: &[u8]) -> Result<Option<u32>, DecodeError> {
    peek_oneof(bytes, is_action_kind)
}

/// Calls `f` with the encoding of each `Action` of an encoded `PluginToHost` whose payload is
/// an `ActionBatch` (see [`peek_plugin_to_host`]), in order, without decoding the batch: the
/// actions a decoder would keep (those of the `actions` fields after the last other payload
/// variant, concatenated, as a decoder merges repeated occurrences). Returns their number.
pub fn for_each_action(
    bytes: &[u8],
    mut f: impl FnMut(&[u8]) -> Result<(), DecodeError>,
) -> Result<usize, DecodeError> {
    // The payload a decoder keeps starts after the last variant that is not `actions`.
    let mut start = bytes;
    let mut rest = bytes;
    while rest.has_remaining() {
        let (tag, wire_type) = decode_key(&mut rest)?;
        prost::encoding::skip_field(wire_type, tag, &mut rest, DecodeContext::default())?;
        if tag != PLUGIN_TO_HOST_ACTIONS && is_plugin_to_host_variant(tag) {
            start = rest;
        }
    }
    let mut n = 0;
    let mut rest = start;
    while rest.has_remaining() {
        let (tag, wire_type) = decode_key(&mut rest)?;
        if tag != PLUGIN_TO_HOST_ACTIONS || wire_type != WireType::LengthDelimited {
            prost::encoding::skip_field(wire_type, tag, &mut rest, DecodeContext::default())?;
            continue;
        }
        let mut batch = take_len_delimited(&mut rest, "action batch runs past the frame")?;
        while batch.has_remaining() {
            let (tag, wire_type) = decode_key(&mut batch)?;
            if tag == ACTION_BATCH_ACTIONS && wire_type == WireType::LengthDelimited {
                f(take_len_delimited(&mut batch, "action runs past its batch")?)?;
                n += 1;
            } else {
                prost::encoding::skip_field(wire_type, tag, &mut batch, DecodeContext::default())?;
            }
        }
    }
    Ok(n)
}

/// The body of a length-delimited field whose key was just read from `bytes`; advances past it.
fn take_len_delimited<'a>(bytes: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], DecodeError> {
    let len = prost::encoding::decode_varint(bytes)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= bytes.len())
        .ok_or(DecodeError::Framing(what))?;
    let (body, rest) = bytes.split_at(len);
    *bytes = rest;
    Ok(body)
}

/// Distinct `PluginToHost` payload variants kept decoded (one reusable message each).
const PLUGIN_SLOTS: usize = 64;

/// Host-side decoder of `PluginToHost` frames. The bytes are first copied out of the ring
/// (shared memory is untrusted: a plugin could change them while they are decoded), then
/// decoded into a reused message, one per payload variant, so that a plugin that alternates
/// results and log lines allocates nothing in steady state. A new decoder allocates nothing
/// until its first message.
#[derive(Debug, Default)]
pub struct PluginDecoder {
    copy: Vec<u8>,
    msgs: Vec<PluginToHost>,
    spare: StringSpare,
}

impl PluginDecoder {
    /// Copies `payload` out and decodes it; the message is valid until the next call.
    pub fn decode(&mut self, payload: &[u8]) -> Result<&PluginToHost, DecodeError> {
        self.decode_mut(payload).map(|m| &*m)
    }

    /// Like [`PluginDecoder::decode`] but lends the message mutably (to move parts out).
    pub fn decode_mut(&mut self, payload: &[u8]) -> Result<&mut PluginToHost, DecodeError> {
        self.copy.clear();
        self.copy.extend_from_slice(payload);
        let number = peek_plugin_to_host(&self.copy)?.unwrap_or(0);
        if self.msgs.is_empty() {
            self.msgs.resize_with(PLUGIN_SLOTS, PluginToHost::default);
        }
        let msg = &mut self.msgs[(number as usize).min(PLUGIN_SLOTS - 1)];
        decode_reuse_spare(msg, &self.copy, &mut self.spare)?;
        Ok(msg)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The field numbers the string-keeping merges match on are the schema's.
    #[test]
    fn kept_string_field_numbers_are_the_schemas() {
        use proto::{event_envelope, event_result, plugin_to_host};
        let n = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
        assert_eq!(
            n(event_envelope::Payload::Command(Default::default())
                .field_number()
                .into()),
            Some(EVENT_ENVELOPE_COMMAND)
        );
        assert_eq!(
            n(plugin_to_host::Payload::EventResult(Default::default())
                .field_number()
                .into()),
            Some(PLUGIN_TO_HOST_EVENT_RESULT)
        );
        assert_eq!(
            n(event_result::Update::Chat(Default::default()).field_number().into()),
            Some(EVENT_RESULT_CHAT)
        );
        let chat = proto::ChatMutation {
            message: Some("x".into()),
        };
        assert_eq!(chat.encode_to_vec()[0] >> 3, CHAT_MUTATION_MESSAGE as u8);
        let cmd = proto::CommandEvent {
            args: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(cmd.encode_to_vec()[0] >> 3, COMMAND_EVENT_ARGS as u8);
    }
}
