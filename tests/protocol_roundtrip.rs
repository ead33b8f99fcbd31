//! Every event payload and every action of the schema round-trips through the rings and the
//! codec, with the list of variants read from the schema's descriptors (not typed by hand): a
//! message added to proto/ is covered without touching this file.
//!
//! For each variant, a `DynamicMessage` of its type is filled with non-default values derived
//! from field numbers (every scalar, string, bytes, enum, repeated, map and nested field, down
//! to [`MAX_DEPTH`]), set into an `EventEnvelope` / `Action`, encoded by prost-reflect, decoded
//! into the generated prost struct, sent through a real frame ring with the codec, decoded on
//! the other side, re-encoded, and decoded again as a `DynamicMessage`, which must equal the
//! original. Comparing dynamic messages (not only bytes) catches a field that a typed struct
//! drops, renumbers or re-types.

use std::collections::HashMap;

use plugbus::codec::{self, BatchBuilder, HostDecoder, HostMessage, PluginDecoder};
use plugbus::proto::{self, EventEnvelope, action, event_envelope, plugin_to_host};
use plugbus::ring::{RegionRef, frame};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, OneofDescriptor, ReflectMessage,
    Value,
};

/// How deep nested messages are filled (the payload message is depth 0).
const MAX_DEPTH: u32 = 4;
/// Samples per variant; sample `s` picks member `s % len` of every oneof it meets, so the
/// oneofs nested inside payloads are exercised with more than one member.
const SAMPLES: u32 = 3;

const EVENT_PAYLOADS_IN_SCHEMA: usize = 49;
const ACTIONS_IN_SCHEMA: usize = 106;

fn pool() -> DescriptorPool {
    DescriptorPool::decode(proto::DESCRIPTOR_SET).expect("proto::DESCRIPTOR_SET decodes")
}

fn message(pool: &DescriptorPool, name: &str) -> MessageDescriptor {
    pool.get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} missing from the descriptor set"))
}

fn oneof(md: &MessageDescriptor, name: &str) -> OneofDescriptor {
    md.oneofs()
        .find(|o| o.name() == name)
        .unwrap_or_else(|| panic!("oneof {name} missing in {}", md.full_name()))
}

/// The fields of oneof `name` of `md`, in declaration order.
fn oneof_fields(md: &MessageDescriptor, name: &str) -> Vec<FieldDescriptor> {
    oneof(md, name).fields().collect()
}

// ------------------------------------------------------------------------------------------
// The filler
// ------------------------------------------------------------------------------------------

/// A value that differs from the field default, derived from `n` (a field number mixed with
/// the sample and the position). `None` when no non-default value exists (an enum with only
/// its zero value) or the depth limit stops a message.
fn scalar(kind: &Kind, n: u32, sample: u32, depth: u32) -> Option<Value> {
    let x = n + 1 + 1000 * sample;
    Some(match kind {
        Kind::Double => Value::F64(f64::from(x) + 0.25),
        Kind::Float => Value::F32(x as f32 + 0.5),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(if x % 2 == 0 { -(x as i32) } else { x as i32 }),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(-(i64::from(x) * 1_000_000_007)),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(x * 65_537),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(u64::from(x) << 33 | 1),
        Kind::Bool => Value::Bool(true),
        // Non-ASCII on purpose: byte lengths differ from char counts.
        Kind::String => Value::String(format!("f{n}-s{sample}-é✓")),
        Kind::Bytes => Value::Bytes(vec![n as u8, 0, 0xFF, sample as u8, 0x80].into()),
        Kind::Enum(ed) => {
            let values: Vec<i32> = ed.values().map(|v| v.number()).filter(|&v| v != 0).collect();
            if values.is_empty() {
                return None;
            }
            Value::EnumNumber(values[(n + sample) as usize % values.len()])
        }
        Kind::Message(md) => {
            if depth >= MAX_DEPTH {
                return None;
            }
            Value::Message(fill(md, sample, depth + 1))
        }
    })
}

fn map_key(kind: &Kind, n: u32, i: u32) -> MapKey {
    let x = n + 1 + i;
    match kind {
        Kind::Bool => MapKey::Bool(i % 2 == 0),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(-(x as i32)),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(-(i64::from(x) << 35)),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(x),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(u64::from(x) << 35),
        Kind::String => MapKey::String(format!("k{n}-{i}")),
        other => panic!("{other:?} cannot be a map key"),
    }
}

