//! A Gateway's listeners, checked: which protocols and route kinds weft
//! serves (HTTP and HTTPS terminated with Secrets; HTTPRoute and GRPCRoute),
//! which namespaces may attach routes, which certificates resolve (across
//! namespaces only with a ReferenceGrant), and which listeners conflict
//! (one port, two protocols; or one port, protocol and hostname twice).
//! Each listener gets the conditions the spec asks for.

use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::Condition};
use weft_gateway_api::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom, GatewayListenersTlsMode,
};

use super::{
    GROUP,
    conditions::condition,
    grants::{self, Reference},
    hostnames,
};
use crate::k8s::{ObjKey, Objects};

/// The route kinds weft serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    /// The kind's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }

    fn from_name(group: &str, kind: &str) -> Option<Self> {
        match (group, kind) {
            (GROUP, "HTTPRoute") => Some(RouteKind::Http),
            (GROUP, "GRPCRoute") => Some(RouteKind::Grpc),
            _ => None,
        }
    }
}

/// Which namespaces may attach routes to a listener.
#[derive(Clone, Debug)]
pub enum From {
    Same,
    All,
    Selector(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector),
}

/// A listener as checked.
#[derive(Clone, Debug)]
pub struct Listener {
    pub name: String,
    pub port: i32,
    pub hostname: Option<String>,
    /// The route kinds it takes (allowed and supported).
    pub kinds: Vec<RouteKind>,
    pub from: From,
    /// SDS names (`<ns>/<secret>`) of its certificates; empty for HTTP.
    pub secrets: Vec<String>,
    pub https: bool,
    /// Routes may attach (the listener is accepted and not conflicted).
    pub attachable: bool,
    /// Envoy serves it (attachable, and every reference resolved).
    pub serving: bool,
    /// Accepted, ResolvedRefs, Conflicted (Programmed is added by the caller).
    pub conditions: Vec<Condition>,
}

impl Listener {
    /// Whether routes from namespace `ns` may attach (the Gateway is in `gateway_ns`).
    pub fn admits_namespace(&self, gateway_ns: &str, ns: &str, objects: &Objects) -> bool {
        match &self.from {
            From::Same => ns == gateway_ns,
            From::All => true,
            From::Selector(sel) => {
                let held: Option<&Namespace> = objects.namespaces.get(&ObjKey::new("", ns)).map(|n| &n.object);
                let mut labels = held.and_then(|n| n.metadata.labels.clone()).unwrap_or_default();
                // The built-in label exists on every namespace, even before it is seen.
                labels.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| ns.to_owned());
                crate::k8s::selector::matches(sel, &labels).unwrap_or(false)
            }
        }
    }
}

/// Checks every listener of `gw` (generation `generation`).
pub fn check(gw: &Gateway, objects: &Objects) -> Vec<Listener> {
    let generation = gw.metadata.generation.unwrap_or(0);
    let ns = gw.metadata.namespace.clone().unwrap_or_default();
    let mut out: Vec<Listener> = gw.spec.listeners.iter().map(|l| one(l, &ns, objects, generation)).collect();
    conflicts(&gw.spec.listeners, &mut out, generation);
    out
}

