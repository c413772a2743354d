//! Desired state: one immutable snapshot derived from everything the sources
//! hold. The datapath worker and the flow pipeline's names read snapshots;
//! only the control loop builds them (through the controller, which builds
//! the xDS resources alongside).

pub mod policy;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use weft_ebpf::abi;

use crate::{
    datapath::{BackendAddr, Frontend, FrontendKind, Proto, ServiceEntry},
    identity::{self, LabelSet},
    k8s::{Collection, ObjKey, Objects, Pod, Sourced},
    lean::SmallMap,
};
use imbl::ordmap::DiffItem;

/// Annotation that sends a Service's connections to a proxy listener on this
/// node port instead of a backend, without an EnvoyConfig (Cilium has a
/// similar per-Service opt-in).
pub const L7_PORT_ANNOTATION: &str = "weft.io/l7-proxy-port";

/// A Service as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    pub key: ObjKey,
    pub entries: Vec<ServiceEntry>,
}

/// A pod with an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub key: ObjKey,
    pub ip: Ipv4Addr,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub identity: u32,
    /// Runs on this node.
    pub local: bool,
    /// The owning workload (kind, name), e.g. (ReplicaSet, web-7d9f).
    pub owner: Option<(String, String)>,
    /// The host-side device (name, index) weft-cni registered for a local pod.
    pub device: Option<(String, u32)>,
}

/// What weft-cni registered, by (container id, interface in the pod).
pub type Attachments = BTreeMap<(String, String), weft_cni::proto::Attachment>;

/// A node and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

/// Where a Service port's connections go instead of a backend: a proxy port
/// on this node. Keyed by Service and port (None: every port).
pub type Redirects = BTreeMap<(ObjKey, Option<u16>), u16>;

/// Everything derived from the sources at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Increases with every snapshot the control loop publishes.
    pub version: u64,
    pub node_name: String,
    /// This node's address (configured, or from its Node object).
    pub node_ip: Option<Ipv4Addr>,
    /// By key. Persistent and shared: a snapshot patched after an endpoint
    /// change shares the list and every other Service's entries with the
    /// one it was made from (the patch costs the changed Services, not a
    /// copy of every one).
    pub services: imbl::Vector<Arc<ServiceState>>,
    pub pods: Vec<PodState>,
    pub nodes: Vec<NodeState>,
    /// Identity -> its label set.
    pub identities: BTreeMap<u32, LabelSet>,
    /// What the network policies mean for this node.
    pub policy: policy::PolicyState,
    /// Things in the objects that could not be represented, one line each.
    pub problems: Vec<String>,
    /// Local pods' devices come from weft-cni alone (not from routes).
    pub cni: bool,
}

fn proto_of(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

fn ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

/// The IPv4 address of a pod that has its own (not host-network).
fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    if host_network(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).chain(status.pod_ip.as_deref()).find_map(ipv4)
}

impl Snapshot {
    /// Frontends whose connections go to a proxy port, with that port.
    pub fn proxied(&self) -> BTreeSet<(Frontend, u16)> {
        proxied_by(&self.services)
    }

    /// Proxy ports policies send connections through (L7 rules): such a
    /// connection has no other way, so without the port's socket it is
    /// refused.
    pub fn policy_proxy_ports(&self) -> BTreeSet<u16> {
        let entries = self.policy.endpoints.values().flat_map(|e| &e.entries);
        entries.filter_map(|e| e.proxy_port).collect()
    }

    /// Every proxy port the datapath hands connections to: Services' and policies'.
    pub fn proxy_ports(&self) -> BTreeSet<u16> {
        let services = self.services.iter().flat_map(|s| &s.entries).filter_map(|e| e.proxy_port);
        services.chain(self.policy_proxy_ports()).collect()
    }

    /// Whether some port is handed connections to (what [`Snapshot::proxy_ports`]
    /// has, without collecting them: it stops at the first).
    pub fn hands_to_proxy(&self) -> bool {
        let mut services = self.services.iter().flat_map(|s| &s.entries);
        services.any(|e| e.proxy_port.is_some())
            || self.policy.endpoints.values().flat_map(|e| &e.entries).any(|e| e.proxy_port.is_some())
    }