/// The value for field `f`: a list of two, a map of two, or one value.
fn field_value(f: &FieldDescriptor, sample: u32, depth: u32) -> Option<Value> {
    let n = f.number();
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else {
            panic!("map field {} without an entry message", f.full_name())
        };
        let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut map = HashMap::new();
        for i in 0..2 {
            // A map value message counts as one level deeper, like any nested message.
            let v = scalar(&vf.kind(), n * 7 + i, sample, depth)?;
            map.insert(map_key(&kf.kind(), n, i), v);
        }
        return Some(Value::Map(map));
    }
    if f.is_list() {
        let items = (0..2)
            .map(|i| scalar(&f.kind(), n * 7 + i, sample, depth))
            .collect::<Option<Vec<_>>>()?;
        return Some(Value::List(items));
    }
    scalar(&f.kind(), n, sample, depth)
}

/// Whether `f` is the member that sample `sample` picks in its (real) oneof, or in none.
fn picked(f: &FieldDescriptor, sample: u32) -> bool {
    match f.containing_oneof() {
        Some(o) if !o.is_synthetic() => {
            let members: Vec<u32> = o.fields().map(|m| m.number()).collect();
            members[sample as usize % members.len()] == f.number()
        }
        _ => true,
    }
}

/// A message of type `md` with every field set to a non-default value (one member per oneof).
fn fill(md: &MessageDescriptor, sample: u32, depth: u32) -> DynamicMessage {
    let mut m = DynamicMessage::new(md.clone());
    for f in md.fields() {
        if !picked(&f, sample) {
            continue;
        }
        if let Some(v) = field_value(&f, sample, depth) {
            m.set_field(&f, v);
        }
    }
    m
}

/// Checks the filler itself: every field it should have set is set (present and non-default),
/// so a round-trip comparison really covers each field. Returns the number of fields checked.
fn assert_filled(m: &DynamicMessage, sample: u32, depth: u32) -> usize {
    let md = m.descriptor();
    let mut checked = 0;
    for f in md.fields() {
        let skip_enum = matches!(f.kind(), Kind::Enum(ref ed) if ed.values().all(|v| v.number() == 0));
        let skip_depth = matches!(f.kind(), Kind::Message(_)) && !f.is_map() && depth >= MAX_DEPTH;
        let skip_map_depth = f.is_map()
            && matches!(f.kind(), Kind::Message(ref e) if matches!(e.map_entry_value_field().kind(), Kind::Message(_)))
            && depth >= MAX_DEPTH;
        if !picked(&f, sample) {
            // Another member of the oneof was picked; exactly one must be present.
            let o = f.containing_oneof().expect("not picked means in a oneof");
            assert_eq!(
                o.fields().filter(|g| m.has_field(g)).count(),
                1,
                "{}: oneof {} must hold exactly one member",
                md.full_name(),
                o.name()
            );
            continue;
        }
        if skip_enum || skip_depth || skip_map_depth {
            continue;
        }
        assert!(m.has_field(&f), "filler left {} unset", f.full_name());
        checked += 1;
        match &*m.get_field(&f) {
            Value::Message(inner) => checked += assert_filled(inner, sample, depth + 1),
            Value::List(items) => {
                assert!(!items.is_empty(), "{} is an empty list", f.full_name());
                for item in items {
                    if let Value::Message(inner) = item {
                        checked += assert_filled(inner, sample, depth + 1);
                    }
                }
            }
            _ => {}
        }
    }
    checked
}

/// A compact text form of a dynamic message (field names and values, unknown fields by
/// number), for failure messages: `Debug` of a `DynamicMessage` prints whole descriptors.
fn render(m: &DynamicMessage) -> String {
    fn value(v: &Value) -> String {
        match v {
            Value::Message(m) => render(m),
            Value::List(items) => format!("[{}]", items.iter().map(value).collect::<Vec<_>>().join(", ")),
            Value::Map(map) => {
                let mut entries: Vec<String> = map.iter().map(|(k, v)| format!("{k:?}: {}", value(v))).collect();
                entries.sort();
                format!("{{{}}}", entries.join(", "))
            }
            other => format!("{other:?}"),
        }
    }
    let mut parts: Vec<String> = m.fields().map(|(f, v)| format!("{}: {}", f.name(), value(v))).collect();
    parts.extend(m.unknown_fields().map(|u| format!("#{}: {:?}", u.number(), u)));
    format!("{} {{ {} }}", m.descriptor().name(), parts.join(", "))
}

