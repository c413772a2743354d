//! `weft-agent validate PATH...`: everything the agent checks before it
//! pushes anything to Envoy, offline. One line per problem; like
//! `istioctl analyze`, but for EnvoyConfigs.

use std::path::PathBuf;

use crate::{
    k8s::yaml,
    xds::{
        envoyconfig,
        model::{Model, NodeInfo},
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
}

/// Validates every EnvoyConfig under `paths` against the other objects there
/// (Services, Secrets...). Node selectors are not applied.
pub fn validate(paths: &[PathBuf]) -> Report {
    let mut loaded = yaml::Loaded::default();
    let mut report = Report::default();
    for p in paths {
        match yaml::files(p) {
            Ok(files) => {
                for f in files {
                    match std::fs::read_to_string(&f) {
                        Ok(text) => yaml::load_text(&f, &text, &mut loaded),
                        Err(e) => report.problems.push(format!("{}: unreadable: {e}", f.display())),
                    }
                }
            }
            Err(e) => report.problems.push(format!("{}: {e}", p.display())),
        }
    }
    report.problems.extend(loaded.problems.iter().map(|p| p.to_string()));
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    for (origin, doc) in &loaded.raw {
        match envoyconfig::parse(origin.clone(), doc) {
            Ok(c) => configs.push(c),
            Err(e) => {
                report.problems.push(format!("{origin}: {e}"));
                errors.push(e);
            }
        }
    }
    report.configs = configs.len() + errors.len();
    let built = Model::new(ProxyPorts::ephemeral()).build(
        &configs,
        &[],
        &loaded.objects,
        &NodeInfo { any: true, ..Default::default() },
    );
    for c in &configs {
        let st = &built.statuses[&c.key];
        if st.problems.is_empty() {
            report.valid += 1;
        }
        for p in &st.problems {
            report.problems.push(format!("{}: {}: {p}", c.origin, st.object));
        }
    }
    report
}
