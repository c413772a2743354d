//! HTTPRoute and GRPCRoute rules as Envoy route entries.
//!
//! Each match of a rule is one entry (no match: the rule matches every
//! request, as a PathPrefix `/`). Filters become route fields: header
//! modifiers, a redirect (scheme, host, port, path, status), a URL rewrite
//! (host, full path or prefix), request mirrors, timeouts; per-backend header
//! modifiers sit on the weighted cluster. A rule weft cannot serve (an
//! unsupported filter, a prefix rewrite without a prefix match, a bad
//! regular expression kind) is dropped and reported; the route's other
//! rules keep serving. Backends that do not resolve make their share of
//! requests 500.

use std::cmp::Reverse;

use serde_json::{Map, Value, json};
use weft_gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute};

use super::{
    backends::{self, BackendRef, Unresolved, Used, Weighted},
    config::Entry,
    matching::{self, MatchError, Precedence, duration_ms, envoy_duration},
};
use crate::k8s::Objects;

/// A route's rules, translated for one listener port.
#[derive(Clone, Debug, Default)]
pub struct Translated {
    pub entries: Vec<Entry>,
    /// Backends that did not resolve (the route's ResolvedRefs).
    pub unresolved: Vec<Unresolved>,
    /// Rules dropped: (index, why).
    pub dropped: Vec<(usize, RuleError)>,
}

/// Why a route rule is dropped (shown in the route's status). `at` is the
/// field within the rule, as `filters[1]` or `matches[0].path`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{at} is not supported")]
    Unsupported { at: String },
    #[error("{at}: {what} is missing")]
    Missing { at: String, what: &'static str },
    #[error("{at}: filter type {kind} is not supported by weft")]
    FilterType { at: String, kind: String },
    #[error("{at}: only header modifiers are supported on a backend")]
    BackendFilter { at: String },
    #[error("{at}: ReplacePrefixMatch needs every match of the rule to be one PathPrefix")]
    PrefixRewrite { at: String },
    #[error("{at}: redirect status {status} is not 301, 302, 303, 307 or 308")]
    RedirectStatus { at: String, status: i64 },
    #[error("{at}: a service or a method is required")]
    NoServiceOrMethod { at: String },
    #[error("{at}: {error}")]
    Match { at: String, error: MatchError },
    #[error("{at}: {error}")]
    Mirror { at: String, error: MirrorError },
}

impl RuleError {
    fn matching(at: impl Into<String>) -> impl FnOnce(MatchError) -> RuleError {
        let at = at.into();
        move |error| RuleError::Match { at, error }
    }
}

/// Where a rule is served from: the listener's port and whether it is HTTPS
/// (a redirect without a scheme keeps them).
#[derive(Clone, Copy, Debug)]
pub struct Via {
    pub port: i32,
    pub https: bool,
}

/// What a header modifier does, whichever route type's it is.
struct HeaderChanges {
    set: Vec<(String, String)>,
    add: Vec<(String, String)>,
    remove: Vec<String>,
}

/// The [`HeaderChanges`] of any header modifier type (they share field names, not a type).
macro_rules! header_changes {
    ($m:expr) => {{
        let m = $m;
        HeaderChanges {
            set: m.set.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
            add: m.add.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
            remove: m.remove.clone().unwrap_or_default(),
        }
    }};
}

