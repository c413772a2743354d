//! Envoy resources written as JSON/YAML (the proto3 JSON mapping, with
//! `@type` for `Any`) decoded into typed protobuf messages by reflection over
//! Envoy's descriptors. Every error names the field path where it happened,
//! so a user can find it: `filter_chains[0].filters[0].typed_config.stat_prefx:
//! unknown field`.

use std::{collections::HashMap, fmt, sync::OnceLock};

use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value as PValue,
};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// Envoy's API descriptors (every message of envoy-types).
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
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

type Result<T> = std::result::Result<T, DecodeError>;

fn err<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(DecodeError { path: path.to_owned(), message: message.into() })
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") }
}

/// The message type a type URL names (`type.googleapis.com/<full name>`).
pub fn message_for_type_url(url: &str) -> Option<MessageDescriptor> {
    let name = url.rsplit('/').next().unwrap_or(url);
    pool().get_message_by_name(name)
}

/// Decodes `{"@type": ..., fields...}` into (type URL, encoded message).
pub fn decode_any_json(value: &Value, path: &str) -> Result<(String, Vec<u8>)> {
    let Some(obj) = value.as_object() else {
        return err(path, format!("expected an object with @type, got {}", kind_of(value)));
    };
    let Some(url) = obj.get("@type").and_then(Value::as_str) else {
        return err(path, "missing @type");
    };
    let Some(desc) = message_for_type_url(url) else {
        return err(&join(path, "@type"), format!("unknown type {url:?}"));
    };
    let msg = if is_special_wkt(desc.full_name()) {
        let inner = obj.get("value").unwrap_or(&Value::Null);
        decode_message(&desc, inner, &join(path, "value"))?
    } else {
        let mut rest = obj.clone();
        rest.remove("@type");
        decode_message(&desc, &Value::Object(rest), path)?
    };
    Ok((normalize_type_url(url), msg.encode_to_vec()))
}

