//! Kubernetes objects as the agent holds them, whichever source they came
//! from (a YAML directory or the API server): typed k8s-openapi objects keyed
//! by namespace and name, each with where it came from.

pub mod crd;
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

/// Everything the agent knows from Kubernetes. Cheap to clone (shared objects).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Collection<Service>,
    pub endpoint_slices: Collection<EndpointSlice>,
    pub endpoints: Collection<Endpoints>,
    pub pods: Collection<Pod>,
    pub nodes: Collection<Node>,
    pub secrets: Collection<Secret>,
    pub network_policies: Collection<NetworkPolicy>,
    pub ingresses: Collection<Ingress>,
    pub ingress_classes: Collection<IngressClass>,
    pub namespaces: Collection<Namespace>,
    pub gateway_classes: Collection<GatewayClass>,
    pub gateways: Collection<Gateway>,
    pub http_routes: Collection<HttpRoute>,
    pub grpc_routes: Collection<GrpcRoute>,
    pub reference_grants: Collection<ReferenceGrant>,
}

/// One typed object from a source.
#[derive(Debug)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Endpoints(Endpoints),
    Pod(Pod),
    Node(Node),
    Secret(Secret),
    NetworkPolicy(NetworkPolicy),
    Ingress(Ingress),
    IngressClass(IngressClass),
    Namespace(Namespace),
    GatewayClass(GatewayClass),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    ReferenceGrant(ReferenceGrant),
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, default_ns: &str) -> ObjKey {
    ObjKey::new(meta.namespace.clone().unwrap_or_else(|| default_ns.to_owned()), meta.name.clone().unwrap_or_default())
}

impl Object {
    /// The object's key; namespaced kinds without a namespace get "default".
    pub fn key(&self) -> ObjKey {
        match self {
            Object::Service(o) => key_of(&o.metadata, "default"),
            Object::EndpointSlice(o) => key_of(&o.metadata, "default"),
            Object::Endpoints(o) => key_of(&o.metadata, "default"),
            Object::Pod(o) => key_of(&o.metadata, "default"),
            Object::Node(o) => key_of(&o.metadata, ""),
            Object::Secret(o) => key_of(&o.metadata, "default"),
            Object::NetworkPolicy(o) => key_of(&o.metadata, "default"),
            Object::Ingress(o) => key_of(&o.metadata, "default"),
            Object::IngressClass(o) => key_of(&o.metadata, ""),
            Object::Namespace(o) => key_of(&o.metadata, ""),
            Object::GatewayClass(o) => key_of(&o.metadata, ""),
            Object::Gateway(o) => key_of(&o.metadata, "default"),
            Object::HttpRoute(o) => key_of(&o.metadata, "default"),
            Object::GrpcRoute(o) => key_of(&o.metadata, "default"),
            Object::ReferenceGrant(o) => key_of(&o.metadata, "default"),
        }
    }

    /// Kind name as in the object.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Endpoints(_) => "Endpoints",
            Object::Pod(_) => "Pod",
            Object::Node(_) => "Node",
            Object::Secret(_) => "Secret",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::Ingress(_) => "Ingress",
            Object::IngressClass(_) => "IngressClass",
            Object::Namespace(_) => "Namespace",
            Object::GatewayClass(_) => "GatewayClass",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::ReferenceGrant(_) => "ReferenceGrant",
        }
    }
}

impl Objects {
    /// Adds every object of `other` (replacing same keys).
    pub fn merge(&mut self, other: &Objects) {
        macro_rules! each {
            ($($c:ident),*) => { $( for (k, v) in &other.$c { self.$c.insert(k.clone(), v.clone()); } )* };
        }
        each!(
            services,
            endpoint_slices,
            endpoints,
            pods,
            nodes,
            secrets,
            network_policies,
            ingresses,
            ingress_classes,
            namespaces,
            gateway_classes,
            gateways,
            http_routes,
            grpc_routes,
            reference_grants
        );
    }

    /// Copies the object `Kind namespace/name` (as [`Object::describe`] writes
    /// it) from `other`, if it has one; true if it did.
    pub fn carry_over(&mut self, other: &Objects, described: &str) -> bool {
        let Some((kind, rest)) = described.split_once(' ') else { return false };
        let key = match rest.split_once('/') {
            Some((ns, name)) => ObjKey::new(ns, name),
            None => ObjKey::new("", rest),
        };
        macro_rules! copy {
            ($c:ident) => {
                match other.$c.get(&key) {
                    Some(v) => {
                        self.$c.insert(key.clone(), v.clone());
                        true
                    }
                    None => false,
                }
            };
        }
        match kind {
            "Service" => copy!(services),
            "EndpointSlice" => copy!(endpoint_slices),
            "Endpoints" => copy!(endpoints),
            "Pod" => copy!(pods),
            "Node" => copy!(nodes),
            "Secret" => copy!(secrets),
            "NetworkPolicy" => copy!(network_policies),
            "Ingress" => copy!(ingresses),
            "IngressClass" => copy!(ingress_classes),
            "Namespace" => copy!(namespaces),
            "GatewayClass" => copy!(gateway_classes),
            "Gateway" => copy!(gateways),
            "HTTPRoute" => copy!(http_routes),
            "GRPCRoute" => copy!(grpc_routes),
            "ReferenceGrant" => copy!(reference_grants),
            _ => false,
        }
    }

    /// Copies every object of `other` that came from `origin`; true if any.
    pub fn carry_over_origin(&mut self, other: &Objects, origin: &Origin) -> bool {
        let mut found = false;
        macro_rules! each {
            ($($c:ident),*) => { $(
                for (k, v) in other.$c.iter().filter(|(_, v)| v.origin == *origin) {
                    self.$c.insert(k.clone(), v.clone());
                    found = true;
                }
            )* };
        }
        each!(services, endpoint_slices, endpoints, pods, nodes, secrets, network_policies, ingresses, ingress_classes);
        found
    }

    /// Adds or replaces an object.
    pub fn insert(&mut self, origin: Origin, object: Object) {
        let key = object.key();
        macro_rules! put {
            ($coll:ident, $o:expr) => {
                drop(self.$coll.insert(key, Arc::new(Sourced { origin, object: $o })))
            };
        }
        match object {
            Object::Service(o) => put!(services, o),
            Object::EndpointSlice(o) => put!(endpoint_slices, o),
            Object::Endpoints(o) => put!(endpoints, o),
            Object::Pod(o) => put!(pods, o),
            Object::Node(o) => put!(nodes, o),
            Object::Secret(o) => put!(secrets, o),
            Object::NetworkPolicy(o) => put!(network_policies, o),
            Object::Ingress(o) => put!(ingresses, o),
            Object::IngressClass(o) => put!(ingress_classes, o),
            Object::Namespace(o) => put!(namespaces, o),
            Object::GatewayClass(o) => put!(gateway_classes, o),
            Object::Gateway(o) => put!(gateways, o),
            Object::HttpRoute(o) => put!(http_routes, o),
            Object::GrpcRoute(o) => put!(grpc_routes, o),
            Object::ReferenceGrant(o) => put!(reference_grants, o),
        };
    }
}
