//! weft's Grafana dashboards (`dashboards/`) as the tests read them: their
//! structure, panels and queries, the template variables and how Grafana
//! fills them in, and the metric and label names a PromQL expression uses.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use serde_json::Value;

/// The dashboards folder of the checkout.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Grafana's own variables, and what the lab check puts in their place: a
/// range that holds many of the lab's 1 s scrapes.
pub const BUILTINS: [(&str, &str); 3] = [("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "5m")];

/// One dashboard file.
pub struct Dashboard {
    pub file: String,
    pub json: Value,
}

/// One query of one panel.
pub struct Query {
    /// `file: panel <id> "<title>" <refId>`, for messages.
    pub place: String,
    pub expr: String,
    pub legend: String,
}

/// A template variable.
pub struct Variable {
    pub name: String,
    pub kind: String,
    /// The query of a `query` variable.
    pub query: Option<String>,
    pub multi: bool,
    pub include_all: bool,
}

/// Every `*.json` under `dashboards/`, by file name.
pub fn load() -> anyhow::Result<Vec<Dashboard>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)?;
            let json = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Ok(Dashboard { file: p.file_name().unwrap().to_string_lossy().into_owned(), json })
        })
        .collect()
}

/// A provisioning file (YAML) under `dashboards/provisioning/`, as JSON.
pub fn provisioning(path: &str) -> anyhow::Result<Value> {
    let p = dir().join("provisioning").join(path);
    let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

impl Dashboard {
    /// Every panel, rows' nested panels included.
    pub fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
            for p in list.as_array().into_iter().flatten() {
                out.push(p);
                walk(&p["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    /// Every query of every panel.
    pub fn queries(&self) -> Vec<Query> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    place: format!("{}: panel {} {} {}", self.file, p["id"], p["title"], t["refId"]),
                    expr: t["expr"].as_str().unwrap_or_default().to_owned(),
                    legend: t["legendFormat"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        out
    }

    /// The template variables, in order (a variable may use those before it).
    pub fn variables(&self) -> Vec<Variable> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| Variable {
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                kind: v["type"].as_str().unwrap_or_default().to_owned(),
                query: match &v["query"] {
                    Value::String(s) if v["type"] == "query" => Some(s.clone()),
                    Value::Object(o) => o.get("query").and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                },
                multi: v["multi"] == true,
                include_all: v["includeAll"] == true,
            })
            .collect()
    }

    /// What is wrong with the dashboard's structure; `datasource_uid` is the
    /// uid the provisioning file gives the Prometheus data source.
    pub fn problems(&self, datasource_uid: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut bad = |what: String| out.push(format!("{}: {what}", self.file));
        let d = &self.json;
        for key in ["uid", "title"] {
            if d[key].as_str().is_none_or(str::is_empty) {
                bad(format!("no {key}"));
            }
        }
        if !d["schemaVersion"].is_u64() {
            bad("no schemaVersion".into());
        }
        if !d["templating"]["list"].is_array() {
            bad("no templating.list".into());
        }
        let vars = self.variables();
        let ds_var = vars.iter().find(|v| v.kind == "datasource").map(|v| format!("${{{}}}", v.name));
        let ds_ok = |ds: &Value| {
            ds["type"] == "prometheus"
                && ds["uid"].as_str().is_some_and(|u| u == datasource_uid || Some(u) == ds_var.as_deref())
        };
        let mut ids = BTreeSet::new();
        let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
        for p in self.panels() {
            let name = format!("panel {} {}", p["id"], p["title"]);
            match p["id"].as_u64() {
                Some(id) if !ids.insert(id) => bad(format!("{name}: id used twice")),
                None => bad(format!("{name}: no numeric id")),
                _ => {}
            }
            if p["title"].as_str().is_none() || p["type"].as_str().is_none() {
                bad(format!("{name}: no title or type"));
            }
            let g = &p["gridPos"];
            let pos = ["x", "y", "w", "h"].map(|k| g[k].as_u64());
            match pos {
                [Some(x), Some(y), Some(w), Some(h)] if w > 0 && h > 0 && x + w <= 24 => {
                    let r = [x, y, w, h];
                    let overlap = |o: &[u64; 4]| {
                        r[0] < o[0] + o[2] && o[0] < r[0] + r[2] && r[1] < o[1] + o[3] && o[1] < r[1] + r[3]
                    };
                    if let Some((other, _)) = boxes.iter().find(|(_, o)| overlap(o)) {
                        bad(format!("{name}: overlaps {other}"));
                    }
                    boxes.push((name.clone(), r));
                }
                _ => bad(format!("{name}: gridPos {g} is not within the 24-column grid")),
            }
            if p["type"] == "row" {
                continue;
            }
            if !ds_ok(&p["datasource"]) {
                bad(format!("{name}: datasource {} is neither {datasource_uid:?} nor {ds_var:?}", p["datasource"]));
            }
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            if targets.is_empty() {
                bad(format!("{name}: no queries"));
            }
            let mut refs = BTreeSet::new();
            for t in targets {
                if !refs.insert(t["refId"].as_str().unwrap_or_default()) {
                    bad(format!("{name}: refId {} missing or used twice", t["refId"]));
                }
                if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                    bad(format!("{name}: query {} has no expr", t["refId"]));
                }
                if !t["datasource"].is_null() && !ds_ok(&t["datasource"]) {
                    bad(format!("{name}: query {} datasource {}", t["refId"], t["datasource"]));
                }
            }
        }
        if ds_var.is_none() && !d.to_string().contains(datasource_uid) {
            bad(format!("neither a datasource variable nor the provisioned uid {datasource_uid:?}"));
        }
        let known: BTreeSet<&str> =
            vars.iter().map(|v| v.name.as_str()).chain(BUILTINS.iter().map(|(n, _)| *n)).collect();
        let exprs = self.queries().into_iter().map(|q| (q.place, q.expr));
        let var_exprs = vars.iter().filter_map(|v| Some((format!("variable {}", v.name), v.query.clone()?)));
        for (place, expr) in exprs.chain(var_exprs) {
            for name in variable_refs(&expr) {
                if !known.contains(name) {
                    bad(format!("{place}: uses ${name}, which is not defined"));
                }
            }
        }
        out
    }
}

/// The names of the variables an expression uses (`$name`, `${name}`,
/// `${name:format}`, `[[name]]`).
pub fn variable_refs(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let ident = |s: &str| s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        let after = &rest[i + 1..];
        let (name, skip) = if rest[i..].starts_with("${") || rest[i..].starts_with("[[") {
            let inner = &after[1..];
            let n = ident(inner);
            (&inner[..n], 1 + n)
        } else if rest[i..].starts_with('$') {
            let n = ident(after);
            (&after[..n], n)
        } else {
            ("", 0)
        };
        if !name.is_empty() {
            out.push(name);
        }
        rest = &after[skip..];
    }
    out
}

