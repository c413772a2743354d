//! weft's custom resources, generated from the Rust types: `EnvoyConfig`
//! (namespaced) and `ClusterwideEnvoyConfig` in `weft.io/v1alpha1`, both with
//! the spec of [`EnvoyConfigSpec`] (defined here, as the API's type; the
//! control plane reads it in `xds::envoyconfig`), a status written by the
//! operator, and printer columns for `kubectl get`; `WeftNode`, each node
//! agent's report of what it serves, from which the operator writes that
//! status; `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy` in
//! `weft.io/v1alpha1` (Cilium's policy kinds under weft's group); and, for
//! clusters without Cilium, Cilium's `CiliumEnvoyConfig`,
//! `CiliumClusterwideEnvoyConfig` (`cilium.io/v2`, the same spec, no status),
//! `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy` so that Cilium
//! users' YAML applies unchanged.
//!
//! The policy kinds' rule sets (`spec`, `specs`) are kept as written
//! (`x-kubernetes-preserve-unknown-fields`): the agent reads them field by
//! field and names each field it refuses (`state::policy::cilium`), which a
//! schema pruning unknown fields would hide.
//!
//! Every schema is structural and uses only formats the API server knows
//! (it warns about others), so nothing a user writes is pruned silently and
//! what the schema can refuse, `kubectl apply` refuses with the server's
//! message.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec of an EnvoyConfig (and of Cilium's CiliumEnvoyConfig).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyConfigSpec {
    /// Services whose traffic is redirected to a listener of this config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceListener>,
    /// Services whose endpoints are sent to Envoy (EDS), without redirecting them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_services: Vec<BackendService>,
    /// Envoy resources (Listener, RouteConfiguration, Cluster,
    /// ClusterLoadAssignment, Secret) in JSON form with `@type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_objects")]
    pub resources: Vec<RawResource>,
    /// Nodes this config applies to; absent: all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// One entry of `spec.resources` as written, kept as compact JSON text: it
/// is read only when its config is translated, and as a tree of JSON values
/// it took about ten times the bytes (most of what a config kept at 10,000
/// configs; `xds::envoyconfig`'s tests count it). The text is made from a
/// value whose object keys are sorted, so two resources are equal exactly
/// when their values are.
#[derive(Clone, PartialEq, Eq)]
pub struct RawResource(Box<str>);

impl RawResource {
    /// The resource as JSON text (compact).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The resource as a JSON value, read again from its text. It was
    /// written from a value whose depth the document's limits bound, so
    /// this fails only on a deeper one made in code (serde_json reads 128
    /// levels).
    pub fn value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl From<&Value> for RawResource {
    fn from(v: &Value) -> Self {
        Self(v.to_string().into_boxed_str())
    }
}

impl From<Value> for RawResource {
    fn from(v: Value) -> Self {
        Self::from(&v)
    }
}

impl std::fmt::Debug for RawResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawResource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawResource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(|v| Self::from(&v))
    }
}

/// A Service redirected to a listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceListener {
    pub name: String,
    /// Ignored for namespaced configs (their own namespace applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Listener (its name in `resources`); absent: the first listener of the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// Service ports to redirect; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "port_numbers")]
    pub ports: Vec<u16>,
}

/// A Service whose endpoints Envoy gets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendService {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service ports (numbers or names) to send; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "ports_as_strings")]
    #[schemars(schema_with = "ports")]
    pub number: Vec<String>,
}

fn ports_as_strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v: Vec<Value> = Deserialize::deserialize(d)?;
    v.into_iter()
        .map(|x| match x {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(serde::de::Error::custom(format!("expected a port number or name, got {other}"))),
        })
        .collect()
}

/// Condition type: the object passed validation (the same checks as `weft-agent validate`).
pub const VALID: &str = "Valid";
/// Condition type: the object's current generation is the one nodes serve.
pub const APPLIED: &str = "Applied";