/// Asserts two dynamic messages are equal, printing them compactly when not.
fn assert_dynamic_eq(got: &DynamicMessage, want: &DynamicMessage, what: &str) {
    if got != want {
        panic!("{what}:\n   got: {}\n  want: {}", render(got), render(want));
    }
}

// ------------------------------------------------------------------------------------------
// Schema lists
// ------------------------------------------------------------------------------------------

#[test]
fn schema_lists_agree_with_the_descriptor() {
    let pool = pool();
    let env = message(&pool, "df.plugin.EventEnvelope");
    let payloads = oneof_fields(&env, "payload");
    assert_eq!(payloads.len(), EVENT_PAYLOADS_IN_SCHEMA, "event payloads in proto/");
    let from_descriptor: Vec<(i32, String, String)> = payloads
        .iter()
        .map(|f| {
            let Kind::Message(md) = f.kind() else {
                panic!("payload {} is not a message", f.name())
            };
            (f.number() as i32, f.name().to_owned(), md.full_name().to_owned())
        })
        .collect();
    let from_build: Vec<(i32, String, String)> = proto::EVENT_PAYLOADS
        .iter()
        .map(|&(n, name, ty)| (n, name.to_owned(), ty.to_owned()))
        .collect();
    assert_eq!(from_build, from_descriptor, "proto::EVENT_PAYLOADS vs the descriptor");

    let act = message(&pool, "df.plugin.Action");
    let kinds = oneof_fields(&act, "kind");
    assert_eq!(kinds.len(), ACTIONS_IN_SCHEMA, "actions in proto/");
    let from_descriptor: Vec<(i32, String, String)> = kinds
        .iter()
        .map(|f| {
            let Kind::Message(md) = f.kind() else {
                panic!("action {} is not a message", f.name())
            };
            (f.number() as i32, f.name().to_owned(), md.full_name().to_owned())
        })
        .collect();
    let from_build: Vec<(i32, String, String)> = proto::ACTION_KINDS
        .iter()
        .map(|&(n, name, ty)| (n, name.to_owned(), ty.to_owned()))
        .collect();
    assert_eq!(from_build, from_descriptor, "proto::ACTION_KINDS vs the descriptor");

    // The generated helpers agree with the descriptor for every variant.
    for f in &payloads {
        let n = f.number() as i32;
        let p = event_envelope::Payload::default_for(n).unwrap_or_else(|| panic!("default_for({n})"));
        assert_eq!((p.field_number(), p.field_name()), (n, f.name()));
        // The protocol's rule: an event's type is its payload's field number.
        assert_eq!(p.event_type() as i32, n, "EventType for payload {}", f.name());
    }
    for f in &kinds {
        let n = f.number() as i32;
        let k = action::Kind::default_for(n).unwrap_or_else(|| panic!("default_for({n})"));
        assert_eq!((k.field_number(), k.field_name()), (n, f.name()));
    }
    assert!(event_envelope::Payload::default_for(0).is_none());
    assert!(action::Kind::default_for(0).is_none());
}

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

/// One event per (payload, sample): the dynamic envelope and its typed decoding.
struct EventCase {
    name: String,
    dynamic: DynamicMessage,
    typed: EventEnvelope,
}

