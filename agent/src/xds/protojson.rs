//! Envoy resources written as JSON/YAML (the proto3 JSON mapping, with
//! `@type` for `Any`) decoded into protobuf messages by prost-reflect's
//! deserializer over Envoy's descriptors (the ones envoy-types ships).
//! serde_path_to_error tracks where a problem is, so every error names the
//! field path a user can find: `filter_chains[0].filters[0].typed_config.stat_prefx:
//! unknown field`. Messages are then walked (see [`walk`]) to bound their
//! nesting, and to apply the field rules Envoy declares and the tenancy rules.

use std::{fmt, sync::OnceLock};

use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    ReflectMessage, Value as PValue,
};
use serde_json::Value;

use crate::limits::MAX_PROTO_DEPTH;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// Envoy's API descriptors (every message of envoy-types, and the `validate`
/// options they carry).
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    // The descriptors are compiled into the binary from envoy-types; they
    // decode or the build is broken (a unit test decodes them).
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).expect("envoy-types descriptors decode"))
}

/// Where in a resource a problem is, and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Field path from the resource root, e.g. `filter_chains[0].filters[0].name`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;

fn err<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(DecodeError { path: path.to_owned(), message: message.into() })
}

/// The message type a type URL names (`type.googleapis.com/<full name>`).
pub fn message_for_type_url(url: &str) -> Option<MessageDescriptor> {
    let name = url.rsplit('/').next().unwrap_or(url);
    pool().get_message_by_name(name)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Decodes a resource, `{"@type": ..., fields...}`, into (type URL, message).
/// The message's nesting is checked ([`MAX_PROTO_DEPTH`]), so encoding it and
/// decoding it again (prost, Envoy) cannot fail on depth.
pub fn decode_resource(value: &Value) -> Result<(String, DynamicMessage)> {
    let Some(obj) = value.as_object() else {
        return err("", format!("expected an object with @type, got {}", kind_of(value)));
    };
    let Some(url) = obj.get("@type").and_then(Value::as_str) else {
        return err("", "missing @type");
    };
    let Some(desc) = message_for_type_url(url) else {
        return err("@type", format!("unknown type {url:?}"));
    };
    let mut fields = obj.clone();
    fields.remove("@type");
    let fields = Value::Object(fields);
    let msg = decode_message(&desc, &fields)?;
    walk(&msg, &mut |_, _| {})?;
    let url = if url.contains('/') { url.to_owned() } else { format!("type.googleapis.com/{url}") };
    Ok((url, msg))
}

/// Decodes a JSON value into a message of type `desc` (proto3 JSON mapping:
/// field names as in the .proto or in lowerCamelCase, `@type` for `Any`).
pub fn decode_message(desc: &MessageDescriptor, value: &Value) -> Result<DynamicMessage> {
    let mut track = serde_path_to_error::Track::new();
    let result = DynamicMessage::deserialize_with_options(
        desc.clone(),
        serde_path_to_error::Deserializer::new(value, &mut track),
        &DeserializeOptions::new(),
    );
    result.map_err(|e| {
        let path = track.path();
        let segments: Vec<&serde_path_to_error::Segment> = path.iter().collect();
        let shown = path.to_string();
        let mut shown = if shown == "." { String::new() } else { shown };
        let raw = e.to_string();
        // An unknown key is reported by the map that holds it: name the key too.
        if let Some(key) = raw.strip_prefix("unrecognized field name '").and_then(|k| k.strip_suffix('\'')) {
            shown = join(&shown, key);
        }
        DecodeError { message: explain(desc, value, &segments, raw), path: shown }
    })
}

/// Rewrites prost-reflect's messages into ones that say what the field is.
fn explain(desc: &MessageDescriptor, root: &Value, segments: &[&serde_path_to_error::Segment], raw: String) -> String {
    let at = resolve(desc, root, segments);
    if raw.starts_with("unrecognized field name") {
        let parent = at.value.and_then(|v| {
            // The map holding the key; an Any's fields are its payload type's.
            match at.message.as_ref() {
                Some(m) if m.full_name() == "google.protobuf.Any" => {
                    v.get("@type").and_then(Value::as_str).and_then(message_for_type_url)
                }
                m => m.cloned(),
            }
        });
        return match parent {
            Some(m) => format!("unknown field (not in {})", m.full_name()),
            None => "unknown field".into(),
        };
    }
    if let Some(field) = &at.field
        && let Kind::Enum(e) = field.kind()
        && (raw.starts_with("unrecognized enum value") || raw.starts_with("invalid type"))
    {
        let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
        return format!("{} is not one of {}", shown(at.value), names.join(", "));
    }
    if raw.starts_with("multiple fields provided for oneof") {
        return format!("{raw}: set only one of the alternatives");
    }
    match &at.field {
        // A value of the wrong type or out of range: say what the field takes.
        Some(field) if at.value.is_some() => {
            let detail = if raw.starts_with("invalid type") { String::new() } else { format!(" ({raw})") };
            format!("expected {}, got {}{detail}", expected(field, at.in_list), shown(at.value))
        }
        _ => raw,
    }
}

fn expected(field: &FieldDescriptor, element: bool) -> String {
    if field.is_list() && !element {
        return "a list".into();
    }
    if field.is_map() {
        return "an object (a map)".into();
    }
    match field.kind() {
        Kind::Bool => "true or false".into(),
        Kind::String => "a string".into(),
        Kind::Bytes => "base64 bytes".into(),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "a 32-bit integer".into(),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "a 64-bit integer".into(),
        Kind::Uint32 | Kind::Fixed32 => "a non-negative 32-bit integer".into(),
        Kind::Uint64 | Kind::Fixed64 => "a non-negative 64-bit integer".into(),
        Kind::Float | Kind::Double => "a number".into(),
        Kind::Enum(e) => format!("an enum name ({})", e.full_name()),
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => "a duration like \"1.5s\"".into(),
            "google.protobuf.Timestamp" => "an RFC 3339 timestamp".into(),
            "google.protobuf.UInt32Value" => "a non-negative 32-bit integer".into(),
            "google.protobuf.UInt64Value" => "a non-negative 64-bit integer".into(),
            "google.protobuf.Int32Value" => "a 32-bit integer".into(),
            "google.protobuf.Int64Value" => "a 64-bit integer".into(),
            "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => "a number".into(),
            "google.protobuf.BoolValue" => "true or false".into(),
            "google.protobuf.StringValue" => "a string".into(),
            name => format!("an object ({name})"),
        },
    }
}

