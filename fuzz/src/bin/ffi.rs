//! cargo-afl target `ffi`: see `plugbus_fuzz::ffi`.
fn main() {
    afl::fuzz!(|data: &[u8]| plugbus_fuzz::ffi(data));
}