    /// Whether `next` stops handing some frontend's connections to the
    /// proxy port this snapshot hands them to. Costs what differs between
    /// the two: a Service whose entries both share (the same `Arc`) hands
    /// the same frontends in both.
    pub fn stops_proxying_in(&self, next: &Snapshot) -> bool {
        let mine = proxied_by(differing(&self.services, &next.services));
        let theirs = proxied_by(differing(&next.services, &self.services));
        let gone: Vec<_> = mine.difference(&theirs).collect();
        // What a changed Service stops handing may be handed by one that did
        // not change (two Services with one frontend): only then look at all.
        !gone.is_empty() && {
            let all = next.proxied();
            gone.iter().any(|p| !all.contains(p))
        }
    }

    /// Derives the snapshot for node `node_name` from the objects.
    /// `node_ip` overrides the address of the node's Node object.
    /// With `attachments` (weft-cni's registrations), a local pod whose
    /// status has no address yet (its kubelet writes it after the CNI ADD)
    /// has the one weft-cni saw, and local pods get the devices weft-cni named.
    pub fn derive(
        objects: &Objects,
        node_name: &str,
        node_ip: Option<Ipv4Addr>,
        redirects: &Redirects,
        attachments: Option<&Attachments>,
    ) -> Snapshot {
        Self::derive_with(objects, node_name, node_ip, attachments, |_| (redirects.clone(), Default::default()))
    }

    /// [`Snapshot::derive`], with the proxy side decided once the policies
    /// are known: `proxies` gets them (the HTTP rules the node's policy
    /// listener must enforce, the listeners rules hand connections to) and
    /// returns the Services' redirects and the ports of those listeners.
    pub fn derive_with(
        objects: &Objects,
        node_name: &str,
        node_ip: Option<Ipv4Addr>,
        attachments: Option<&Attachments>,
        proxies: impl FnOnce(&policy::PolicyState) -> (Redirects, policy::l7::ListenerPorts),
    ) -> Snapshot {
        let mut problems = Vec::new();
        let mut by_pod = BTreeMap::new();
        for a in attachments.iter().flat_map(|m| m.values()) {
            let key = ObjKey::new(a.pod.namespace.clone(), a.pod.name.clone());
            match objects.pods.get(&key).map(|p| &p.object) {
                None => problems.push(format!(
                    "weft-cni: pod {key} (container {}) is not known to the agent (yet)",
                    a.container_id
                )),
                Some(p) if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node_name) => problems.push(
                    format!("weft-cni: pod {key} (container {}) is not bound to node {node_name}", a.container_id),
                ),
                Some(_) => drop(by_pod.insert(key, a)),
            }
        }
        let nodes: Vec<NodeState> = objects
            .nodes
            .values()
            .filter_map(|n| {
                let n = &n.object;
                let ip = node_address(n)?;
                Some(NodeState {
                    name: n.metadata.name.clone()?,
                    ip,
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                })
            })
            .collect();
        let node_ip = node_ip.or_else(|| nodes.iter().find(|n| n.name == node_name).map(|n| n.ip));

