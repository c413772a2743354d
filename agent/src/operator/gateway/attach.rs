//! Attaching a route to a Gateway: a parentRef names the Gateway and maybe
//! a listener (`sectionName`) or a port; of the listeners it names, the
//! route attaches to those that take its kind, admit its namespace and
//! share a hostname with it. When it attaches nowhere, the reason is the
//! one the spec gives for the first thing that failed.

use super::{
    hostnames,
    listeners::{Listener, RouteKind},
};
use crate::k8s::Objects;

/// Where a route attached: (listener index, the hostnames it serves there).
pub type Attachments = Vec<(usize, Vec<String>)>;

/// Why a route did not attach: (reason, message) for its Accepted condition.
pub type NotAttached = (&'static str, String);

/// A route asking to attach through one of its parentRefs.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub kind: RouteKind,
    pub namespace: &'a str,
    pub hostnames: &'a [String],
    /// The parentRef's `sectionName` and `port`.
    pub section: Option<&'a str>,
    pub port: Option<i32>,
}

/// Attaches a route to a Gateway in `gateway_ns` with `listeners`.
pub fn attach(
    route: &Candidate,
    gateway_ns: &str,
    listeners: &[Listener],
    objects: &Objects,
) -> Result<Attachments, NotAttached> {
    let Candidate { kind, namespace: route_ns, hostnames: route_hostnames, section, port } = *route;
    let named: Vec<(usize, &Listener)> = listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| section.is_none_or(|s| s == l.name) && port.is_none_or(|p| p == l.port))
        .collect();
    if named.is_empty() {
        let what = match (section, port) {
            (Some(s), Some(p)) => format!("no listener named {s:?} on port {p}"),
            (Some(s), None) => format!("no listener named {s:?}"),
            (None, Some(p)) => format!("no listener on port {p}"),
            (None, None) => "the Gateway has no listeners".into(),
        };
        return Err(("NoMatchingParent", what));
    }
    let allowed: Vec<(usize, &Listener)> = named
        .into_iter()
        .filter(|(_, l)| l.attachable && l.kinds.contains(&kind) && l.admits_namespace(gateway_ns, route_ns, objects))
        .collect();
    if allowed.is_empty() {
        return Err((
            "NotAllowedByListeners",
            format!("no listener it names takes {}s from namespace {route_ns}", kind.name()),
        ));
    }
    let mut out = Vec::new();
    for (i, l) in allowed {
        if let Some(h) = hostnames::intersect(l.hostname.as_deref(), route_hostnames) {
            out.push((i, h));
        }
    }
    if out.is_empty() {
        return Err(("NoMatchingListenerHostname", "no listener it names shares a hostname with the route".into()));
    }
    Ok(out)
}