/// Envoy header fields (`<direction>_headers_to_add` / `_to_remove`) for a modifier.
fn header_fields(direction: &str, changes: HeaderChanges, into: &mut Map<String, Value>) {
    let HeaderChanges { set, add, remove } = changes;
    let mut to_add: Vec<Value> =
        into.get(&format!("{direction}_headers_to_add")).and_then(Value::as_array).cloned().unwrap_or_default();
    for (name, value) in set {
        to_add
            .push(json!({ "header": { "key": name, "value": value }, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD" }));
    }
    for (name, value) in add {
        to_add.push(json!({ "header": { "key": name, "value": value }, "append_action": "APPEND_IF_EXISTS_OR_ADD" }));
    }
    if !to_add.is_empty() {
        into.insert(format!("{direction}_headers_to_add"), Value::Array(to_add));
    }
    if !remove.is_empty() {
        let mut to_remove: Vec<Value> =
            into.get(&format!("{direction}_headers_to_remove")).and_then(Value::as_array).cloned().unwrap_or_default();
        to_remove.extend(remove.into_iter().map(Value::from));
        into.insert(format!("{direction}_headers_to_remove"), Value::Array(to_remove));
    }
}

/// A mirror policy for a resolved cluster: the whole traffic, `percent`, or a fraction.
/// A mirror fraction Envoy cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror fraction: denominator must be positive")]
    Denominator,
    #[error("mirror fraction: numerator must not be negative")]
    Numerator,
}

fn mirror(cluster: String, percent: Option<i32>, fraction: Option<(i32, Option<i32>)>) -> Result<Value, MirrorError> {
    let millionths: Option<u64> = match (percent, fraction) {
        (Some(p), _) => Some(u64::try_from(p.clamp(0, 100)).unwrap_or(0) * 10_000),
        (None, Some((num, den))) => {
            let den = u64::try_from(den.unwrap_or(100)).ok().filter(|d| *d > 0).ok_or(MirrorError::Denominator)?;
            let num = u64::try_from(num).map_err(|_| MirrorError::Numerator)?;
            Some(num.min(den) * 1_000_000 / den)
        }
        (None, None) => None,
    };
    let mut m = json!({ "cluster": cluster });
    if let Some(n) = millionths {
        m["runtime_fraction"] = json!({ "default_value": { "numerator": n, "denominator": "MILLION" } });
    }
    Ok(m)
}

/// The RE2 form of a literal.
fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `regex_rewrite` replacing the matched path prefix `prefix` with
/// `replacement`, element-wise (`/` replaces the prefix with nothing: `/a/b`
/// under `/a` becomes `/b`).
fn prefix_rewrite(prefix: &str, replacement: &str) -> Value {
    let prefix = prefix.trim_end_matches('/');
    let replacement = replacement.trim_end_matches('/');
    if replacement.is_empty() {
        json!({ "pattern": { "regex": format!("^{}/*", escape(prefix)) }, "substitution": "/" })
    } else {
        json!({ "pattern": { "regex": format!("^{}", escape(prefix)) }, "substitution": replacement })
    }
}

/// One rule's translation ingredients common to HTTP and gRPC.
struct RuleOut {
    fields: Map<String, Value>,
    /// The route action's extra fields (rewrite, mirror, timeout).
    action_extra: Map<String, Value>,
    redirect: Option<Value>,
    backends: Vec<Weighted>,
}

/// Builds the entries of one rule: `matches` are (match JSON, precedence
/// without the tie-breakers), `name` the entry name prefix.
fn entries_of(out: &RuleOut, matches: Vec<(Value, Precedence)>, name: &str, into: &mut Vec<Entry>) {
    for (i, (m, precedence)) in matches.into_iter().enumerate() {
        let mut base = out.fields.clone();
        base.insert("name".into(), json!(format!("{name}/match/{i}")));
        base.insert("match".into(), m.clone());
        if let Some(r) = &out.redirect {
            let mut e = base;
            e.insert("redirect".into(), r.clone());
            into.push(Entry { precedence, route: Value::Object(e) });
            continue;
        }
        let (bad_share, action) = backends::action(&out.backends);
        if bad_share > 0 && action.is_some() {
            // The unresolved share first: a fraction of matching requests gets 500, the rest fall through.
            let mut e = base.clone();
            let mut m = m.clone();
            m["runtime_fraction"] = json!({ "default_value": { "numerator": bad_share, "denominator": "MILLION" } });
            e.insert("match".into(), m);
            e.insert("direct_response".into(), json!({ "status": 500 }));
            into.push(Entry { precedence: precedence.clone(), route: Value::Object(e) });
        }
        let mut e = base;
        match action {
            None => {
                e.insert("direct_response".into(), json!({ "status": 500 }));
            }
            Some(mut a) => {
                if let Some(o) = a.as_object_mut() {
                    o.extend(out.action_extra.clone());
                }
                e.insert("route".into(), a);
            }
        }
        into.push(Entry { precedence, route: Value::Object(e) });
    }
}

/// A [`BackendRef`] from any route type's reference (they share field names, not a type).
macro_rules! backend_ref {
    ($b:expr) => {{
        let b = $b;
        BackendRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: &b.name,
            namespace: b.namespace.as_deref(),
            port: b.port,
        }
    }};
}

/// What translating one rule reads and adds to.
struct RuleCtx<'a> {
    id: &'a RouteId,
    objects: &'a Objects,
    used: &'a mut Used,
    t: &'a mut Translated,
}

