//! Kubernetes objects as the agent holds them, whichever source they came
//! from (a YAML directory or the API server): typed k8s-openapi objects keyed
//! by namespace and name, each with where it came from.

pub mod crd;
pub mod report;
pub mod selector;
pub mod source;
pub mod watch;
pub mod yaml;

use std::{collections::BTreeMap, fmt, path::PathBuf, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
    networking::v1::{Ingress, IngressClass, NetworkPolicy},
};
use weft_gateway_api::{
    gatewayclasses::GatewayClass, gateways::Gateway, grpcroutes::GrpcRoute, httproutes::HttpRoute,
    referencegrants::ReferenceGrant,
};

/// Namespace (empty for cluster-scoped objects) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.namespace, self.name) }
    }
}

/// Where an object came from, for messages that point the user at it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// A file of the objects directory and the document's index in it (from 0).
    File { path: PathBuf, doc: usize },
    /// The API server.
    Api,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, doc: 0 } => write!(f, "{}", path.display()),
            Origin::File { path, doc } => write!(f, "{} (document {})", path.display(), doc + 1),
            Origin::Api => f.write_str("API server"),
        }
    }
}

/// An object and its origin.
#[derive(Debug)]
pub struct Sourced<T> {
    pub origin: Origin,
    pub object: T,
}

/// One collection of objects of a kind.
pub type Collection<T> = BTreeMap<ObjKey, Arc<Sourced<T>>>;

/// The kinds of typed objects, in one table: (variant and type, kind name,
/// field of [`Objects`], apiVersions, namespaced). Adding a kind is a line here (and,
/// for the API source, a line in `watch.rs`).
macro_rules! object_kinds {
    ($mac:ident) => {
        $mac! {
            Service "Service" => services, "v1", true;
            EndpointSlice "EndpointSlice" => endpoint_slices, "discovery.k8s.io/v1", true;
            Endpoints "Endpoints" => endpoints, "v1", true;
            Pod "Pod" => pods, "v1", true;
            Node "Node" => nodes, "v1", false;
            Namespace "Namespace" => namespaces, "v1", false;
            Secret "Secret" => secrets, "v1", true;
            NetworkPolicy "NetworkPolicy" => network_policies, "networking.k8s.io/v1", true;
            Ingress "Ingress" => ingresses, "networking.k8s.io/v1", true;
            IngressClass "IngressClass" => ingress_classes, "networking.k8s.io/v1", false;
            WeftNode "WeftNode" => weft_nodes, "weft.io/v1alpha1", false;
            GatewayClass "GatewayClass" => gateway_classes, "gateway.networking.k8s.io/v1", false;
            Gateway "Gateway" => gateways, "gateway.networking.k8s.io/v1", true;
            HttpRoute "HTTPRoute" => http_routes, "gateway.networking.k8s.io/v1", true;
            GrpcRoute "GRPCRoute" => grpc_routes, "gateway.networking.k8s.io/v1", true;
            ReferenceGrant "ReferenceGrant" => reference_grants,
                "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", true;
            CiliumNetworkPolicy "CiliumNetworkPolicy" => cilium_network_policies,
                "cilium.io/v2" | "weft.io/v1alpha1", true;
            CiliumClusterwideNetworkPolicy "CiliumClusterwideNetworkPolicy" => cilium_clusterwide_network_policies,
                "cilium.io/v2" | "weft.io/v1alpha1", false;
        }
    };
}

/// Every node's report of what its agent serves (written by that agent).
pub type WeftNode = crd::WeftNodeResource;

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy (`cilium.io/v2`,
/// or the same kind in `weft.io/v1alpha1`). The rule sets stay as written
/// (JSON) so that `state::policy::cilium` can name every field it refuses,
/// where a typed parse would drop the fields it does not know.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct CiliumPolicy {
    #[serde(default)]
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// One rule set ...
    #[serde(default)]
    pub spec: Option<serde_json::Value>,
    /// ... and/or a list of them.
    #[serde(default)]
    pub specs: Option<serde_json::Value>,
}

/// Namespaced: its selectors stay in its namespace unless they name one.
pub type CiliumNetworkPolicy = CiliumPolicy;
/// Cluster-scoped: its selectors span the cluster.
pub type CiliumClusterwideNetworkPolicy = CiliumPolicy;

macro_rules! define_objects {
    ($($kind:ident $name:literal => $field:ident, $($api:literal)|+, $namespaced:literal;)*) => {
        /// Everything the agent knows from Kubernetes. Cheap to clone (shared objects).
        #[derive(Clone, Debug, Default)]
        pub struct Objects {
            $(pub $field: Collection<$kind>,)*
        }

        /// One typed object from a source. Each is moved once, into its
        /// collection's `Arc`: the variants' sizes do not matter.
        #[derive(Debug)]
        #[allow(clippy::large_enum_variant)]
        pub enum Object {
            $($kind($kind),)*
        }

        impl Object {
            /// The object's key; namespaced kinds without a namespace get "default".
            pub fn key(&self) -> ObjKey {
                match self {
                    $(Object::$kind(o) => key_of(&o.metadata, if $namespaced { "default" } else { "" }),)*
                }
            }

            /// Kind name as in the object.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Object::$kind(_) => $name,)*
                }
            }

            /// Parses a document of a kind in the table (None: another kind).
            pub fn from_value(v: serde_json::Value) -> Result<Option<Object>, serde_json::Error> {
                let api = v.get("apiVersion").and_then(serde_json::Value::as_str).unwrap_or_default();
                let kind = v.get("kind").and_then(serde_json::Value::as_str).unwrap_or_default();
                Ok(Some(match (api, kind) {
                    $(($($api)|+, $name) => Object::$kind(serde_json::from_value(v)?),)*
                    _ => return Ok(None),
                }))
            }
        }

        impl Objects {
            /// Adds every object of `other` (replacing same keys).
            pub fn merge(&mut self, other: &Objects) {
                $(for (k, v) in &other.$field { self.$field.insert(k.clone(), v.clone()); })*
            }

            /// Copies the object `Kind namespace/name` (as problems name it)
            /// from `other`, if it has one; true if it did.
            pub fn carry_over(&mut self, other: &Objects, described: &str) -> bool {
                let Some((kind, rest)) = described.split_once(' ') else { return false };
                let key = match rest.split_once('/') {
                    Some((ns, name)) => ObjKey::new(ns, name),
                    None => ObjKey::new("", rest),
                };
                match kind {
                    $($name => match other.$field.get(&key) {
                        Some(v) => {
                            self.$field.insert(key, v.clone());
                            true
                        }
                        None => false,
                    },)*
                    _ => false,
                }
            }

            /// Copies every object of `other` that came from `origin`; true if any.
            pub fn carry_over_origin(&mut self, other: &Objects, origin: &Origin) -> bool {
                let mut found = false;
                $(for (k, v) in other.$field.iter().filter(|(_, v)| v.origin == *origin) {
                    self.$field.insert(k.clone(), v.clone());
                    found = true;
                })*
                found
            }

            /// Adds or replaces an object.
            pub fn insert(&mut self, origin: Origin, object: Object) {
                let key = object.key();
                match object {
                    $(Object::$kind(o) => drop(self.$field.insert(key, Arc::new(Sourced { origin, object: o }))),)*
                }
            }
        }
    };
}
object_kinds!(define_objects);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, default_ns: &str) -> ObjKey {
    ObjKey::new(meta.namespace.clone().unwrap_or_else(|| default_ns.to_owned()), meta.name.clone().unwrap_or_default())
}
