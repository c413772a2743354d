//! One Gateway's Envoy configuration: a single transparent listener for the
//! Gateway's Service, whose filter chains are chosen by destination port
//! (the Service port the client connected to; Envoy sees it as its local
//! port) and, on HTTPS ports, by SNI; a route configuration per HTTP port
//! and per HTTPS listener; an EDS cluster per backend Service port.
//!
//! Virtual hosts carry listener isolation and hostname precedence: there is
//! one per hostname in play (each listener's, and each attached route's
//! hostnames as intersected with its listener's); a host belongs to the most
//! specific listener hostname that covers it, and holds the entries of that
//! listener's routes whose hostnames cover it, routes with the more specific
//! hostname first. Envoy picks the most specific matching domain, so a
//! request for a listener's host never reaches another listener's routes,
//! and an unknown host gets 404.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    hostnames::{covers, most_specific_first, specificity},
    matching::Precedence,
};
use crate::operator::envoy;

/// A listener the Envoy config serves.
#[derive(Clone, Debug)]
pub struct Served {
    pub name: String,
    pub port: i32,
    /// TLS termination with these SDS secrets (`<ns>/<secret>`); empty: plain HTTP.
    pub secrets: Vec<String>,
    pub hostname: Option<String>,
}

/// One Envoy route entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub precedence: Precedence,
    pub route: Value,
}

/// A route's entries attached to one listener, under its effective hostnames.
#[derive(Clone, Debug)]
pub struct Attached<'a> {
    /// Index into the served listeners.
    pub listener: usize,
    pub hostnames: Vec<String>,
    pub entries: &'a [Entry],
}

/// The virtual hosts for the listeners `set` (indices into `served`).
fn virtual_hosts(served: &[Served], set: &[usize], attached: &[Attached]) -> Vec<Value> {
    let host_of = |i: usize| served.get(i).and_then(|l| l.hostname.clone()).unwrap_or_else(|| "*".into());
    let mut domains: Vec<String> = set.iter().map(|&i| host_of(i)).collect();
    for a in attached.iter().filter(|a| set.contains(&a.listener)) {
        domains.extend(a.hostnames.iter().cloned());
    }
    domains.sort_by(|a, b| most_specific_first(a, b));
    domains.dedup();
    let mut out = Vec::new();
    for d in domains {
        // The most specific listener of the set whose hostname covers the domain.
        let Some(owner) = set
            .iter()
            .copied()
            .filter(|&i| covers(&host_of(i), &d))
            .max_by(|&a, &b| specificity(&host_of(a)).cmp(&specificity(&host_of(b))))
        else {
            continue;
        };
        let mut entries: Vec<((bool, usize), &Entry)> = Vec::new();
        for a in attached.iter().filter(|a| a.listener == owner) {
            let Some(best) = a.hostnames.iter().filter(|h| covers(h, &d)).max_by_key(|h| specificity(h)) else {
                continue;
            };
            entries.extend(a.entries.iter().map(|e| (specificity(best), e)));
        }
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.precedence.cmp(&b.1.precedence)));
        out.push(json!({
            "name": d,
            "domains": [d],
            "routes": entries.iter().map(|(_, e)| e.route.clone()).collect::<Vec<_>>(),
        }));
    }
    out
}

fn route_config(name: &str, vhosts: Vec<Value>) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": vhosts,
    })
}

