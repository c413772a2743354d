//! `weft-agent validate PATH...`: everything the agent checks before it
//! pushes anything to Envoy, offline. One line per problem; like
//! `istioctl analyze`, but for EnvoyConfigs and Cilium's policy kinds.

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    k8s::{Origin, yaml},
    state::policy::cilium,
    xds::{
        envoyconfig::ConfigKey,
        model::{Model, NodeInfo, Serving},
        ports::ProxyPorts,
    },
};

/// The outcome of validating some files.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per problem: where, what object, what is wrong.
    pub problems: Vec<String>,
    /// EnvoyConfigs found (valid or not).
    pub configs: usize,
    /// Valid EnvoyConfigs.
    pub valid: usize,
    /// CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies found.
    pub policies: usize,
}

/// The verdict on one EnvoyConfig document.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The config; None when the document did not get as far as naming one.
    pub key: Option<ConfigKey>,
    pub origin: Origin,
    /// apiVersion of the document (weft's or Cilium's group).
    pub api_version: String,
    /// metadata.generation of the document.
    pub generation: i64,
    /// "<object>: <what is wrong>", one per problem; empty if valid.
    pub problems: Vec<String>,
    /// The generation that stands in for it (an earlier valid one), if any,
    /// when `model` carried one.
    pub serving: Serving,
    /// The nodes it is for (None: every node).
    pub node_selector: Option<LabelSelector>,
}

/// Validates every EnvoyConfig in `loaded` against the other objects there
/// (Services, Secrets...), as one cluster-wide set: node selectors are not
/// applied. `model` carries earlier accepted versions from call to call (the
/// operator); a fresh one judges each document alone.
pub fn verdicts(loaded: &yaml::Loaded, model: &mut Model) -> Vec<Verdict> {
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut api_versions = std::collections::BTreeMap::new();
    for doc in &loaded.configs {
        match &doc.parsed {
            Ok(c) => {
                api_versions.insert(c.key.clone(), doc.api_version.clone());
                configs.push(c.clone())
            }
            Err(e) => {
                out.push(Verdict {
                    key: e.key.clone(),
                    origin: doc.origin.clone(),
                    api_version: doc.api_version.clone(),
                    generation: doc.generation,
                    problems: vec![e.to_string()],
                    serving: Serving::Nothing,
                    node_selector: None,
                });
                errors.push(e.clone());
            }
        }
    }
    let built = model.build(&configs, &errors, &loaded.objects, &NodeInfo { any: true, ..Default::default() });
    for c in &configs {
        let Some(st) = built.statuses.get(&c.key) else { continue };
        out.push(Verdict {
            key: Some(c.key.clone()),
            origin: c.origin.clone(),
            api_version: api_versions.get(&c.key).cloned().unwrap_or_default(),
            generation: c.generation,
            problems: st.problems.iter().map(|p| format!("{}: {p}", st.object)).collect(),
            serving: st.serving.clone(),
            node_selector: c.spec.node_selector.clone(),
        });
    }
    for v in out.iter_mut().filter(|v| v.key.is_some() && v.serving == Serving::Nothing && !v.problems.is_empty()) {
        // A document that no longer parses: the model may still serve its last good version.
        if let Some(st) = v.key.as_ref().and_then(|k| built.statuses.get(k)) {
            v.serving = st.serving.clone();
        }
    }
    out
}

/// Validates every EnvoyConfig under `paths` against the other objects there
/// (Services, Secrets...), and every Cilium policy (what it refuses, by
/// field). Node selectors are not applied.
pub fn validate(paths: &[PathBuf]) -> Report {
    let mut loaded = yaml::Loaded::default();
    let mut report = Report::default();
    for p in paths {
        match yaml::files(p) {
            Ok(files) => {
                for f in files {
                    yaml::load_file(&f, &mut loaded);
                }
            }
            Err(e) => report.problems.push(format!("{}: {e}", p.display())),
        }
    }
    report.problems.extend(loaded.problems.iter().map(|p| p.to_string()));
    for v in verdicts(&loaded, &mut Model::new(ProxyPorts::ephemeral())) {
        report.configs += 1;
        if v.problems.is_empty() {
            report.valid += 1;
        }
        report.problems.extend(v.problems.iter().map(|p| format!("{}: {p}", v.origin)));
    }
    let policies = loaded.objects.cilium_network_policies.iter().map(|(k, p)| (k, p, false));
    let clusterwide = loaded.objects.cilium_clusterwide_network_policies.iter().map(|(k, p)| (k, p, true));
    for (key, p, clusterwide) in policies.chain(clusterwide) {
        report.policies += 1;
        let kind = if clusterwide { cilium::CLUSTERWIDE_KIND } else { cilium::KIND };
        let problems = cilium::problems(key, &p.object, clusterwide);
        report.problems.extend(problems.iter().map(|m| format!("{}: {kind} {key}: {m}", p.origin)));
    }
    report
}