/// Adds a mirror of the rule's requests to `r` (a share: `percent` or a
/// (numerator, denominator) fraction); an unresolved mirror is reported, not served.
fn add_mirror(
    ctx: &mut RuleCtx,
    out: &mut RuleOut,
    r: &BackendRef,
    share: (Option<i32>, Option<(i32, Option<i32>)>),
    at: &str,
) -> Result<(), RuleError> {
    match backends::resolve(r, ctx.id.kind, &ctx.id.namespace, ctx.objects, ctx.used) {
        Ok(cluster) => {
            let policy =
                mirror(cluster, share.0, share.1).map_err(|error| RuleError::Mirror { at: at.to_owned(), error })?;
            let mut all =
                out.action_extra.get("request_mirror_policies").and_then(Value::as_array).cloned().unwrap_or_default();
            all.push(policy);
            out.action_extra.insert("request_mirror_policies".into(), Value::Array(all));
        }
        Err(u) => ctx.t.unresolved.push(u),
    }
    Ok(())
}

/// The rule's backends, each with its per-backend header modifiers (the
/// only per-backend filters served); `$bf` is the route type's backend filter type enum.
macro_rules! add_backends {
    ($rule:expr, $bf:path, $ctx:expr, $out:expr) => {{
        use $bf as BF;
        for (bi, b) in $rule.backend_refs.iter().flatten().enumerate() {
            let cluster =
                backends::resolve(&backend_ref!(b), $ctx.id.kind, &$ctx.id.namespace, $ctx.objects, $ctx.used);
            if let Err(u) = &cluster {
                $ctx.t.unresolved.push(u.clone());
            }
            let mut headers = Map::new();
            for (fi, f) in b.filters.iter().flatten().enumerate() {
                match f.r#type {
                    BF::RequestHeaderModifier => {
                        if let Some(m) = &f.request_header_modifier {
                            header_fields("request", header_changes!(m), &mut headers);
                        }
                    }
                    BF::ResponseHeaderModifier => {
                        if let Some(m) = &f.response_header_modifier {
                            header_fields("response", header_changes!(m), &mut headers);
                        }
                    }
                    _ => {
                        return Err(RuleError::BackendFilter { at: format!("backendRefs[{bi}].filters[{fi}]") });
                    }
                }
            }
            $out.backends.push(Weighted { cluster, weight: weight(b.weight), headers });
        }
    }};
}

fn weight(w: Option<i32>) -> u32 {
    u32::try_from(w.unwrap_or(1)).unwrap_or(0)
}

/// What a match asks for, for its precedence: (path rank, path length,
/// a method, header matches, query matches).
type Shape = (u8, usize, bool, usize, usize);

fn precedence(
    (path_rank, path_len, method, headers, queries): Shape,
    route: &RouteId,
    rule: usize,
    matched: usize,
) -> Precedence {
    Precedence {
        path_rank,
        path_len: Reverse(path_len),
        method: Reverse(method),
        headers: Reverse(headers),
        queries: Reverse(queries),
        created: route.created.clone(),
        route: route.key.clone(),
        rule,
        matched,
    }
}

