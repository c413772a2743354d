//! EnvoyConfig objects: the spec shape of Cilium's CiliumEnvoyConfig, as our
//! kinds `EnvoyConfig` (namespaced) and `ClusterwideEnvoyConfig` in
//! `weft.io/v1alpha1`, with Cilium's `cilium.io/v2` kinds accepted unchanged.

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde_json::Value;

use crate::{
    k8s::{ObjKey, Origin, crd::EnvoyConfigSpec, selector},
    limits,
};

/// Our API group and version.
pub const API_VERSION: &str = "weft.io/v1alpha1";

/// Identifies a config: clusterwide ones have no namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigKey {
    pub clusterwide: bool,
    pub key: ObjKey,
}

impl ConfigKey {
    /// The namespace used to qualify resource names ("" when clusterwide).
    pub fn namespace(&self) -> &str {
        &self.key.namespace
    }

    pub fn name(&self) -> &str {
        &self.key.name
    }
}

impl ConfigKey {
    /// The namespace of a Service named in `services` or `backendServices`
    /// (`written`: its `namespace` field). A namespaced config names only its
    /// own Services: its namespace replaces the one written, as in Cilium.
    pub fn service_namespace(&self, written: Option<&str>) -> String {
        if self.clusterwide { written.unwrap_or("default").to_owned() } else { self.namespace().to_owned() }
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.clusterwide {
            write!(f, "ClusterwideEnvoyConfig {}", self.key.name)
        } else {
            write!(f, "EnvoyConfig {}", self.key)
        }
    }
}

/// One EnvoyConfig as read from a source.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvoyConfig {
    pub key: ConfigKey,
    pub origin: Origin,
    /// metadata.generation (0 when the source has none, e.g. a file).
    pub generation: i64,
    /// metadata.labels and annotations, for reports.
    pub annotations: BTreeMap<String, String>,
    /// Shared: the model keeps the spec each translation was of, and an
    /// unchanged document's config keeps its `Arc` (see [`same_spec`]).
    pub spec: Arc<EnvoyConfigSpec>,
}

/// Whether two specs are equal; the same `Arc` answers without comparing
/// them (what every build asks of every unchanged object).
pub fn same_spec(a: &Arc<EnvoyConfigSpec>, b: &Arc<EnvoyConfigSpec>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Whether a kind/apiVersion pair is an EnvoyConfig: Some(clusterwide).
pub fn kind_of(api_version: &str, kind: &str) -> Option<bool> {
    match (api_version, kind) {
        (API_VERSION, "EnvoyConfig") | ("cilium.io/v2", "CiliumEnvoyConfig") => Some(false),
        (API_VERSION, "ClusterwideEnvoyConfig") | ("cilium.io/v2", "CiliumClusterwideEnvoyConfig") => Some(true),
        _ => None,
    }
}

/// A DNS-1123 subdomain, as Kubernetes requires of object names.
pub fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= limits::MAX_NAME_BYTES
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A DNS-1123 label, as Kubernetes requires of namespaces.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= limits::MAX_NAMESPACE_BYTES
        && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-')
}

/// At most 64 characters of a (hostile) string, for messages.
pub fn truncated(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Why a document is not a usable EnvoyConfig.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The config, when the document got far enough to name it.
    pub key: Option<ConfigKey>,
    /// "EnvoyConfig ns/name" when known.
    pub object: String,
    /// Field path (`spec.services[0].listnr`) when known.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.path, self.message)
        }
    }
}

/// An EnvoyConfig document as a source keeps it: parsed when it is read, so
/// its JSON value (ten times the bytes of what the parse keeps) is dropped
/// then, with what other readers take from its metadata. Sources hand over
/// a document that did not change as the same `Arc`, so it is not parsed
/// or translated again.
#[derive(Debug)]
pub struct ConfigDoc {
    pub origin: Origin,
    /// `apiVersion` and `kind` as written (weft's group or Cilium's).
    pub api_version: String,
    pub kind: String,
    /// `metadata.name` and `metadata.namespace` as written.
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// `metadata.labels` (the operator finds the configs it made by theirs).
    pub labels: BTreeMap<String, String>,
    /// `metadata.generation` (0 when absent).
    pub generation: i64,
    /// The config, or why the document is not a usable one.
    pub parsed: Result<EnvoyConfig, ConfigError>,
}

