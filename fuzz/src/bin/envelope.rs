//! cargo-afl target `envelope`: see `plugbus_fuzz::envelope`.
fn main() {
    afl::fuzz!(|data: &[u8]| plugbus_fuzz::envelope(data));
}