/// What the operator found, written once for the whole cluster (per-node
/// refusals by Envoy are Kubernetes Events on the object instead).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyConfigStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid` and `Applied`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Services redirected to this config's listeners (in its own namespace),
/// Services whose endpoints Envoy gets, the Envoy resources, and the nodes it is for.
// Three printer columns are three `printcolumn` attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "EnvoyConfig",
    root = "EnvoyConfigResource",
    namespaced,
    status = "EnvoyConfigStatus",
    shortname = "ec",
    category = "weft",
    doc = "Envoy resources for the node-local Envoy of every selected node, and the Services redirected to them",
    printcolumn(name = "Valid", type_ = "string", json_path = ".status.conditions[?(@.type==\"Valid\")].status"),
    printcolumn(name = "Applied", type_ = "string", json_path = ".status.conditions[?(@.type==\"Applied\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(transparent)]
pub struct NamespacedSpec(pub EnvoyConfigSpec);

/// Services redirected to this config's listeners (in any namespace),
/// Services whose endpoints Envoy gets, the Envoy resources, and the nodes it is for.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "ClusterwideEnvoyConfig",
    root = "ClusterwideEnvoyConfigResource",
    status = "EnvoyConfigStatus",
    shortname = "cwec",
    category = "weft",
    doc = "Like EnvoyConfig, cluster-scoped: its Services may be in any namespace",
    printcolumn(name = "Valid", type_ = "string", json_path = ".status.conditions[?(@.type==\"Valid\")].status"),
    printcolumn(name = "Applied", type_ = "string", json_path = ".status.conditions[?(@.type==\"Applied\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(transparent)]
pub struct ClusterwideSpec(pub EnvoyConfigSpec);

/// A node's report, named after the node, in weft's namespace, written by its
/// agent alone (deploy/agent.yaml holds each agent to its own node's report
/// with a ValidatingAdmissionPolicy) and owned by the agent's Pod (so it goes
/// when the agent does): what its Envoy does with each EnvoyConfig meant for
/// the node. The operator reads every node's report to say whether a config
/// is applied.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftNode",
    root = "WeftNodeResource",
    derive = "PartialEq",
    namespaced,
    status = "WeftNodeStatus",
    shortname = "wn",
    category = "weft",
    doc = "What the weft agent of a node serves (named after the node, written by its agent)",
    printcolumn(name = "Envoy", type_ = "string", json_path = ".status.envoy"),
    printcolumn(name = "Served", type_ = "string", json_path = ".status.summary"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
pub struct WeftNodeSpec {}

/// See [`WeftNodeSpec`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeftNodeStatus {
    /// `Connected` (the node's Envoy takes its configuration from the agent) or `NotConnected`.
    #[serde(default)]
    pub envoy: String,
    /// "<served> of <configs> served", for `kubectl get`.
    #[serde(default)]
    pub summary: String,
    /// Each EnvoyConfig meant for this node, and what its Envoy does with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<NodeConfig>,
}

/// One EnvoyConfig on one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// `EnvoyConfig` or `ClusterwideEnvoyConfig` (Cilium's kinds count as these).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The generation the agent holds.
    pub generation: i64,
    /// The generation whose resources this node serves (its Envoy acknowledged them), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_generation: Option<i64>,
    /// `Serving` (the generation the agent holds), `Pending`, `Rejected` (by Envoy or by
    /// validation; `servedGeneration` says what stays in effect) or `NotServed`.
    pub state: String,
    /// Why it is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Schema of `spec.resources`: Envoy resources in proto-JSON, checked by
/// weft's own validation (which names the field), not by the API server.
pub fn any_objects(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// Schema of `services[].ports`: port numbers (a Service port is never 0).
pub fn port_numbers(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": 65535}
    })
}

/// Cilium's CiliumEnvoyConfig, for clusters without Cilium.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumEnvoyConfig",
    root = "CiliumEnvoyConfigResource",
    namespaced,
    shortname = "cec",
    doc = "Cilium's CiliumEnvoyConfig, served by weft like its EnvoyConfig"
)]
#[serde(transparent)]
pub struct CiliumNamespacedSpec(pub EnvoyConfigSpec);

