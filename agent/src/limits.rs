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

/// Stack of every thread the agent runs: its main work (`main.rs` runs it
/// on a thread of its own), the tokio workers and blocking threads
/// ([`runtime`]), the datapath and flow-pipeline threads ([`thread`]).
/// Decoders recurse once or more per nesting level of what they read (YAML
/// takes about 20 KiB per level in a debug build, JSON from the API server,
/// protobuf from Envoy); the depth limits of this module keep the deepest
/// input they accept within half of it in a debug build, where frames are
/// largest (tests `deepest_*_fit_in_half_the_thread_stack`), and the fuzz
/// targets run on a thread with this stack. Set explicitly, so neither
/// `ulimit -s`, `RUST_MIN_STACK` nor a library's default (tokio's and the
/// test harness's 2 MiB, which a YAML document nested 105 deep overflowed)
/// decides it.
pub const THREAD_STACK_BYTES: usize = 8 << 20;

/// A thread builder with the agent's stack ([`THREAD_STACK_BYTES`]): every
/// thread of the agent is started with it (or with [`runtime`]).
pub fn thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new().name(name.to_owned()).stack_size(THREAD_STACK_BYTES)
}

/// A tokio runtime whose workers and blocking threads have the agent's stack.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_stack_size(THREAD_STACK_BYTES)
        .enable_all()
        .build()
}

/// Parser events that YAML aliases may replay in one file.
pub const MAX_ALIAS_EVENTS: usize = 100_000;

/// Deepest nesting of a YAML document (any kind: the agent must read past
/// documents it does not use, so this is above [`MAX_DOCUMENT_DEPTH`]).
pub const MAX_YAML_DEPTH: usize = 128;