fn shown(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => format!("{s:?}"),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => kind_of(other).to_owned(),
        None => "nothing".into(),
    }
}

/// What a path leads to: the JSON value there, the field it sets, and the
/// message type it is (or is in).
struct At<'a> {
    value: Option<&'a Value>,
    field: Option<FieldDescriptor>,
    /// The value is one element of a list (or map) field.
    in_list: bool,
    message: Option<MessageDescriptor>,
}

fn resolve<'a>(desc: &MessageDescriptor, root: &'a Value, segments: &[&serde_path_to_error::Segment]) -> At<'a> {
    use serde_path_to_error::Segment;
    let mut at = At { value: Some(root), field: None, in_list: false, message: Some(desc.clone()) };
    for seg in segments {
        let value = at.value.take();
        match seg {
            Segment::Seq { index } => {
                at.value = value.and_then(|v| v.get(*index));
                at.in_list = true;
                at.message = match at.field.as_ref().map(FieldDescriptor::kind) {
                    Some(Kind::Message(m)) => Some(m),
                    _ => None,
                };
            }
            Segment::Map { key } => {
                at.value = value.and_then(|v| v.get(key.as_str()));
                if let Some(f) = at.field.as_ref().filter(|f| f.is_map() && !at.in_list) {
                    // A key of a map field: the map's value type applies.
                    at.in_list = true;
                    at.message = match f.kind() {
                        Kind::Message(entry) => match entry.map_entry_value_field().kind() {
                            Kind::Message(m) => Some(m),
                            _ => None,
                        },
                        _ => None,
                    };
                    continue;
                }
                let mut m = at.message.take();
                if m.as_ref().is_some_and(|m| m.full_name() == "google.protobuf.Any") {
                    m = value.and_then(|v| v.get("@type")).and_then(Value::as_str).and_then(message_for_type_url);
                }
                let field = m.as_ref().and_then(|m| m.get_field_by_json_name(key).or_else(|| m.get_field_by_name(key)));
                at.in_list = false;
                at.message = match field.as_ref().map(FieldDescriptor::kind) {
                    Some(Kind::Message(m)) if !field.as_ref().is_some_and(FieldDescriptor::is_map) => Some(m),
                    _ => None,
                };
                at.field = field;
            }
            _ => {
                at.value = None;
                at.message = None;
            }
        }
    }
    at
}