/// Who a route is, for ordering ties and entry names.
pub struct RouteId {
    pub kind: &'static str,
    pub namespace: String,
    pub key: String,
    pub created: String,
}

impl RouteId {
    pub fn of(kind: &'static str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        let namespace = meta.namespace.clone().unwrap_or_default();
        Self {
            kind,
            key: format!("{namespace}/{}", meta.name.clone().unwrap_or_default()),
            namespace,
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        }
    }
}

/// (match type, name, value) of a match's headers, any route type (`$h`: its header match type enum).
macro_rules! header_kinds {
    ($m:expr, $h:ident) => {
        $m.headers.iter().flatten().map(|h| {
            let kind = match h.r#type {
                None | Some($h::Exact) => "Exact",
                Some($h::RegularExpression) => "RegularExpression",
                Some(_) => "unsupported",
            };
            (kind, h.name.as_str(), h.value.as_str())
        })
    };
}

/// Deduplicated header matches (the first of equal names counts, as the spec says).
fn header_matches<'a>(headers: impl Iterator<Item = (&'a str, &'a str, &'a str)>) -> Result<Vec<Value>, MatchError> {
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (kind, name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if seen.contains(&lower) {
            continue;
        }
        seen.push(lower);
        out.push(matching::header(kind, name, value)?);
    }
    Ok(out)
}

/// Translates an HTTPRoute's rules for a listener.
pub fn http(route: &HttpRoute, via: Via, objects: &Objects, used: &mut Used) -> Translated {
    let id = RouteId::of("HTTPRoute", &route.metadata);
    let mut t = Translated::default();
    for (ri, rule) in route.spec.rules.iter().flatten().enumerate() {
        let name = format!("httproute/{}/rule/{}", id.key, rule.name.clone().unwrap_or_else(|| ri.to_string()));
        match http_rule(rule, ri, via, &id, objects, used, &name, &mut t) {
            Ok(()) => {}
            Err(why) => t.dropped.push((ri, why)),
        }
    }
    t
}