/// YAML parser budget: generous (thousands of objects in one file are
/// normal), but bounded, so an alias bomb (`&a [*b, *b, ...]` nested) or a
/// deeply nested document stops with a message instead of eating memory.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 100_000_000;
    budget.max_events = 200_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_depth = MAX_YAML_DEPTH;
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

    /// Runs `f` on a thread with half the agent's stack and waits for it. A
    /// stack overflow aborts the whole test binary, so a failure is loud.
    fn on_half_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .name("half-stack".into())
            .stack_size(THREAD_STACK_BYTES / 2)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    /// How a value is nested: YAML block and flow styles, JSON.
    #[derive(Clone, Copy, Debug)]
    enum Style {
        BlockMap,
        BlockSeq,
        FlowMap,
        FlowSeq,
        Json,
    }

    /// `n` levels of maps or lists around a scalar, as the value of key `x`
    /// of a top-level mapping (block styles on the lines after `x:`).
    fn nested(style: Style, n: usize) -> String {
        match style {
            Style::BlockMap => {
                let mut out = String::from("x:\n");
                for i in 1..=n {
                    out.push_str(&" ".repeat(2 * i));
                    out.push_str(if i == n { "k: leaf\n" } else { "k:\n" });
                }
                out
            }
            Style::BlockSeq => format!("x:\n  {}leaf\n", "- ".repeat(n)),
            Style::FlowMap => format!("x: {}leaf{}\n", "{k: ".repeat(n), "}".repeat(n)),
            Style::FlowSeq => format!("x: {}leaf{}\n", "[".repeat(n), "]".repeat(n)),
            Style::Json => format!("x: {}\n", json_nest(n, true)),
        }
    }

    /// `n` levels of JSON objects (`{"k": ...}`) or lists around a string.
    fn json_nest(n: usize, objects: bool) -> String {
        let (open, close) = if objects { ("{\"k\": ", "}") } else { ("[", "]") };
        format!("{}\"leaf\"{}", open.repeat(n), close.repeat(n))
    }

    /// A ClusterwideEnvoyConfig whose listener carries `value` as filter
    /// metadata (a `Struct`: three protobuf levels per JSON level) and `perm`
    /// as an RBAC permission (typed messages inside two `Any`s).
    fn envoyconfig(metadata: &str, permission: &str) -> String {
        format!(
            r#"{{"apiVersion": "weft.io/v1alpha1", "kind": "ClusterwideEnvoyConfig", "metadata": {{"name": "deep"}},
            "spec": {{"resources": [{{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l",
              "metadata": {{"filter_metadata": {{"x": {metadata}}}}},
              "filter_chains": [{{"filters": [{{"name": "hcm", "typed_config": {{
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "s", "route_config": {{"name": "r"}},
                "http_filters": [
                  {{"name": "rbac", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {{"policies": {{"p": {{"permissions": [{permission}], "principals": [{{"any": true}}]}}}}}}}}}},
                  {{"name": "router", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]
              }}}}]}}]}}]}}}}"#
        )
    }

    fn rbac_nest(n: usize) -> String {
        format!("{}{{\"any\": true}}{}", "{\"and_rules\": {\"rules\": [".repeat(n), "]}}".repeat(n))
    }

    /// Parses `text` as a file of the objects directory and judges its
    /// EnvoyConfigs; true if the file was read without a YAML problem.
    fn load_and_judge(text: &str) -> bool {
        let mut loaded = crate::k8s::yaml::Loaded::default();
        crate::k8s::yaml::load_text(std::path::Path::new("deep.yaml"), text, &mut loaded);
        crate::validate::verdicts(
            &loaded,
            &mut crate::xds::model::Model::new(crate::xds::ports::ProxyPorts::ephemeral()),
        );
        loaded.problems.is_empty()
    }

    /// The stack each thread of the agent gets holds the deepest input every
    /// decoder accepts, twice over, in a debug build: YAML at the parser's
    /// depth budget in every style (a Service, whose unknown field is skipped,
    /// and an EnvoyConfig, refused by the document check), EnvoyConfigs at the
    /// document and protobuf depth limits through `Struct`s and typed
    /// messages inside `Any`s, JSON from the API server at serde_json's
    /// recursion limit (typed objects and EnvoyConfigs), and Envoy's access
    /// log at prost's recursion limit. Each runs past its limit too, so the
    /// refusal is what stops it, not the end of the loop.
    #[test]
    fn deepest_inputs_fit_in_half_the_thread_stack() {
        on_half_stack(|| {
            for style in [Style::BlockMap, Style::BlockSeq, Style::FlowMap, Style::FlowSeq, Style::Json] {
                let depths = MAX_YAML_DEPTH - 8..=MAX_YAML_DEPTH + 2;
                let read: Vec<bool> = depths
                    .clone()
                    .map(|n| {
                        let service = format!(
                            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: default}}\n{}",
                            nested(style, n)
                        );
                        load_and_judge(&service)
                    })
                    .collect();
                assert!(read.first() == Some(&true) && read.last() == Some(&false), "{style:?}: {read:?}");
                for n in depths {
                    let value = match style {
                        Style::FlowSeq | Style::BlockSeq => json_nest(n, false),
                        _ => json_nest(n, true),
                    };
                    load_and_judge(&envoyconfig(&value, &rbac_nest(1)));
                }
            }
            // Through the document check, the protobuf depth check, decoding,
            // translation and the model.
            for n in (1..=MAX_DOCUMENT_DEPTH).step_by(3) {
                assert!(load_and_judge(&envoyconfig(&json_nest(n, true), &rbac_nest(1))));
                assert!(load_and_judge(&envoyconfig(&json_nest(n, false), &rbac_nest(1))));
                assert!(load_and_judge(&envoyconfig("1", &rbac_nest(n / 2))));
            }
        });
    }

    /// The same for what the API server sends (kube decodes each watch event
    /// with serde_json, whose recursion limit is 128) and for Envoy's access
    /// log (each spool line is read with serde_json too).
    #[test]
    fn deepest_api_and_access_log_messages_fit_in_half_the_thread_stack() {
        use kube::{api::DynamicObject, core::WatchEvent};

        let access_log_lines: Vec<Vec<u8>> = (1..=300)
            .step_by(7)
            .flat_map(|n| [true, false].map(|obj| format!(r#"{{"path": {}}}"#, json_nest(n, obj)).into_bytes()))
            .collect();
        on_half_stack(move || {
            for line in &access_log_lines {
                assert!(weft_observe::pipeline::accesslog::parse(line).is_err(), "a nested path is not an entry");
            }

            let ar = kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk("weft.io", "v1alpha1", "ClusterwideEnvoyConfig"),
                "clusterwideenvoyconfigs",
            );
            let mut configs = Vec::new();
            for n in 110..=130 {
                // Typed objects skip unknown fields without recursing.
                let pod = format!(
                    r#"{{"type": "ADDED", "object": {{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "p", "namespace": "default"}}, "spec": {{"containers": [], "x": {}}}}}}}"#,
                    json_nest(n, n % 2 == 0)
                );
                assert!(serde_json::from_str::<WatchEvent<k8s_openapi::api::core::v1::Pod>>(&pod).is_ok());
                // EnvoyConfigs are read as JSON values, to the limit.
                let config = format!(
                    r#"{{"type": "ADDED", "object": {}}}"#,
                    envoyconfig(&json_nest(n - 7, n % 2 == 0), &rbac_nest(1))
                );
                let event = serde_json::from_str::<WatchEvent<DynamicObject>>(&config);
                configs.push(event.is_ok());
                if let Ok(WatchEvent::Added(o)) = event {
                    let mut loaded = crate::k8s::yaml::Loaded::default();
                    let doc = crate::k8s::watch::config_doc(&o, &ar);
                    let doc = crate::xds::envoyconfig::ConfigDoc::read(crate::k8s::Origin::Api, &doc);
                    loaded.configs.push_back(std::sync::Arc::new(doc));
                    crate::validate::verdicts(
                        &loaded,
                        &mut crate::xds::model::Model::new(crate::xds::ports::ProxyPorts::ephemeral()),
                    );
                }
            }
            assert!(configs.first() == Some(&true) && configs.last() == Some(&false), "{configs:?}");
        });
    }
}
