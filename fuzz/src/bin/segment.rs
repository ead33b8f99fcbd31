//! cargo-afl target `segment`: see `plugbus_fuzz::segment`.
fn main() {
    afl::fuzz!(|data: &[u8]| plugbus_fuzz::segment(data));
}
