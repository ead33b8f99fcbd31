//! Fuzz harnesses for plugbus: each takes arbitrary bytes, drives one piece of code that faces
//! bytes written by an untrusted peer, and panics only when a property breaks (a panic inside
//! plugbus is a finding too).
//!
//! The same functions run under the fuzzer (`fuzz/src/bin/<target>.rs`, cargo-afl) and in the
//! root package's replay test (`tests/fuzz_corpus.rs` includes this file), which runs every
//! committed corpus file through its harness, and in the property test `tests/fuzz_props.rs`.
//!
//! | target | what it drives |
//! | --- | --- |
//! | `frame_ring` | a frame-ring `Consumer` over a region whose control block and data are the input, with a hostile producer scribbling between reads |
//! | `move_frame` | `fastpath::parse` and the record conversions |
//! | `envelope` | `HostDecoder`, `PluginDecoder`, `decode_reuse`, and batches built by `BatchBuilder` read back |
//! | `segment` | `Segment::open_unattached` over a shared-memory file of arbitrary size and header |
//! | `ffi` | the C API: event accessors and reply helpers, the host functions, the plugin configuration calls |
#![allow(clippy::missing_panics_doc, clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::Cell;
use std::ffi::{CString, c_char};
use std::ptr::{null, null_mut};

use plugbus::codec::{self, BatchBuilder, HostDecoder, HostMessage, PluginDecoder};
use plugbus::fastpath::{self, MoveRecord};
use plugbus::ffi::{self as c, connection as cc, event as ce, host as ch};
use plugbus::proto::{EventEnvelope, HostToPlugin, PluginToHost};
use plugbus::ring::{CONTROL_SIZE, RegionRef, RingError, frame};
use plugbus::segment::Segment;
use plugbus::sync::{AtomicU64, Ordering};
use prost::Message;

/// A harness: takes arbitrary bytes, panics on a finding.
pub type Harness = fn(&[u8]);

/// Every harness, by target name (the names of `fuzz/src/bin/*` and `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame_ring", frame_ring),
    ("move_frame", move_frame),
    ("envelope", envelope),
    ("segment", segment),
    ("ffi", ffi),
];

/// A cursor over the fuzzer's bytes; reads past the end give zeros (or empty slices), so every
/// input means something.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }
    /// Whether every byte was taken.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    /// The rest.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
    /// One byte (0 at the end).
    pub fn byte(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }
    /// A chunk prefixed by a one-byte length.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        self.bytes(n)
    }
}

// ---------------------------------------------------------------------------------------------
// frame_ring

/// Offsets of `tail` and `head` in a ring's control block (lines 0 and 1, see `plugbus::ring`).
const TAIL: usize = 0;
const HEAD: usize = 128;

fn position(region: &RegionRef, offset: usize) -> &AtomicU64 {
    // SAFETY: offset is TAIL or HEAD, 8-aligned inside the control block of a page-aligned heap
    // region; the ring code reads these words only as atomics too.
    unsafe { &*region.as_ptr().add(offset).cast::<AtomicU64>() }
}

