//! The field constraints Envoy declares in its API descriptors
//! (protoc-gen-validate's `validate.rules` field options, `validate.required`
//! on oneofs, `validate.disabled` on messages), applied to decoded resources,
//! so what Envoy would refuse (a port of 70000, an empty cluster name, a
//! missing required field) is refused offline with the field's path, not only
//! by Envoy's NACK on every node.
//!
//! The rules are read from the descriptors envoy-types ships (the same ones
//! the decoder uses), once per message type. Covered: numeric ranges, `const`,
//! `in`/`not_in` (all numeric kinds, durations), string and bytes lengths,
//! `pattern`, `prefix`/`suffix`/`contains`, string well-known formats
//! (hostname, IP addresses, HTTP header names and values), enum `defined_only`,
//! repeated `min_items`/`max_items`/`unique`/`items`, map `min_pairs`/
//! `max_pairs`/`keys`/`values`, `Any` `in`/`not_in`, required messages and
//! oneofs. Not covered (Envoy still checks them): timestamp ranges, `uri`,
//! `email`, `uuid` formats.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use prost_reflect::{
    DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value as PValue,
};

use super::protojson::{self, DecodeError};

/// Rules of one message type: each field with rules, and oneofs that must be set.
struct TypeRules {
    /// The type's full name (what the per-thread cache checks a hit by).
    name: String,
    fields: Vec<(FieldDescriptor, DynamicMessage)>,
    /// Names of required oneofs and their fields.
    required_oneofs: Vec<(String, Vec<FieldDescriptor>)>,
    disabled: bool,
}

fn extension(name: &str) -> Option<ExtensionDescriptor> {
    protojson::pool().get_extension_by_name(name)
}

/// The rules of a message type, read from its descriptor once per process.
/// Asked for every message of every resource checked: each thread keeps the
/// types it asked for by the address of their name in the descriptor pool,
/// which lives as long as the process (no lock, no hashing of the name).
fn rules_of(desc: &MessageDescriptor) -> Arc<TypeRules> {
    thread_local! {
        static SEEN: std::cell::RefCell<HashMap<usize, Arc<TypeRules>>> = Default::default();
    }
    let name = desc.full_name();
    let at = name.as_ptr() as usize;
    if let Some(r) = SEEN.with(|s| s.borrow().get(&at).filter(|r| r.name == name).cloned()) {
        return r;
    }
    let r = read_rules(desc);
    SEEN.with(|s| s.borrow_mut().insert(at, r.clone()));
    r
}

fn read_rules(desc: &MessageDescriptor) -> Arc<TypeRules> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<TypeRules>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(r) = cache.lock().ok().and_then(|c| c.get(desc.full_name()).cloned()) {
        return r;
    }
    let field_ext = extension("validate.rules");
    let oneof_ext = extension("validate.required");
    let disabled_ext = extension("validate.disabled");
    let flag = |opts: &DynamicMessage, ext: &Option<ExtensionDescriptor>| {
        ext.as_ref().is_some_and(|e| opts.has_extension(e) && matches!(*opts.get_extension(e), PValue::Bool(true)))
    };
    let mut rules = TypeRules {
        name: desc.full_name().to_owned(),
        fields: Vec::new(),
        required_oneofs: Vec::new(),
        disabled: flag(&desc.options(), &disabled_ext),
    };
    if let Some(ext) = &field_ext {
        for f in desc.fields() {
            let opts = f.options();
            if opts.has_extension(ext)
                && let PValue::Message(m) = &*opts.get_extension(ext)
            {
                rules.fields.push((f.clone(), m.clone()));
            }
        }
    }
    for o in desc.oneofs().filter(|o| !o.is_synthetic()) {
        if flag(&o.options(), &oneof_ext) {
            rules.required_oneofs.push((o.name().to_owned(), o.fields().collect()));
        }
    }
    let rules = Arc::new(rules);
    if let Ok(mut c) = cache.lock() {
        c.insert(desc.full_name().to_owned(), rules.clone());
    }
    rules
}

