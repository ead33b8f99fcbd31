//! The old design's wire format on the reading side: length-delimited protobuf messages (a
//! varint length, then the bytes), as `prost::Message::encode_length_delimited` writes them.
//! Shared by `plugbus compare`'s baseline plugin and `benches/ipc.rs` (through `#[path]`), so
//! both measure the same reader.

use std::io::Read;

/// Reads one length-delimited message into `buf`; `None` at a clean end of stream.
pub fn read_message(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<Option<()>> {
    let Some(len) = read_varint(r)? else {
        return Ok(None);
    };
    buf.resize(len as usize, 0);
    r.read_exact(buf)?;
    Ok(Some(()))
}

/// Reads a protobuf varint; `None` at a clean end of stream.
fn read_varint(r: &mut impl Read) -> std::io::Result<Option<u64>> {
    let mut v = 0u64;
    for i in 0..10 {
        let mut b = [0u8];
        if r.read(&mut b)? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        v |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some(v));
        }
    }
    Err(std::io::Error::other("varint too long"))
}
