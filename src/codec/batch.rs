//! Per-plugin, per-tick event batches, gathered as encoded bytes and written as one
//! `HostToPlugin { events: EventBatch }` frame.

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::{EVENT_BATCH_EVENTS, HOST_TO_PLUGIN_EVENTS, KIND_HOST_TO_PLUGIN};
use crate::proto::EventEnvelope;
use crate::ring::frame::{self, ReserveError};

/// When a batch is flushed before the end of the tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Flush when this many events are gathered (default 100).
    pub max_events: usize,
    /// Flush when the encoded batch reaches this many bytes (default 4 KiB).
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_events: 100,
            max_bytes: 4096,
        }
    }
}

/// The events gathered for one plugin since the last flush, as the encoded body of an
/// `EventBatch` (each event is `EventBatch.events` entry: key, length, envelope).
#[derive(Debug, Default)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: usize,
}

impl BatchBuilder {
    /// An empty batch with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Appends one envelope, encoding it here.
    #[inline]
    pub fn push(&mut self, env: &EventEnvelope) {
        prost::encoding::message::encode(EVENT_BATCH_EVENTS, env, &mut self.buf);
        self.count += 1;
    }

    /// Appends one envelope already encoded (its body, as from `encode_raw`), so that one
    /// encoding serves every plugin.
    #[inline]
    pub fn push_encoded(&mut self, body: &[u8]) {
        encode_key(EVENT_BATCH_EVENTS, WireType::LengthDelimited, &mut self.buf);
        encode_varint(body.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(body);
        self.count += 1;
    }

    /// Events gathered.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes gathered.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The encoding of the `EventBatch` message gathered so far (its `events` fields in order).
    pub fn body(&self) -> &[u8] {
        &self.buf
    }

    /// Whether `limits` say this batch must go now.
    #[inline]
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.count >= limits.max_events || self.buf.len() >= limits.max_bytes
    }

    /// Size of the frame payload this batch becomes.
    pub fn frame_len(&self) -> usize {
        key_len(HOST_TO_PLUGIN_EVENTS) + encoded_len_varint(self.buf.len() as u64) + self.buf.len()
    }

    /// Writes the frame payload (`HostToPlugin { events }`) into `out`, which must be exactly
    /// [`BatchBuilder::frame_len`] bytes.
    pub fn write_payload(&self, mut out: &mut [u8]) {
        encode_key(HOST_TO_PLUGIN_EVENTS, WireType::LengthDelimited, &mut out);
        encode_varint(self.buf.len() as u64, &mut out);
        out.copy_from_slice(&self.buf);
    }

    /// Writes the batch as one frame and empties it. On error nothing is written and the batch
    /// is kept.
    pub fn flush_to(&mut self, producer: &mut frame::Producer) -> Result<(), ReserveError> {
        let mut grant = producer.try_reserve(self.frame_len())?;
        self.write_payload(grant.bytes_mut());
        grant.commit(KIND_HOST_TO_PLUGIN);
        self.clear();
        Ok(())
    }

    /// Moves the frame payload into `out` (cleared first) and empties the batch: for an overflow
    /// queue in host memory.
    pub fn drain_into(&mut self, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.frame_len(), 0);
        self.write_payload(out);
        self.clear();
    }

    /// Forgets the gathered events, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
    }

    /// The encoded `EventBatch` body gathered so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Encodes `env` (its body only) into `out`, cleared first: the "encode once" half of sending
/// one event to several plugins.
#[inline]
pub fn encode_body(env: &EventEnvelope, out: &mut Vec<u8>) {
    out.clear();
    env.encode_raw(out);
}