/// Checks one message's own fields (not the messages inside it: walk the
/// resource with [`protojson::walk`] and call this for each).
pub fn check(path: &str, msg: &DynamicMessage, out: &mut Vec<DecodeError>) {
    let desc = msg.descriptor();
    let rules = rules_of(&desc);
    if rules.disabled {
        return;
    }
    for (name, fields) in &rules.required_oneofs {
        if !fields.iter().any(|f| msg.has_field(f)) {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            out.push(DecodeError {
                path: path.to_owned(),
                message: format!("one of {} is required ({name})", names.join(", ")),
            });
        }
    }
    for (field, r) in &rules.fields {
        let set = msg.has_field(field);
        let value = msg.get_field(field);
        // The field's path is written only for a failure (most fields pass).
        let mut fail = |message: String| out.push(DecodeError { path: protojson::join(path, field.name()), message });
        // A member of a oneof, or a proto3 `optional` field, is checked only when set.
        if !set && field.containing_oneof().is_some() {
            continue;
        }
        if let Some(m) = sub(r, "message") {
            if get_bool(m, "required") && !set {
                fail("is required".into());
                continue;
            }
            if get_bool(m, "skip") {
                continue;
            }
        }
        if field.is_list() {
            let items = match &*value {
                PValue::List(l) => l.as_slice(),
                _ => &[],
            };
            if let Some(rep) = sub(r, "repeated") {
                if get_bool(rep, "ignore_empty") && items.is_empty() {
                    continue;
                }
                count_rules(rep, "min_items", "max_items", items.len(), "items", &mut fail);
                if get_bool(rep, "unique") {
                    for (i, a) in items.iter().enumerate() {
                        if items[..i].contains(a) {
                            fail(format!("item {i} repeats an earlier one; items must be unique"));
                            break;
                        }
                    }
                }
                if let Some(each) = sub(rep, "items") {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(m) = value_rule(each, field, item, set) {
                            fail(format!("[{i}] {m}"));
                        }
                    }
                }
            }
            continue;
        }
        if field.is_map() {
            let Some(map) = sub(r, "map") else { continue };
            let entries = match &*value {
                PValue::Map(m) => m.len(),
                _ => 0,
            };
            if get_bool(map, "ignore_empty") && entries == 0 {
                continue;
            }
            count_rules(map, "min_pairs", "max_pairs", entries, "entries", &mut fail);
            if let (PValue::Map(m), Kind::Message(entry)) = (&*value, field.kind()) {
                let kf = entry.map_entry_key_field();
                let vf = entry.map_entry_value_field();
                for (k, v) in m {
                    let key = key_value(k);
                    if let Some(keys) = sub(map, "keys")
                        && let Some(msg) = value_rule(keys, &kf, &key, true)
                    {
                        fail(format!("key {}: {msg}", shown(&key)));
                    }
                    if let Some(values) = sub(map, "values")
                        && let Some(msg) = value_rule(values, &vf, v, true)
                    {
                        fail(format!("[{}] {msg}", shown(&key)));
                    }
                }
            }
            continue;
        }
        if let Some(m) = value_rule(r, field, &value, set) {
            fail(m);
        }
    }
}

fn key_value(k: &prost_reflect::MapKey) -> PValue {
    use prost_reflect::MapKey;
    match k {
        MapKey::Bool(b) => PValue::Bool(*b),
        MapKey::I32(n) => PValue::I32(*n),
        MapKey::I64(n) => PValue::I64(*n),
        MapKey::U32(n) => PValue::U32(*n),
        MapKey::U64(n) => PValue::U64(*n),
        MapKey::String(s) => PValue::String(s.clone()),
    }
}

/// The rules message `name` of `rules`, when set (borrowed: the rules are
/// read for every field of every resource checked).
fn sub<'a>(rules: &'a DynamicMessage, name: &str) -> Option<&'a DynamicMessage> {
    let field = rules.descriptor().get_field_by_name(name)?;
    if !rules.has_field(&field) {
        return None;
    }
    match rules.get_field(&field) {
        std::borrow::Cow::Borrowed(PValue::Message(m)) => Some(m),
        _ => None,
    }
}

