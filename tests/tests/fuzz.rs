//! Fuzz targets (the engine and how to add one: `weft_tests::fuzz`). Each runs
//! its regressions, its seed corpus and then mutations for
//! `WEFT_FUZZ_SECONDS` (CI's budget when unset); `tests/fuzz.sh TARGET
//! SECONDS` runs one for as long as asked.

use std::{
    collections::BTreeSet,
    hash::{Hash, Hasher},
    path::Path,
    time::Duration,
};

use weft_agent::{
    k8s::yaml,
    validate,
    xds::{model::Model, ports::ProxyPorts},
};
use weft_tests::fuzz;

/// Objects the fuzzed configs can refer to (Services, Pods, a TLS Secret).
const OBJECTS: &str = include_str!("../fuzz/envoyconfig/corpus/objects.yaml");

/// A signature of a list of problems: their wording without names and numbers.
fn signature(problems: impl Iterator<Item = String>) -> u64 {
    let shapes: BTreeSet<String> = problems
        .map(|p| {
            let mut out = String::new();
            let mut quoted = false;
            for c in p.chars() {
                match c {
                    '"' => quoted = !quoted,
                    c if quoted || c.is_ascii_digit() => {}
                    c => out.push(c),
                }
            }
            out
        })
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    shapes.hash(&mut h);
    h.finish()
}

/// The EnvoyConfig path as the agent and `weft-agent validate` run it: YAML
/// (one file, many documents) -> objects and EnvoyConfig documents -> parse ->
/// proto-JSON decode -> translate -> field rules and tenancy -> the
/// cross-object model (built twice, as the agent does on the next change).
fn envoyconfig(input: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(input) else { return 0 };
    let mut loaded = yaml::Loaded::default();
    yaml::load_text(Path::new("objects.yaml"), OBJECTS, &mut loaded);
    yaml::load_text(Path::new("fuzz.yaml"), text, &mut loaded);
    let mut model = Model::new(ProxyPorts::ephemeral());
    let verdicts = validate::verdicts(&loaded, &mut model);
    let again = validate::verdicts(&loaded, &mut model);
    assert_eq!(verdicts.len(), again.len(), "the same objects judged twice give as many verdicts");
    signature(
        verdicts
            .iter()
            .flat_map(|v| v.problems.iter().cloned())
            .chain(loaded.problems.iter().map(|p| p.message.clone())),
    )
}

#[test]
fn fuzz_envoyconfig() {
    let budget = fuzz::budget(Duration::from_secs(20));
    fuzz::run("envoyconfig", &envoyconfig, budget, Duration::from_secs(30));
}
