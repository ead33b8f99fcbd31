//! cargo-afl target `move_frame`: see `plugbus_fuzz::move_frame`.
fn main() {
    afl::fuzz!(|data: &[u8]| plugbus_fuzz::move_frame(data));
}