        // Identities from every pod's labels, the same on every node.
        let labels_of = |pod: &Pod| {
            let spec = pod.spec.as_ref();
            let sa = spec.and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()));
            identity::pod_labels(&pod.metadata.labels.clone().unwrap_or_default(), sa)
        };
        let label_set =
            |ns: &str, pod: &Pod| LabelSet::new(ns, labels_of(pod).iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let with_ip: Vec<(&ObjKey, &Pod, Ipv4Addr)> = objects
            .pods
            .iter()
            .filter_map(|(k, p)| {
                let from_cni = || by_pod.get(k).filter(|_| !host_network(&p.object)).map(|a| a.ip);
                Some((k, &p.object, pod_ip(&p.object).or_else(from_cni)?))
            })
            .collect();
        let sets: BTreeSet<LabelSet> = with_ip.iter().map(|(k, p, _)| label_set(&k.namespace, p)).collect();
        let ids = identity::assign(&sets);
        let pods: Vec<PodState> = with_ip
            .iter()
            .map(|(k, p, ip)| {
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
                let device = match by_pod.get(*k) {
                    Some(a) if a.ip == *ip => Some((a.host_ifname.clone(), a.host_ifindex)),
                    Some(a) => {
                        problems.push(format!("weft-cni: pod {k} has address {ip}, weft-cni saw {}", a.ip));
                        None
                    }
                    None => None,
                };
                PodState {
                    device,
                    key: (*k).clone(),
                    ip: *ip,
                    local: node == node_name,
                    node,
                    labels: labels_of(p),
                    identity: ids.get(&label_set(&k.namespace, p)).copied().unwrap_or_default(),
                    owner: p
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|o| o.controller == Some(true))
                        .map(|o| (o.kind.clone(), o.name.clone())),
                }
            })
            .collect();

        let named_ports = with_ip
            .iter()
            .filter_map(|(_, p, ip)| {
                let ports: BTreeMap<String, (u16, Proto)> = p
                    .spec
                    .as_ref()?
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|cp| {
                        let proto = proto_of(cp.protocol.as_deref())?;
                        Some((cp.name.clone()?, (u16::try_from(cp.container_port).ok()?, proto)))
                    })
                    .collect();
                (!ports.is_empty()).then_some((*ip, ports))
            })
            .collect();
        let node_ids: Vec<(Ipv4Addr, u32)> = nodes
            .iter()
            .map(|n| (n.ip, if n.name == node_name { abi::ID_HOST } else { abi::ID_REMOTE_NODE }))
            .chain(node_ip.map(|ip| (ip, abi::ID_HOST)))
            .collect();
        let namespace_labels = objects
            .namespaces
            .iter()
            .map(|(k, n)| (k.name.clone(), n.object.metadata.labels.clone().unwrap_or_default()))
            .collect();
        let cluster = policy::rule::Cluster {
            pods: &pods,
            nodes: &node_ids,
            named_ports: &named_ports,
            namespace_labels: &namespace_labels,
        };
        let mut translated = policy::Translated::default();
        for (key, np) in &objects.network_policies {
            policy::netpol::translate(key, &np.object, &mut translated);
        }
        for (key, p) in &objects.cilium_network_policies {
            policy::cilium::translate(key, &p.object, false, &mut translated);
        }
        for (key, p) in &objects.cilium_clusterwide_network_policies {
            policy::cilium::translate(key, &p.object, true, &mut translated);
        }
        let node_labels = nodes.iter().find(|n| n.name == node_name).map(|n| n.labels.clone()).unwrap_or_default();
        let mut policy = policy::derive(translated, &cluster, &node_labels, &mut problems);
        let (redirects, proxy_ports) = proxies(&policy);
        policy.connect(&proxy_ports);
        problems.extend(policy.problem_lines());
        let redirects = &redirects;

        let slices = SliceIndex::of(objects);
        let services = objects
            .services
            .iter()
            .filter_map(|(key, s)| service_state(key, &s.object, objects, &slices, node_ip, redirects, &mut problems))
            .map(Arc::new)
            .collect();

        Snapshot {
            version: 0,
            node_name: node_name.to_owned(),
            node_ip,
            services,
            pods,
            nodes,
            identities: ids.into_iter().map(|(set, id)| (id, set)).collect(),
            policy,
            problems,
            cni: attachments.is_some(),
        }
    }

    /// This snapshot after a change of the endpoints (EndpointSlices,
    /// Endpoints objects) of `services` alone, nothing else having changed
    /// since it was derived from `objects` as they were: those Services'
    /// entries are derived again, with the `redirects` in effect, the rest
    /// is kept. Equals what [`Snapshot::derive_with`] gives from `objects`.
    /// `slices` indexes the objects' EndpointSlices (the controller keeps it).
    pub fn with_endpoints_of(
        &self,
        services: &BTreeSet<ObjKey>,
        objects: &Objects,
        slices: &SliceIndex,
        redirects: &Redirects,
    ) -> Snapshot {
        let mut next = self.clone();
        for key in services {
            let Ok(i) = next.services.binary_search_by(|s| s.key.cmp(key)) else { continue };
            let Some(svc) = objects.services.get(key) else { continue };
            // What a Service's entries report depends on the Service alone,
            // which did not change: it was reported when it was derived.
            let mut unchanged_problems = Vec::new();
            if let Some(state) =
                service_state(key, &svc.object, objects, slices, next.node_ip, redirects, &mut unchanged_problems)
            {
                next.services.set(i, Arc::new(state));
            }
        }
        next
    }

    /// The pod with this address, if known.
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodState> {
        self.pods.iter().find(|p| p.ip == ip)
    }
}