/// The EnvoyConfig spec for a Gateway: `stat` names it in Envoy's stats,
/// `service` is its Service, `clusters` every backend cluster its routes use
/// (name to protocol), `backends` the Service ports they need. `None` when
/// no listener is served (Envoy refuses a listener without filter chains).
///
/// One Envoy listener per port, redirected from that Service port alone: the
/// datapath hands Envoy the connection on a loopback listener, so the port
/// a client dialled is not something a filter chain could match on. HTTP
/// listeners of a port share one chain (virtual hosts tell them apart);
/// HTTPS listeners get a chain each, chosen by server name.
pub fn spec(
    stat: &str,
    service: &crate::k8s::ObjKey,
    served: &[Served],
    attached: &[Attached],
    clusters: &BTreeMap<String, (String, envoy::Upstream)>,
    backends: &BTreeMap<crate::k8s::ObjKey, std::collections::BTreeSet<i32>>,
) -> Option<Value> {
    if served.is_empty() {
        return None;
    }
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    let mut services = Vec::new();
    let mut by_port: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, l) in served.iter().enumerate() {
        by_port.entry(l.port).or_default().push(i);
    }
    for (port, set) in &by_port {
        let mut chains = Vec::new();
        let plain: Vec<usize> = set.iter().copied().filter(|&i| served[i].secrets.is_empty()).collect();
        if !plain.is_empty() {
            let name = format!("http-{port}");
            chains.push(json!({ "filters": [envoy::hcm(&format!("{stat}-{port}"), &name)] }));
            routes.push(route_config(&name, virtual_hosts(served, &plain, attached)));
        }
        let mut tls = false;
        for &i in set.iter().filter(|&&i| !served[i].secrets.is_empty()) {
            tls = true;
            let l = &served[i];
            let name = format!("https-{}", l.name);
            let mut m = json!({ "transport_protocol": "tls" });
            if let Some(h) = &l.hostname {
                m["server_names"] = json!([h]);
            }
            chains.push(json!({
                "filter_chain_match": m,
                "filters": [envoy::hcm(&format!("{stat}-{}", l.name), &name)],
                "transport_socket": envoy::tls_transport_socket(&l.secrets),
            }));
            routes.push(route_config(&name, virtual_hosts(served, &[i], attached)));
        }
        let name = format!("listener-{port}");
        services
            .push(json!({ "name": service.name, "namespace": service.namespace, "listener": name, "ports": [port] }));
        listeners.push(envoy::listener(&name, chains, tls));
    }
    let mut resources = listeners;
    resources.extend(routes);
    resources.extend(clusters.iter().map(|(name, (service, up))| envoy::eds_cluster(name, Some(service), *up)));
    Some(json!({
        "services": services,
        "backendServices": envoy::backend_services(backends),
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;

    use super::*;

    fn entry(name: &str) -> Entry {
        Entry {
            precedence: Precedence {
                path_rank: 2,
                path_len: Reverse(1),
                method: Reverse(false),
                headers: Reverse(0),
                queries: Reverse(0),
                created: String::new(),
                route: name.into(),
                rule: 0,
                matched: 0,
            },
            route: json!({ "name": name }),
        }
    }

    fn listener(name: &str, hostname: Option<&str>) -> Served {
        Served { name: name.into(), port: 80, secrets: vec![], hostname: hostname.map(Into::into) }
    }

    fn hosts(vhosts: &[Value]) -> Vec<(String, Vec<String>)> {
        vhosts
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["routes"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_host_belongs_to_the_most_specific_listener_and_specific_route_hostnames_go_first() {
        // Listeners `*` and `*.example.com`, and `bar.example.com` with no routes.
        let served =
            [listener("any", None), listener("wild", Some("*.example.com")), listener("bar", Some("bar.example.com"))];
        let (any, wild, foo) = (vec![entry("any")], vec![entry("wild")], vec![entry("foo")]);
        let attached = [
            Attached { listener: 0, hostnames: vec!["*".into()], entries: &any },
            Attached { listener: 1, hostnames: vec!["*.example.com".into()], entries: &wild },
            Attached { listener: 1, hostnames: vec!["foo.example.com".into()], entries: &foo },
        ];
        let v = virtual_hosts(&served, &[0, 1, 2], &attached);
        assert_eq!(
            hosts(&v),
            [
                ("bar.example.com".to_owned(), vec![]),
                ("foo.example.com".to_owned(), vec!["foo".to_owned(), "wild".to_owned()]),
                ("*.example.com".to_owned(), vec!["wild".to_owned()]),
                ("*".to_owned(), vec!["any".to_owned()]),
            ]
        );
    }

    #[test]
    fn each_port_is_a_listener_of_its_own_with_a_chain_per_https_listener() {
        let served = [
            listener("http", None),
            Served { name: "https".into(), port: 443, secrets: vec!["ns/cert".into()], hostname: Some("a.org".into()) },
        ];
        let e = vec![entry("r")];
        let attached = [Attached { listener: 1, hostnames: vec!["a.org".into()], entries: &e }];
        let spec = spec(
            "gw",
            &crate::k8s::ObjKey::new("ns", "weft-gateway-gw"),
            &served,
            &attached,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        // A listener per port, each redirected from its Service port only.
        let (http, https) = (&spec["resources"][0], &spec["resources"][1]);
        assert_eq!((&http["name"], &https["name"]), (&json!("listener-80"), &json!("listener-443")));
        assert_eq!(http["filter_chains"][0].get("filter_chain_match"), None);
        assert_eq!(http.get("listener_filters"), None);
        assert_eq!(
            https["filter_chains"][0]["filter_chain_match"],
            json!({ "transport_protocol": "tls", "server_names": ["a.org"] })
        );
        assert_eq!(https["listener_filters"][0]["name"], "envoy.filters.listener.tls_inspector");
        assert_eq!(
            spec["services"],
            json!([
                { "name": "weft-gateway-gw", "namespace": "ns", "listener": "listener-80", "ports": [80] },
                { "name": "weft-gateway-gw", "namespace": "ns", "listener": "listener-443", "ports": [443] },
            ])
        );
        assert_eq!(spec["resources"][3]["name"], "https-https");
        assert_eq!(
            hosts(spec["resources"][3]["virtual_hosts"].as_array().unwrap()),
            [("a.org".to_owned(), vec!["r".to_owned()])]
        );
        assert!(
            super::spec("gw", &crate::k8s::ObjKey::new("ns", "s"), &[], &[], &BTreeMap::new(), &BTreeMap::new())
                .is_none()
        );
    }
}