/// Replaces every variable with its value; fails on an unknown one.
/// `values` holds what Grafana would write (see [`grafana_value`]).
pub fn interpolate(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut names: Vec<&str> = variable_refs(expr);
    // Longest first, so `$node` does not eat the start of `$nodes`.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = expr.to_owned();
    for n in names {
        let v = values.get(n).ok_or_else(|| format!("no value for ${n} in {expr}"))?;
        out = out.replace(&format!("${{{n}}}"), v).replace(&format!("[[{n}]]"), v).replace(&format!("${n}"), v);
    }
    Ok(out)
}

/// What Grafana writes into a Prometheus query for a variable's selected
/// values: a multi-value or "All" variable's values are regex-escaped (the
/// backslash doubled for the PromQL string) and joined as `(a|b)`; a plain
/// variable's single value is written as it is.
pub fn grafana_value(var: &Variable, values: &[String]) -> String {
    if !var.multi && !var.include_all {
        return values.first().cloned().unwrap_or_default();
    }
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars().map(|c| if "\\^$*+?.()|{}[]".contains(c) { format!("\\\\{c}") } else { c.to_string() }).collect()
        })
        .collect();
    match escaped.as_slice() {
        [one] => one.clone(),
        many => format!("({})", many.join("|")),
    }
}

/// `label_values(selector, label)` split into its selector and label.
pub fn label_values_query(q: &str) -> Option<(&str, &str)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim(), label.trim()))
}

/// The metric and label names a PromQL expression uses.
#[derive(Debug, Default, PartialEq)]
pub struct Names {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
}

const AGGREGATIONS: [&str; 12] =
    ["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"];
const KEYWORDS: [&str; 8] = ["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"];
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Reads the metric and label names out of a PromQL expression: identifiers
/// that are not functions, aggregations or keywords are metric names;
/// identifiers inside `{...}` before a matcher, and inside the parentheses
/// of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, are label
/// names. Strings and `[...]` ranges are skipped. Enough for dashboard
/// queries; not a full parser (Prometheus itself says whether they parse).
pub fn names(expr: &str) -> Names {
    let b = expr.as_bytes();
    let mut out = Names::default();
    let (mut i, mut braces, mut brackets, mut parens) = (0, 0usize, 0usize, 0usize);
    // A label-list keyword was just read; its `(` opens a list of labels.
    let mut list_next = false;
    // Inside a label list: the paren depth it opened at.
    let mut list_at: Option<usize> = None;
    while i < b.len() {
        let c = b[i] as char;
        let start = i;
        i += 1;
        if c.is_whitespace() {
            continue;
        }
        let was_list_next = std::mem::take(&mut list_next);
        if c == '"' || c == '\'' || c == '`' {
            while i < b.len() && b[i] as char != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`0.95`, `1e3`, `5m`).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let call = expr[i..].trim_start().starts_with('(');
            if brackets > 0 {
            } else if braces > 0 || list_at.is_some() {
                out.labels.insert(word.to_owned());
            } else if LABEL_LISTS.contains(&word) {
                list_next = true;
            } else if !(call || AGGREGATIONS.contains(&word) || KEYWORDS.contains(&word.to_lowercase().as_str())) {
                out.metrics.insert(word.to_owned());
            }
        } else {
            match c {
                '{' => braces += 1,
                '}' => braces = braces.saturating_sub(1),
                '[' => brackets += 1,
                ']' => brackets = brackets.saturating_sub(1),
                '(' => {
                    parens += 1;
                    if was_list_next {
                        list_at = Some(parens);
                    }
                }
                ')' => {
                    if list_at == Some(parens) {
                        list_at = None;
                    }
                    parens = parens.saturating_sub(1);
                }
                _ => {}
            }
        }
    }
    out
}