/// The frontends these Services hand to a proxy port, with that port.
fn proxied_by<'a>(services: impl IntoIterator<Item = &'a Arc<ServiceState>>) -> BTreeSet<(Frontend, u16)> {
    services.into_iter().flat_map(|s| &s.entries).filter_map(|e| Some((e.frontend, e.proxy_port?))).collect()
}

/// The Services of `a` that `b` does not hold as the same `Arc` (both
/// lists by key): what changed from one snapshot to the other.
pub fn differing<'a>(
    a: &'a imbl::Vector<Arc<ServiceState>>,
    b: &imbl::Vector<Arc<ServiceState>>,
) -> Vec<&'a Arc<ServiceState>> {
    let mut out = Vec::new();
    let mut other = b.iter().peekable();
    for s in a {
        while other.next_if(|o| o.key < s.key).is_some() {}
        if other.peek().is_none_or(|o| !Arc::ptr_eq(o, s)) {
            out.push(s);
        }
    }
    out
}

/// A frontend's address, port and protocol: frontends of two kinds there
/// are one entry in the datapath's services map, and one name for flows.
pub type FrontendTuple = (Ipv4Addr, u16, Proto);

pub fn tuple_of(f: &Frontend) -> FrontendTuple {
    (f.addr, f.port, f.proto)
}

/// Which Services have a frontend at each address, port and protocol,
/// followed from snapshot to snapshot by the Services that changed (those
/// a snapshot does not share with the last one followed): what tells the
/// datapath's reconciler and the flow names which frontends a snapshot
/// changed, and which Service decides each (the last in key order, as a
/// pass over every Service has it), without a look at the others.
#[derive(Default)]
pub struct FrontendOwners {
    followed: imbl::Vector<Arc<ServiceState>>,
    /// The Services with a frontend at each tuple, in key order: nearly
    /// always one, and a `BTreeSet` takes a node of eleven keys for its
    /// first (544 bytes, 640 in jemalloc's size class: 13 MB of nodes at
    /// 10,000 Services in the two indexes the agent keeps, the datapath's
    /// and the flow names').
    owners: HashMap<FrontendTuple, SmallMap<ObjKey, ()>>,
}

impl FrontendOwners {
    /// Follows the Services to `services`; returns the frontends of those
    /// that changed (before and after).
    pub fn follow(&mut self, services: &imbl::Vector<Arc<ServiceState>>) -> BTreeSet<FrontendTuple> {
        let mut touched = BTreeSet::new();
        for s in differing(&self.followed, services) {
            for t in s.entries.iter().map(|e| tuple_of(&e.frontend)) {
                if let Some(o) = self.owners.get_mut(&t) {
                    o.remove(&s.key);
                    if o.is_empty() {
                        self.owners.remove(&t);
                    }
                }
                touched.insert(t);
            }
        }
        for s in differing(services, &self.followed) {
            for t in s.entries.iter().map(|e| tuple_of(&e.frontend)) {
                self.owners.entry(t).or_default().or_default(s.key.clone());
                touched.insert(t);
            }
        }
        self.followed = services.clone();
        touched
    }

    /// The Services followed last with a frontend at `t`, in key order.
    pub fn owners(&self, t: &FrontendTuple) -> impl DoubleEndedIterator<Item = &Arc<ServiceState>> {
        let keys = self.owners.get(t).into_iter().flat_map(|o| o.iter().map(|(k, ())| k));
        keys.filter_map(|key| self.followed.binary_search_by(|s| s.key.cmp(key)).ok().map(|i| &self.followed[i]))
    }
}

/// IPv4 EndpointSlices by the Service they belong to (namespace and the
/// `kubernetes.io/service-name` label), each Service's in the order of
/// their keys: finding a Service's backends does not scan every slice. A
/// whole build makes one ([`SliceIndex::of`]); the controller keeps one and
/// follows the sources' changes ([`SliceIndex::follow`]), so a change of
/// some Services' endpoints costs what changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceIndex(HashMap<ObjKey, Vec<Arc<Sourced<EndpointSlice>>>>);

impl SliceIndex {
    /// The index of every slice the objects hold: one pass over them.
    pub fn of(objects: &Objects) -> Self {
        let mut index = Self::default();
        // In key order: each Service's list comes out in order.
        for slice in objects.endpoint_slices.values() {
            if let Some(service) = Self::service_of(&slice.object) {
                index.0.entry(service).or_default().push(slice.clone());
            }
        }
        index
    }

