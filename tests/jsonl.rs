//! Every event payload of the schema (the list read from the descriptors, so a payload added to
//! proto/ is covered) round-trips through `jsonl::event_line` -> `jsonl::parse_line`, and
//! through a `Recorder` file read back by `jsonl::parse_input`.
//!
//! Each payload is a `DynamicMessage` filled with non-default values for every field (scalars,
//! strings, bytes, enums, repeated, maps, nested messages to a depth limit), so a field that the
//! JSON mapping loses or renames fails the comparison.

use std::collections::HashMap;

use plugbus::fastpath::MoveRecord;
use plugbus::jsonl::{self, InputItem, Recorder};
use plugbus::proto::{self, EventEnvelope};
use prost::Message as _;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};

const MAX_DEPTH: u32 = 4;

fn scalar(kind: &Kind, n: u32, depth: u32) -> Option<Value> {
    let x = n + 1;
    Some(match kind {
        Kind::Double => Value::F64(f64::from(x) + 0.1),
        Kind::Float => Value::F32(x as f32 + 0.3),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(-(x as i32)),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(-(i64::from(x) << 40) - 1),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(x * 65_537),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(u64::MAX - u64::from(x)),
        Kind::Bool => Value::Bool(true),
        Kind::String => Value::String(format!("f{n} \"q\" \\ é✓\n")),
        Kind::Bytes => Value::Bytes(vec![n as u8, 0, 0xFF, 0x80, 0x3E].into()),
        Kind::Enum(ed) => {
            let values: Vec<i32> = ed.values().map(|v| v.number()).filter(|&v| v != 0).collect();
            if values.is_empty() {
                return None;
            }
            Value::EnumNumber(values[n as usize % values.len()])
        }
        Kind::Message(md) => {
            if depth >= MAX_DEPTH {
                return None;
            }
            Value::Message(fill(md, depth + 1))
        }
    })
}

fn map_key(kind: &Kind, n: u32, i: u32) -> MapKey {
    match kind {
        Kind::Bool => MapKey::Bool(i % 2 == 0),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(-((n + i) as i32)),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(-(i64::from(n + i) << 35)),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(n + i),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(u64::from(n + i) << 35),
        Kind::String => MapKey::String(format!("k{n}-{i}")),
        other => panic!("{other:?} cannot be a map key"),
    }
}

fn field_value(f: &FieldDescriptor, depth: u32) -> Option<Value> {
    let n = f.number();
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else { unreachable!() };
        let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut map = HashMap::new();
        for i in 0..2 {
            map.insert(map_key(&kf.kind(), n, i), scalar(&vf.kind(), n * 7 + i, depth)?);
        }
        return Some(Value::Map(map));
    }
    if f.is_list() {
        let items = (0..2)
            .map(|i| scalar(&f.kind(), n * 7 + i, depth))
            .collect::<Option<Vec<_>>>()?;
        return Some(Value::List(items));
    }
    scalar(&f.kind(), n, depth)
}

/// Every field set, except the non-first members of each (real) oneof.
fn fill(md: &MessageDescriptor, depth: u32) -> DynamicMessage {
    let mut m = DynamicMessage::new(md.clone());
    for f in md.fields() {
        let first_in_oneof = match f.containing_oneof() {
            Some(o) if !o.is_synthetic() => o.fields().next().map(|g| g.number()) == Some(f.number()),
            _ => true,
        };
        if !first_in_oneof {
            continue;
        }
        if let Some(v) = field_value(&f, depth) {
            m.set_field(&f, v);
        }
    }
    m
}

/// One filled envelope per event payload of the schema.
fn every_event() -> Vec<EventEnvelope> {
    let pool = jsonl::descriptor_pool();
    let env_md = pool.get_message_by_name("df.plugin.EventEnvelope").unwrap();
    assert!(
        proto::EVENT_PAYLOADS.len() >= 49,
        "{} payloads",
        proto::EVENT_PAYLOADS.len()
    );
    proto::EVENT_PAYLOADS
        .iter()
        .enumerate()
        .map(|(i, &(number, name, full))| {
            let payload_md = pool.get_message_by_name(full).unwrap();
            let mut env = DynamicMessage::new(env_md.clone());
            env.set_field_by_name("event_id", Value::String(format!("ev-{i}")));
            env.set_field_by_name("type", Value::EnumNumber(number));
            env.set_field_by_name("expects_response", Value::Bool(i % 2 == 0));
            env.set_field_by_name("immediate", Value::Bool(i % 3 == 0));
            let payload = fill(&payload_md, 0);
            assert!(
                payload.fields().count() > 0 || payload_md.fields().len() == 0,
                "{name} left empty"
            );
            env.set_field_by_name(name, Value::Message(payload));
            let typed: EventEnvelope = env.transcode_to().unwrap();
            assert_eq!(typed.payload.as_ref().map(|p| p.field_number()), Some(number), "{name}");
            typed
        })
        .collect()
}

#[test]
fn every_event_type_round_trips() {
    for (i, env) in every_event().iter().enumerate() {
        let text = jsonl::event_line(i as u64, env);
        assert!(!text.contains('\n'));
        let line = jsonl::parse_line(&text, i + 1)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .unwrap();
        assert_eq!((line.line, line.tick), (i + 1, Some(i as u64)));
        match line.item {
            InputItem::Event(back) => assert_eq!(&back, env, "{text}"),
            other => panic!("not an event: {other:?}"),
        }
    }
}

#[test]
fn recorder_round_trips_every_event_type() {
    let events = every_event();
    let moves: Vec<MoveRecord> = (0..5u8)
        .map(|i| MoveRecord::new([i; 16], [f64::from(i) * 0.1, 64.0, -1e-9], f32::from(i) * 1.1, -0.5))
        .collect();
    let path = std::env::temp_dir().join(format!("plugbus-jsonl-it-{}.jsonl", std::process::id()));
    let mut rec = Recorder::create(&path).unwrap();
    let mut buf = Vec::new();
    for (i, e) in events.iter().enumerate() {
        buf.clear();
        e.encode(&mut buf).unwrap();
        rec.event(i as u64, &buf);
        rec.moves(i as u64, &moves[..i % moves.len()]);
    }
    assert_eq!(rec.dropped(), 0);
    let written = rec.finish().unwrap();

    let file = std::fs::File::open(&path).unwrap();
    let lines = jsonl::parse_input(std::io::BufReader::new(file)).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(lines.len() as u64, written);
    let mut expected = Vec::new();
    for (i, e) in events.iter().enumerate() {
        expected.push((Some(i as u64), InputItem::Event(e.clone())));
        if i % moves.len() != 0 {
            expected.push((Some(i as u64), InputItem::Moves(moves[..i % moves.len()].to_vec())));
        }
    }
    let got: Vec<_> = lines.into_iter().map(|l| (l.tick, l.item)).collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
}