#[allow(clippy::too_many_arguments)]
fn http_rule(
    rule: &weft_gateway_api::httproutes::HttpRouteRules,
    ri: usize,
    via: Via,
    id: &RouteId,
    objects: &Objects,
    used: &mut Used,
    name: &str,
    t: &mut Translated,
) -> Result<(), RuleError> {
    use weft_gateway_api::httproutes::{
        HttpRouteRulesFiltersRequestRedirectPathType as RedirectPath,
        HttpRouteRulesFiltersRequestRedirectScheme as Scheme, HttpRouteRulesFiltersType as F,
        HttpRouteRulesFiltersUrlRewritePathType as RewritePath, HttpRouteRulesMatchesHeadersType as H,
        HttpRouteRulesMatchesPathType as P, HttpRouteRulesMatchesQueryParamsType as Q,
    };
    // Matches first: they decide what a prefix rewrite means.
    let mut matches = Vec::new();
    let mut prefixes = Vec::new();
    let default_match = [Default::default()];
    let rule_matches = rule.matches.as_deref().filter(|m| !m.is_empty()).unwrap_or(&default_match);
    for (mi, m) in rule_matches.iter().enumerate() {
        let m: &weft_gateway_api::httproutes::HttpRouteRulesMatches = m;
        let (kind, value) = match &m.path {
            None => ("PathPrefix", "/".to_owned()),
            Some(p) => (
                match p.r#type {
                    None | Some(P::PathPrefix) => "PathPrefix",
                    Some(P::Exact) => "Exact",
                    Some(P::RegularExpression) => "RegularExpression",
                    Some(_) => return Err(RuleError::Unsupported { at: format!("matches[{mi}].path.type") }),
                },
                p.value.clone().unwrap_or_else(|| "/".into()),
            ),
        };
        let (rank, mut json) =
            matching::path(kind, &value).map_err(RuleError::matching(format!("matches[{mi}].path")))?;
        prefixes.push((kind == "PathPrefix").then(|| value.clone()));
        let mut header_json =
            header_matches(header_kinds!(m, H)).map_err(RuleError::matching(format!("matches[{mi}].headers")))?;
        let header_count = header_json.len();
        let method = m
            .method
            .as_ref()
            .map(|mm| serde_json::to_value(mm).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default());
        if let Some(method) = &method {
            header_json.push(json!({ "name": ":method", "string_match": { "exact": method } }));
        }
        if !header_json.is_empty() {
            json["headers"] = Value::Array(header_json);
        }
        let mut queries = Vec::new();
        let mut seen = Vec::new();
        for q in m.query_params.iter().flatten() {
            if seen.contains(&q.name) {
                continue;
            }
            seen.push(q.name.clone());
            let k = match q.r#type {
                None | Some(Q::Exact) => "Exact",
                Some(Q::RegularExpression) => "RegularExpression",
                Some(_) => "unsupported",
            };
            queries.push(
                matching::query(k, &q.name, &q.value)
                    .map_err(RuleError::matching(format!("matches[{mi}].queryParams")))?,
            );
        }
        let query_count = queries.len();
        if !queries.is_empty() {
            json["query_parameters"] = Value::Array(queries);
        }
        let path_len = if rank == 0 || rank == 1 { value.len() } else { value.trim_end_matches('/').len() };
        matches.push((json, precedence((rank, path_len, method.is_some(), header_count, query_count), id, ri, mi)));
    }
    let mut out = RuleOut { fields: Map::new(), action_extra: Map::new(), redirect: None, backends: Vec::new() };
    for (fi, f) in rule.filters.iter().flatten().enumerate() {
        let at = format!("filters[{fi}]");
        match f.r#type {
            F::RequestHeaderModifier => {
                let m = f
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "requestHeaderModifier" })?;
                header_fields("request", header_changes!(m), &mut out.fields);
            }
            F::ResponseHeaderModifier => {
                let m = f
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "responseHeaderModifier" })?;
                header_fields("response", header_changes!(m), &mut out.fields);
            }
            F::RequestRedirect => {
                let r = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "requestRedirect" })?;
                let mut red = Map::new();
                let scheme = r.scheme.as_ref().map(|s| match s {
                    Scheme::Https => "https",
                    _ => "http",
                });
                if let Some(s) = scheme {
                    red.insert("scheme_redirect".into(), json!(s));
                }
                if let Some(h) = &r.hostname {
                    red.insert("host_redirect".into(), json!(h));
                }
                // The port: as given; else the scheme's (left out); else the listener's (left out when it is its scheme's).
                let port = match (r.port, scheme) {
                    (Some(p), _) => Some(p),
                    (None, Some(_)) => None,
                    (None, None) => Some(via.port),
                };
                let effective_scheme = scheme.unwrap_or(if via.https { "https" } else { "http" });
                if let Some(p) = port.filter(|p| !matches!((effective_scheme, *p), ("http", 80) | ("https", 443))) {
                    red.insert("port_redirect".into(), json!(p));
                }
                if let Some(p) = &r.path {
                    match p.r#type {
                        RedirectPath::ReplaceFullPath => {
                            red.insert(
                                "path_redirect".into(),
                                json!(p.replace_full_path.clone().unwrap_or_else(|| "/".into())),
                            );
                        }
                        RedirectPath::ReplacePrefixMatch => {
                            let prefix =
                                single_prefix(&prefixes).ok_or_else(|| RuleError::PrefixRewrite { at: at.clone() })?;
                            red.insert(
                                "regex_rewrite".into(),
                                prefix_rewrite(&prefix, p.replace_prefix_match.as_deref().unwrap_or("/")),
                            );
                        }
                        _ => return Err(RuleError::Unsupported { at: format!("{at}.requestRedirect.path.type") }),
                    }
                }
                let code = match r.status_code.unwrap_or(302) {
                    301 => "MOVED_PERMANENTLY",
                    302 => "FOUND",
                    303 => "SEE_OTHER",
                    307 => "TEMPORARY_REDIRECT",
                    308 => "PERMANENT_REDIRECT",
                    other => return Err(RuleError::RedirectStatus { at, status: other }),
                };
                red.insert("response_code".into(), json!(code));
                out.redirect = Some(Value::Object(red));
            }
            F::UrlRewrite => {
                let r =
                    f.url_rewrite.as_ref().ok_or_else(|| RuleError::Missing { at: at.clone(), what: "urlRewrite" })?;
                if let Some(h) = &r.hostname {
                    out.action_extra.insert("host_rewrite_literal".into(), json!(h));
                }
                if let Some(p) = &r.path {
                    let rw = match p.r#type {
                        RewritePath::ReplaceFullPath => json!({
                            "pattern": { "regex": "^/.*$" },
                            "substitution": p.replace_full_path.clone().unwrap_or_else(|| "/".into())
                        }),
                        RewritePath::ReplacePrefixMatch => {
                            let prefix =
                                single_prefix(&prefixes).ok_or_else(|| RuleError::PrefixRewrite { at: at.clone() })?;
                            prefix_rewrite(&prefix, p.replace_prefix_match.as_deref().unwrap_or("/"))
                        }
                        _ => return Err(RuleError::Unsupported { at: format!("{at}.urlRewrite.path.type") }),
                    };
                    out.action_extra.insert("regex_rewrite".into(), rw);
                }
            }
            F::RequestMirror => {
                let m = f
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "requestMirror" })?;
                let share = (m.percent, m.fraction.as_ref().map(|f| (f.numerator, f.denominator)));
                let mut ctx = RuleCtx { id, objects, used: &mut *used, t: &mut *t };
                add_mirror(&mut ctx, &mut out, &backend_ref!(&m.backend_ref), share, &at)?;
            }
            _ => {
                return Err(RuleError::FilterType { at, kind: serde_json::to_string(&f.r#type).unwrap_or_default() });
            }
        }
    }
    if let Some(timeouts) = &rule.timeouts {
        let request = timeouts
            .request
            .as_deref()
            .map(duration_ms)
            .transpose()
            .map_err(RuleError::matching("timeouts.request"))?;
        let backend = timeouts
            .backend_request
            .as_deref()
            .map(duration_ms)
            .transpose()
            .map_err(RuleError::matching("timeouts.backendRequest"))?;
        if let Some(ms) = request.or(backend) {
            out.action_extra.insert("timeout".into(), json!(envoy_duration(ms)));
        }
        if let (Some(_), Some(b)) = (request, backend) {
            out.action_extra
                .insert("retry_policy".into(), json!({ "num_retries": 0, "per_try_timeout": envoy_duration(b) }));
        }
    }
    let ctx = RuleCtx { id, objects, used, t: &mut *t };
    add_backends!(rule, weft_gateway_api::httproutes::HttpRouteRulesBackendRefsFiltersType, ctx, out);
    entries_of(&out, matches, name, &mut t.entries);
    Ok(())
}