    /// Follows the slices from `old` (what the index was of) to `new`.
    /// Sources hand over collections that share what did not change, so
    /// this costs what changed (`diff` skips what the two share).
    pub fn follow(&mut self, old: &Collection<EndpointSlice>, new: &Collection<EndpointSlice>) {
        for d in old.diff(new) {
            let (gone, came) = match d {
                DiffItem::Add(_, x) => (None, Some(x)),
                DiffItem::Remove(_, x) => (Some(x), None),
                DiffItem::Update { old: (_, x), new: (_, y) } => (Some(x), Some(y)),
            };
            if let Some(x) = gone
                && let Some(service) = Self::service_of(&x.object)
                && let Some(list) = self.0.get_mut(&service)
            {
                list.retain(|s| !Arc::ptr_eq(s, x));
                if list.is_empty() {
                    self.0.remove(&service);
                }
            }
            if let Some(y) = came
                && let Some(service) = Self::service_of(&y.object)
            {
                // A Service's slices share its namespace: their keys are in the order of their names.
                let list = self.0.entry(service).or_default();
                let at = list.partition_point(|s| s.object.metadata.name <= y.object.metadata.name);
                list.insert(at, y.clone());
            }
        }
    }

    /// The Service an IPv4 slice belongs to (None: no label, or not IPv4).
    fn service_of(s: &EndpointSlice) -> Option<ObjKey> {
        let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        (s.address_type == "IPv4").then(|| ObjKey::new(ns, name.as_str()))
    }

    /// The Service's IPv4 EndpointSlices (as shared objects: one that did
    /// not change is the same `Arc`).
    pub fn of_service(&self, key: &ObjKey) -> &[Arc<Sourced<EndpointSlice>>] {
        self.0.get(key).map(Vec::as_slice).unwrap_or_default()
    }
}

/// The label that names an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The backends of one Service port: from its EndpointSlices, else from its
/// Endpoints object. Only ready IPv4 addresses count.
pub fn backends(key: &ObjKey, port_name: Option<&str>, objects: &Objects, slices: &SliceIndex) -> Vec<BackendAddr> {
    let mut out = BTreeSet::new();
    let found = slices.of_service(key);
    let any_slice = !found.is_empty();
    for slice in found.iter().map(|s| &s.object) {
        // A port outside 1-65535 is no backend (the Service is reported by service_state).
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name.unwrap_or(""))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &ep.addresses {
                if let Some(addr) = ipv4(a) {
                    out.insert(BackendAddr { addr, port });
                }
            }
        }
    }
    if !any_slice && let Some(eps) = objects.endpoints.get(key) {
        for subset in eps.object.subsets.iter().flatten() {
            let Some(port) = subset
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == port_name.unwrap_or(""))
                .and_then(|p| u16::try_from(p.port).ok())
            else {
                continue;
            };
            for a in subset.addresses.iter().flatten() {
                if let Some(addr) = ipv4(&a.ip) {
                    out.insert(BackendAddr { addr, port });
                }
            }
        }
    }
    out.into_iter().collect()
}

/// A Service's IPv4 addresses, as the datapath installs its frontends.
struct Addresses<'a> {
    kind: &'a str,
    cluster_ips: Vec<Ipv4Addr>,
    /// External IPs, and for a LoadBalancer its ingress IPs.
    external: Vec<Ipv4Addr>,
}

fn addresses(svc: &Service) -> Option<Addresses<'_>> {
    let spec = svc.spec.as_ref()?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ips: Vec<Ipv4Addr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.as_ref())
        .filter_map(|s| ipv4(s))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut external: Vec<Ipv4Addr> = spec.external_ips.iter().flatten().filter_map(|s| ipv4(s)).collect();
    if kind == "LoadBalancer" {
        let lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        external.extend(
            lb.and_then(|l| l.ingress.as_ref()).into_iter().flatten().filter_map(|i| i.ip.as_deref().and_then(ipv4)),
        );
    }
    Some(Addresses { kind, cluster_ips, external })
}

