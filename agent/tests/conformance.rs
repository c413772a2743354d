//! Cilium's public examples (shared/conformance/cilium-examples), validated
//! as `weft-agent validate` does: which EnvoyConfigs and Cilium policies weft
//! accepts unchanged, and the precise reason for each it refuses.

mod support;

use std::path::PathBuf;
use support::examples;

use weft_agent::validate::validate;

/// Every example file with an EnvoyConfig, and what weft makes of it: None =
/// valid; Some(text) = refused, with a problem containing the text.
const EXPECTED: &[(&str, Option<&str>)] = &[
    ("envoy/envoy-circuit-breaker.yaml", None),
    ("envoy/envoy-helloworld-v1-90-v2-10.yaml", None),
    ("envoy/envoy-prometheus-metrics-listener.yaml", None),
    ("envoy/envoy-traffic-management-test.yaml", None),
    ("other/examples__policies__l4__envoy_forward_proxy_cec.yaml", None),
    ("other/examples__policies__l4__envoy_listener_redirect_cec.yaml", None),
    // Binds [::]:9901, where every node's Envoy has its admin interface.
    ("envoy/envoy-admin-listener.yaml", Some("binds [::]:9901, which is Envoy's admin interface's port on every node")),
    (
        "envoy/envoy-admin-listener-nodeselector.yaml",
        Some("binds [::]:9901, which is Envoy's admin interface's port on every node"),
    ),
    // Cilium's parser test data: listeners with only a name, which Envoy refuses.
    (
        "other/pkg__ciliumenvoyconfig__testdata__experimental__ciliumenvoyconfig.yaml",
        Some("filter_chains: a listener needs at least one filter chain"),
    ),
    (
        "other/pkg__ciliumenvoyconfig__testdata__experimental__ciliumclusterwideenvoyconfig.yaml",
        Some("filter_chains: a listener needs at least one filter chain"),
    ),
    // An unrendered Go template.
    (
        "other/cilium-cli__connectivity__builder__manifests__client-egress-to-fqdns-and-ccec-listener.yaml",
        Some("not valid YAML"),
    ),
];

/// Every example file with a Cilium policy, and the fields weft refuses in it
/// (each a problem naming the field; none: accepted and enforced).
const POLICIES: &[(&str, &[&str])] = &[
    ("policy/allow-ingress-cluster.yaml", &[]),
    ("policy/external-lockdown.yaml", &[]),
    (
        "policy/allow-ingress-cidr.yaml",
        &["spec.endpointSelector: selects Cilium's reserved identity \"ingress\"; weft enforces policies on pods only"],
    ),
    ("policy/default-deny.yaml", &["spec.egress[0].toPorts[0].rules.dns: DNS rules are not supported"]),
    ("envoy/client-egress-only-dns.yaml", &["spec.egress[0].toPorts[0].rules.dns: DNS rules are not supported"]),
    // HTTP rules are enforced in the node's Envoy; listener redirects hand
    // the port to the named EnvoyConfig listener.
    ("cnp-without-mutual-auth.yaml", &[]),
    ("cnp-with-mutual-auth.yaml", &["spec.ingress[0].authentication: mutual authentication is not supported"]),
    ("envoy/client-egress-l7-http.yaml", &["spec.egress[1].toFQDNs: FQDN rules are not supported"]),
    ("other/examples__policies__l4__envoy_forward_proxy.yaml", &[]),
    ("other/examples__policies__l4__wildcard_port_listener.yaml", &[]),
    (
        "other/examples__policies__l4__envoy_listener_redirect.yaml",
        &["spec.egress[0].toFQDNs: FQDN rules are not supported"],
    ),
];

#[test]
fn cilium_policies_are_accepted_or_refused_by_field() {
    let dir = examples();
    let mut failures = Vec::new();
    for (file, refused) in POLICIES {
        let report = validate(&[dir.join(file)]);
        if report.policies == 0 {
            failures.push(format!("{file}: no policy found"));
        }
        if refused.is_empty() && !report.problems.is_empty() {
            failures.push(format!("{file}: expected accepted, got {:?}", report.problems));
        }
        for text in *refused {
            if !report.problems.iter().any(|p| p.contains(text)) {
                failures.push(format!("{file}: expected a problem containing {text:?}, got {:?}", report.problems));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cilium_envoy_configs_validate_or_are_refused_precisely() {
    let dir = examples();
    let mut failures = Vec::new();
    for (file, expected) in EXPECTED {
        let report = validate(&[dir.join(file)]);
        match expected {
            None if report.problems.is_empty() && report.valid == 1 => {}
            None => failures.push(format!("{file}: expected valid, got {:?}", report.problems)),
            Some(text) if report.problems.iter().any(|p| p.contains(text)) => {}
            Some(text) => {
                failures.push(format!("{file}: expected a problem containing {text:?}, got {:?}", report.problems))
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_example_file_is_accounted_for() {
    // Files without EnvoyConfigs or Cilium policies (Deployments, Services,
    // Ingresses) are read without complaint; every file with one is listed.
    let dir = examples();
    let mut unlisted = Vec::new();
    for sub in ["", "envoy", "other", "policy"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let rel = path.strip_prefix(&dir).unwrap().to_string_lossy().into_owned();
            let report = validate(std::slice::from_ref(&path));
            let listed = EXPECTED.iter().any(|(f, _)| *f == rel) || POLICIES.iter().any(|(f, _)| *f == rel);
            if !listed && (report.configs > 0 || report.policies > 0 || !report.problems.is_empty()) {
                unlisted.push(format!("{rel}: {} config(s), problems {:?}", report.configs, report.problems));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "example files with EnvoyConfigs, policies or problems not listed:\n{}",
        unlisted.join("\n")
    );
}

#[test]
fn validate_exits_non_zero_with_one_line_per_problem() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_weft-agent"));
    let ok = std::process::Command::new(&bin)
        .arg("validate")
        .arg(examples().join("envoy/envoy-helloworld-v1-90-v2-10.yaml"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let bad = std::process::Command::new(&bin)
        .arg("validate")
        .arg(examples().join("envoy/envoy-admin-listener.yaml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("ClusterwideEnvoyConfig envoy-admin-listener: listener"), "{out}");
}
