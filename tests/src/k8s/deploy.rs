//! deploy/ applied to the test control plane the way a user applies it,
//! each part once per control plane: weft's CRDs, Cilium's EnvoyConfig CRDs,
//! and the namespace, ServiceAccounts and RBAC of the agent and the
//! operator (everything but the DaemonSet and the Deployment, which need a
//! kubelet).

use std::{path::PathBuf, sync::Mutex};

use serde_json::Value;

use super::ControlPlane;

/// A file of deploy/.
pub fn file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of YAML text.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("YAML parses").into_iter().filter(|d| !d.is_null()).collect()
}

/// What was applied, by part: (part, kubectl's output).
static APPLIED: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

/// Applies `yaml` as `part` unless it was already, and waits for the CRDs
/// among it to be established; returns kubectl's output of the one time it
/// ran (warnings included).
fn once(cp: &ControlPlane, part: &'static str, yaml: &str) -> String {
    let mut applied = APPLIED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, out)) = applied.iter().find(|(p, _)| *p == part) {
        return out.clone();
    }
    let out = cp.apply(yaml);
    for d in documents(yaml).iter().filter(|d| d["kind"] == "CustomResourceDefinition") {
        let name = format!("crd/{}", d["metadata"]["name"].as_str().unwrap_or_default());
        cp.kubectl_ok(&["wait", "--for", "condition=established", "--timeout=60s", &name]);
    }
    applied.push((part, out.clone()));
    out
}

/// deploy/crds.yaml; kubectl's output.
pub fn crds(cp: &ControlPlane) -> String {
    once(cp, "crds", &file("crds.yaml"))
}

/// deploy/cilium-crds.yaml; kubectl's output.
pub fn cilium_crds(cp: &ControlPlane) -> String {
    once(cp, "cilium-crds", &file("cilium-crds.yaml"))
}

/// The documents of deploy/ but the workloads (DaemonSet, Deployment).
pub fn without_workloads(name: &str) -> String {
    documents(&file(name))
        .into_iter()
        .filter(|d| !matches!(d["kind"].as_str(), Some("DaemonSet" | "Deployment")))
        .map(|d| serde_json::to_string(&d).expect("serializes"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// weft's namespace, ServiceAccounts, RBAC, ConfigMap and Services from
/// deploy/ (with the CRDs first); kubectl's output.
pub fn rbac(cp: &ControlPlane) -> String {
    crds(cp);
    let yaml =
        [file("namespace.yaml"), without_workloads("agent.yaml"), without_workloads("operator.yaml")].join("\n---\n");
    once(cp, "rbac", &yaml)
}

/// The Gateway API's standard-channel CRDs (v1.6.1, shared/conformance/gateway-api/crds),
/// as a user installs them before weft's GatewayClass; kubectl's output.
pub fn gateway_api_crds(cp: &ControlPlane) -> String {
    let dir = crate::objects::gateway_api_dir().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.to_string_lossy().contains("vap_"))
        .collect();
    files.sort();
    let yaml = files.iter().map(|f| std::fs::read_to_string(f).expect("readable")).collect::<Vec<_>>().join("\n---\n");
    once(cp, "gateway-api-crds", &yaml)
}