fn one(l: &GatewayListeners, ns: &str, objects: &Objects, generation: i64) -> Listener {
    let mut accepted: Result<(), (&str, String)> = Ok(());
    let mut resolved: Result<(), (&str, String)> = Ok(());
    let https = match l.protocol.as_str() {
        "HTTP" => false,
        "HTTPS" => true,
        other => {
            accepted =
                Err(("UnsupportedProtocol", format!("protocol {other:?} is not served by weft (HTTP and HTTPS are)")));
            false
        }
    };
    if let Some(h) = &l.hostname
        && !hostnames::valid(h)
    {
        accepted = Err(("UnsupportedValue", format!("hostname {h:?} is not a valid DNS name")));
    }
    // Route kinds: those asked for that weft serves; none asked: all it serves.
    let mut kinds = Vec::new();
    match l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
        Some(asked) => {
            let mut bad = Vec::new();
            for k in asked {
                let group = k.group.as_deref().unwrap_or(GROUP);
                match RouteKind::from_name(group, &k.kind) {
                    Some(kind) if !kinds.contains(&kind) => kinds.push(kind),
                    Some(_) => {}
                    None => bad.push(if group.is_empty() { k.kind.clone() } else { format!("{group}/{}", k.kind) }),
                }
            }
            if !bad.is_empty() {
                resolved = Err((
                    "InvalidRouteKinds",
                    format!("route kinds {} are not served (HTTPRoute and GRPCRoute are)", bad.join(", ")),
                ));
            }
        }
        None => kinds = vec![RouteKind::Http, RouteKind::Grpc],
    }
    if accepted.is_err() {
        kinds.clear();
    }
    let from = match l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()) {
        None => From::Same,
        Some(n) => match &n.from {
            None | Some(GatewayListenersAllowedRoutesNamespacesFrom::Same) => From::Same,
            Some(GatewayListenersAllowedRoutesNamespacesFrom::All) => From::All,
            Some(GatewayListenersAllowedRoutesNamespacesFrom::Selector) => {
                match n.selector.as_ref().map(|s| serde_json::to_value(s).and_then(serde_json::from_value)) {
                    Some(Ok(sel)) => From::Selector(sel),
                    _ => {
                        accepted = Err((
                            "UnsupportedValue",
                            "allowedRoutes.namespaces: from Selector needs a selector".into(),
                        ));
                        From::Same
                    }
                }
            }
            Some(_) => {
                accepted =
                    Err(("UnsupportedValue", "allowedRoutes.namespaces.from is not Same, All or Selector".into()));
                From::Same
            }
        },
    };
    let mut secrets = Vec::new();
    if https && accepted.is_ok() {
        let tls = l.tls.as_ref();
        if matches!(tls.and_then(|t| t.mode.as_ref()), Some(m) if *m != GatewayListenersTlsMode::Terminate) {
            accepted = Err(("UnsupportedValue", "TLS mode Passthrough is not served by weft (Terminate is)".into()));
        }
        let refs = tls.and_then(|t| t.certificate_refs.as_ref()).map(Vec::as_slice).unwrap_or_default();
        if refs.is_empty() && accepted.is_ok() {
            resolved = Err(("InvalidCertificateRef", "an HTTPS listener needs a certificateRef".into()));
        }
        for (i, r) in refs.iter().enumerate() {
            let group = r.group.as_deref().unwrap_or("");
            let kind = r.kind.as_deref().unwrap_or("Secret");
            let secret_ns = r.namespace.clone().unwrap_or_else(|| ns.to_owned());
            let at = format!("certificateRefs[{i}]");
            if !group.is_empty() || kind != "Secret" {
                resolved = Err(("InvalidCertificateRef", format!("{at}: {kind} is not a Secret (group \"\")")));
                continue;
            }
            let reference = Reference {
                from_kind: "Gateway",
                from_namespace: ns,
                to_group: "",
                to_kind: "Secret",
                to_namespace: &secret_ns,
                to_name: &r.name,
            };
            if !grants::permitted(&reference, objects) {
                resolved = Err((
                    "RefNotPermitted",
                    format!(
                        "{at}: Secret {secret_ns}/{} is in another namespace and no ReferenceGrant there allows it",
                        r.name
                    ),
                ));
                continue;
            }
            let key = ObjKey::new(secret_ns.clone(), r.name.clone());
            let usable = objects.secrets.get(&key).is_some_and(|s| {
                let data = s.object.data.as_ref();
                data.is_some_and(|d| {
                    d.get("tls.crt").is_some_and(|c| !c.0.is_empty())
                        && d.get("tls.key").is_some_and(|k| !k.0.is_empty())
                })
            });
            if !usable {
                resolved = Err((
                    "InvalidCertificateRef",
                    format!("{at}: Secret {key} does not exist or is not a TLS Secret with tls.crt and tls.key"),
                ));
                continue;
            }
            secrets.push(key.to_string());
        }
    }
    let mut conditions = Vec::new();
    match &accepted {
        Ok(()) => conditions.push(condition("Accepted", true, "Accepted", "the listener is valid", generation)),
        Err((reason, msg)) => conditions.push(condition("Accepted", false, reason, msg.clone(), generation)),
    }
    match &resolved {
        Ok(()) => {
            conditions.push(condition("ResolvedRefs", true, "ResolvedRefs", "every reference resolves", generation))
        }
        Err((reason, msg)) => conditions.push(condition("ResolvedRefs", false, reason, msg.clone(), generation)),
    }
    let attachable = accepted.is_ok();
    Listener {
        name: l.name.clone(),
        port: l.port,
        hostname: l.hostname.clone(),
        kinds,
        from,
        secrets,
        https,
        attachable,
        serving: attachable && resolved.is_ok(),
        conditions,
    }
}

/// Marks listeners that cannot be told apart: two protocols on one port
/// (all of that port's listeners), or one port, protocol and hostname twice
/// (all but the first). Conflicted listeners are not served.
fn conflicts(spec: &[GatewayListeners], out: &mut [Listener], generation: i64) {
    for i in 0..out.len() {
        let (port, proto) = (spec[i].port, spec[i].protocol.as_str());
        let protocol_conflict = spec.iter().any(|o| o.port == port && o.protocol != proto);
        let hostname_conflict = spec[..i].iter().any(|o| {
            o.port == port
                && o.protocol == proto
                && o.hostname.as_deref().unwrap_or("") == spec[i].hostname.as_deref().unwrap_or("")
        });
        let c = if protocol_conflict {
            condition(
                "Conflicted",
                true,
                "ProtocolConflict",
                format!("another listener on port {port} has another protocol"),
                generation,
            )
        } else if hostname_conflict {
            condition(
                "Conflicted",
                true,
                "HostnameConflict",
                format!("an earlier listener on port {port} has the same protocol and hostname"),
                generation,
            )
        } else {
            condition("Conflicted", false, "NoConflicts", "no other listener conflicts with it", generation)
        };
        if c.status == "True" {
            let l = &mut out[i];
            l.attachable = false;
            l.serving = false;
            if let Some(a) = l.conditions.iter_mut().find(|c| c.type_ == "Accepted" && c.status == "True") {
                *a = condition(
                    "Accepted",
                    false,
                    "Pending",
                    "the listener conflicts with another; see Conflicted",
                    generation,
                );
            }
        }
        out[i].conditions.push(c);
    }
}
