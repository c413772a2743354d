//! Names for addresses: which pod, node or Service an address (and port) is,
//! from the agent's state snapshot. The agent keeps a [`Names`] in step with
//! its snapshots (the Services' table follows the Services that changed)
//! and hands a copy of it to the pipeline, which looks addresses up without
//! allocating (hash lookups and `Arc` clones).

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use fnv::FnvBuildHasher;

use weft_ebpf::abi::Event;

use super::record::{EndpointInfo, FlowRecord, ServiceInfo};

/// Address -> name tables of one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Names {
    pub node_name: String,
    /// This node's labels as `key=value`.
    pub node_labels: Vec<String>,
    pub cluster: String,
    /// By address in the datapath's (network) byte order.
    endpoints: HashMap<u32, Arc<EndpointInfo>, FnvBuildHasher>,
    /// By (address in network order, port, protocol number).
    services: HashMap<u64, Arc<ServiceInfo>, FnvBuildHasher>,
    /// Policy rule id -> the policy.
    policies: HashMap<u32, PolicyName, FnvBuildHasher>,
}

/// The policy object a verdict's rule id stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyName {
    /// As users wrote it: `NetworkPolicy`, `CiliumNetworkPolicy`, ...
    pub kind: String,
    /// Empty for cluster-wide kinds.
    pub namespace: String,
    pub name: String,
}

fn raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn svc_key(raw_addr: u32, port_host: u16, proto: u8) -> u64 {
    (raw_addr as u64) << 32 | (port_host as u64) << 8 | proto as u64
}

impl Names {
    pub fn new(node_name: impl Into<String>) -> Self {
        Names { node_name: node_name.into(), cluster: "default".into(), ..Default::default() }
    }

    pub fn add_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) {
        self.endpoints.insert(raw(ip), Arc::new(info));
    }

    /// A Service frontend (address, port, protocol number).
    pub fn add_service(&mut self, ip: Ipv4Addr, port: u16, proto: u8, info: Arc<ServiceInfo>) {
        self.services.insert(svc_key(raw(ip), port, proto), info);
    }

    /// Forgets a Service frontend (address, port, protocol number).
    pub fn remove_service(&mut self, ip: Ipv4Addr, port: u16, proto: u8) {
        self.services.remove(&svc_key(raw(ip), port, proto));
    }

    /// Forgets every name but the Services': what follows the Services
    /// change by change keeps its table while the rest is named again.
    pub fn clear_all_but_services(&mut self) {
        self.node_labels.clear();
        self.endpoints.clear();
        self.policies.clear();
    }

    pub fn add_policy(&mut self, rule_id: u32, policy: PolicyName) {
        self.policies.insert(rule_id, policy);
    }

    /// The pod or node with this address.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&Arc<EndpointInfo>> {
        self.endpoints.get(&raw(ip))
    }

    /// Every endpoint, for listing namespaces.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<EndpointInfo>> {
        self.endpoints.values()
    }

    /// The Service with this frontend.
    pub fn service(&self, ip: Ipv4Addr, port: u16, proto: u8) -> Option<&Arc<ServiceInfo>> {
        self.services.get(&svc_key(raw(ip), port, proto))
    }

    /// The policy a rule id names.
    pub fn policy(&self, rule_id: u32) -> Option<&PolicyName> {
        self.policies.get(&rule_id)
    }

    fn endpoint_raw(&self, raw_addr: u32) -> Option<Arc<EndpointInfo>> {
        self.endpoints.get(&raw_addr).cloned()
    }

    fn service_raw(&self, raw_addr: u32, port_be: u16, proto: u8) -> Option<Arc<ServiceInfo>> {
        if self.services.is_empty() {
            return None;
        }
        self.services.get(&svc_key(raw_addr, u16::from_be(port_be), proto)).cloned()
    }

    /// A datapath record with its names.
    pub fn enrich(&self, ev: &Event, time_ns: u64) -> FlowRecord {
        let (dst_addr, dst_port) = if ev.flags as u32 & weft_ebpf::abi::EVF_XLATED_DST != 0 {
            (ev.orig_addr, ev.orig_port)
        } else {
            (ev.daddr, ev.dport)
        };
        FlowRecord {
            time_ns,
            ev: *ev,
            src: self.endpoint_raw(ev.saddr),
            dst: self.endpoint_raw(ev.daddr),
            src_svc: self.service_raw(ev.saddr, ev.sport, ev.proto),
            dst_svc: self.service_raw(dst_addr, dst_port, ev.proto),
            http: None,
        }
    }
}

/// The workload that owns a pod, from its controller owner: a ReplicaSet
/// named `<deployment>-<pod-template-hash>` belongs to that Deployment.
pub fn workload(owner: Option<(&str, &str)>, pod_template_hash: Option<&str>) -> Option<(String, String)> {
    let (kind, name) = owner?;
    if kind == "ReplicaSet"
        && let Some(deploy) = pod_template_hash.and_then(|h| name.strip_suffix(h)).and_then(|n| n.strip_suffix('-'))
    {
        return Some(("Deployment".into(), deploy.into()));
    }
    Some((kind.into(), name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_sets_belong_to_their_deployment() {
        assert_eq!(
            workload(Some(("ReplicaSet", "web-7d9f8")), Some("7d9f8")),
            Some(("Deployment".into(), "web".into()))
        );
        assert_eq!(workload(Some(("ReplicaSet", "web-7d9f8")), None), Some(("ReplicaSet".into(), "web-7d9f8".into())));
        assert_eq!(workload(Some(("StatefulSet", "db")), None), Some(("StatefulSet".into(), "db".into())));
        assert_eq!(workload(None, Some("x")), None);
    }

    #[test]
    fn enrich_names_both_ends_and_the_service_before_translation() {
        let mut n = Names::new("n1");
        let a: Ipv4Addr = "10.1.1.10".parse().unwrap();
        let b: Ipv4Addr = "10.1.2.20".parse().unwrap();
        let vip: Ipv4Addr = "10.96.0.10".parse().unwrap();
        n.add_endpoint(a, EndpointInfo { pod: "a".into(), namespace: "x".into(), ..Default::default() });
        n.add_endpoint(b, EndpointInfo { pod: "b".into(), namespace: "y".into(), ..Default::default() });
        n.add_service(vip, 80, 6, Arc::new(ServiceInfo { namespace: "y".into(), name: "svc".into() }));
        let ev = Event {
            saddr: raw(a),
            daddr: raw(b),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            orig_addr: raw(vip),
            orig_port: 80u16.to_be(),
            proto: 6,
            flags: weft_ebpf::abi::EVF_XLATED_DST as u8,
            ..Default::default()
        };
        let f = n.enrich(&ev, 1);
        assert_eq!(f.src.unwrap().pod, "a");
        assert_eq!(f.dst.unwrap().pod, "b");
        assert_eq!(f.dst_svc.unwrap().name, "svc");
        assert!(f.src_svc.is_none());
    }
}