impl ConfigDoc {
    /// Parses a document whose kind is an EnvoyConfig kind (see [`parse`]).
    pub fn read(origin: Origin, doc: &Value) -> Self {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let meta = doc.get("metadata");
        let labels = meta
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default();
        ConfigDoc {
            api_version: text(doc.get("apiVersion")).unwrap_or_default(),
            kind: text(doc.get("kind")).unwrap_or_default(),
            name: text(meta.and_then(|m| m.get("name"))),
            namespace: text(meta.and_then(|m| m.get("namespace"))),
            labels,
            generation: meta.and_then(|m| m.get("generation")).and_then(Value::as_i64).unwrap_or(0),
            parsed: parse(origin.clone(), doc),
            origin,
        }
    }

    /// Says the document was read from `origin` (a file read in parts
    /// learns a document's index in the file after reading it).
    pub fn moved_to(&mut self, origin: &Origin) {
        if self.origin != *origin {
            self.origin = origin.clone();
            if let Ok(c) = &mut self.parsed {
                c.origin = origin.clone();
            }
        }
    }
}

/// Parses a document whose kind is an EnvoyConfig kind.
#[allow(clippy::result_large_err)] // one per rejected document, not a hot path
pub fn parse(origin: Origin, doc: &Value) -> Result<EnvoyConfig, ConfigError> {
    let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    let Some(clusterwide) = kind_of(api, kind) else {
        return Err(ConfigError {
            key: None,
            object: kind.into(),
            path: "apiVersion".into(),
            message: format!("{api}/{kind} is not an EnvoyConfig kind"),
        });
    };
    let null = Value::Null;
    let meta = doc.get("metadata").unwrap_or(&null);
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let namespace = if clusterwide {
        String::new()
    } else {
        meta.get("namespace").and_then(Value::as_str).unwrap_or("default").to_owned()
    };
    if !clusterwide && !valid_namespace(&namespace) {
        return Err(ConfigError {
            key: None,
            object: format!("{kind} {}", if name.len() <= limits::MAX_NAME_BYTES { name.as_str() } else { "" }),
            path: "metadata.namespace".into(),
            message: format!(
                "{:?} is not a valid namespace (at most {} lower-case letters, digits and '-')",
                truncated(&namespace),
                limits::MAX_NAMESPACE_BYTES
            ),
        });
    }
    let key = ConfigKey { clusterwide, key: ObjKey::new(namespace, name.clone()) };
    let object = if name.len() <= limits::MAX_NAME_BYTES { key.to_string() } else { kind.to_owned() };
    if !valid_object_name(&name) {
        return Err(ConfigError {
            key: None,
            object,
            path: "metadata.name".into(),
            message: format!(
                "{:?} is not a valid object name (at most {} lower-case letters, digits, '-' and '.'){}",
                truncated(&name),
                limits::MAX_NAME_BYTES,
                if name.contains("{{") { "; it looks like an unrendered template" } else { "" }
            ),
        });
    }
    // Before anything reads the document further: it may be huge or deep.
    if let Err(e) = limits::check_document(doc, limits::MAX_DOCUMENT_DEPTH, limits::MAX_DOCUMENT_BYTES) {
        return Err(ConfigError { key: Some(key), object, path: String::new(), message: e.to_string() });
    }
    for field in doc.as_object().into_iter().flat_map(|o| o.keys()) {
        if !matches!(field.as_str(), "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            return Err(ConfigError { key: Some(key), object, path: field.clone(), message: "unknown field".into() });
        }
    }
    // Read from the document in place: a copy of the spec's value tree
    // would be the largest allocation of the parse.
    let no_spec = Value::Object(Default::default());
    let spec: EnvoyConfigSpec =
        serde_path_to_error::deserialize(doc.get("spec").unwrap_or(&no_spec)).map_err(|e| ConfigError {
            key: Some(key.clone()),
            object: object.clone(),
            path: format!("spec.{}", e.path()).trim_end_matches('.').to_owned(),
            message: e.inner().to_string(),
        })?;
    for (field, n) in [("spec.services", spec.services.len()), ("spec.backendServices", spec.backend_services.len())] {
        if n > limits::MAX_SERVICES {
            return Err(ConfigError {
                key: Some(key),
                object,
                path: field.into(),
                message: format!("{n} entries; at most {} are accepted in one object", limits::MAX_SERVICES),
            });
        }
    }
    if let Some(sel) = &spec.node_selector {
        selector::check(sel).map_err(|e| ConfigError {
            key: Some(key.clone()),
            object: object.clone(),
            path: format!("spec.nodeSelector.{}", e.field()),
            message: e.to_string(),
        })?;
    }
    let annotations = meta
        .get("annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    Ok(EnvoyConfig {
        key,
        origin,
        generation: meta.get("generation").and_then(Value::as_i64).unwrap_or(0),
        annotations,
        spec: Arc::new(spec),
    })
}

