//! The Grafana dashboards (issue 6): the committed JSON is what
//! dashboards/generate.py writes; dashboards and provisioning files are well
//! formed; and, with Debian's Prometheus scraping an agent that carried the
//! lab's plain, L7 and policy-denied traffic, every query of every panel
//! uses only names the agent exports, parses, and returns data.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use weft_tests::{
    dashboards::{
        self, BUILTINS, Dashboard, Names, Query, exposition_names, grafana_value, interpolate, label_values_query,
        legend_labels, load, provisioning,
    },
    envoylab::EnvoyLab,
    flows::{HELLO, Prometheus, agent_get, flow_lab, traffic, wait_for},
    http::Client,
    require_root,
    scenario::{T, sa},
};

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// The values the check selects where the lab has one to pick; any other
/// variable gets all of its values, as a user who ticks every box.
const LAB_CHOICES: [(&str, &str); 2] = [("node", "node1"), ("namespace", "default")];

/// Values a variable must offer for the lab's traffic.
const LAB_EXPECTS: [(&str, &str); 2] = [("workload", "n2-p1"), ("instance", "127.0.0.1:9962")];

#[test]
fn the_committed_dashboards_are_what_the_generator_writes() {
    let out = Command::new("python3")
        .arg(dashboards::dir().join("generate.py"))
        .arg("--check")
        .output()
        .expect("running python3 (tests/setup.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dashboards_and_provisioning_files_are_well_formed() {
    let ds = provisioning("datasources/weft.yaml").unwrap();
    assert_eq!(ds["apiVersion"], 1);
    let prometheus: Vec<&Value> =
        ds["datasources"].as_array().into_iter().flatten().filter(|d| d["type"] == "prometheus").collect();
    assert_eq!(prometheus.len(), 1, "one Prometheus data source: {ds}");
    let uid = prometheus[0]["uid"].as_str().expect("the data source has a uid the dashboards refer to");

    let providers = provisioning("dashboards/weft.yaml").unwrap();
    assert_eq!(providers["apiVersion"], 1);
    let p = &providers["providers"][0];
    assert_eq!(p["type"], "file", "{providers}");
    assert!(p["options"]["path"].as_str().is_some_and(|s| s.starts_with('/')), "{providers}");

    let all = load().unwrap();
    let files: BTreeSet<&str> = all.iter().map(|d| d.file.as_str()).collect();
    assert_eq!(files, BTreeSet::from(["weft-agent.json", "weft-http.json", "weft-network.json"]));
    let mut problems: Vec<String> = all.iter().flat_map(|d| d.problems(uid)).collect();
    let uids: BTreeSet<&str> = all.iter().filter_map(|d| d.json["uid"].as_str()).collect();
    if uids.len() != all.len() {
        problems.push(format!("dashboard uids are not unique: {uids:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_panel_query_parses_and_returns_data_for_the_lab_traffic() {
    require_root!();
    let env = flow_lab("");
    let prom = Prometheus::start(&env.lab, 0, &env.lab.run_dir.join("prometheus")).unwrap_or_else(|e| env.fail(e));
    // Rounds a few scrapes apart, so every counter grows while Prometheus
    // watches and rates (and latency quantiles) are not all zero.
    let rounds = 4;
    for _ in 0..rounds {
        traffic(&env, 3);
        server_errors(&env, 2);
        std::thread::sleep(Duration::from_secs(2));
    }
    let errors = (2 * rounds) as f64;
    wait_for(Duration::from_secs(20), "Prometheus to scrape the last round", || {
        let v = prom.value("sum(weft_http_responses_total{status=\"503\"})").ok().flatten()?;
        (v >= errors).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let exported = exposition_names(&agent_get(&env.lab, 0, "/metrics").unwrap());

    let mut failures = Vec::new();
    let mut checked = 0;
    for d in load().unwrap() {
        let values = variable_values(&d, &prom, &exported, &mut failures);
        for q in d.queries() {
            checked += 1;
            if let Err(e) = check_query(&prom, &exported, &values, &q) {
                failures.push(format!("{}: {e}", q.place));
            }
        }
    }
    assert!(checked >= 40, "only {checked} queries in the dashboards");
    assert!(failures.is_empty(), "{} problems in {checked} queries:\n{}", failures.len(), failures.join("\n"));
}

/// `n` requests that the backend answers with 503, through Envoy.
fn server_errors(env: &EnvoyLab, n: usize) {
    let mut c = Client::connect(&env.lab.pod("n1-p1").netns, sa(HELLO, 80), None, T).unwrap_or_else(|e| env.fail(e));
    for _ in 0..n {
        let r = c.get("hello.default", "/status/503", &[]).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 503, "{r:?}");
    }
}

/// Metric and label names in `expr` that the agent does not export.
fn unknown_names(expr: &str, exported: &Names) -> Option<String> {
    let used = dashboards::names(expr);
    let metrics: Vec<&String> = used.metrics.difference(&exported.metrics).collect();
    let labels: Vec<&String> =
        used.labels.iter().filter(|l| !exported.labels.contains(*l) && !TARGET_LABELS.contains(&l.as_str())).collect();
    (!metrics.is_empty() || !labels.is_empty())
        .then(|| format!("names the agent does not export: metrics {metrics:?}, labels {labels:?}"))
}

/// Fills every variable of a dashboard as Grafana would, by running its
/// `label_values` query against Prometheus, with the lab's choices.
fn variable_values(
    d: &Dashboard,
    prom: &Prometheus,
    exported: &Names,
    failures: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = BUILTINS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for var in d.variables() {
        let mut fail = |e: String| failures.push(format!("{}: variable {}: {e}", d.file, var.name));
        match var.kind.as_str() {
            // Only used in data source references, never in a query.
            "datasource" => continue,
            "query" => {}
            other => {
                fail(format!("the check does not know variables of type {other:?}"));
                continue;
            }
        }
        let query = var.query.as_deref().unwrap_or_default();
        let Some((selector, label)) = label_values_query(query) else {
            fail(format!("{query:?} is not label_values(selector, label)"));
            continue;
        };
        if let Some(e) = unknown_names(selector, exported) {
            fail(e);
        }
        if !exported.labels.contains(label) && !TARGET_LABELS.contains(&label) {
            fail(format!("label {label} is not exported"));
        }
        let options = interpolate(selector, &values)
            .map_err(|e| e.to_string())
            .and_then(|s| prom.label_values(label, &s).map_err(|e| e.to_string()));
        let options = match options {
            Ok(o) if !o.is_empty() => o,
            Ok(_) => {
                fail(format!("{query} offers no value for the lab"));
                continue;
            }
            Err(e) => {
                fail(e);
                continue;
            }
        };
        for (_, want) in LAB_EXPECTS.iter().filter(|(n, _)| *n == var.name) {
            if !options.iter().any(|o| o == want) {
                fail(format!("{query} offers {options:?}, not {want}"));
            }
        }
        let chosen: Vec<String> = match LAB_CHOICES.iter().find(|(n, _)| *n == var.name) {
            Some((_, v)) if options.iter().any(|o| o == v) => vec![v.to_string()],
            Some((_, v)) => {
                fail(format!("{query} offers {options:?}, not the lab's {v}"));
                continue;
            }
            None => options,
        };
        values.insert(var.name.clone(), grafana_value(&var, &chosen));
    }
    values
}

/// Runs one panel query: known names only, parses, returns at least one
/// finite sample, and its legend names labels the result has.
fn check_query(
    prom: &Prometheus,
    exported: &Names,
    values: &BTreeMap<String, String>,
    q: &Query,
) -> Result<(), String> {
    if let Some(e) = unknown_names(&q.expr, exported) {
        return Err(e);
    }
    let expr = interpolate(&q.expr, values)?;
    let answer = prom.query(&expr).map_err(|e| e.to_string())?;
    let data = &answer["data"];
    let series: Vec<&Value> = match data["resultType"].as_str() {
        Some("vector") => data["result"].as_array().into_iter().flatten().collect(),
        Some("scalar") => vec![data],
        other => return Err(format!("a {other:?} result; panels want an instant vector: {expr}")),
    };
    let value = |s: &Value| {
        let v = if s["value"].is_array() { &s["value"][1] } else { &s["result"][1] };
        v.as_str().and_then(|v| v.parse::<f64>().ok())
    };
    if series.is_empty() {
        return Err(format!("no data for the lab's traffic: {expr}"));
    }
    if !series.iter().any(|s| value(s).is_some_and(f64::is_finite)) {
        return Err(format!("only NaN or infinite values {series:?}: {expr}"));
    }
    for label in legend_labels(&q.legend) {
        if !series.iter().any(|s| s["metric"].get(label).is_some()) {
            return Err(format!("the legend {:?} uses {label}, which no series has: {series:?}", q.legend));
        }
    }
    Ok(())
}