fn get_bool(m: &DynamicMessage, name: &str) -> bool {
    matches!(m.get_field_by_name(name).as_deref(), Some(PValue::Bool(true)))
}

fn get_u64(m: &DynamicMessage, name: &str) -> Option<u64> {
    if !m.has_field_by_name(name) {
        return None;
    }
    match m.get_field_by_name(name).as_deref() {
        Some(PValue::U64(n)) => Some(*n),
        Some(PValue::U32(n)) => Some(u64::from(*n)),
        _ => None,
    }
}

fn count_rules(r: &DynamicMessage, min: &str, max: &str, n: usize, what: &str, fail: &mut impl FnMut(String)) {
    let n = n as u64;
    if let Some(lo) = get_u64(r, min).filter(|lo| n < *lo) {
        fail(format!("has {n} {what}; at least {lo} required"));
    }
    if let Some(hi) = get_u64(r, max).filter(|hi| n > *hi) {
        fail(format!("has {n} {what}; at most {hi} allowed"));
    }
}

/// A number as i128 (exact for every integer kind) or f64.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn of(v: &PValue) -> Option<Num> {
        Some(match v {
            PValue::I32(n) => Num::Int(i128::from(*n)),
            PValue::I64(n) => Num::Int(i128::from(*n)),
            PValue::U32(n) => Num::Int(i128::from(*n)),
            PValue::U64(n) => Num::Int(i128::from(*n)),
            PValue::F32(n) => Num::Float(f64::from(*n)),
            PValue::F64(n) => Num::Float(*n),
            PValue::EnumNumber(n) => Num::Int(i128::from(*n)),
            _ => return None,
        })
    }

    fn cmp(self, other: Num) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.float().partial_cmp(&b.float()),
        }
    }

    fn float(self) -> f64 {
        match self {
            Num::Int(n) => n as f64,
            Num::Float(f) => f,
        }
    }

    fn show(self) -> String {
        match self {
            Num::Int(n) => n.to_string(),
            Num::Float(f) => f.to_string(),
        }
    }
}