/// Service `s<i>` as the control-plane bench writes it (port 80 to 8080).
#[cfg(test)]
pub(crate) fn bench_service(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.97.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n",
        i / 250,
        i % 250 + 1
    )
}

/// The control-plane bench's objects for `range`: each Service with an
/// EndpointSlice holding one endpoint, then each EnvoyConfig.
#[cfg(test)]
pub(crate) fn bench_objects(range: std::ops::Range<usize>) -> String {
    let mut text = String::new();
    for i in range.clone() {
        text.push_str(&bench_service(i));
        text.push_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [10.1.1.12]\n---\n"
        ));
    }
    for i in range {
        text.push_str(&bench_config(i));
        text.push_str("---\n");
    }
    text
}

/// EnvoyConfig `c<i>` as the control-plane bench writes it: a listener, a
/// route configuration and an EDS cluster for Service `s<i>` (tests count
/// what the agent keeps of such configs).
#[cfg(test)]
pub(crate) fn bench_config(i: usize) -> String {
    format!(
        r#"apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: c{i}, namespace: default}}
spec:
  services: [{{name: s{i}}}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: c{i}-listener
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: c{i}
          rds: {{route_config_name: c{i}-route}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: c{i}-route
    virtual_hosts:
    - name: all
      domains: ["*"]
      routes:
      - match: {{prefix: /}}
        route: {{cluster: default/s{i}}}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/s{i}
    connect_timeout: 2s
    type: EDS
"#
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;

    fn doc(s: &str) -> Value {
        serde_saphyr::from_str(s).unwrap()
    }

    #[test]
    fn cilium_kinds_parse_unchanged() {
        let c = parse(
            Origin::Api,
            &doc("apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: lb}\nspec:\n  services: [{name: web, namespace: default}]\n  backendServices: [{name: b, number: [\"80\", 8080]}]\n"),
        )
        .unwrap();
        assert!(!c.key.clusterwide);
        assert_eq!(c.key.key, ObjKey::new("default", "lb"));
        assert_eq!(c.spec.backend_services[0].number, vec!["80", "8080"]);
        let cw = parse(
            Origin::Api,
            &doc("apiVersion: weft.io/v1alpha1\nkind: ClusterwideEnvoyConfig\nmetadata: {name: x}\nspec: {}\n"),
        )
        .unwrap();
        assert!(cw.key.clusterwide && cw.key.namespace().is_empty());
    }

    #[test]
    fn spec_errors_name_the_path() {
        let e = parse(Origin::Api, &doc("apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: x, namespace: ns}\nspec:\n  services: [{name: a, listnr: l}]\n")).unwrap_err();
        assert_eq!(e.object, "EnvoyConfig ns/x");
        assert_eq!(e.path, "spec.services[0].listnr");
        assert!(e.message.contains("unknown field `listnr`"), "{e}");
        let e = parse(
            Origin::Api,
            &doc("apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: \"p-{{.X}}\"}\nspec: {}\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unrendered template"), "{e}");
    }

    /// What one parsed EnvoyConfig keeps (its key, origin, annotations and
    /// spec), counted by the test allocator over many documents like the
    /// control-plane bench's (a listener, a route configuration and an EDS
    /// cluster for one Service): at 10,000 configs this is kept for each.
    #[test]
    fn a_parsed_config_keeps_its_resources_compact() {
        const N: usize = 200;
        let docs: Vec<Value> = (0..N).map(|i| doc(&bench_config(i))).collect();
        let origin = Origin::File { path: std::path::Path::new("objects/configs.yaml").into(), doc: 0 };
        let (configs, held) = crate::test_alloc::held_after(|| {
            docs.iter().map(|d| parse(origin.clone(), d).unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(configs.len(), N);
        let per_config = held / N as isize;
        println!("a parsed config keeps {per_config} bytes ({held} for {N})");
        // 10,190 bytes while its resources were kept as JSON values, 1,331 as text.
        assert!(per_config < 2_000, "{per_config} bytes per config");
    }

    #[test]
    fn selectors() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({"matchLabels": {"role": "infra"}})).unwrap();
        let mut labels = BTreeMap::new();
        assert!(!selector::matches(&sel, &labels).unwrap());
        labels.insert("role".to_string(), "infra".to_string());
        assert!(selector::matches(&sel, &labels).unwrap());
        let e = parse(
            Origin::Api,
            &doc("apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: x}\nspec:\n  nodeSelector: {matchExpressions: [{key: zone, operator: Has}]}\n"),
        )
        .unwrap_err();
        assert_eq!(e.path, "spec.nodeSelector.matchExpressions[0].operator");
        assert!(e.message.contains("\"Has\""), "{e}");
    }
}
