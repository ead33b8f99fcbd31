//! What goes on the wire for each plugin: one `HostToPlugin` per event (what the df.plugin SDKs
//! understand) or, for a plugin that declared the capabilities, batches, packed moves and
//! compressed batches; and back, on the plugin side.

use prost::Message as _;

use crate::fastpath::{self, MoveFrameHeader, MoveRecord};
use crate::proto::{
    CompressedEventBatch, EventBatch, EventEnvelope, EventType, HostToPlugin, PluginCapabilities, event_envelope,
    host_to_plugin,
};

use super::COMPRESS_OVER;

/// One item from the tick thread to a plugin's stream.
pub(super) enum Down {
    /// A complete `HostToPlugin` encoding.
    Encoded(Vec<u8>),
    /// A tick's moves.
    Moves {
        tick: u64,
        flags: u32,
        records: Vec<MoveRecord>,
    },
}

fn event_message(env: EventEnvelope) -> HostToPlugin {
    HostToPlugin {
        plugin_id: String::new(),
        payload: Some(host_to_plugin::Payload::Event(env)),
    }
}

/// The messages `item` becomes for a plugin with capabilities `caps`, appended to `out`.
pub(super) fn to_wire(item: &Down, caps: &PluginCapabilities, out: &mut Vec<HostToPlugin>) -> Result<(), String> {
    match item {
        Down::Encoded(bytes) => {
            let msg =
                HostToPlugin::decode(bytes.as_slice()).map_err(|e| format!("bad HostToPlugin from the host: {e}"))?;
            match msg.payload {
                Some(host_to_plugin::Payload::Events(batch)) if !caps.event_batches => {
                    out.extend(batch.events.into_iter().map(event_message));
                }
                Some(host_to_plugin::Payload::Events(batch)) if caps.compressed_batches => {
                    let raw = batch.encode_to_vec();
                    if raw.len() > COMPRESS_OVER {
                        let data = snap::raw::Encoder::new()
                            .compress_vec(&raw)
                            .map_err(|e| format!("snappy: {e}"))?;
                        out.push(HostToPlugin {
                            plugin_id: msg.plugin_id,
                            payload: Some(host_to_plugin::Payload::CompressedEvents(CompressedEventBatch {
                                data,
                                original_size: raw.len() as i32,
                            })),
                        });
                    } else {
                        out.push(HostToPlugin {
                            plugin_id: msg.plugin_id,
                            payload: Some(host_to_plugin::Payload::Events(batch)),
                        });
                    }
                }
                _ => out.push(msg),
            }
        }
        Down::Moves { tick, flags, records } => {
            if caps.packed_movements {
                out.push(HostToPlugin {
                    plugin_id: String::new(),
                    payload: Some(host_to_plugin::Payload::PlayerMovementsPacked(fastpath::to_packed(
                        *tick, *flags, records,
                    ))),
                });
            } else {
                // The id names the tick and the record ("<tick>.<i>"): ids are opaque to the
                // df.plugin SDKs, which echo them; a plugin that knows may read the tick there.
                out.extend(records.iter().enumerate().map(|(i, r)| {
                    event_message(EventEnvelope {
                        event_id: format!("{tick}.{i}"),
                        r#type: EventType::PlayerMove as i32,
                        payload: Some(event_envelope::Payload::PlayerMove(r.to_move_event("", ""))),
                        ..Default::default()
                    })
                }));
            }
        }
    }
    Ok(())
}

/// What the plugin side hands its runtime for one message from the host.
pub(super) enum Up {
    /// A `HostToPlugin` encoding the plugin runtime decodes.
    Host(Vec<u8>),
    /// A tick's moves.
    Moves(MoveFrameHeader, Vec<MoveRecord>),
}

/// Plugin side: one message from the host as the runtime takes it (compressed batches
/// decompressed, packed moves as records).
pub(super) fn from_wire(msg: HostToPlugin) -> Result<Up, String> {
    match msg.payload {
        Some(host_to_plugin::Payload::PlayerMovementsPacked(p)) => {
            let mut records = Vec::with_capacity(p.moves.len());
            let bad = fastpath::from_packed(&p, &mut records);
            if bad > 0 {
                return Err(format!("{bad} packed moves with a UUID that is not 16 bytes"));
            }
            let header = MoveFrameHeader {
                tick: p.tick,
                count: records.len() as u32,
                flags: p.flags,
            };
            Ok(Up::Moves(header, records))
        }
        Some(host_to_plugin::Payload::CompressedEvents(c)) => {
            let len = snap::raw::decompress_len(&c.data).map_err(|e| format!("snappy: {e}"))?;
            if len > super::MAX_MESSAGE || len != c.original_size as usize {
                return Err(format!(
                    "compressed batch of {len} bytes (announced {})",
                    c.original_size
                ));
            }
            let raw = snap::raw::Decoder::new()
                .decompress_vec(&c.data)
                .map_err(|e| format!("snappy: {e}"))?;
            let batch = EventBatch::decode(raw.as_slice()).map_err(|e| format!("bad compressed batch: {e}"))?;
            Ok(Up::Host(
                HostToPlugin {
                    plugin_id: msg.plugin_id,
                    payload: Some(host_to_plugin::Payload::Events(batch)),
                }
                .encode_to_vec(),
            ))
        }
        _ => Ok(Up::Host(msg.encode_to_vec())),
    }
}