/// Cilium's CiliumClusterwideEnvoyConfig, for clusters without Cilium.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumClusterwideEnvoyConfig",
    root = "CiliumClusterwideEnvoyConfigResource",
    shortname = "ccec",
    doc = "Cilium's CiliumClusterwideEnvoyConfig, served by weft like its ClusterwideEnvoyConfig"
)]
#[serde(transparent)]
pub struct CiliumClusterwideSpec(pub EnvoyConfigSpec);

/// Schema of `backendServices[].number`: port numbers or names.
pub fn ports(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"x-kubernetes-int-or-string": true}
    })
}

/// The CRD of a Cilium policy kind in `group`/`version`: `spec` (a rule
/// set) and `specs` (a list of them), both kept as written.
fn policy_crd(group: &str, version: &str, kind: &str, namespaced: bool, short: &[&str]) -> CustomResourceDefinition {
    let singular = kind.to_lowercase();
    // ...Policy -> ...policies.
    let plural = format!("{}ies", singular.strip_suffix('y').unwrap_or(&singular));
    let rules = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    // The EnvoyConfigs' status shape (conditions and the generation they
    // describe); only `Valid` is written for policies.
    let mut status = EnvoyConfigResource::crd().spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("status"))
        .map(|s| serde_json::to_value(s).expect("schemas serialize"))
        .expect("the EnvoyConfig CRD has a status");
    status["description"] = "Written by weft's operator: the `Valid` condition is False while weft refuses \
                             some field of the policy, and its message names each such field and why."
        .into();
    status["properties"]["conditions"]["description"] = "`Valid`, with a reason and a message.".into();
    let crd = serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": singular,
                "shortNames": short,
                "categories": if group == "weft.io" { vec!["weft"] } else { vec![] },
            },
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "versions": [{
                "name": version,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "description": format!("Cilium's {kind} (L3/L4 rules enforced by weft's datapath; what weft does not enforce is refused by field)"),
                    "type": "object",
                    "properties": {
                        "spec": rules,
                        "specs": {"type": "array", "items": rules},
                        "status": status,
                    },
                }},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Valid", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Valid\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    });
    serde_json::from_value(crd).expect("a well-formed CRD")
}

/// weft's CRDs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        EnvoyConfigResource::crd(),
        ClusterwideEnvoyConfigResource::crd(),
        WeftNodeResource::crd(),
        policy_crd("weft.io", "v1alpha1", "CiliumNetworkPolicy", true, &[]),
        policy_crd("weft.io", "v1alpha1", "CiliumClusterwideNetworkPolicy", false, &[]),
    ]
}

/// Cilium's EnvoyConfig and policy CRDs, for clusters without Cilium.
pub fn cilium_crds() -> Vec<CustomResourceDefinition> {
    vec![
        CiliumEnvoyConfigResource::crd(),
        CiliumClusterwideEnvoyConfigResource::crd(),
        policy_crd("cilium.io", "v2", "CiliumNetworkPolicy", true, &["cnp", "ciliumnp"]),
        policy_crd("cilium.io", "v2", "CiliumClusterwideNetworkPolicy", false, &["ccnp"]),
    ]
}

fn yaml_stream(header: &str, crds: Vec<CustomResourceDefinition>) -> String {
    let mut out = String::from(header);
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("CRDs serialize"));
    }
    out
}

/// The CRDs as one YAML stream, as `weft-agent crds` prints them and
/// deploy/crds.yaml holds them.
pub fn crds_yaml() -> String {
    yaml_stream("# Generated by `weft-agent crds`; do not edit.\n", crds())
}