/// Visits every message of `msg` depth first (the root too), with its field
/// path (`filter_chains[0].filters[0].typed_config`), going into `Any`
/// payloads. Fails when the nesting goes past [`MAX_PROTO_DEPTH`], counting
/// through `Any` payloads, or when a payload does not decode.
pub fn walk(msg: &DynamicMessage, visit: &mut dyn FnMut(&str, &DynamicMessage)) -> Result<()> {
    walk_at(msg, "", 1, visit)
}

fn walk_at(msg: &DynamicMessage, path: &str, depth: usize, visit: &mut dyn FnMut(&str, &DynamicMessage)) -> Result<()> {
    if depth > MAX_PROTO_DEPTH {
        return err(
            &elided(path),
            format!(
                "nested more than {MAX_PROTO_DEPTH} messages deep (Envoy refuses deeper ones; a Struct costs three levels per JSON level)"
            ),
        );
    }
    visit(path, msg);
    if msg.descriptor().full_name() == "google.protobuf.Any" {
        if let Some(inner) = any_payload(msg).transpose()? {
            return walk_at(&inner, path, depth + 1, visit);
        }
        return Ok(());
    }
    for (field, value) in msg.fields() {
        let name = join(path, field.name());
        match value {
            PValue::Message(m) => walk_at(m, &name, depth + 1, visit)?,
            PValue::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let PValue::Message(m) = item {
                        walk_at(m, &format!("{name}[{i}]"), depth + 1, visit)?;
                    }
                }
            }
            PValue::Map(entries) => {
                for (k, v) in entries {
                    if let PValue::Message(m) = v {
                        // A map entry is a message of its own on the wire.
                        walk_at(m, &format!("{name}[{}]", show_key(k)), depth + 2, visit)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The message an `Any` holds, decoded; None when it is empty.
pub fn any_payload(any: &DynamicMessage) -> Option<Result<DynamicMessage>> {
    let url = match any.get_field_by_name("type_url").as_deref() {
        Some(PValue::String(s)) if !s.is_empty() => s.clone(),
        _ => return None,
    };
    let bytes = match any.get_field_by_name("value").as_deref() {
        Some(PValue::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let Some(desc) = message_for_type_url(&url) else {
        return Some(err("@type", format!("unknown type {url:?}")));
    };
    Some(
        DynamicMessage::decode(desc, bytes)
            .map_err(|e| DecodeError { path: String::new(), message: format!("{url}: {e} (nested too deeply?)") }),
    )
}

/// A long path with its middle left out, for messages.
fn elided(path: &str) -> String {
    let chars: Vec<char> = path.chars().collect();
    if chars.len() <= 160 {
        return path.to_owned();
    }
    let head: String = chars[..80].iter().collect();
    let tail: String = chars[chars.len() - 60..].iter().collect();
    format!("{head}...{tail}")
}

/// `a.b` from `a` and `b`.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") }
}

fn show_key(k: &MapKey) -> String {
    match k {
        MapKey::String(s) => format!("{s:?}"),
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};

    fn decode(v: Value) -> Result<(String, DynamicMessage)> {
        decode_resource(&v)
    }

    /// The pool is held for as long as the agent runs: it holds Envoy's
    /// messages, fields and the `validate` options, not the .proto files'
    /// comments (build.rs leaves them out: decoded, they were 27 of its 28 MiB).
    #[test]
    fn the_descriptor_pool_holds_no_source_comments() {
        let (pool, held) = crate::test_alloc::held_after(|| DescriptorPool::decode(DESCRIPTORS).unwrap());
        assert!(pool.get_message_by_name("envoy.config.listener.v3.Listener").is_some());
        assert!(pool.files().all(|f| f.file_descriptor_proto().source_code_info.is_none()));
        println!("the descriptor pool holds {} KiB", held / 1024);
        // 28,400 KiB with the comments, 10,100 without (debug).
        assert!(held < 14 << 20, "{held} bytes");
    }

    #[test]
    fn decodes_a_listener_with_nested_any() {
        let v = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "p",
                    "rds": {"route_config_name": "r"},
                    "common_http_protocol_options": {"idle_timeout": "1.5s"},
                    "http_filters": [{"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                }
            }]}]
        });
        let (url, msg) = decode(v).unwrap();
        assert_eq!(url, "type.googleapis.com/envoy.config.listener.v3.Listener");
        let l: Listener = msg.transcode_to().unwrap();
        assert_eq!(l.name, "l");
        let Some(filter::ConfigType::TypedConfig(any)) = l.filter_chains[0].filters[0].config_type.as_ref() else {
            panic!()
        };
        assert!(any.type_url.ends_with("HttpConnectionManager"));
        let mut paths = Vec::new();
        walk(&msg, &mut |p, m| paths.push(format!("{p} {}", m.descriptor().full_name()))).unwrap();
        assert!(
            paths.contains(&"filter_chains[0].filters[0].typed_config.common_http_protocol_options.idle_timeout google.protobuf.Duration".to_string()),
            "{paths:#?}"
        );
    }

    #[test]
    fn errors_name_the_field_path() {
        let e = decode(serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "filter_chains": [{"filters": [{"name": "x", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefx": "p"
            }}]}]
        }))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "filter_chains[0].filters[0].typed_config.stat_prefx: unknown field (not in envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager)"
        );

        let e = decode(serde_json::json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "per_connection_buffer_limit_bytes": "lots"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "per_connection_buffer_limit_bytes: expected a non-negative 32-bit integer, got \"lots\" (invalid digit found in string)"
        );

        let e = decode(serde_json::json!({"@type": "type.googleapis.com/envoy.config.nope.v3.Thing"})).unwrap_err();
        assert_eq!(e.to_string(), "@type: unknown type \"type.googleapis.com/envoy.config.nope.v3.Thing\"");

        let e = decode(serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "connect_timeout": "5 seconds"})).unwrap_err();
        assert_eq!(e.path, "connect_timeout");

        let e = decode(serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "lb_policy": "RANDOMISH"})).unwrap_err();
        assert!(e.message.starts_with("\"RANDOMISH\" is not one of ROUND_ROBIN, LEAST_REQUEST"), "{e}");

        let e = decode(serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"port_value": -1}}}}]}]}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: expected a non-negative 32-bit integer, got -1 (out of range integral type conversion attempted)"
        );
    }

    #[test]
    fn camel_case_and_oneof_conflicts() {
        let ok = decode(
            serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "connectTimeout": "1s"}),
        );
        assert!(ok.is_ok());
        let e = decode(
            serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "type": "EDS", "cluster_type": {"name": "x"}}),
        )
        .unwrap_err();
        assert!(e.message.contains("oneof"), "{e}");
    }

    #[test]
    fn nesting_is_bounded_and_named() {
        // 45 levels of JSON in filter metadata: 135 levels of protobuf.
        let mut deep = serde_json::json!("leaf");
        for _ in 0..45 {
            deep = serde_json::json!({ "k": deep });
        }
        let e = decode(serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "metadata": {"filter_metadata": {"x": deep}}
        }))
        .unwrap_err();
        assert!(e.path.starts_with("metadata.filter_metadata[\"x\"].fields[\"k\"]"), "{e}");
        assert!(e.message.starts_with("nested more than 100 messages deep"), "{e}");
    }
}