/// Range, `const`, `in` and `not_in` rules of a numeric rules message
/// (UInt32Rules...), or of DurationRules with values in nanoseconds.
fn range(
    r: &DynamicMessage,
    v: Num,
    of: &dyn Fn(&PValue) -> Option<Num>,
    show: &dyn Fn(Num) -> String,
) -> Option<String> {
    use std::cmp::Ordering::*;
    let get = |name: &str| r.has_field_by_name(name).then(|| r.get_field_by_name(name)).flatten().and_then(|x| of(&x));
    if let Some(c) = get("const").filter(|c| v.cmp(*c) != Some(Equal)) {
        return Some(format!("must be {}, got {}", show(c), show(v)));
    }
    let (gt, gte, lt, lte) = (get("gt"), get("gte"), get("lt"), get("lte"));
    let above =
        gt.map(|b| (b, v.cmp(b) == Some(Greater), "above")).or(gte.map(|b| (b, v.cmp(b) != Some(Less), "at least")));
    let below =
        lt.map(|b| (b, v.cmp(b) == Some(Less), "below")).or(lte.map(|b| (b, v.cmp(b) != Some(Greater), "at most")));
    match (above, below) {
        // PGV: lower bound above the upper bound means "outside the range".
        (Some((lo, lo_ok, lo_w)), Some((hi, hi_ok, hi_w))) if lo.cmp(hi) == Some(Greater) && !lo_ok && !hi_ok => {
            return Some(format!("must be {hi_w} {} or {lo_w} {}, got {}", show(hi), show(lo), show(v)));
        }
        (Some((lo, lo_ok, lo_w)), Some((hi, hi_ok, hi_w))) if (!lo_ok || !hi_ok) => {
            return Some(format!("must be {lo_w} {} and {hi_w} {}, got {}", show(lo), show(hi), show(v)));
        }
        (Some((b, false, w)), None) | (None, Some((b, false, w))) => {
            return Some(format!("must be {w} {}, got {}", show(b), show(v)));
        }
        _ => {}
    }
    let list = |name: &str| match r.get_field_by_name(name).as_deref() {
        Some(PValue::List(l)) => l.iter().filter_map(of).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let allowed = list("in");
    if !allowed.is_empty() && !allowed.iter().any(|a| v.cmp(*a) == Some(Equal)) {
        let shown: Vec<String> = allowed.iter().map(|a| show(*a)).collect();
        return Some(format!("must be one of {}, got {}", shown.join(", "), show(v)));
    }
    if list("not_in").iter().any(|a| v.cmp(*a) == Some(Equal)) {
        return Some(format!("must not be {}", show(v)));
    }
    None
}

/// The members of FieldRules' `type` oneof [`value_rule`] reads: the numeric
/// kinds first.
const VALUE_KINDS: [&str; 18] = [
    "float",
    "double",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "sint32",
    "sint64",
    "fixed32",
    "fixed64",
    "sfixed32",
    "sfixed64",
    "string",
    "bytes",
    "enum",
    "any",
    "duration",
    "timestamp",
];

/// Checks one value (a singular field, a list item, a map key or value)
/// against its FieldRules; `set`: whether the field is present.
fn value_rule(r: &DynamicMessage, field: &FieldDescriptor, value: &PValue, set: bool) -> Option<String> {
    // FieldRules sets one member of its `type` oneof besides `message`:
    // found in one pass over the fields it sets.
    let (kind, rules) = r.fields().find_map(|(f, v)| match v {
        PValue::Message(m) if f.name() != "message" => Some((VALUE_KINDS.iter().find(|k| **k == f.name())?, m)),
        _ => None,
    })?;
    let kind = *kind;
    if VALUE_KINDS[..12].contains(&kind) {
        // The rules of a wrapper type (UInt32Value) apply to its value, when it is set.
        let v = match value {
            PValue::Message(m) => {
                if !set {
                    return None;
                }
                Num::of(m.get_field_by_name("value").as_deref()?)?
            }
            v => Num::of(v)?,
        };
        if get_bool(rules, "ignore_empty") && v.cmp(Num::Int(0)) == Some(std::cmp::Ordering::Equal) {
            return None;
        }
        return range(rules, v, &Num::of, &|n| n.show());
    }
    if kind == "string" {
        let s = match value {
            PValue::String(s) => s.as_str(),
            PValue::Message(m) if set => match m.get_field_by_name("value").as_deref() {
                Some(PValue::String(s)) => return string_rule(rules, s),
                _ => return None,
            },
            _ => return None,
        };
        return string_rule(rules, s);
    }
    if kind == "bytes" {
        let PValue::Bytes(b) = value else { return None };
        if get_bool(rules, "ignore_empty") && b.is_empty() {
            return None;
        }
        return length(rules, b.len(), "bytes", ["min_len", "max_len", "len"]);
    }
    if kind == "enum" {
        let PValue::EnumNumber(n) = value else { return None };
        let Kind::Enum(e) = field.kind() else { return None };
        if get_bool(rules, "defined_only") && e.get_value(*n).is_none() {
            return Some(format!("{n} is not a value of {}", e.full_name()));
        }
        let show = |x: Num| match x {
            Num::Int(i) => {
                i32::try_from(i).ok().and_then(|i| e.get_value(i)).map_or(i.to_string(), |v| v.name().to_owned())
            }
            f => f.show(),
        };
        return range(rules, Num::Int(i128::from(*n)), &Num::of, &show);
    }
    if kind == "any" {
        let PValue::Message(m) = value else { return None };
        if !set {
            return get_bool(rules, "required").then(|| "is required".into());
        }
        let url = match m.get_field_by_name("type_url").as_deref() {
            Some(PValue::String(s)) => s.clone(),
            _ => String::new(),
        };
        let list = |name: &str| match rules.get_field_by_name(name).as_deref() {
            Some(PValue::List(l)) => l.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let allowed = list("in");
        if !allowed.is_empty() && !allowed.contains(&url) {
            return Some(format!("type {url:?} is not accepted here (expected one of {})", allowed.join(", ")));
        }
        if list("not_in").contains(&url) {
            return Some(format!("type {url:?} is not accepted here"));
        }
        return None;
    }
    if kind == "duration" {
        let PValue::Message(m) = value else { return None };
        if !set {
            return get_bool(rules, "required").then(|| "is required".into());
        }
        let nanos = |d: &PValue| -> Option<Num> {
            let PValue::Message(d) = d else { return None };
            let s = d.get_field_by_name("seconds").as_deref().and_then(PValue::as_i64).unwrap_or(0);
            let n = d.get_field_by_name("nanos").as_deref().and_then(PValue::as_i32).unwrap_or(0);
            Some(Num::Int(i128::from(s) * 1_000_000_000 + i128::from(n)))
        };
        let v = nanos(&PValue::Message(m.clone()))?;
        let show = |x: Num| match x {
            Num::Int(n) => format!("{}s", n as f64 / 1e9),
            f => f.show(),
        };
        return range(rules, v, &nanos, &show);
    }
    if kind == "timestamp" {
        return (!set && get_bool(rules, "required")).then(|| "is required".into());
    }
    None
}

fn length(r: &DynamicMessage, n: usize, unit: &str, names: [&str; 3]) -> Option<String> {
    let n = n as u64;
    if let Some(l) = get_u64(r, names[2]).filter(|l| n != *l) {
        return Some(format!("must be {l} {unit} long, got {n}"));
    }
    if let Some(lo) = get_u64(r, names[0]).filter(|lo| n < *lo) {
        return Some(if lo == 1 && n == 0 {
            "must not be empty".into()
        } else {
            format!("must be at least {lo} {unit} long, got {n}")
        });
    }
    if let Some(hi) = get_u64(r, names[1]).filter(|hi| n > *hi) {
        return Some(format!("must be at most {hi} {unit} long, got {n}"));
    }
    None
}

fn string_rule(r: &DynamicMessage, s: &str) -> Option<String> {
    if get_bool(r, "ignore_empty") && s.is_empty() {
        return None;
    }
    let text = |name: &str| match r.get_field_by_name(name).as_deref() {
        Some(PValue::String(t)) if r.has_field_by_name(name) => Some(t.clone()),
        _ => None,
    };
    if let Some(c) = text("const").filter(|c| c != s) {
        return Some(format!("must be {c:?}"));
    }
    if let Some(m) = length(r, s.chars().count(), "characters", ["min_len", "max_len", "len"]) {
        return Some(m);
    }
    if let Some(m) = length(r, s.len(), "bytes", ["min_bytes", "max_bytes", "len_bytes"]) {
        return Some(m);
    }
    if let Some(p) = text("prefix").filter(|p| !s.starts_with(p.as_str())) {
        return Some(format!("must start with {p:?}"));
    }
    if let Some(p) = text("suffix").filter(|p| !s.ends_with(p.as_str())) {
        return Some(format!("must end with {p:?}"));
    }
    if let Some(p) = text("contains").filter(|p| !s.contains(p.as_str())) {
        return Some(format!("must contain {p:?}"));
    }
    if let Some(p) = text("not_contains").filter(|p| s.contains(p.as_str())) {
        return Some(format!("must not contain {p:?}"));
    }
    if let Some(p) = text("pattern")
        && let Some(re) = pattern(&p)
        && !re.is_match(s)
    {
        return Some(format!("must match the regular expression {p:?}"));
    }
    let list = |name: &str| match r.get_field_by_name(name).as_deref() {
        Some(PValue::List(l)) => l.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let allowed = list("in");
    if !allowed.is_empty() && !allowed.iter().any(|a| a == s) {
        return Some(format!("must be one of {}", allowed.join(", ")));
    }
    if list("not_in").iter().any(|a| a == s) {
        return Some(format!("must not be {s:?}"));
    }
    well_known(r, s)
}

fn well_known(r: &DynamicMessage, s: &str) -> Option<String> {
    let bad = |what: &str| Some(format!("{s:?} is not {what}"));
    if get_bool(r, "ip") && s.parse::<std::net::IpAddr>().is_err() {
        return bad("an IP address");
    }
    if get_bool(r, "ipv4") && s.parse::<std::net::Ipv4Addr>().is_err() {
        return bad("an IPv4 address");
    }
    if get_bool(r, "ipv6") && s.parse::<std::net::Ipv6Addr>().is_err() {
        return bad("an IPv6 address");
    }
    if get_bool(r, "hostname") && !hostname(s) {
        return bad("a host name");
    }
    if get_bool(r, "address") && s.parse::<std::net::IpAddr>().is_err() && !hostname(s) {
        return bad("a host name or IP address");
    }
    // well_known_regex: 1 = HTTP_HEADER_NAME, 2 = HTTP_HEADER_VALUE. With
    // `strict: false` (Envoy sets it where it matters) only NUL, CR and LF are refused.
    let strict = !r.has_field_by_name("strict") || get_bool(r, "strict");
    match r.get_field_by_name("well_known_regex").as_deref() {
        Some(PValue::EnumNumber(1)) if r.has_field_by_name("well_known_regex") => {
            let ok = if strict {
                let name = s.strip_prefix(':').unwrap_or(s);
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_|~`".contains(&b))
            } else {
                !s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
            };
            if !ok {
                return bad("a valid HTTP header name");
            }
        }
        Some(PValue::EnumNumber(2)) if r.has_field_by_name("well_known_regex") => {
            let ok = if strict {
                !s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
            } else {
                !s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
            };
            if !ok {
                return bad("a valid HTTP header value");
            }
        }
        _ => {}
    }
    None
}

fn hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A rule's pattern (RE2 syntax, which the regex crate reads), compiled once.
fn pattern(p: &str) -> Option<regex::Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<regex::Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().ok()?;
    c.entry(p.to_owned()).or_insert_with(|| regex::Regex::new(p).ok()).clone()
}

fn shown(v: &PValue) -> String {
    match v {
        PValue::String(s) => format!("{s:?}"),
        other => Num::of(other).map_or_else(|| format!("{other:?}"), |n| n.show()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every rule violation in a resource (all its messages), with paths.
    fn problems(v: serde_json::Value) -> Vec<String> {
        let (_, msg) = protojson::decode_resource(&v).unwrap();
        let mut out = Vec::new();
        protojson::walk(&msg, &mut |path, m| check(path, m, &mut out)).unwrap();
        out.iter().map(|e| e.to_string()).collect()
    }

    const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    #[test]
    fn envoys_declared_constraints_are_applied() {
        let p = problems(json!({
            "@type": CLUSTER, "name": "c", "type": "STATIC",
            "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 70000}}}}]}]}
        }));
        assert_eq!(
            p,
            [
                "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: must be at most 65535, got 70000"
            ]
        );
        // A required field, an empty name where one is required, a duration that must be positive.
        let p = problems(
            json!({"@type": CLUSTER, "name": "c", "connect_timeout": "-1s", "load_assignment": {"cluster_name": ""}}),
        );
        assert!(p.iter().any(|x| x.starts_with("connect_timeout: must be above 0s")), "{p:?}");
        assert!(p.iter().any(|x| x == "load_assignment.cluster_name: must not be empty"), "{p:?}");
        // A valid cluster has no problems.
        assert!(problems(json!({"@type": CLUSTER, "name": "c", "type": "EDS", "connect_timeout": "1s"})).is_empty());
    }

    #[test]
    fn listeners_and_routes_too() {
        let p = problems(json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "r",
            "virtual_hosts": [{"name": "vh", "domains": [], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": ""}}]}]
        }));
        assert!(p.iter().any(|x| x.starts_with("virtual_hosts[0].domains: has 0 items; at least 1 required")), "{p:?}");
        assert!(p.iter().any(|x| x == "virtual_hosts[0].routes[0].route.cluster: must not be empty"), "{p:?}");
        let p = problems(json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "r",
            "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}}]}]
        }));
        assert!(p.iter().any(|x| x.starts_with("virtual_hosts[0].routes[0]: one of route, redirect")), "{p:?}");
    }
}