fn normalize_type_url(url: &str) -> String {
    if url.contains('/') { url.to_owned() } else { format!("type.googleapis.com/{url}") }
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

fn is_special_wkt(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Duration"
            | "google.protobuf.Timestamp"
            | "google.protobuf.FieldMask"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// Decodes a JSON value into a message of type `desc`.
pub fn decode_message(desc: &MessageDescriptor, value: &Value, path: &str) -> Result<DynamicMessage> {
    let mut msg = DynamicMessage::new(desc.clone());
    match desc.full_name() {
        "google.protobuf.Any" => {
            let (url, bytes) = decode_any_json(value, path)?;
            msg.set_field_by_name("type_url", PValue::String(url));
            msg.set_field_by_name("value", PValue::Bytes(bytes.into()));
            return Ok(msg);
        }
        "google.protobuf.Duration" => {
            let Some(s) = value.as_str() else {
                return err(path, format!("expected a duration like \"1.5s\", got {}", kind_of(value)));
            };
            let (secs, nanos) = parse_duration(s).ok_or_else(|| DecodeError {
                path: path.to_owned(),
                message: format!("{s:?} is not a duration (expected seconds with an \"s\" suffix, like \"1.5s\")"),
            })?;
            msg.set_field_by_name("seconds", PValue::I64(secs));
            msg.set_field_by_name("nanos", PValue::I32(nanos));
            return Ok(msg);
        }
        "google.protobuf.Timestamp" => {
            let Some(s) = value.as_str() else { return err(path, "expected an RFC 3339 timestamp string") };
            let (secs, nanos) = parse_timestamp(s).ok_or_else(|| DecodeError {
                path: path.to_owned(),
                message: format!("{s:?} is not an RFC 3339 timestamp"),
            })?;
            msg.set_field_by_name("seconds", PValue::I64(secs));
            msg.set_field_by_name("nanos", PValue::I32(nanos));
            return Ok(msg);
        }
        "google.protobuf.FieldMask" => {
            let Some(s) = value.as_str() else { return err(path, "expected a comma-separated field mask string") };
            let paths = s.split(',').filter(|p| !p.is_empty()).map(|p| PValue::String(p.to_owned())).collect();
            msg.set_field_by_name("paths", PValue::List(paths));
            return Ok(msg);
        }
        "google.protobuf.Struct" => {
            let Some(obj) = value.as_object() else {
                return err(path, format!("expected an object, got {}", kind_of(value)));
            };
            let field = desc.get_field_by_name("fields").expect("Struct.fields");
            let value_desc = map_value_desc(&field);
            let mut map = HashMap::new();
            for (k, v) in obj {
                map.insert(MapKey::String(k.clone()), PValue::Message(struct_value(&value_desc, v)));
            }
            msg.set_field(&field, PValue::Map(map));
            return Ok(msg);
        }
        "google.protobuf.Value" => return Ok(struct_value(desc, value)),
        "google.protobuf.ListValue" => {
            let Some(arr) = value.as_array() else { return err(path, "expected a list") };
            let field = desc.get_field_by_name("values").expect("ListValue.values");
            let Kind::Message(vd) = field.kind() else { unreachable!() };
            msg.set_field(&field, PValue::List(arr.iter().map(|v| PValue::Message(struct_value(&vd, v))).collect()));
            return Ok(msg);
        }
        name if name.starts_with("google.protobuf.") && name.ends_with("Value") && is_special_wkt(name) => {
            let field = desc.get_field_by_name("value").expect("wrapper value");
            let v = scalar(&field.kind(), value, path)?;
            msg.set_field(&field, v);
            return Ok(msg);
        }
        _ => {}
    }

    let Some(obj) = value.as_object() else {
        if value.is_null() {
            return Ok(msg);
        }
        return err(path, format!("expected an object ({}), got {}", desc.full_name(), kind_of(value)));
    };
    let mut oneofs_set: HashMap<String, String> = HashMap::new();
    for (key, v) in obj {
        let fpath = join(path, key);
        let Some(field) = desc.get_field_by_json_name(key).or_else(|| desc.get_field_by_name(key)) else {
            return err(&fpath, format!("unknown field (not in {})", desc.full_name()));
        };
        if v.is_null() {
            continue;
        }
        if let Some(oneof) = field.containing_oneof() {
            if !oneof.is_synthetic() {
                if let Some(other) = oneofs_set.insert(oneof.name().to_owned(), field.name().to_owned()) {
                    return err(
                        &fpath,
                        format!("{} and {other} are alternatives (oneof {}): set only one", field.name(), oneof.name()),
                    );
                }
            }
        }
        let decoded = field_value(&field, v, &fpath)?;
        msg.set_field(&field, decoded);
    }
    Ok(msg)
}

fn map_value_desc(field: &FieldDescriptor) -> MessageDescriptor {
    let Kind::Message(entry) = field.kind() else { unreachable!("map field") };
    let Kind::Message(v) = entry.map_entry_value_field().kind() else { unreachable!("Struct map value") };
    v
}

/// google.protobuf.Value from any JSON.
fn struct_value(desc: &MessageDescriptor, v: &Value) -> DynamicMessage {
    let mut m = DynamicMessage::new(desc.clone());
    match v {
        Value::Null => m.set_field_by_name("null_value", PValue::EnumNumber(0)),
        Value::Bool(b) => m.set_field_by_name("bool_value", PValue::Bool(*b)),
        Value::Number(n) => m.set_field_by_name("number_value", PValue::F64(n.as_f64().unwrap_or(0.0))),
        Value::String(s) => m.set_field_by_name("string_value", PValue::String(s.clone())),
        Value::Array(a) => {
            let lf = desc.get_field_by_name("list_value").unwrap();
            let Kind::Message(ld) = lf.kind() else { unreachable!() };
            let mut l = DynamicMessage::new(ld);
            l.set_field_by_name(
                "values",
                PValue::List(a.iter().map(|x| PValue::Message(struct_value(desc, x))).collect()),
            );
            m.set_field(&lf, PValue::Message(l));
        }
        Value::Object(o) => {
            let sf = desc.get_field_by_name("struct_value").unwrap();
            let Kind::Message(sd) = sf.kind() else { unreachable!() };
            let mut s = DynamicMessage::new(sd.clone());
            let fields = sd.get_field_by_name("fields").unwrap();
            let map =
                o.iter().map(|(k, x)| (MapKey::String(k.clone()), PValue::Message(struct_value(desc, x)))).collect();
            s.set_field(&fields, PValue::Map(map));
            m.set_field(&sf, PValue::Message(s));
        }
    }
    m
}

fn field_value(field: &FieldDescriptor, v: &Value, path: &str) -> Result<PValue> {
    if field.is_map() {
        let Some(obj) = v.as_object() else {
            return err(path, format!("expected an object (a map), got {}", kind_of(v)));
        };
        let Kind::Message(entry) = field.kind() else { unreachable!() };
        let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        let mut map = HashMap::new();
        for (k, x) in obj {
            let kpath = format!("{path}[{k:?}]");
            let key = map_key(&kf.kind(), k, &kpath)?;
            map.insert(key, single(&vf, x, &kpath)?);
        }
        return Ok(PValue::Map(map));
    }
    if field.is_list() {
        let Some(arr) = v.as_array() else { return err(path, format!("expected a list, got {}", kind_of(v))) };
        return arr
            .iter()
            .enumerate()
            .map(|(i, x)| single(field, x, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>>>()
            .map(PValue::List);
    }
    single(field, v, path)
}

fn single(field: &FieldDescriptor, v: &Value, path: &str) -> Result<PValue> {
    match field.kind() {
        Kind::Message(desc) => decode_message(&desc, v, path).map(PValue::Message),
        Kind::Enum(e) => match v {
            Value::String(s) => match e.get_value_by_name(s) {
                Some(ev) => Ok(PValue::EnumNumber(ev.number())),
                None => {
                    let names: Vec<String> = e.values().map(|x| x.name().to_owned()).collect();
                    err(path, format!("{s:?} is not one of {}", names.join(", ")))
                }
            },
            Value::Number(n) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(PValue::EnumNumber)
                .ok_or_else(|| DecodeError { path: path.to_owned(), message: format!("{n} is not an enum number") }),
            other => err(path, format!("expected an enum name ({}), got {}", e.full_name(), kind_of(other))),
        },
        k => scalar(&k, v, path),
    }
}

fn map_key(kind: &Kind, k: &str, path: &str) -> Result<MapKey> {
    Ok(match kind {
        Kind::String => MapKey::String(k.to_owned()),
        Kind::Bool => MapKey::Bool(k == "true"),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(parse_int(k, path)?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(parse_int(k, path)?),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(parse_int(k, path)?),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(parse_int(k, path)?),
        _ => return err(path, "unsupported map key type"),
    })
}

fn parse_int<T: std::str::FromStr>(s: &str, path: &str) -> Result<T> {
    s.parse().map_err(|_| DecodeError { path: path.to_owned(), message: format!("{s:?} is not a valid integer here") })
}

fn int_of<T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr>(v: &Value, path: &str, what: &str) -> Result<T> {
    let bad = || DecodeError { path: path.to_owned(), message: format!("expected {what}, got {}", shown(v)) };
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                T::try_from(i).map_err(|_| bad())
            } else if let Some(u) = n.as_u64() {
                T::try_from(u).map_err(|_| bad())
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 => T::try_from(f as i64).map_err(|_| bad()),
                    _ => Err(bad()),
                }
            }
        }
        Value::String(s) => s.parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        other => kind_of(other).to_owned(),
    }
}

fn scalar(kind: &Kind, v: &Value, path: &str) -> Result<PValue> {
    Ok(match kind {
        Kind::Bool => match v {
            Value::Bool(b) => PValue::Bool(*b),
            Value::String(s) if s == "true" || s == "false" => PValue::Bool(s == "true"),
            _ => return err(path, format!("expected true or false, got {}", shown(v))),
        },
        Kind::String => match v {
            Value::String(s) => PValue::String(s.clone()),
            _ => return err(path, format!("expected a string, got {}", shown(v))),
        },
        Kind::Bytes => match v {
            Value::String(s) => PValue::Bytes(
                base64_decode(s)
                    .ok_or_else(|| DecodeError { path: path.to_owned(), message: "expected base64 bytes".into() })?
                    .into(),
            ),
            _ => return err(path, format!("expected base64 bytes, got {}", shown(v))),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => PValue::I32(int_of(v, path, "a 32-bit integer")?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => PValue::I64(int_of(v, path, "a 64-bit integer")?),
        Kind::Uint32 | Kind::Fixed32 => PValue::U32(int_of(v, path, "a non-negative 32-bit integer")?),
        Kind::Uint64 | Kind::Fixed64 => PValue::U64(int_of(v, path, "a non-negative 64-bit integer")?),
        Kind::Float | Kind::Double => {
            let f = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => match s.as_str() {
                    "NaN" => Some(f64::NAN),
                    "Infinity" => Some(f64::INFINITY),
                    "-Infinity" => Some(f64::NEG_INFINITY),
                    s => s.parse().ok(),
                },
                _ => None,
            }
            .ok_or_else(|| DecodeError {
                path: path.to_owned(),
                message: format!("expected a number, got {}", shown(v)),
            })?;
            if matches!(kind, Kind::Float) { PValue::F32(f as f32) } else { PValue::F64(f) }
        }
        Kind::Message(_) | Kind::Enum(_) => unreachable!("handled by single()"),
    })
}

/// "1.5s", "-2s", "0.000000001s" -> (seconds, nanos).
pub fn parse_duration(s: &str) -> Option<(i64, i32)> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let nanos: i32 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    Some(if neg { (-secs, -nanos) } else { (secs, nanos) })
}

/// RFC 3339 `YYYY-MM-DDTHH:MM:SS[.frac]Z` -> (seconds, nanos) since the epoch.
fn parse_timestamp(s: &str) -> Option<(i64, i32)> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let nanos = if frac.is_empty() { 0 } else { format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()? };
    Some((days * 86400 + t[0] * 3600 + t[1] * 60 + t[2], nanos))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(v: Value) -> Result<(String, Vec<u8>)> {
        decode_any_json(&v, "")
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
        let (url, bytes) = listener(v).unwrap();
        assert_eq!(url, "type.googleapis.com/envoy.config.listener.v3.Listener");
        let l = envoy_types::pb::envoy::config::listener::v3::Listener::decode(&*bytes).unwrap();
        assert_eq!(l.name, "l");
        let any = l.filter_chains[0].filters[0].config_type.as_ref().unwrap();
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any) = any else { panic!() };
        assert!(any.type_url.ends_with("HttpConnectionManager"));
    }

    #[test]
    fn errors_name_the_field_path() {
        let e = listener(serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "filter_chains": [{"filters": [{"name": "x", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefx": "p"
            }}]}]
        }))
        .unwrap_err();
        assert_eq!(e.path, "filter_chains[0].filters[0].typed_config.stat_prefx");
        assert!(e.message.starts_with("unknown field"), "{e}");

        let e = listener(serde_json::json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "per_connection_buffer_limit_bytes": "lots"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "per_connection_buffer_limit_bytes: expected a non-negative 32-bit integer, got \"lots\""
        );

        let e = listener(serde_json::json!({"@type": "type.googleapis.com/envoy.config.nope.v3.Thing"})).unwrap_err();
        assert_eq!(e.to_string(), "@type: unknown type \"type.googleapis.com/envoy.config.nope.v3.Thing\"");

        let e = decode_any_json(&serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "connect_timeout": "5 seconds"}), "").unwrap_err();
        assert_eq!(e.path, "connect_timeout");

        let e = decode_any_json(&serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "lb_policy": "RANDOMISH"}), "").unwrap_err();
        assert!(e.message.contains("is not one of"), "{e}");
    }

    #[test]
    fn camel_case_and_oneof_conflicts() {
        let ok = decode_any_json(
            &serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "connectTimeout": "1s"}),
            "",
        );
        assert!(ok.is_ok());
        let e = decode_any_json(
            &serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "type": "EDS", "cluster_type": {"name": "x"}}),
            "",
        )
        .unwrap_err();
        assert!(e.message.contains("alternatives"), "{e}");
    }

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(parse_duration("1.5s"), Some((1, 500_000_000)));
        assert_eq!(parse_duration("0.000000001s"), Some((0, 1)));
        assert_eq!(parse_duration("1m"), None);
        assert_eq!(parse_timestamp("1970-01-02T00:00:01Z"), Some((86401, 0)));
        assert_eq!(base64_decode("aGk="), Some(b"hi".to_vec()));
    }
}