/// The one PathPrefix every match of a rule has, if they all have the same.
fn single_prefix(prefixes: &[Option<String>]) -> Option<String> {
    let first = prefixes.first()?.clone()?;
    prefixes
        .iter()
        .all(|p| p.as_ref().map(|p| p.trim_end_matches('/')) == Some(first.trim_end_matches('/')))
        .then_some(first)
}

/// Translates a GRPCRoute's rules.
pub fn grpc(route: &GrpcRoute, objects: &Objects, used: &mut Used) -> Translated {
    use weft_gateway_api::grpcroutes::{
        GrpcRouteRulesFiltersType as F, GrpcRouteRulesMatchesHeadersType as H, GrpcRouteRulesMatchesMethodType as M,
    };
    let id = RouteId::of("GRPCRoute", &route.metadata);
    let mut t = Translated::default();
    for (ri, rule) in route.spec.rules.iter().flatten().enumerate() {
        let name = format!("grpcroute/{}/rule/{}", id.key, rule.name.clone().unwrap_or_else(|| ri.to_string()));
        let result = (|| -> Result<(), RuleError> {
            let mut matches = Vec::new();
            let default_match = [Default::default()];
            let rule_matches = rule.matches.as_deref().filter(|m| !m.is_empty()).unwrap_or(&default_match);
            for (mi, m) in rule_matches.iter().enumerate() {
                let m: &weft_gateway_api::grpcroutes::GrpcRouteRulesMatches = m;
                let (rank, len, mut json) = match &m.method {
                    None => (2, 0, json!({ "prefix": "/" })),
                    Some(mm) => {
                        let (svc, method) = (mm.service.as_deref(), mm.method.as_deref());
                        match (&mm.r#type, svc, method) {
                            (_, None, None) => {
                                return Err(RuleError::NoServiceOrMethod { at: format!("matches[{mi}].method") });
                            }
                            (None | Some(M::Exact), Some(s), Some(me)) => {
                                (0, s.len() + me.len(), json!({ "path": format!("/{s}/{me}") }))
                            }
                            (None | Some(M::Exact), Some(s), None) => {
                                (2, s.len(), json!({ "prefix": format!("/{s}/") }))
                            }
                            (None | Some(M::Exact), None, Some(me)) => {
                                (1, me.len(), json!({ "safe_regex": { "regex": format!("/[^/]+/{}", escape(me)) } }))
                            }
                            (Some(M::RegularExpression), s, me) => (
                                1,
                                s.map_or(0, str::len) + me.map_or(0, str::len),
                                json!({ "safe_regex": { "regex": format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")) } }),
                            ),
                            _ => return Err(RuleError::Unsupported { at: format!("matches[{mi}].method.type") }),
                        }
                    }
                };
                let header_json = header_matches(header_kinds!(m, H))
                    .map_err(RuleError::matching(format!("matches[{mi}].headers")))?;
                let count = header_json.len();
                if !header_json.is_empty() {
                    json["headers"] = Value::Array(header_json);
                }
                // Only gRPC requests: the content type says so.
                json["grpc"] = json!({});
                matches.push((json, precedence((rank, len, false, count, 0), &id, ri, mi)));
            }
            let mut out =
                RuleOut { fields: Map::new(), action_extra: Map::new(), redirect: None, backends: Vec::new() };
            for (fi, f) in rule.filters.iter().flatten().enumerate() {
                let at = format!("filters[{fi}]");
                match f.r#type {
                    F::RequestHeaderModifier => {
                        let m = f
                            .request_header_modifier
                            .as_ref()
                            .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "requestHeaderModifier" })?;
                        header_fields("request", header_changes!(m), &mut out.fields);
                    }
                    F::ResponseHeaderModifier => {
                        let m = f
                            .response_header_modifier
                            .as_ref()
                            .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "responseHeaderModifier" })?;
                        header_fields("response", header_changes!(m), &mut out.fields);
                    }
                    F::RequestMirror => {
                        let m = f
                            .request_mirror
                            .as_ref()
                            .ok_or_else(|| RuleError::Missing { at: at.clone(), what: "requestMirror" })?;
                        let share = (m.percent, m.fraction.as_ref().map(|f| (f.numerator, f.denominator)));
                        let mut ctx = RuleCtx { id: &id, objects, used: &mut *used, t: &mut t };
                        add_mirror(&mut ctx, &mut out, &backend_ref!(&m.backend_ref), share, &at)?;
                    }
                    _ => {
                        return Err(RuleError::FilterType {
                            at,
                            kind: serde_json::to_string(&f.r#type).unwrap_or_default(),
                        });
                    }
                }
            }
            let ctx = RuleCtx { id: &id, objects, used: &mut *used, t: &mut t };
            add_backends!(rule, weft_gateway_api::grpcroutes::GrpcRouteRulesBackendRefsFiltersType, ctx, out);
            entries_of(&out, matches, &name, &mut t.entries);
            Ok(())
        })();
        if let Err(why) = result {
            t.dropped.push((ri, why));
        }
    }
    t
}