fn event_cases(pool: &DescriptorPool) -> Vec<EventCase> {
    let env_md = message(pool, "df.plugin.EventEnvelope");
    let mut cases = Vec::new();
    for sample in 0..SAMPLES {
        for f in oneof_fields(&env_md, "payload") {
            let Kind::Message(payload_md) = f.kind() else {
                panic!("payload {} is not a message", f.name())
            };
            let payload = fill(&payload_md, sample, 0);
            assert_filled(&payload, sample, 0);
            let mut env = DynamicMessage::new(env_md.clone());
            env.set_field_by_name("event_id", Value::String(format!("ev-{}-{sample}", f.number())));
            env.set_field_by_name("type", Value::EnumNumber(f.number() as i32));
            // Only non-default values are set: a dynamic message keeps an explicit default,
            // which no encoding carries, so it would not compare equal after a round trip.
            let flag = if sample % 2 == 0 {
                "expects_response"
            } else {
                "immediate"
            };
            env.set_field_by_name(flag, Value::Bool(true));
            env.set_field(&f, Value::Message(payload));
            let bytes = env.encode_to_vec();
            let typed =
                EventEnvelope::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{}: typed decode: {e}", f.name()));
            let p = typed
                .payload
                .as_ref()
                .unwrap_or_else(|| panic!("{}: typed decode lost the payload", f.name()));
            assert_eq!(p.field_number(), f.number() as i32, "{}", f.name());
            assert_eq!(typed.r#type, f.number() as i32);
            assert_eq!(typed.encoded_len(), bytes.len(), "{}: typed length differs", f.name());
            cases.push(EventCase {
                name: format!("{} (sample {sample})", f.name()),
                dynamic: env,
                typed,
            });
        }
    }
    cases
}

/// Re-encodes what came out of the codec and compares it, as a dynamic message, with the input.
fn assert_event_same(case: &EventCase, got: &EventEnvelope, env_md: &MessageDescriptor, path: &str) {
    assert_eq!(got, &case.typed, "{}: typed message differs after {path}", case.name);
    let again = DynamicMessage::decode(env_md.clone(), got.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("{}: dynamic decode after {path}: {e}", case.name));
    assert_dynamic_eq(
        &again,
        &case.dynamic,
        &format!("{}: dynamic message differs after {path}", case.name),
    );
    let mut transcoded = DynamicMessage::new(env_md.clone());
    transcoded.transcode_from(got).expect("transcode");
    assert_dynamic_eq(
        &transcoded,
        &case.dynamic,
        &format!("{}: transcoded message differs after {path}", case.name),
    );
}

fn ring(capacity: usize) -> (frame::Producer, frame::Consumer) {
    frame::channel(RegionRef::heap(frame::region_size(capacity))).expect("frame ring")
}

#[test]
fn every_event_round_trips_alone() {
    let pool = pool();
    let env_md = message(&pool, "df.plugin.EventEnvelope");
    let cases = event_cases(&pool);
    assert_eq!(cases.len(), EVENT_PAYLOADS_IN_SCHEMA * SAMPLES as usize);
    // A small ring, so the frames wrap many times (padding frames included).
    let (mut tx, mut rx) = ring(1 << 16);
    let mut decoder = HostDecoder::default();
    for case in &cases {
        let len = codec::encode_event_in_ring(&mut tx, &case.typed).expect("encode into the ring");
        let f = rx.try_read().expect("ring ok").expect("one frame");
        assert_eq!(f.kind(), codec::KIND_HOST_TO_PLUGIN);
        assert_eq!(f.payload().len(), len);
        // Any df.plugin decoder reads the frame: a fresh prost decode sees `HostToPlugin.event`.
        let fresh = proto::HostToPlugin::decode(f.payload()).expect("fresh decode");
        match &fresh.payload {
            Some(proto::host_to_plugin::Payload::Event(e)) => assert_event_same(case, e, &env_md, "fresh decode"),
            other => panic!("{}: frame holds {other:?}", case.name),
        }
        let mut seen = 0;
        let n = decoder
            .decode(f.payload(), |m| match m {
                HostMessage::Event(e) => {
                    seen += 1;
                    assert_event_same(case, e, &env_md, "ring + HostDecoder");
                }
                HostMessage::Other(o) => panic!("{}: decoded as {o:?}", case.name),
            })
            .expect("HostDecoder");
        assert_eq!((n, seen), (1, 1));
        drop(f);
        assert!(rx.try_read().expect("ring ok").is_none());
    }
}

#[test]
fn every_event_round_trips_in_batch_frames() {
    let pool = pool();
    let env_md = message(&pool, "df.plugin.EventEnvelope");
    let cases = event_cases(&pool);
    let (mut tx, mut rx) = ring(1 << 22);
    let mut decoder = HostDecoder::default();

    // All of them in one frame, in order.
    let mut batch = BatchBuilder::default();
    for case in &cases {
        batch.push(&case.typed);
    }
    assert_eq!(batch.len(), cases.len());
    batch.flush_to(&mut tx).expect("flush the batch");
    assert!(batch.is_empty());
    let f = rx.try_read().expect("ring ok").expect("the batch frame");
    let mut i = 0;
    let n = decoder
        .decode(f.payload(), |m| match m {
            HostMessage::Event(e) => {
                assert_event_same(&cases[i], e, &env_md, "one batch frame");
                i += 1;
            }
            HostMessage::Other(o) => panic!("batch decoded as {o:?}"),
        })
        .expect("HostDecoder");
    assert_eq!((n, i), (cases.len(), cases.len()));
    // A fresh prost decode reads the same frame as `HostToPlugin.events`.
    match proto::HostToPlugin::decode(f.payload()).expect("fresh decode").payload {
        Some(proto::host_to_plugin::Payload::Events(b)) => {
            assert_eq!(b.events.len(), cases.len());
            for (e, case) in b.events.iter().zip(&cases) {
                assert_event_same(case, e, &env_md, "fresh batch decode");
            }
        }
        other => panic!("batch frame holds {other:?}"),
    }
    drop(f);

    // As the host gathers them: flushed whenever the default limits are reached, many frames.
    let limits = codec::BatchLimits::default();
    let mut frames = 0;
    for case in &cases {
        batch.push(&case.typed);
        if batch.is_full(&limits) {
            batch.flush_to(&mut tx).expect("flush");
            frames += 1;
        }
    }
    if !batch.is_empty() {
        batch.flush_to(&mut tx).expect("flush");
        frames += 1;
    }
    assert!(frames > 1, "the filled events are large enough to need several frames");
    let mut i = 0;
    for _ in 0..frames {
        let f = rx.try_read().expect("ring ok").expect("a batch frame");
        decoder
            .decode(f.payload(), |m| match m {
                HostMessage::Event(e) => {
                    assert_event_same(&cases[i], e, &env_md, "limited batch frames");
                    i += 1;
                }
                HostMessage::Other(o) => panic!("batch decoded as {o:?}"),
            })
            .expect("HostDecoder");
    }
    assert_eq!(i, cases.len());
    assert!(rx.try_read().expect("ring ok").is_none());
}

// ------------------------------------------------------------------------------------------
// Actions
// ------------------------------------------------------------------------------------------

struct ActionCase {
    name: String,
    dynamic: DynamicMessage,
    typed: proto::Action,
}

fn action_cases(pool: &DescriptorPool) -> Vec<ActionCase> {
    let act_md = message(pool, "df.plugin.Action");
    let mut cases = Vec::new();
    for sample in 0..SAMPLES {
        for f in oneof_fields(&act_md, "kind") {
            let Kind::Message(kind_md) = f.kind() else {
                panic!("action {} is not a message", f.name())
            };
            let inner = fill(&kind_md, sample, 0);
            assert_filled(&inner, sample, 0);
            let mut act = DynamicMessage::new(act_md.clone());
            if sample != 1 {
                // Sample 1 leaves the optional correlation id absent.
                act.set_field_by_name("correlation_id", Value::String(format!("corr-{}-{sample}", f.number())));
            }
            act.set_field(&f, Value::Message(inner));
            let bytes = act.encode_to_vec();
            let typed =
                proto::Action::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{}: typed decode: {e}", f.name()));
            let k = typed
                .kind
                .as_ref()
                .unwrap_or_else(|| panic!("{}: typed decode lost the kind", f.name()));
            assert_eq!(k.field_number(), f.number() as i32);
            assert_eq!(typed.correlation_id.is_some(), sample != 1);
            cases.push(ActionCase {
                name: format!("{} (sample {sample})", f.name()),
                dynamic: act,
                typed,
            });
        }
    }
    cases
}

fn assert_action_same(case: &ActionCase, got: &proto::Action, act_md: &MessageDescriptor, path: &str) {
    assert_eq!(got, &case.typed, "{}: typed action differs after {path}", case.name);
    let again = DynamicMessage::decode(act_md.clone(), got.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("{}: dynamic decode after {path}: {e}", case.name));
    assert_dynamic_eq(
        &again,
        &case.dynamic,
        &format!("{}: dynamic action differs after {path}", case.name),
    );
    let mut transcoded = DynamicMessage::new(act_md.clone());
    transcoded.transcode_from(got).expect("transcode");
    assert_dynamic_eq(
        &transcoded,
        &case.dynamic,
        &format!("{}: transcoded action differs after {path}", case.name),
    );
}

fn actions_message(actions: Vec<proto::Action>) -> proto::PluginToHost {
    proto::PluginToHost {
        plugin_id: "roundtrip".to_owned(),
        payload: Some(plugin_to_host::Payload::Actions(proto::ActionBatch { actions })),
    }
}

#[test]
fn every_action_round_trips() {
    let pool = pool();
    let act_md = message(&pool, "df.plugin.Action");
    let cases = action_cases(&pool);
    assert_eq!(cases.len(), ACTIONS_IN_SCHEMA * SAMPLES as usize);
    let (mut tx, mut rx) = ring(1 << 16);
    let mut decoder = PluginDecoder::default();

    // One action per frame, through a small ring that wraps.
    for case in &cases {
        let msg = actions_message(vec![case.typed.clone()]);
        let len = codec::encode_in_ring(&mut tx, codec::KIND_PLUGIN_TO_HOST, &msg).expect("encode into the ring");
        let f = rx.try_read().expect("ring ok").expect("one frame");
        assert_eq!((f.kind(), f.payload().len()), (codec::KIND_PLUGIN_TO_HOST, len));
        let got = decoder.decode(f.payload()).expect("PluginDecoder");
        assert_eq!(got.plugin_id, "roundtrip");
        match &got.payload {
            Some(plugin_to_host::Payload::Actions(b)) => {
                assert_eq!(b.actions.len(), 1, "{}", case.name);
                assert_action_same(case, &b.actions[0], &act_md, "ring + PluginDecoder");
            }
            other => panic!("{}: decoded as {other:?}", case.name),
        }
    }

    // All of them in one ActionBatch frame, in order.
    let (mut tx, mut rx) = ring(1 << 22);
    let msg = actions_message(cases.iter().map(|c| c.typed.clone()).collect());
    codec::encode_in_ring(&mut tx, codec::KIND_PLUGIN_TO_HOST, &msg).expect("encode into the ring");
    let f = rx.try_read().expect("ring ok").expect("one frame");
    let got = decoder.decode(f.payload()).expect("PluginDecoder");
    let Some(plugin_to_host::Payload::Actions(b)) = &got.payload else {
        panic!("decoded as {:?}", got.payload)
    };
    assert_eq!(b.actions.len(), cases.len());
    for (a, case) in b.actions.iter().zip(&cases) {
        assert_action_same(case, a, &act_md, "one ActionBatch frame");
    }
}

// ------------------------------------------------------------------------------------------
// Decoding into reused messages
// ------------------------------------------------------------------------------------------

/// Decodes `bytes` (a `HostToPlugin` frame payload) with the reusing decoder and checks each
/// event against a fresh prost decode of the same bytes.
fn check_reuse(decoder: &mut HostDecoder, bytes: &[u8], what: &str) {
    let fresh = proto::HostToPlugin::decode(bytes).expect("fresh decode");
    let expected: Vec<EventEnvelope> = match fresh.payload {
        Some(proto::host_to_plugin::Payload::Event(e)) => vec![e],
        Some(proto::host_to_plugin::Payload::Events(b)) => b.events,
        other => panic!("{what}: not an event frame: {other:?}"),
    };
    let mut got = Vec::new();
    decoder
        .decode(bytes, |m| match m {
            HostMessage::Event(e) => got.push(e.clone()),
            HostMessage::Other(o) => panic!("{what}: decoded as {o:?}"),
        })
        .expect("HostDecoder");
    assert_eq!(got, expected, "{what}: reused decode differs from a fresh decode");
}

fn event_frame(env: &EventEnvelope) -> Vec<u8> {
    proto::HostToPlugin {
        plugin_id: String::new(),
        payload: Some(proto::host_to_plugin::Payload::Event(env.clone())),
    }
    .encode_to_vec()
}

fn event_frame_raw(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(
        codec::HOST_TO_PLUGIN_EVENT,
        prost::encoding::WireType::LengthDelimited,
        &mut out,
    );
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

fn chat(id: &str, msg: &str) -> EventEnvelope {
    EventEnvelope {
        event_id: id.to_owned(),
        r#type: proto::EventType::Chat as i32,
        expects_response: true,
        immediate: false,
        payload: Some(event_envelope::Payload::Chat(proto::ChatEvent {
            player_uuid: "2f1d6c3e-0000-4000-8000-000000000001".to_owned(),
            name: "Steve".to_owned(),
            message: msg.to_owned(),
        })),
    }
}

#[test]
fn host_decoder_reuse_equals_fresh_decode() {
    let pool = pool();
    let cases = event_cases(&pool);
    let mut decoder = HostDecoder::default();

    // Every schema event, in an order that changes type at each step, twice, so each decode
    // lands in a slot already used by another sample of the same type.
    for round in 0..2 {
        for (k, case) in cases.iter().enumerate().rev() {
            check_reuse(
                &mut decoder,
                &event_frame(&case.typed),
                &format!("round {round}, case {k}"),
            );
        }
    }

    // Strings getting shorter, fields going back to default, in the same slot.
    let long = chat("event-id-long-long-long", &"x".repeat(300));
    let mut short = chat("1", "hi");
    short.expects_response = false;
    check_reuse(&mut decoder, &event_frame(&long), "long chat");
    check_reuse(&mut decoder, &event_frame(&short), "shorter chat");
    let mut empty_chat = chat("", "");
    empty_chat.payload = Some(event_envelope::Payload::Chat(proto::ChatEvent::default()));
    empty_chat.expects_response = false;
    check_reuse(&mut decoder, &event_frame(&empty_chat), "chat with an empty payload");

    // An envelope with no payload after envelopes with one; then a payload again.
    let no_payload = EventEnvelope {
        event_id: "np".to_owned(),
        r#type: proto::EventType::Chat as i32,
        ..Default::default()
    };
    check_reuse(&mut decoder, &event_frame(&long), "chat before no payload");
    check_reuse(&mut decoder, &event_frame(&no_payload), "no payload after a chat");
    check_reuse(&mut decoder, &event_frame(&EventEnvelope::default()), "empty envelope");
    check_reuse(&mut decoder, &event_frame(&short), "chat after no payload");

    // Nested messages present, then absent (same type, same slot).
    let with_pos = EventEnvelope {
        event_id: "m1".to_owned(),
        r#type: proto::EventType::PlayerMove as i32,
        payload: Some(event_envelope::Payload::PlayerMove(proto::PlayerMoveEvent {
            player_uuid: "u".repeat(36),
            name: "Alex".to_owned(),
            world: "overworld".to_owned(),
            position: Some(proto::Vec3 {
                x: 1.5,
                y: 64.0,
                z: -3.0,
            }),
            rotation: Some(proto::Rotation { yaw: 90.0, pitch: 10.0 }),
        })),
        ..Default::default()
    };
    let without_pos = EventEnvelope {
        event_id: "m2".to_owned(),
        r#type: proto::EventType::PlayerMove as i32,
        payload: Some(event_envelope::Payload::PlayerMove(proto::PlayerMoveEvent {
            name: "A".to_owned(),
            ..Default::default()
        })),
        ..Default::default()
    };
    check_reuse(&mut decoder, &event_frame(&with_pos), "move with position");
    check_reuse(&mut decoder, &event_frame(&without_pos), "move without position");

    // Protobuf merge semantics: two encodings concatenated are one message (last scalar wins,
    // nested messages merge, and the last oneof member wins).
    let mut body = with_pos.encode_to_vec();
    body.extend_from_slice(&without_pos.encode_to_vec());
    check_reuse(&mut decoder, &event_frame_raw(&body), "two moves merged");
    let mut body = long.encode_to_vec();
    body.extend_from_slice(&with_pos.encode_to_vec());
    check_reuse(&mut decoder, &event_frame_raw(&body), "chat then move: move wins");
    let mut body = with_pos.encode_to_vec();
    body.extend_from_slice(&no_payload.encode_to_vec());
    check_reuse(
        &mut decoder,
        &event_frame_raw(&body),
        "move then no payload: move stays",
    );

    // A field this schema does not know, numbered like a oneof member, after the payload (what a
    // newer host adding an envelope field would send): skipped, the payload kept.
    for unknown in [5u32, 82, 200, 1000] {
        let mut body = long.encode_to_vec();
        prost::encoding::string::encode(unknown, &"from a newer host".to_owned(), &mut body);
        check_reuse(
            &mut decoder,
            &event_frame_raw(&body),
            &format!("chat then unknown field {unknown}"),
        );
        let mut body = Vec::new();
        prost::encoding::string::encode(unknown, &"from a newer host".to_owned(), &mut body);
        body.extend_from_slice(&short.encode_to_vec());
        check_reuse(
            &mut decoder,
            &event_frame_raw(&body),
            &format!("unknown field {unknown} then chat"),
        );
    }

    // The same one level up: a `HostToPlugin` field this schema does not know, after the event.
    // The frame still carries that event (a fresh decode sees `HostToPlugin.event`).
    for unknown in [5u32, 30, 99] {
        let mut frame = event_frame(&long);
        prost::encoding::string::encode(unknown, &"from a newer host".to_owned(), &mut frame);
        check_reuse(
            &mut decoder,
            &frame,
            &format!("event then HostToPlugin field {unknown}"),
        );
    }

    // The same events as one batch frame, decoded into the slots used above.
    let mut batch = BatchBuilder::default();
    for env in [&long, &no_payload, &short, &with_pos, &without_pos, &empty_chat, &long] {
        batch.push(env);
    }
    let mut frame = Vec::new();
    batch.drain_into(&mut frame);
    check_reuse(&mut decoder, &frame, "batch of mixed events");
}

fn command(id: &str, args: &[&str]) -> EventEnvelope {
    EventEnvelope {
        event_id: id.to_owned(),
        r#type: proto::EventType::Command as i32,
        payload: Some(event_envelope::Payload::Command(proto::CommandEvent {
            player_uuid: "2f1d6c3e-0000-4000-8000-000000000001".to_owned(),
            name: "Steve".to_owned(),
            raw: format!("/tp {}", args.join(" ")),
            command: "tp".to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        })),
        ..Default::default()
    }
}

/// A command's arguments (a `repeated string`) decode into strings kept from the previous
/// command: more, fewer, none, and two encodings merged (their lists concatenated).
#[test]
fn host_decoder_reuse_of_command_arguments_equals_fresh_decode() {
    let mut decoder = HostDecoder::default();
    let cases = [
        command("1", &["Alex", "10", "64", "-3"]),
        command("2", &["x"]),
        command("3", &[]),
        command("4", &["a much longer argument than any before it", "", "b"]),
        command("5", &["one", "two", "three", "four", "five", "six"]),
        chat("6", "between two commands"),
        command("7", &["after a chat"]),
    ];
    for (k, env) in cases.iter().enumerate() {
        check_reuse(&mut decoder, &event_frame(env), &format!("command case {k}"));
    }
    let mut body = cases[0].encode_to_vec();
    body.extend_from_slice(&cases[3].encode_to_vec());
    check_reuse(&mut decoder, &event_frame_raw(&body), "two commands merged");
}

fn answer(id: &str, cancel: Option<bool>, update: Option<proto::event_result::Update>) -> proto::PluginToHost {
    proto::PluginToHost {
        plugin_id: "p".to_owned(),
        payload: Some(plugin_to_host::Payload::EventResult(proto::EventResult {
            event_id: id.to_owned(),
            cancel,
            update,
        })),
    }
}

fn chat_mutation(message: Option<&str>) -> Option<proto::event_result::Update> {
    Some(proto::event_result::Update::Chat(proto::ChatMutation {
        message: message.map(str::to_owned),
    }))
}

/// The host's decoder of plugin answers keeps a chat mutation's text from one answer to the
/// next; presence still decodes as a fresh decode does: text, no text (`None`), an explicit
/// empty text (`Some("")`), no mutation, another mutation, and merged encodings.
#[test]
fn plugin_decoder_reuse_of_chat_mutations_equals_fresh_decode() {
    let mut decoder = PluginDecoder::default();
    let food = Some(proto::event_result::Update::PlayerFoodLoss(
        proto::PlayerFoodLossMutation { to: Some(3) },
    ));
    let cases = [
        answer("1", None, chat_mutation(Some("hello there"))),
        answer("2", None, chat_mutation(None)),
        answer("3", Some(true), chat_mutation(Some(""))),
        answer("4", None, chat_mutation(Some(&"long ".repeat(80)))),
        answer("5", None, None),
        answer("6", None, chat_mutation(Some("short"))),
        answer("7", Some(false), food.clone()),
        answer("8", None, chat_mutation(Some("after food"))),
    ];
    let check = |decoder: &mut PluginDecoder, bytes: &[u8], what: &str| {
        let fresh = proto::PluginToHost::decode(bytes).expect("fresh decode");
        let got = decoder.decode(bytes).expect("PluginDecoder");
        assert_eq!(*got, fresh, "{what}: reused decode differs from a fresh decode");
    };
    for round in 0..2 {
        for (k, msg) in cases.iter().enumerate() {
            check(
                &mut decoder,
                &msg.encode_to_vec(),
                &format!("round {round}, answer case {k}"),
            );
        }
    }
    // Two answers concatenated: nested messages merge, so a text set in the first survives a
    // second mutation without one; a later different variant replaces the chat.
    for (a, b) in [(0, 1), (1, 0), (0, 2), (3, 0), (0, 6), (6, 0), (0, 4)] {
        let mut bytes = cases[a].encode_to_vec();
        bytes.extend_from_slice(&cases[b].encode_to_vec());
        check(&mut decoder, &bytes, &format!("answers {a} and {b} merged"));
    }
}
