//! cargo-afl target `frame_ring`: see `plugbus_fuzz::frame_ring`.
fn main() {
    afl::fuzz!(|data: &[u8]| plugbus_fuzz::frame_ring(data));
}
