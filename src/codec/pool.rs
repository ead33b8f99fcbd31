//! Pools: byte buffers and reusable event envelopes.

use crate::proto::{EventEnvelope, EventType, event_envelope::Payload};

use super::Reusable;

/// Hits and misses of a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Takes served from the pool.
    pub hits: u64,
    /// Takes that had to allocate.
    pub misses: u64,
}

/// A free list of byte buffers: cleared on return, capacity kept. For the places where a buffer
/// cannot be avoided (a batch being gathered, frames waiting in an overflow queue, one encoding
/// copied to several plugins).
#[derive(Debug)]
pub struct BufferPool {
    free: Vec<Vec<u8>>,
    max_free: usize,
    initial_capacity: usize,
    stats: PoolStats,
}

impl Default for BufferPool {
    fn default() -> Self {
        Self::new(256, 4096)
    }
}

impl BufferPool {
    /// A pool keeping at most `max_free` idle buffers, each new one with `initial_capacity`.
    pub fn new(max_free: usize, initial_capacity: usize) -> Self {
        Self {
            free: Vec::with_capacity(max_free),
            max_free,
            initial_capacity,
            stats: PoolStats::default(),
        }
    }

    /// An empty buffer, from the pool when one is idle.
    #[inline]
    pub fn take(&mut self) -> Vec<u8> {
        match self.free.pop() {
            Some(b) => {
                self.stats.hits += 1;
                b
            }
            None => {
                self.stats.misses += 1;
                Vec::with_capacity(self.initial_capacity)
            }
        }
    }

    /// Returns a buffer (cleared here; dropped if the pool is full).
    #[inline]
    pub fn give(&mut self, mut buf: Vec<u8>) {
        if self.free.len() < self.max_free {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}

/// Reusable event envelopes, kept per event type so that a taken envelope already holds the
/// right payload variant, whose strings keep their capacity from earlier use. Building an event
/// in steady state then allocates nothing.
#[derive(Debug)]
pub struct EnvelopePool {
    free: Vec<Vec<EventEnvelope>>,
    max_per_type: usize,
    stats: PoolStats,
}

impl Default for EnvelopePool {
    fn default() -> Self {
        Self::new(64)
    }
}

impl EnvelopePool {
    /// A pool keeping at most `max_per_type` idle envelopes of each event type.
    pub fn new(max_per_type: usize) -> Self {
        Self {
            free: (0..super::SLOTS).map(|_| Vec::new()).collect(),
            max_per_type,
            stats: PoolStats::default(),
        }
    }

    /// A cleared envelope whose payload is a default message of `ty` (`None` payload for
    /// types that carry none, such as `EVENT_TYPE_ALL`), with `type` set.
    #[inline]
    pub fn take(&mut self, ty: EventType) -> EventEnvelope {
        let n = ty as i32;
        let list = &mut self.free[(n as usize).min(super::SLOTS - 1)];
        let mut env = match list.pop() {
            Some(e) if e.oneof_number() == Payload::default_for(n).as_ref().map(Payload::field_number) => {
                self.stats.hits += 1;
                e
            }
            _ => {
                self.stats.misses += 1;
                EventEnvelope {
                    payload: Payload::default_for(n),
                    ..Default::default()
                }
            }
        };
        env.r#type = n;
        env
    }

    /// Returns an envelope: reset in place (variant kept) and stored for its type.
    #[inline]
    pub fn give(&mut self, mut env: EventEnvelope) {
        let n = env.oneof_number().unwrap_or(0);
        let list = &mut self.free[(n as usize).min(super::SLOTS - 1)];
        if list.len() < self.max_per_type {
            env.reset_keep();
            if list.capacity() == 0 {
                list.reserve_exact(self.max_per_type);
            }
            list.push(env);
        }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}