/// The TCP frontends of a Service's `ports` (every port when empty) on the
/// node with address `node_ip`: the local addresses its connections have
/// when the datapath hands them to the proxy (cluster IPs, the node's
/// NodePort, external and load-balancer IPs), as [`Snapshot::derive`]
/// installs them.
pub fn tcp_frontends(svc: &Service, node_ip: Option<Ipv4Addr>, ports: &[u16]) -> Vec<std::net::SocketAddrV4> {
    let Some(a) = addresses(svc).filter(|a| a.kind != "ExternalName") else { return Vec::new() };
    let mut out = Vec::new();
    for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        let Ok(number) = u16::try_from(port.port) else { continue };
        if proto_of(port.protocol.as_deref()) != Some(Proto::Tcp) || !(ports.is_empty() || ports.contains(&number)) {
            continue;
        }
        out.extend(a.cluster_ips.iter().chain(&a.external).map(|ip| std::net::SocketAddrV4::new(*ip, number)));
        if matches!(a.kind, "NodePort" | "LoadBalancer")
            && let (Some(np), Some(ip)) = (port.node_port.and_then(|p| u16::try_from(p).ok()), node_ip)
        {
            out.push(std::net::SocketAddrV4::new(ip, np));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A Node's address (its first IPv4 InternalIP).
pub fn node_address(node: &k8s_openapi::api::core::v1::Node) -> Option<Ipv4Addr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    addrs.iter().filter(|a| a.type_ == "InternalIP").find_map(|a| ipv4(&a.address))
}

fn service_state(
    key: &ObjKey,
    svc: &Service,
    objects: &Objects,
    slices: &SliceIndex,
    node_ip: Option<Ipv4Addr>,
    redirects: &Redirects,
    problems: &mut Vec<String>,
) -> Option<ServiceState> {
    let spec = svc.spec.as_ref()?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return None;
    }
    let annotation_port: Option<u16> =
        svc.metadata.annotations.as_ref().and_then(|a| a.get(L7_PORT_ANNOTATION)).and_then(|v| match v.parse() {
            Ok(p) => Some(p),
            Err(_) => {
                problems.push(format!("Service {key}: annotation {L7_PORT_ANNOTATION}={v:?} is not a port number"));
                None
            }
        });
    let Addresses { cluster_ips, external, .. } = addresses(svc)?;

    let mut entries = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = proto_of(port.protocol.as_deref()) else {
            problems.push(format!(
                "Service {key} port {}: protocol {} is not supported (TCP and UDP are)",
                port.port,
                port.protocol.as_deref().unwrap_or("")
            ));
            continue;
        };
        let Ok(number) = u16::try_from(port.port) else {
            problems.push(format!("Service {key}: port {} is not a port number (1-65535)", port.port));
            continue;
        };
        let node_port = match port.node_port.map(u16::try_from) {
            Some(Err(_)) => {
                problems.push(format!(
                    "Service {key} port {number}: nodePort {} is not a port number (1-65535)",
                    port.node_port.unwrap_or_default()
                ));
                continue;
            }
            Some(Ok(p)) => Some(p),
            None => None,
        };
        let backends = backends(key, port.name.as_deref(), objects, slices);
        let proxy_port = redirects
            .get(&(key.clone(), Some(number)))
            .or_else(|| redirects.get(&(key.clone(), None)))
            .copied()
            .or(annotation_port)
            .filter(|_| proto == Proto::Tcp);
        let mut add = |addr, port: u16, kind| {
            entries.push(ServiceEntry {
                frontend: Frontend { addr, port, proto, kind },
                backends: backends.clone(),
                proxy_port,
            })
        };
        for ip in &cluster_ips {
            add(*ip, number, FrontendKind::ClusterIp);
        }
        if matches!(kind, "NodePort" | "LoadBalancer")
            && let (Some(np), Some(ip)) = (node_port, node_ip)
        {
            add(ip, np, FrontendKind::NodePort);
        }
        for ip in &external {
            add(*ip, number, FrontendKind::External);
        }
    }
    Some(ServiceState { key: key.clone(), entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::yaml::{Loaded, load_text};

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {role: infra}}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.1.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node2, containers: []}
status: {podIP: 10.1.2.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.1.11]
- addresses: [10.1.2.11]
- addresses: [10.1.2.99]
  conditions: {ready: false}
