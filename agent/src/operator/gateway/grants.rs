//! ReferenceGrants: a reference from an object in one namespace to an
//! object in another holds only when a ReferenceGrant in the target's
//! namespace allows that kind, from that namespace, to that kind (and name,
//! if it names one). References within a namespace need none.

use super::GROUP;
use crate::k8s::Objects;

/// A reference to check. The referring object is of the Gateway API group.
#[derive(Clone, Copy, Debug)]
pub struct Reference<'a> {
    pub from_kind: &'a str,
    pub from_namespace: &'a str,
    pub to_group: &'a str,
    pub to_kind: &'a str,
    pub to_namespace: &'a str,
    pub to_name: &'a str,
}

/// Whether the reference is allowed.
pub fn permitted(r: &Reference, objects: &Objects) -> bool {
    if r.from_namespace == r.to_namespace {
        return true;
    }
    objects.reference_grants.iter().filter(|(k, _)| k.namespace == r.to_namespace).any(|(_, g)| {
        let spec = &g.object.spec;
        spec.from.iter().any(|f| f.group == GROUP && f.kind == r.from_kind && f.namespace == r.from_namespace)
            && spec.to.iter().any(|t| {
                t.group == r.to_group && t.kind == r.to_kind && t.name.as_deref().is_none_or(|n| n == r.to_name)
            })
    })
}