/// Input: `[capacity selector][head: u64][tail mode][tail: u64][data area...][ops...]`. The
/// region is a heap region of a ring of 16 B to 8 KiB whose control block and data are set from
/// the input; then each op byte either reads a frame, moves `tail` or writes 8 bytes anywhere
/// in the data area (a hostile producer), and at the end the ring is read until it is empty or
/// fails. The consumer must never panic, never lend bytes outside the data area or a frame
/// larger than half of it, never return more frames than the ring holds, and once failed keep
/// returning the same error.
pub fn frame_ring(data: &[u8]) {
    let mut u = Input::new(data);
    let capacity = 16usize << (u.byte() % 10);
    let region = RegionRef::heap(frame::region_size(capacity));
    let head = u.u64();
    let mode = u.byte();
    let raw = u.u64();
    let cap = capacity as u64;
    let tail = match mode % 4 {
        0 => raw,
        // A tail some whole frames past the head: the common, almost valid case.
        1 | 2 => head.wrapping_add(raw % (cap / 8 + 2) * 8),
        _ => head.wrapping_add(raw % (2 * cap + 16)),
    };
    position(&region, HEAD).store(head, Ordering::Relaxed);
    position(&region, TAIL).store(tail, Ordering::Relaxed);
    let fill = u.bytes(capacity);
    // SAFETY: the data area is `capacity` bytes after the control block; fill.len() <= capacity;
    // no reference to the region exists yet.
    unsafe { std::ptr::copy_nonoverlapping(fill.as_ptr(), region.as_ptr().add(CONTROL_SIZE), fill.len()) };

    let mut rx = frame::Consumer::attach(region.clone()).expect("a ring region of a valid size attaches");
    let data_area = region.as_ptr() as usize + CONTROL_SIZE..region.as_ptr() as usize + CONTROL_SIZE + capacity;
    let mut buf = Vec::new();
    let mut read = |rx: &mut frame::Consumer| -> Result<bool, RingError> {
        let r = match rx.try_read() {
            Ok(Some(f)) => {
                assert!(
                    f.kind() != 0 && f.kind() != frame::PADDING,
                    "lent a frame of kind {}",
                    f.kind()
                );
                let p = f.payload();
                assert!(
                    p.len() + frame::HEADER <= capacity / 2,
                    "a frame larger than half the ring"
                );
                let start = p.as_ptr() as usize;
                assert!(
                    data_area.contains(&start) || p.is_empty(),
                    "payload outside the data area"
                );
                assert!(start + p.len() <= data_area.end, "payload runs past the data area");
                assert_eq!(start % 8, 0, "payload not 8-byte aligned");
                f.copy_to(&mut buf);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            assert_eq!(rx.poisoned(), Some(e));
            assert_eq!(rx.try_read().err(), Some(e), "a failed consumer must keep failing");
            assert_eq!(rx.used().err(), Some(e));
        }
        r
    };
    let mut failed = false;
    while !u.is_empty() && !failed {
        match u.byte() % 4 {
            0 => {
                let d = u.byte();
                let now = position(&region, TAIL).load(Ordering::Relaxed);
                let new = if d & 0x80 != 0 {
                    u.u64()
                } else {
                    now.wrapping_add(u64::from(d) * 8)
                };
                position(&region, TAIL).store(new, Ordering::Release);
            }
            1 => {
                let off = (u.u16() as usize % capacity) & !7;
                let b = u.bytes(8);
                // SAFETY: off + 8 <= capacity (off is a multiple of 8 below it, capacity a multiple
                // of 8); no frame is lent now (each read drops its frame), so no reference to
                // these bytes exists.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), region.as_ptr().add(CONTROL_SIZE + off), b.len()) };
            }
            _ => failed = read(&mut rx).is_err(),
        }
    }
    // Drain: the positions are validated to be at most `capacity` apart and every frame takes at
    // least 8 bytes, so a consumer that keeps lending frames past that is looping.
    for i in 0.. {
        assert!(
            i <= capacity / 8 + 2,
            "the consumer lent more frames than the ring holds"
        );
        match read(&mut rx) {
            Ok(true) => continue,
            _ => break,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// move_frame

/// `fastpath::parse` on the input at an 8-aligned address and at an odd one; a parsed frame
/// must have `count` records filling the payload, and its records must survive the packed and
/// envelope conversions (positions rounded to f32 once, then stable).
pub fn move_frame(data: &[u8]) {
    let mut words = vec![0u64; data.len() / 8 + 2];
    // SAFETY: `words` has room for 8 * len bytes >= data.len() + 16.
    let aligned = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
    aligned[..data.len()].copy_from_slice(data);
    let payload = &aligned[..data.len()];
    if let Ok((h, records)) = fastpath::parse(payload) {
        assert_eq!(records.len(), h.count as usize);
        assert_eq!(payload.len(), 16 + 48 * records.len());
        let packed = fastpath::to_packed(h.tick, h.flags, records);
        let mut back = Vec::new();
        assert_eq!(
            fastpath::from_packed(&packed, &mut back),
            0,
            "every record has a 16-byte uuid"
        );
        assert_eq!(back.len(), records.len());
        let again = fastpath::to_packed(h.tick, h.flags, &back);
        assert_eq!(again.encode_to_vec(), packed.encode_to_vec(), "packed form is stable");
        for r in records {
            let e = r.to_move_event("name", "world");
            let r2 = MoveRecord::from_move_event(&e).expect("a formatted uuid parses");
            assert_eq!(zerocopy_bytes(&r2), zerocopy_bytes(r), "envelope form round-trips");
        }
    }
    // The same bytes one byte off alignment: never a panic (Misaligned, Short or CountMismatch).
    aligned.copy_within(0..data.len(), 1);
    if let Ok((_, records)) = fastpath::parse(&aligned[1..=data.len()]) {
        assert!(records.is_empty(), "records lent at a misaligned address");
    }
}

fn zerocopy_bytes(r: &MoveRecord) -> [u8; 48] {
    let mut b = [0; 48];
    b[..16].copy_from_slice(&r.uuid);
    for (i, v) in [r.x, r.y, r.z].iter().enumerate() {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_bits().to_le_bytes());
    }
    b[40..44].copy_from_slice(&r.yaw.to_bits().to_le_bytes());
    b[44..48].copy_from_slice(&r.pitch.to_bits().to_le_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// envelope

/// Equal messages; NaN fields compare unequal, so equal encodings count too.
fn same<M: Message + PartialEq>(a: &M, b: &M) -> bool {
    a == b || a.encode_to_vec() == b.encode_to_vec()
}

/// Input: `[selector][split: u16][bytes...]`. Every decoder the peers' bytes reach: the plugin's
/// `HostDecoder` (single events, batches, other messages) whose lent messages must equal fresh
/// decodes of the bytes it lends with them; the host's `PluginDecoder` and `decode_reuse`, which
/// after decoding a first message must decode a second exactly as a fresh decode does
/// (same result, same error or success); and batches built from the input's chunks that decode
/// as envelopes, which must read back as the same events in order.
pub fn envelope(data: &[u8]) {
    let mut u = Input::new(data);
    let sel = u.byte();
    let split = u.u16() as usize;
    let body = u.rest();
    let (first, _) = body.split_at(split.min(body.len()));

    let mut dec = HostDecoder::default();
    for bytes in [first, body] {
        let _ = dec.decode_raw(bytes, |m, raw| match m {
            HostMessage::Event(e) => {
                let fresh = EventEnvelope::decode(raw).expect("an event the decoder lent decodes afresh");
                assert!(same(&fresh, e), "reused event decode differs from a fresh one");
            }
            HostMessage::Other(o) => {
                let fresh = HostToPlugin::decode(raw).expect("a message the decoder lent decodes afresh");
                assert!(same(&fresh, o), "reused message decode differs from a fresh one");
            }
        });
    }

    let mut pd = PluginDecoder::default();
    let _ = pd.decode(first);
    let reused = pd.decode(body).ok().cloned();
    let fresh = PluginToHost::decode(body).ok();
    match (&reused, &fresh) {
        (Some(a), Some(b)) => assert!(same(a, b), "PluginDecoder differs from a fresh decode"),
        (None, None) => {}
        _ => panic!("PluginDecoder and a fresh decode disagree on success: {reused:?} vs {fresh:?}"),
    }
    reuse_matches_fresh::<EventEnvelope>(first, body);
    reuse_matches_fresh::<HostToPlugin>(first, body);

    // Batches: chunks that decode as envelopes, pushed encoded and as messages.
    let mut chunks = Input::new(body);
    let mut batch = BatchBuilder::default();
    let mut events = Vec::new();
    while !chunks.is_empty() && events.len() < 64 {
        let c = chunks.chunk();
        if let Ok(env) = EventEnvelope::decode(c) {
            if sel & 1 == 0 {
                batch.push_encoded(c);
            } else {
                batch.push(&env);
            }
            events.push(env);
        }
    }
    assert_eq!(batch.len(), events.len());
    let mut payload = Vec::new();
    batch.drain_into(&mut payload);
    let mut got = Vec::new();
    let n = HostDecoder::default()
        .decode(&payload, |m| match m {
            HostMessage::Event(e) => got.push(e.clone()),
            HostMessage::Other(o) => panic!("a batch read back as {o:?}"),
        })
        .unwrap_or_else(|e| {
            if events.is_empty() {
                0
            } else {
                panic!("a batch of {} events does not decode: {e}", events.len())
            }
        });
    if !events.is_empty() {
        assert_eq!(n, events.len());
        assert_eq!(got.len(), events.len());
        for (a, b) in got.iter().zip(&events) {
            assert!(same(a, b), "a batched event read back differently");
        }
    }
}

fn reuse_matches_fresh<M: codec::Reusable + Default + PartialEq + std::fmt::Debug>(first: &[u8], second: &[u8]) {
    let mut m = M::default();
    let _ = codec::decode_reuse(&mut m, first);
    let reused = codec::decode_reuse(&mut m, second).map(|()| m);
    let fresh = M::decode(second);
    match (&reused, &fresh) {
        (Ok(a), Ok(b)) => assert!(same(a, b), "decode_reuse differs from a fresh decode: {a:?} vs {b:?}"),
        (Err(_), Err(_)) => {}
        _ => panic!("decode_reuse and a fresh decode disagree on success: {reused:?} vs {fresh:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// segment

/// Removes a shared-memory name when dropped.
struct Unlink(CString);

impl Drop for Unlink {
    fn drop(&mut self) {
        // SAFETY: a valid NUL-terminated name.
        unsafe { libc::shm_unlink(self.0.as_ptr()) };
    }
}

/// Input: `[size: u32][file bytes...]`. Writes the bytes into a new shared-memory file
/// `plugbus.fuzz.<pid>.<n>` of a size chosen by the input (the bytes' length, more, less, or up
/// to 1 MiB), opens it with `Segment::open_unattached` (which must give a segment or an error,
/// never panic or fault), reads every ring an opened segment describes, and unlinks the file.
pub fn segment(data: &[u8]) {
    thread_local!(static NEXT: Cell<u64> = const { Cell::new(0) });
    let mut u = Input::new(data);
    let sel = u.u32() as usize;
    let contents = u.rest();
    let size = match sel >> 30 {
        0 => contents.len(),
        1 => contents.len() + (sel & 0xffff),
        2 => sel & 0xf_ffff,
        _ => contents.len() / 2,
    };
    let n = NEXT.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let name = format!("plugbus.fuzz.{}.{n}", std::process::id());
    let path = CString::new(format!("/{name}")).expect("no NUL in the name");
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe {
        libc::shm_open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    assert!(fd >= 0, "shm_open {name}: {}", std::io::Error::last_os_error());
    let _unlink = Unlink(path);
    let write = &contents[..contents.len().min(size)];
    // SAFETY: fd is the descriptor just opened; `write` is valid for its length.
    unsafe {
        assert_eq!(libc::ftruncate(fd, size as libc::off_t), 0, "ftruncate");
        assert_eq!(
            libc::pwrite(fd, write.as_ptr().cast(), write.len(), 0),
            write.len() as isize,
            "pwrite"
        );
        libc::close(fd);
    }
    let seg = match Segment::open_unattached(&name) {
        Ok(seg) => seg,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(!seg.is_broken());
    let _ = seg.peer_heartbeat_age_ns();
    for (i, d) in seg.rings().to_vec().into_iter().enumerate() {
        let end = d.offset + d.data_bytes() + CONTROL_SIZE as u64;
        assert!(
            end <= seg.len() as u64,
            "ring {i} ({d:?}) ends past the {}-byte mapping",
            seg.len()
        );
        if let Ok(region) = seg.frame_region(i) {
            if let Ok(mut rx) = frame::Consumer::attach(region) {
                for _ in 0..=rx.capacity() / 8 + 2 {
                    match rx.try_read() {
                        Ok(Some(f)) => assert!(f.payload().len() <= rx_cap_half(d.data_bytes())),
                        _ => break,
                    }
                }
            }
        }
    }
}

fn rx_cap_half(data_bytes: u64) -> usize {
    (data_bytes / 2) as usize
}

// ---------------------------------------------------------------------------------------------
// ffi

/// A status that is not `PLUGBUS_ERR_INTERNAL`: that code means a Rust panic was caught at the
/// boundary, which is a finding.
#[track_caller]
fn ok_or_error(what: &str, status: c::plugbus_status) -> c::plugbus_status {
    assert_ne!(
        status,
        c::PLUGBUS_ERR_INTERNAL,
        "{what}: internal error: {}",
        last_error()
    );
    status
}

fn last_error() -> String {
    // SAFETY: plugbus_last_error never returns NULL; the string lives until the next call.
    unsafe { std::ffi::CStr::from_ptr(c::plugbus_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A (pointer, length) argument from the input: the bytes, or NULL with their length, or the
/// bytes with a length far past any limit (which the contract allows: the length is checked
/// before the pointer is read).
fn arg(u: &mut Input<'_>) -> (*const c_char, usize) {
    let b = u.chunk();
    match u.byte() % 8 {
        0 => (null(), b.len()),
        1 => (b.as_ptr().cast(), usize::MAX),
        2 => (b.as_ptr().cast(), 1 << 40),
        _ => (b.as_ptr().cast(), b.len()),
    }
}

/// A NUL-terminated argument from the input (or NULL).
fn cstr(u: &mut Input<'_>) -> Option<CString> {
    let b = u.chunk();
    if b.first() == Some(&0xff) {
        return None;
    }
    Some(CString::new(b.iter().copied().filter(|&c| c != 0).collect::<Vec<u8>>()).expect("NULs removed"))
}

fn cptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(null(), |s| s.as_ptr())
}

fn str_of(s: &c::plugbus_str) -> &[u8] {
    if s.len == 0 {
        return &[];
    }
    // SAFETY: plugbus filled `s` from a string it keeps alive for the current call scope.
    unsafe { std::slice::from_raw_parts(s.ptr.cast(), s.len) }
}

/// Input: `[selector][...]`. Runs one of three parts by the selector:
/// - the event accessors and reply helpers on an event decoded from the rest (or on an empty
///   one when it does not decode), with out pointers NULL or valid and fuzzed indexes and
///   message arguments; after the callback the event must refuse use (`BAD_STATE`);
/// - the host functions on a host with no plugins (one per thread), driven by op bytes, fed
///   arbitrary event bytes, strings, ids and move records;
/// - the plugin handle's configuration calls (hello, commands, subscriptions, wait, timeouts,
///   sends and logs before connecting) with arbitrary strings and values.
///
/// No call may return `PLUGBUS_ERR_INTERNAL` (a panic caught at the boundary) or crash.
pub fn ffi(data: &[u8]) {
    let mut u = Input::new(data);
    match u.byte() % 3 {
        0 => ffi_event(&mut u),
        1 => ffi_host(&mut u),
        _ => ffi_plugin(&mut u),
    }
}

fn ffi_event(u: &mut Input<'_>) {
    let max_message = u.u16() as usize;
    let index = u.u64() as usize;
    let (msg_ptr, msg_len) = arg(u);
    let nulls = u.byte();
    let bytes = u.rest();
    let env = EventEnvelope::decode(bytes).unwrap_or_default();
    let null_or = |bit: u8, p: *mut c::plugbus_str| if nulls & (1 << bit) != 0 { null_mut() } else { p };
    let mut escaped: *mut ce::plugbus_event = null_mut();
    let ((), reply) = ce::with_event_for_fuzzing(&env, bytes, max_message, |ev| {
        escaped = ev;
        let mut s = [c::plugbus_str { ptr: null(), len: 0 }; 5];
        let [a, b, d, e, f] = &mut s;
        let (a, b, d, e, f): (*mut _, *mut _, *mut _, *mut _, *mut _) = (a, b, d, e, f);
        let mut t = 0i32;
        let mut flag = false;
        let mut n = 0usize;
        let mut p = null();
        // SAFETY: `ev` is the event lent for this call; every out pointer is NULL or a local.
        unsafe {
            if ok_or_error("event_id", ce::plugbus_event_id(ev, null_or(0, a))) == c::PLUGBUS_OK {
                assert_eq!(str_of(&*a), env.event_id.as_bytes());
            }
            ok_or_error("event_type", ce::plugbus_event_type(ev, &mut t));
            ok_or_error("expects_response", ce::plugbus_event_expects_response(ev, &mut flag));
            if ok_or_error("event_bytes", ce::plugbus_event_bytes(ev, &mut p, &mut n)) == c::PLUGBUS_OK {
                assert_eq!((p, n), (bytes.as_ptr(), bytes.len()));
            }
            ok_or_error(
                "chat",
                ce::plugbus_event_chat(ev, null_or(1, a), null_or(2, b), null_or(3, d)),
            );
            let mut count = 0usize;
            let cmd = ce::plugbus_event_command(ev, null_or(1, a), null_or(2, b), d, null_or(4, e), &mut count);
            ok_or_error("command", cmd);
            ok_or_error("command_arg", ce::plugbus_event_command_arg(ev, index, f));
            if cmd == c::PLUGBUS_OK && count > 0 {
                ok_or_error("command_arg", ce::plugbus_event_command_arg(ev, count - 1, f));
                ok_or_error("command_arg", ce::plugbus_event_command_arg(ev, count, f));
            }
            ok_or_error("join", ce::plugbus_event_join(ev, null_or(5, a), null_or(6, b)));
            ok_or_error("quit", ce::plugbus_event_quit(ev, null_or(5, a), null_or(6, b)));
            match nulls % 3 {
                0 => ok_or_error("ack", ce::plugbus_reply_ack(ev)),
                1 => ok_or_error("cancel", ce::plugbus_reply_cancel(ev)),
                _ => ok_or_error("set_chat", ce::plugbus_reply_set_chat_message(ev, msg_ptr, msg_len)),
            };
        }
    });
    let _ = reply;
    let mut t = 0;
    // SAFETY: a handle (a token, never dereferenced), now outside its callback. It belongs to
    // no open connection, so it is refused as closed (an open connection's says BAD_STATE).
    let after = unsafe { ce::plugbus_event_type(escaped, &mut t) };
    assert!(
        matches!(after, c::PLUGBUS_ERR_BAD_STATE | c::PLUGBUS_ERR_CLOSED),
        "an event used after its callback: {after}"
    );
}

/// The thread's host (no plugins), started on first use and shut down when the thread ends.
struct HostHandle(*mut ch::plugbus_host);

impl Drop for HostHandle {
    fn drop(&mut self) {
        // SAFETY: a handle from plugbus_host_start, shut down once.
        unsafe { ch::plugbus_host_shutdown(self.0, null(), 0) };
    }
}

thread_local! {
    static HOST: HostHandle = {
        let toml = "[host]\n";
        let mut h = null_mut();
        // SAFETY: `toml` is valid for its length; `h` is writable.
        let st = unsafe { ch::plugbus_host_start(toml.as_ptr().cast(), toml.len(), &mut h) };
        assert_eq!(st, c::PLUGBUS_OK, "a host with no plugins starts: {}", last_error());
        HostHandle(h)
    };
}

fn ffi_host(u: &mut Input<'_>) {
    HOST.with(|host| {
        let h = host.0;
        let mut in_tick = false;
        let mut ops = 0;
        while !u.is_empty() && ops < 64 {
            ops += 1;
            let op = u.byte();
            let mut pending = 0u64;
            // SAFETY: `h` is this thread's host; every pointer argument is NULL, a local, or
            // bytes of the input valid for the length given (or a length past the limit).
            unsafe {
                let st = match op % 20 {
                    0 => {
                        let mut t = 0;
                        ch::plugbus_host_begin_tick(h, &mut t)
                    }
                    1 => ch::plugbus_host_end_tick(h),
                    2 => {
                        let (p, n) = arg(u);
                        ch::plugbus_host_publish_event(h, p.cast(), n)
                    }
                    3 => {
                        let (p, n) = arg(u);
                        ch::plugbus_host_dispatch_event(h, p.cast(), n, &mut pending)
                    }
                    4 | 5 => {
                        let (a, an) = arg(u);
                        let (b, bn) = arg(u);
                        if op % 20 == 4 {
                            ch::plugbus_host_publish_join(h, a, an, b, bn)
                        } else {
                            ch::plugbus_host_publish_quit(h, a, an, b, bn)
                        }
                    }
                    6 | 7 => {
                        let (a, an) = arg(u);
                        let (b, bn) = arg(u);
                        let (m, mn) = arg(u);
                        if op % 20 == 6 {
                            ch::plugbus_host_dispatch_chat(h, a, an, b, bn, m, mn, &mut pending)
                        } else {
                            ch::plugbus_host_dispatch_command(h, a, an, b, bn, m, mn, &mut pending)
                        }
                    }
                    8 => {
                        let raw = u.chunk();
                        let recs: Vec<c::plugbus_move_record> = raw
                            .chunks(48)
                            .map(|c| {
                                let mut b = [0u8; 48];
                                b[..c.len()].copy_from_slice(c);
                                let f = |i: usize| f64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                                let g = |i: usize| f32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
                                c::plugbus_move_record {
                                    uuid: b[..16].try_into().expect("16 bytes"),
                                    x: f(16),
                                    y: f(24),
                                    z: f(32),
                                    yaw: g(40),
                                    pitch: g(44),
                                }
                            })
                            .collect();
                        let ptr = if u.byte() & 1 == 0 { recs.as_ptr() } else { null() };
                        ch::plugbus_host_publish_moves(h, ptr, recs.len())
                    }
                    9 => {
                        let mut o = std::mem::zeroed::<ch::plugbus_outcome>();
                        ch::plugbus_host_poll_outcome(h, u.u64(), &mut o)
                    }
                    10 => {
                        let mut o = std::mem::zeroed::<ch::plugbus_outcome>();
                        // A short timeout: a wait on an id that never completes is a legal call.
                        ch::plugbus_host_wait(h, u.u64(), u64::from(u.byte()), &mut o)
                    }
                    11 => {
                        let (mut p, mut n) = (null(), 0);
                        ch::plugbus_host_outcome_result(h, &mut p, &mut n)
                    }
                    12 => {
                        let mut s = c::plugbus_str { ptr: null(), len: 0 };
                        ch::plugbus_host_outcome_chat(h, &mut s)
                    }
                    13 => {
                        let mut a = std::mem::zeroed::<ch::plugbus_action>();
                        ch::plugbus_host_next_action(h, &mut a)
                    }
                    14 => {
                        let (a, an) = arg(u);
                        let (b, bn) = arg(u);
                        ch::plugbus_host_send_action_result(h, a, an, b.cast(), bn)
                    }
                    15 => {
                        let mut s = [c::plugbus_str { ptr: null(), len: 0 }; 3];
                        let [a, b, d] = &mut s;
                        ch::plugbus_host_next_notice(h, a, b);
                        ch::plugbus_host_next_log(h, a, b, d)
                    }
                    16 => {
                        let mut s = c::plugbus_str { ptr: null(), len: 0 };
                        ch::plugbus_host_metrics(h, &mut s)
                    }
                    17 => {
                        let (a, an) = arg(u);
                        let mut pid = 0u32;
                        ch::plugbus_host_plugin_pid(h, a, an, &mut pid)
                    }
                    18 => {
                        let (a, an) = arg(u);
                        ch::plugbus_host_plugin_ready(h, a, an)
                    }
                    _ => {
                        let mut s = [c::plugbus_str { ptr: null(), len: 0 }; 2];
                        let [a, b] = &mut s;
                        let mut pos = [0f64; 3];
                        let mut rot = [0f64; 2];
                        ch::plugbus_host_action_send_chat(h, a, b);
                        ch::plugbus_host_action_kick(h, a, b);
                        ch::plugbus_host_action_teleport(h, a, pos.as_mut_ptr(), rot.as_mut_ptr())
                    }
                };
                ok_or_error("host call", st);
                match (op % 20, st) {
                    (0, c::PLUGBUS_OK) => in_tick = true,
                    (1, c::PLUGBUS_OK) => in_tick = false,
                    _ => {}
                }
            }
        }
        if in_tick {
            // SAFETY: as above.
            assert_eq!(unsafe { ch::plugbus_host_end_tick(h) }, c::PLUGBUS_OK);
        }
    });
}

fn ffi_plugin(u: &mut Input<'_>) {
    let address = cstr(u);
    let id = cstr(u);
    let mut p = null_mut();
    // SAFETY: NUL-terminated strings or NULL; `p` is writable.
    let st = ok_or_error("open", unsafe { cc::plugbus_open(cptr(&address), cptr(&id), &mut p) });
    if st != c::PLUGBUS_OK {
        assert!(p.is_null());
        return;
    }
    let mut ops = 0;
    while !u.is_empty() && ops < 32 {
        ops += 1;
        let op = u.byte();
        // SAFETY: `p` is the handle just opened (not connected); every pointer is NULL, a local
        // or input bytes valid for the length given (or a length past the limit).
        let st = unsafe {
            match op % 9 {
                0 => {
                    let (a, b) = (cstr(u), cstr(u));
                    cc::plugbus_hello(p, cptr(&a), cptr(&b))
                }
                1 => {
                    let (a, b) = (cstr(u), cstr(u));
                    cc::plugbus_register_command(p, cptr(&a), cptr(&b))
                }
                2 => {
                    let raw = u.chunk();
                    let types: Vec<i32> = raw
                        .chunks(4)
                        .map(|c| {
                            let mut b = [0; 4];
                            b[..c.len()].copy_from_slice(c);
                            i32::from_le_bytes(b)
                        })
                        .collect();
                    let ptr = if u.byte() & 1 == 0 { types.as_ptr() } else { null() };
                    cc::plugbus_subscribe(p, ptr, types.len())
                }
                3 => cc::plugbus_set_wait(p, u.u32() as i32),
                4 => cc::plugbus_set_hello_timeout(p, u.u32()),
                5 => {
                    let (a, an) = arg(u);
                    cc::plugbus_send_raw(p, a.cast(), an)
                }
                6 => {
                    let (a, an) = arg(u);
                    let (b, bn) = arg(u);
                    cc::plugbus_send_chat(p, a, an, b, bn)
                }
                7 => {
                    let level = cstr(u);
                    let (a, an) = arg(u);
                    cc::plugbus_log(p, cptr(&level), a, an)
                }
                _ => {
                    let mut s = c::plugbus_str { ptr: null(), len: 0 };
                    cc::plugbus_host_boot_id(p, &mut s);
                    cc::plugbus_shutdown_reason(p, &mut s)
                }
            }
        };
        ok_or_error("plugin call", st);
    }
    // SAFETY: the handle opened above, closed once; then a closed handle must be refused.
    unsafe {
        assert_eq!(cc::plugbus_close(p), c::PLUGBUS_OK);
        assert_eq!(cc::plugbus_set_wait(p, 0), c::PLUGBUS_ERR_CLOSED);
    }
}

// ---------------------------------------------------------------------------------------------
// seeds

/// Seed inputs for every target, made from valid encodings (written to `fuzz/corpus/<target>/`
/// by `cargo run --bin gen_corpus`; the replay test also runs them directly).
pub fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("frame_ring", frame_ring_seeds()),
        ("move_frame", move_frame_seeds()),
        ("envelope", envelope_seeds()),
        ("segment", segment_seeds()),
        ("ffi", ffi_seeds()),
    ]
}

fn frame_ring_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (sel, frames, taken, ops) in [
        (4u8, &[3usize, 0, 17][..], 0usize, &[][..]),
        (4, &[100, 20], 1, &[2u8, 2, 2][..]),
        (
            6,
            &[8, 8, 8, 8, 8, 8, 8],
            5,
            &[2, 0, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2][..],
        ),
        (
            6,
            &[500, 1, 200],
            2,
            &[0, 0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2][..],
        ),
        (2, &[8, 40], 1, &[2, 2][..]),
        (0, &[0], 0, &[2][..]),
    ] {
        let capacity = 16usize << sel;
        let region = RegionRef::heap(frame::region_size(capacity));
        let (mut tx, mut rx) = frame::channel(region.clone()).expect("a valid ring");
        // Wrap around a few times so that the positions are not small and padding appears.
        for round in 0..3 {
            for (i, &len) in frames.iter().enumerate() {
                let payload: Vec<u8> = (0..len).map(|b| (b + i + round) as u8).collect();
                if tx.try_push(1 + i as u32, &payload).is_err() {
                    break;
                }
            }
            let keep = if round == 2 { taken } else { usize::MAX };
            for _ in 0..keep {
                if !matches!(rx.try_read(), Ok(Some(_))) {
                    break;
                }
            }
        }
        let mut s = vec![sel];
        s.extend_from_slice(&position(&region, HEAD).load(Ordering::Relaxed).to_le_bytes());
        s.push(0);
        s.extend_from_slice(&position(&region, TAIL).load(Ordering::Relaxed).to_le_bytes());
        let mut data = vec![0u8; capacity];
        // SAFETY: the data area is `capacity` bytes; the ring is idle (same thread).
        unsafe { std::ptr::copy_nonoverlapping(region.as_ptr().add(CONTROL_SIZE), data.as_mut_ptr(), capacity) };
        s.extend_from_slice(&data);
        s.extend_from_slice(ops);
        out.push(s);
    }
    out
}

fn move_payload(tick: u64, flags: u32, n: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&tick.to_le_bytes());
    p.extend_from_slice(&n.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    for i in 0..n {
        let mut uuid = [0u8; 16];
        uuid[15] = i as u8;
        uuid[6] = 0x40;
        p.extend_from_slice(&uuid);
        for v in [f64::from(i) * 1.5, 64.0, -f64::from(i)] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for v in [90.0f32, -12.5] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

fn move_frame_seeds() -> Vec<Vec<u8>> {
    let mut out = vec![
        move_payload(1, 0, 0),
        move_payload(7, fastpath::FLAG_CONFLATED, 1),
        move_payload(u64::MAX, fastpath::FLAG_MORE, 3),
        move_payload(42, 3, 5),
    ];
    let mut short = move_payload(2, 0, 2);
    short.truncate(60);
    out.push(short);
    let mut nan = move_payload(3, 0, 1);
    nan[16 + 16..16 + 24].copy_from_slice(&f64::NAN.to_le_bytes());
    out.push(nan);
    out
}

fn event(n: i32) -> Option<EventEnvelope> {
    use plugbus::proto::event_envelope::Payload;
    let payload = Payload::default_for(n)?;
    let mut env = EventEnvelope {
        event_id: format!("{n}"),
        expects_response: n % 2 == 0,
        payload: Some(payload),
        ..Default::default()
    };
    env.r#type = env.payload.as_ref().map_or(0, |p| p.event_type() as i32);
    Some(env)
}

fn all_events() -> Vec<EventEnvelope> {
    use plugbus::proto::{ChatEvent, CommandEvent, event_envelope::Payload};
    let mut v: Vec<EventEnvelope> = (0..128).filter_map(event).collect();
    let mut chat = event(18).expect("chat is field 18");
    chat.payload = Some(Payload::Chat(ChatEvent {
        player_uuid: "00000000-0000-4000-8000-000000000001".into(),
        name: "steve".into(),
        message: "hello there".into(),
    }));
    v.push(chat);
    if let Some(mut cmd) = v
        .iter()
        .find(|e| matches!(e.payload, Some(Payload::Command(_))))
        .cloned()
    {
        cmd.payload = Some(Payload::Command(CommandEvent {
            player_uuid: "00000000-0000-4000-8000-000000000002".into(),
            name: "alex".into(),
            raw: "/filterstats a b".into(),
            command: "filterstats".into(),
            args: vec!["a".into(), "b".into()],
        }));
        v.push(cmd);
    }
    v
}

fn envelope_seeds() -> Vec<Vec<u8>> {
    use plugbus::proto::{host_to_plugin, plugin_to_host};
    let events = all_events();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for env in events.iter().step_by(3) {
        bodies.push(
            HostToPlugin {
                plugin_id: "p".into(),
                payload: Some(host_to_plugin::Payload::Event(env.clone())),
            }
            .encode_to_vec(),
        );
    }
    for n in 0..64 {
        if let Some(p) = host_to_plugin::Payload::default_for(n) {
            bodies.push(
                HostToPlugin {
                    plugin_id: "p".into(),
                    payload: Some(p),
                }
                .encode_to_vec(),
            );
        }
        if let Some(p) = plugin_to_host::Payload::default_for(n) {
            bodies.push(
                PluginToHost {
                    plugin_id: "p".into(),
                    payload: Some(p),
                }
                .encode_to_vec(),
            );
        }
    }
    for chunk in events.chunks(12).take(3) {
        let mut b = BatchBuilder::default();
        chunk.iter().for_each(|e| b.push(e));
        let mut payload = Vec::new();
        b.drain_into(&mut payload);
        bodies.push(payload);
    }
    // Length-prefixed envelopes, for the batch part of the harness.
    let mut chunks = Vec::new();
    for env in events.iter().take(6) {
        let e = env.encode_to_vec();
        chunks.push(e.len() as u8);
        chunks.extend_from_slice(&e);
    }
    bodies.push(chunks);
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut s = vec![i as u8];
            let split = if i % 2 == 0 { body.len() / 2 } else { 0xffff };
            s.extend_from_slice(&(split as u16).to_le_bytes());
            s.extend_from_slice(&body);
            s
        })
        .collect()
}

fn segment_seeds() -> Vec<Vec<u8>> {
    use plugbus::segment::{RingSpec, unique_name};
    let mut out = Vec::new();
    for rings in [
        vec![RingSpec::frames(4096)],
        vec![RingSpec::frames(1024), RingSpec::frames(512)],
        vec![],
    ] {
        let name = unique_name("fuzzseed");
        let Ok(seg) = Segment::create(&name, "fuzz", &rings) else {
            continue;
        };
        let bytes = std::fs::read(format!("/dev/shm/{name}")).unwrap_or_default();
        drop(seg);
        let size = bytes.len();
        let mut trimmed = bytes;
        while trimmed.last() == Some(&0) {
            trimmed.pop();
        }
        // Mode 2: the file has `size` bytes (below 1 MiB), the contents' trailing zeros implied.
        let mut s = ((2u32 << 30) | (size as u32 & 0xf_ffff)).to_le_bytes().to_vec();
        s.extend_from_slice(&trimmed);
        out.push(s.clone());
        // The same header in a file cut short.
        s[..4].copy_from_slice(&(3u32 << 30).to_le_bytes());
        out.push(s);
    }
    out
}

fn ffi_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, env) in all_events().iter().enumerate().filter(|(i, _)| i % 4 == 0 || *i >= 50) {
        let mut s = vec![0u8];
        s.extend_from_slice(&4096u16.to_le_bytes());
        s.extend_from_slice(&(i as u64 % 3).to_le_bytes());
        let msg = b"replaced text";
        s.push(msg.len() as u8);
        s.extend_from_slice(msg);
        s.push(3 + (i % 5) as u8);
        s.push(if i % 2 == 0 { 2 } else { 0x5a });
        s.extend_from_slice(&env.encode_to_vec());
        out.push(s);
    }
    // Host: begin, publish an event, dispatch a chat, moves, end, then drain queues.
    let chat = all_events()
        .into_iter()
        .find(|e| e.event_id == "18")
        .expect("a chat event");
    let ev = chat.encode_to_vec();
    let mut s = vec![1u8, 0, 2, ev.len() as u8];
    s.extend_from_slice(&ev);
    s.push(3);
    s.extend_from_slice(&[6, 4]);
    s.extend_from_slice(b"uuid");
    s.extend_from_slice(&[3, 5]);
    s.extend_from_slice(b"steve");
    s.extend_from_slice(&[3, 2]);
    s.extend_from_slice(b"hi");
    s.push(3);
    s.extend_from_slice(&[8, 96]);
    s.extend_from_slice(&move_payload(1, 0, 2)[16..]);
    s.extend_from_slice(&[0, 1, 9, 1, 0, 0, 0, 0, 0, 0, 0, 13, 15, 16, 19]);
    out.push(s);
    let mut s = vec![1u8, 0, 3, ev.len() as u8];
    s.extend_from_slice(&ev);
    s.push(3);
    s.extend_from_slice(&[11, 12, 1, 17, 1, b'p', 3, 18, 0, 0, 14, 1, b'p', 3, 4, 1, 2, 3, 4, 3]);
    out.push(s);
    // Plugin configuration before connecting.
    let mut s = vec![2u8, 17];
    s.extend_from_slice(b"shm:plugbus.fuzz1");
    s.push(6);
    s.extend_from_slice(b"plugin");
    s.extend_from_slice(&[0, 4]);
    s.extend_from_slice(b"name");
    s.push(5);
    s.extend_from_slice(b"1.0.0");
    s.extend_from_slice(&[1, 5]);
    s.extend_from_slice(b"stats");
    s.push(0xff);
    s.extend_from_slice(&[2, 8, 18, 0, 0, 0, 10, 0, 0, 0, 0, 3, 1, 0, 0, 0, 4, 100, 0, 0, 0, 5, 3]);
    s.extend_from_slice(b"abc");
    s.extend_from_slice(&[3, 6, 0, 3, 0, 3, 7, 4]);
    s.extend_from_slice(b"info");
    s.extend_from_slice(&[2, b'h', b'i', 3, 8]);
    out.push(s);
    out
}