"#;

    fn loaded() -> Loaded {
        let mut l = Loaded::default();
        load_text(std::path::Path::new("t.yaml"), OBJECTS, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        l
    }

    #[test]
    fn services_get_frontends_and_ready_backends() {
        let l = loaded();
        let snap = Snapshot::derive(&l.objects, "node1", None, &Redirects::new(), None);
        assert_eq!(snap.node_ip, Some(Ipv4Addr::new(192, 168, 50, 1)));
        let svc = &snap.services[0];
        let frontends: Vec<String> = svc.entries.iter().map(|e| e.frontend.to_string()).collect();
        assert_eq!(frontends, ["10.96.0.20:80/TCP", "192.168.50.1:30080/TCP"]);
        let backends: Vec<String> = svc.entries[0].backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        assert_eq!(backends, ["10.1.1.11:8080", "10.1.2.11:8080"], "not-ready endpoints are left out");
        assert_eq!(snap.problems.len(), 1, "SCTP is reported: {:?}", snap.problems);
        assert!(snap.problems[0].contains("Service shop/web port 53: protocol SCTP"));
    }

    #[test]
    fn pods_share_an_identity_and_know_where_they_run() {
        let l = loaded();
        let snap = Snapshot::derive(&l.objects, "node1", None, &Redirects::new(), None);
        assert_eq!(snap.pods.len(), 2);
        assert_eq!(snap.pods[0].identity, snap.pods[1].identity, "same namespace and labels");
        assert!(snap.pods.iter().find(|p| p.key.name == "web-1").unwrap().local);
        assert!(!snap.pods.iter().find(|p| p.key.name == "web-2").unwrap().local);
    }

    #[test]
    fn redirects_mark_service_ports_for_the_proxy() {
        let l = loaded();
        let mut r = Redirects::new();
        r.insert((ObjKey::new("shop", "web"), Some(80)), 15001);
        let snap = Snapshot::derive(&l.objects, "node1", None, &r, None);
        assert!(snap.services[0].entries.iter().all(|e| e.proxy_port == Some(15001)));

        // Which changes must reach the datapath before Envoy (run/control.rs).
        let plain = Snapshot::derive(&l.objects, "node1", None, &Redirects::new(), None);
        assert!(snap.stops_proxying_in(&plain), "a redirect removed");
        assert!(!plain.stops_proxying_in(&snap), "a redirect added");
        assert!(!snap.stops_proxying_in(&snap.clone()));
        let mut moved = Redirects::new();
        moved.insert((ObjKey::new("shop", "web"), Some(80)), 15002);
        let elsewhere = Snapshot::derive(&l.objects, "node1", None, &moved, None);
        assert!(snap.stops_proxying_in(&elsewhere), "a frontend handed to another proxy port");
        assert_eq!(snap.proxy_ports(), BTreeSet::from([15001]));
        assert!(snap.hands_to_proxy() && !plain.hands_to_proxy());
        assert!(snap.policy_proxy_ports().is_empty());
    }

    /// The owners index takes the room its frontends hold: a Service with
    /// one frontend of its own costs its tuple and one key, not a tree
    /// node.
    #[test]
    fn following_services_costs_each_its_frontends_and_key() {
        const N: u32 = 1000;
        let services: imbl::Vector<Arc<ServiceState>> = (0..N)
            .map(|i| {
                let frontend = Frontend {
                    addr: Ipv4Addr::from(0x0a60_0000 + i),
                    port: 80,
                    proto: Proto::Tcp,
                    kind: FrontendKind::ClusterIp,
                };
                let entries = vec![ServiceEntry { frontend, backends: Vec::new(), proxy_port: None }];
                Arc::new(ServiceState { key: ObjKey::new("default", format!("s{i:04}")), entries })
            })
            .collect();
        let (owners, held) = crate::test_alloc::held_after(|| {
            let mut owners = FrontendOwners::default();
            owners.follow(&services);
            owners
        });
        let per = held / N as isize;
        // The tuple and the list in the map (with its spare buckets), the
        // key (two Strings) in a list of one: 127 bytes (623 with a
        // `BTreeSet`).
        assert!(per < 200, "{per} bytes per Service");
        let first = tuple_of(&services[0].entries[0].frontend);
        assert_eq!(owners.owners(&first).map(|s| s.key.clone()).collect::<Vec<_>>(), [services[0].key.clone()]);
    }
}
