//! A Pod as the agent keeps it: what its state reads, in the shape of the
//! API's object, so a pod reads the same from a file and from the API
//! server. The agent watches every pod of the cluster, and k8s-openapi's
//! `Pod` is 2,248 bytes before it holds anything, each `Container` 2,144:
//! a pod of one container with a named port took about 5.5 KB even with
//! all but these fields dropped (`watch`'s tests measure it).
//!
//! Read: the metadata (labels, owner), `spec.nodeName`, `hostNetwork`, the
//! service account (an identity label), each container's named ports
//! (NetworkPolicies may name them), `status.phase` and the pod's IPs. Any
//! other field of a document is skipped as it is read.

use k8s_openapi::{api::core::v1::ContainerPort, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Serialize};

/// `v1` Pod, the fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

/// `spec`, the fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The deprecated alias of `serviceAccountName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A container: its name and ports.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
}

/// `status`, the fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIp>>,
}

/// One of `status.podIPs`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodIp {
    #[serde(default)]
    pub ip: String,
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod document reads into the same fields as k8s-openapi's `Pod`
    /// (its names are the API's: `podIP`, `serviceAccountName`, ...).
    #[test]
    fn reads_the_fields_the_api_object_has() {
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "hostNetwork": false, "serviceAccountName": "web", "serviceAccount": "web",
                "containers": [{"name": "app", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.1.1.11", "podIPs": [{"ip": "10.1.1.11"}], "hostIP": "192.0.2.1"},
        });
        let api: k8s_openapi::api::core::v1::Pod = serde_json::from_value(doc.clone()).unwrap();
        let ours: Pod = serde_json::from_value(doc).unwrap();
        let (spec, st) = (api.spec.unwrap(), api.status.unwrap());
        assert_eq!(ours.metadata, api.metadata);
        let our_spec = ours.spec.unwrap();
        assert_eq!(
            (our_spec.node_name, our_spec.host_network, our_spec.service_account_name, our_spec.service_account),
            (spec.node_name, spec.host_network, spec.service_account_name, spec.service_account)
        );
        assert_eq!(our_spec.containers[0].name, spec.containers[0].name);
        assert_eq!(our_spec.containers[0].ports, spec.containers[0].ports);
        let our_st = ours.status.unwrap();
        assert_eq!((our_st.phase, our_st.pod_ip), (st.phase, st.pod_ip));
        let ips = |v: Option<Vec<String>>| v.unwrap_or_default();
        assert_eq!(
            ips(our_st.pod_ips.map(|v| v.into_iter().map(|p| p.ip).collect())),
            ips(st.pod_ips.map(|v| v.into_iter().map(|p| p.ip).collect()))
        );
    }
}
