//! Limits on what the agent reads, in one place. Every object, file and
//! config the agent takes in is written by someone who may be careless or
//! hostile; these bounds are checked before the input is decoded, so no input
//! can exhaust the agent's memory or stack, or reach a decoder's internal
//! limits (where it would fail without saying which field is at fault).
//! README "Limits of inputs" lists them for users.

use serde_json::Value;

/// Largest file of the objects directory (or given to `weft-agent validate`).
/// A `kubectl get -o yaml` dump of a large cluster fits.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Largest agent config file.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Largest EnvoyConfig document (its JSON form). etcd refuses requests over
/// 1.5 MiB by default, so no larger object can exist in a cluster.
pub const MAX_DOCUMENT_BYTES: usize = 3 << 19;

/// Deepest nesting of objects and lists in an EnvoyConfig document (the
/// document itself is level 1, a resource of `spec.resources` level 4).
/// Real configs stay under 30, even with nested RBAC rules.
pub const MAX_DOCUMENT_DEPTH: usize = 64;

/// Deepest nesting of protobuf messages in one Envoy resource, counted
/// through `Any` payloads. Envoy's parser and prost both stop at 100; a
/// `Struct` (filter metadata) costs three levels per JSON level.
pub const MAX_PROTO_DEPTH: usize = 100;

/// Resources in `spec.resources` of one EnvoyConfig.
pub const MAX_RESOURCES: usize = 1000;

/// Entries of `spec.services` or of `spec.backendServices` of one EnvoyConfig.
pub const MAX_SERVICES: usize = 1000;

/// Longest resource name as written in an EnvoyConfig (Kubernetes object
/// names have the same bound), and longest namespace (a DNS label).
pub const MAX_NAME_BYTES: usize = 253;
pub const MAX_NAMESPACE_BYTES: usize = 63;

/// Parser events that YAML aliases may replay in one file.
pub const MAX_ALIAS_EVENTS: usize = 100_000;

/// YAML parser budget: generous (thousands of objects in one file are
/// normal), but bounded, so an alias bomb (`&a [*b, *b, ...]` nested) or a
/// deeply nested document stops with a message instead of eating memory.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 100_000_000;
    budget.max_events = 200_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_depth = 128;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    // Aliases are rare in Kubernetes YAML; expanding them may not cost more
    // than a large document would (an alias bomb of 9^6 strings took 14 s).
    o.alias_limits.max_total_replayed_events = MAX_ALIAS_EVENTS;
    o
}

/// A document that is too large or too deep: what, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooBig {
    #[error("{path}: nested {depth} levels deep; at most {max} are accepted")]
    Deep { path: String, depth: usize, max: usize },
    #[error("the document is larger than {max} bytes (its JSON form); split it into several objects")]
    Large { max: usize },
}

/// Checks a document's nesting depth and size (its JSON length, estimated
/// without serializing it) before anything decodes it. Iterative, so the
/// check itself cannot overflow the stack.
pub fn check_document(doc: &Value, max_depth: usize, max_bytes: usize) -> Result<(), TooBig> {
    let mut bytes = 0usize;
    // (value, depth, path segment of the value)
    let mut stack: Vec<(&Value, usize, Segment<'_>)> = vec![(doc, 1, Segment::Root)];
    let mut trail: Vec<Segment<'_>> = Vec::new();
    while let Some((v, depth, seg)) = stack.pop() {
        trail.truncate(depth.saturating_sub(1));
        trail.push(seg);
        bytes = bytes.saturating_add(match v {
            Value::String(s) => s.len().saturating_add(2),
            _ => 8,
        });
        if bytes > max_bytes {
            return Err(TooBig::Large { max: max_bytes });
        }
        let children = match v {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            _ => 0,
        };
        if children > 0 && depth >= max_depth {
            let path = render(&trail);
            let path = if path.len() > 160 {
                let cut = (0..=100).rev().find(|i| path.is_char_boundary(*i)).unwrap_or(0);
                format!("{}...", &path[..cut])
            } else {
                path
            };
            return Err(TooBig::Deep { path, depth: depth.saturating_add(1), max: max_depth });
        }
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate().rev() {
                    stack.push((x, depth + 1, Segment::Index(i)));
                }
            }
            Value::Object(o) => {
                for (k, x) in o.iter().rev() {
                    bytes = bytes.saturating_add(k.len().saturating_add(4));
                    stack.push((x, depth + 1, Segment::Key(k)));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

fn render(trail: &[Segment<'_>]) -> String {
    let mut out = String::new();
    for s in trail {
        match s {
            Segment::Root => {}
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Reads a file of at most `max` bytes as UTF-8; the error says which limit
/// or which byte is at fault.
pub fn read_text(path: &std::path::Path, max: u64) -> Result<String, ReadError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut bytes = Vec::new();
    f.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge { max });
    }
    String::from_utf8(bytes).map_err(|e| ReadError::NotUtf8 { offset: e.utf8_error().valid_up_to() })
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("unreadable: {0}")]
    Io(std::io::Error),
    #[error("unreadable: larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("unreadable: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn depth_and_size_are_checked_with_the_path() {
        let mut deep = json!("leaf");
        for _ in 0..10 {
            deep = json!({ "k": deep });
        }
        let doc = json!({"spec": {"resources": [deep]}});
        assert!(check_document(&doc, 20, 1 << 20).is_ok());
        let e = check_document(&doc, 8, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "spec.resources[0].k.k.k.k: nested 9 levels deep; at most 8 are accepted");
        let big = json!({"a": "x".repeat(2000)});
        assert_eq!(check_document(&big, 8, 1000), Err(TooBig::Large { max: 1000 }));
    }

    #[test]
    fn files_too_large_or_not_utf8_are_named() {
        let dir = std::env::temp_dir().join(format!("weft-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.yaml");
        std::fs::write(&f, b"kind: Service\nname: \xff\xfe\n").unwrap();
        let e = read_text(&f, 1000).unwrap_err().to_string();
        assert_eq!(e, "unreadable: not UTF-8 text (invalid byte at offset 20)");
        std::fs::write(&f, "a".repeat(2000)).unwrap();
        assert_eq!(read_text(&f, 1000).unwrap_err().to_string(), "unreadable: larger than 1000 bytes");
        assert_eq!(read_text(&f, 4000).unwrap().len(), 2000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