/// Cilium's CRDs as `weft-agent crds --cilium` prints them and
/// deploy/cilium-crds.yaml holds them.
pub fn cilium_crds_yaml() -> String {
    yaml_stream(
        "# Generated by `weft-agent crds --cilium`; do not edit.\n\
         # Cilium's CiliumEnvoyConfig, CiliumClusterwideEnvoyConfig, CiliumNetworkPolicy and\n\
         # CiliumClusterwideNetworkPolicy (cilium.io/v2), for clusters without Cilium: Cilium users'\n\
         # YAML applies unchanged and weft serves or enforces it. Where Cilium is\n\
         # installed, its own CRDs are these: do not apply this file there.\n",
        cilium_crds(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_status_columns_and_a_structural_schema() {
        let crds = crds();
        let names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "envoyconfigs.weft.io",
                "clusterwideenvoyconfigs.weft.io",
                "weftnodes.weft.io",
                "ciliumnetworkpolicies.weft.io",
                "ciliumclusterwidenetworkpolicies.weft.io"
            ]
        );
        assert_eq!(crds[3].spec.scope, "Namespaced");
        assert_eq!(crds[4].spec.scope, "Cluster");
        assert_eq!(crds[0].spec.scope, "Namespaced");
        assert_eq!(crds[1].spec.scope, "Cluster");
        assert_eq!(crds[2].spec.scope, "Namespaced");
        for crd in &crds[..2] {
            let v = &crd.spec.versions[0];
            assert!(v.subresources.as_ref().unwrap().status.is_some(), "status subresource");
            let cols: Vec<_> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
            assert_eq!(cols, ["Valid", "Applied", "Age"]);
            let schema = serde_json::to_value(&v.schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            let spec = &schema["properties"]["spec"]["properties"];
            assert_eq!(spec["resources"]["items"]["x-kubernetes-preserve-unknown-fields"], true);
            assert_eq!(
                spec["backendServices"]["items"]["properties"]["number"]["items"]["x-kubernetes-int-or-string"],
                true
            );
            assert!(spec["nodeSelector"]["properties"]["matchLabels"].is_object(), "{}", spec["nodeSelector"]);
            let status = &schema["properties"]["status"]["properties"];
            assert!(status["conditions"]["items"]["properties"]["reason"].is_object());
            assert!(status["observedGeneration"].is_object());
            // Structural schemas have no `additionalProperties: false` and every node typed.
            let text = schema.to_string();
            assert!(!text.contains("\"additionalProperties\":false"), "{text}");
        }
        // The policy kinds, in both groups: a status the operator writes `Valid` in.
        let cilium = cilium_crds();
        for crd in crds[3..].iter().chain(&cilium[2..]) {
            let v = &crd.spec.versions[0];
            assert!(v.subresources.as_ref().unwrap().status.is_some(), "status subresource");
            let cols: Vec<_> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
            assert_eq!(cols, ["Valid", "Age"]);
            let schema = serde_json::to_value(&v.schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            let status = &schema["properties"]["status"]["properties"];
            assert!(status["conditions"]["items"]["properties"]["message"].is_object());
            assert_eq!(schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"], true);
        }
    }

    #[test]
    fn committed_crds_match_the_types() {
        for (file, generated, command) in [
            ("crds.yaml", crds_yaml(), "weft-agent crds"),
            ("cilium-crds.yaml", cilium_crds_yaml(), "weft-agent crds --cilium"),
        ] {
            let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(
                committed == generated,
                "deploy/{file} differs from the Rust types: regenerate it with `{command} > deploy/{file}`"
            );
        }
    }

    /// Every `format` in a schema, with where it is.
    fn formats(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("format", serde_json::Value::String(f)) => out.push((at.to_owned(), f.clone())),
                        _ => formats(x, &format!("{at}.{k}"), out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| formats(x, at, out)),
            _ => {}
        }
    }

    #[test]
    fn schemas_use_only_formats_the_api_server_knows() {
        // The formats kube-apiserver validates (k8s.io/kube-openapi's
        // strfmt registry); any other is accepted with a warning.
        const KNOWN: &[&str] = &["int32", "int64", "float", "double", "byte", "date", "date-time", "duration"];
        for crd in crds().into_iter().chain(cilium_crds()) {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let mut found = Vec::new();
            formats(&schema, "", &mut found);
            for (at, f) in found {
                assert!(KNOWN.contains(&f.as_str()), "{}: {at}: format {f:?}", crd.metadata.name.as_deref().unwrap());
            }
        }
    }
}