/// The sample names and label names of a Prometheus text exposition.
pub fn exposition_names(text: &str) -> Names {
    let mut out = Names::default();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        out.metrics.insert(line[..end].to_owned());
        if let Some(labels) = line[end..].strip_prefix('{').and_then(|l| l.split_once('}')).map(|(l, _)| l) {
            out.labels.extend(names(&format!("x{{{labels}}}")).labels);
        }
    }
    out
}

/// The label names a legend format uses (`{{name}}`).
pub fn legend_labels(legend: &str) -> Vec<&str> {
    legend.split("{{").skip(1).filter_map(|s| s.split_once("}}")).map(|(n, _)| n.trim()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_finds_metrics_and_labels_but_not_functions_or_keywords() {
        let n = names(
            r#"1 - (sum by (a, b) (rate(m_total{x=~"$v", y!="s(t)"}[$__rate_interval])) or sum(m2{z="1"}) * 0)
               / on (instance) group_left (node) max by (instance, node) (info) > bool 0"#,
        );
        assert_eq!(n.metrics, set(&["info", "m2", "m_total"]));
        assert_eq!(n.labels, set(&["a", "b", "instance", "node", "x", "y", "z"]));
        let n = names("histogram_quantile(0.95, sum without (pod) (rate(h_bucket[5m] offset 1m)))");
        assert_eq!((n.metrics, n.labels), (set(&["h_bucket"]), set(&["pod"])));
    }

    #[test]
    fn variables_are_found_and_filled_in_as_grafana_does() {
        assert_eq!(variable_refs("a{x=~\"$ns\", y=\"${wl:regex}\"}[$__range] [[old]]"), ["ns", "wl", "__range", "old"]);
        let multi = Variable { name: "i".into(), kind: "query".into(), query: None, multi: true, include_all: true };
        assert_eq!(grafana_value(&multi, &["127.0.0.1:9962".into()]), r"127\\.0\\.0\\.1:9962");
        assert_eq!(grafana_value(&multi, &["a".into(), "b".into()]), "(a|b)");
        let values = BTreeMap::from([("n".to_string(), "x".to_string()), ("nn".to_string(), "y".to_string())]);
        assert_eq!(interpolate("$nn $n ${n}", &values).unwrap(), "y x x");
        assert!(interpolate("$missing", &values).is_err());
        assert_eq!(label_values_query("label_values(m{a=~\"$x\"}, node)"), Some(("m{a=~\"$x\"}", "node")));
        assert_eq!(legend_labels("{{a}} → {{ b }} ({{c}})"), ["a", "b", "c"]);
    }

    #[test]
    fn problems_name_what_is_wrong() {
        let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
        let panel = |id: u64, x: u64, ds: &Value, expr: &str| {
            serde_json::json!({"id": id, "type": "timeseries", "title": format!("p{id}"), "datasource": ds,
                "gridPos": {"x": x, "y": 0, "w": 12, "h": 8}, "targets": [{"refId": "A", "expr": expr}]})
        };
        let d = |panels: Vec<Value>| Dashboard {
            file: "d.json".into(),
            json: serde_json::json!({"uid": "u", "title": "t", "schemaVersion": 39, "panels": panels,
                "templating": {"list": [{"type": "datasource", "name": "datasource", "query": "prometheus"}]}}),
        };
        let good = d(vec![panel(1, 0, &ds, "up{a=\"$__range\"}"), panel(2, 12, &ds, "up")]);
        assert_eq!(good.problems("weft-prometheus"), Vec::<String>::new());
        let other = serde_json::json!({"type": "prometheus", "uid": "elsewhere"});
        let bad = d(vec![panel(1, 0, &ds, "up"), panel(1, 6, &other, "x{a=\"$nope\"}")]);
        let p = bad.problems("weft-prometheus").join("\n");
        for want in ["id used twice", "overlaps panel 1", "datasource", "uses $nope"] {
            assert!(p.contains(want), "{want} not in:\n{p}");
        }
    }

    #[test]
    fn exposition_names_are_sample_names() {
        let n = exposition_names(
            "# TYPE h histogram\nh_bucket{le=\"0.1\",m=\"GET\"} 1\nh_count{m=\"GET\"} 1\nc_total 3\n# EOF\n",
        );
        assert_eq!(n.metrics, set(&["c_total", "h_bucket", "h_count"]));
        assert_eq!(n.labels, set(&["le", "m"]));
    }
}
