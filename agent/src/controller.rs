//! The one writer of desired state. It takes what the sources hold, builds the
//! xDS snapshot and the datapath snapshot from it, and follows what Envoy says
//! about each push: ACKs mark objects acknowledged, a NACK is traced back to
//! the objects whose resources Envoy refused, which are then set aside (their
//! last good version stays) so everything else keeps working.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Serialize;

use crate::{
    k8s::{
        ObjKey,
        yaml::{Loaded, ParseProblem},
    },
    state::{
        Attachments, Snapshot,
        policy::{PolicyState, l7::ListenerPorts},
    },
    xds::{
        envoyconfig::{self, ConfigError, ConfigKey, EnvoyConfig},
        model::{Built, ConfigStatus, ListenerBudget, Model, NodeInfo, Serving},
        policy,
        ports::ProxyPorts,
        server::{AdsEvent, Published},
        translate::qualify,
    },
};

/// What Envoy made of an object's resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum EnvoyAck {
    /// Not (all) answered yet.
    Pending,
    /// Every resource of the object, as now, was ACKed.
    Acknowledged { version: u64 },
    /// Envoy refused it.
    Nacked { message: String },
    /// Nothing of it goes to Envoy (rejected, or not for this node).
    NotApplied,
}

/// An object's full state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectState {
    #[serde(flatten)]
    pub config: ConfigStatus,
    pub envoy: EnvoyAck,
}

/// The controller's view, for `weft status` and the API.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ControlStatus {
    pub version: u64,
    pub envoy_connected: bool,
    /// "delta" or "state-of-the-world", as Envoy's stream is.
    pub xds_mode: Option<&'static str>,
    pub objects: Vec<ObjectState>,
    /// Documents of the objects directory that could not be read.
    pub source_problems: Vec<String>,
    /// Things the datapath snapshot could not represent.
    pub state_problems: Vec<String>,
}

/// The proxy ports of the listeners the policies need, as the build gave them.
fn proxy_ports(built: &Built, p: &PolicyState) -> ListenerPorts {
    let serving = |key: &ConfigKey| {
        built.statuses.get(key).filter(|s| s.for_this_node && s.serving != Serving::Nothing).map(|s| &s.listeners)
    };
    let http = serving(&policy::config_key()).and_then(|l| l.first()).map(|(_, port)| *port);
    let mut listeners = BTreeMap::new();
    for l in p.listeners() {
        let key = ConfigKey { clusterwide: l.clusterwide, key: ObjKey::new(l.namespace.clone(), l.config.clone()) };
        let name = qualify(&l.namespace, &l.config, &l.listener, false);
        if let Some((_, port)) = serving(&key).into_iter().flatten().find(|(n, _)| *n == name) {
            listeners.insert(l.clone(), *port);
        }
    }
    ListenerPorts { http, listeners }
}

/// See the module doc.
pub struct Controller {
    node_name: String,
    node_ip: Option<Ipv4Addr>,
    model: Model,
    loaded: Loaded,
    configs: Vec<EnvoyConfig>,
    parse_errors: Vec<ConfigError>,
    version: u64,
    built: Built,
    /// (type URL, name) -> version Envoy ACKed.
    acked: BTreeMap<(String, String), String>,
    /// Objects Envoy refused, with its message (for the current spec).
    nacked: BTreeMap<ConfigKey, String>,
    envoy_connected: bool,
    xds_mode: Option<&'static str>,
    /// ACKed snapshot version per object, when all its resources are in.
    acked_version: BTreeMap<ConfigKey, u64>,
    /// Objects with resources in the current snapshot.
    owners: std::collections::BTreeSet<ConfigKey>,
    /// weft-cni's attachments, when pods come through it.
    attachments: Option<Arc<Attachments>>,
}

impl Controller {
    pub fn new(node_name: String, node_ip: Option<Ipv4Addr>, ports: ProxyPorts) -> Self {
        Self {
            node_name,
            node_ip,
            model: Model::new(ports),
            loaded: Loaded::default(),
            configs: Vec::new(),
            parse_errors: Vec::new(),
            version: 0,
            built: Built::default(),
            acked: BTreeMap::new(),
            nacked: BTreeMap::new(),
            envoy_connected: false,
            xds_mode: None,
            acked_version: BTreeMap::new(),
            owners: Default::default(),
            attachments: None,
        }
    }

    /// Refuses configs whose listeners would not fit in Envoy's open files.
    pub fn set_listener_budget(&mut self, budget: ListenerBudget) {
        self.model.set_listener_budget(budget);
    }

    /// Takes what a source now holds.
    pub fn load(&mut self, loaded: Loaded) {
        self.configs.clear();
        self.parse_errors.clear();
        for (origin, doc) in &loaded.raw {
            match envoyconfig::parse(origin.clone(), doc) {
                Ok(c) => self.configs.push(c),
                Err(e) => self.parse_errors.push(e),
            }
        }
        self.loaded = loaded;
    }

    fn node_info(&self) -> NodeInfo {
        let node = self
            .loaded
            .objects
            .nodes
            .values()
            .find(|n| n.object.metadata.name.as_deref() == Some(&self.node_name))
            .map(|n| &n.object);
        NodeInfo {
            name: self.node_name.clone(),
            labels: node.and_then(|n| n.metadata.labels.clone()).unwrap_or_default(),
            any: false,
            ip: self.node_ip.or_else(|| node.and_then(crate::state::node_address)),
        }
    }

    /// Sets weft-cni's attachments (None: pods do not come through weft-cni).
    pub fn set_attachments(&mut self, attachments: Option<Arc<Attachments>>) {
        self.attachments = attachments;
    }

    /// Builds both snapshots from the current sources.
    pub fn build(&mut self) -> (Snapshot, Arc<Published>) {
        let node = self.node_info();
        let (model, configs, parse_errors, built) =
            (&mut self.model, &mut self.configs, &self.parse_errors, &mut self.built);
        let objects = &self.loaded.objects;
        // The policies decide what the proxy must do for them: the node's
        // policy listener joins the configs, and the ports of the listeners
        // rules hand connections to come back from the build.
        let mut snap =
            Snapshot::derive_with(objects, &self.node_name, self.node_ip, self.attachments.as_deref(), |p| {
                configs.retain(|c| c.key != policy::config_key());
                configs.extend(policy::config(&p.http));
                let named = p.listeners().into_iter().map(|l| qualify(&l.namespace, &l.config, &l.listener, false));
                model.set_policy_listeners(named.collect());
                *built = model.build(configs, parse_errors, objects, &node);
                (built.redirects.clone(), proxy_ports(built, p))
            });
        self.version += 1;
        self.owners = self.built.xds.types.values().flat_map(|m| m.values()).filter_map(|r| r.owner.clone()).collect();
        snap.version = self.version;
        let published = Arc::new(Published { version: self.version, xds: self.built.xds.clone() });
        self.refresh_acks();
        (snap, published)
    }

    /// Follows an ADS event; true if the snapshot must be rebuilt (a NACK).
    pub fn on_event(&mut self, ev: AdsEvent) -> bool {
        match ev {
            AdsEvent::Connected { delta } => {
                self.envoy_connected = true;
                self.xds_mode = Some(if delta { "delta" } else { "state-of-the-world" });
                false
            }
            AdsEvent::Disconnected => {
                self.envoy_connected = false;
                // A new Envoy starts empty: it has to ACK everything again.
                self.acked.clear();
                self.refresh_acks();
                false
            }
            AdsEvent::Ack { type_url, resources, .. } => {
                for (name, version) in resources {
                    self.acked.insert((type_url.clone(), name), version);
                }
                self.refresh_acks();
                false
            }
            AdsEvent::Nack { type_url, message, resources } => {
                let owners = self.blame(&type_url, &message, &resources);
                tracing::warn!(%type_url, ?owners, "Envoy refused an update: {message}");
                let kind = type_url.rsplit('.').next().unwrap_or(&type_url);
                for (key, names) in &owners {
                    let Some(cfg) = self.configs.iter().find(|c| c.key == *key) else { continue };
                    let what = names.iter().map(|n| format!("{kind} {n:?}")).collect::<Vec<_>>().join(", ");
                    let why = format!("{what}: {message}");
                    self.model.nack(key, &cfg.spec, why.clone());
                    self.nacked.insert(key.clone(), why);
                }
                !owners.is_empty()
            }
        }
    }

    /// The objects behind resources Envoy refused: those whose resource
    /// names the message mentions; else those whose resources in the refused
    /// response changed since Envoy last ACKed them.
    fn blame(&self, type_url: &str, message: &str, names: &[String]) -> BTreeMap<ConfigKey, Vec<String>> {
        let res = self.built.xds.types.get(type_url);
        let owned = |n: &String| Some((res.and_then(|m| m.get(n)).and_then(|r| r.owner.clone())?, n.clone()));
        let group = |pairs: Vec<(ConfigKey, String)>| {
            let mut out: BTreeMap<ConfigKey, Vec<String>> = BTreeMap::new();
            for (k, n) in pairs {
                out.entry(k).or_default().push(n);
            }
            out
        };
        let named = group(names.iter().filter(|n| message.contains(n.as_str())).filter_map(owned).collect());
        if !named.is_empty() {
            return named;
        }
        group(
            names
                .iter()
                .filter(|n| {
                    let now = res.and_then(|m| m.get(*n)).map(|r| r.version.clone());
                    self.acked.get(&(type_url.to_owned(), (*n).clone())) != now.as_ref()
                })
                .filter_map(owned)
                .collect(),
        )
    }

    fn refresh_acks(&mut self) {
        let mut per_owner: BTreeMap<ConfigKey, bool> = BTreeMap::new();
        for (t, m) in &self.built.xds.types {
            for r in m.values() {
                let Some(o) = &r.owner else { continue };
                let ok = self.acked.get(&(t.clone(), r.name.clone())) == Some(&r.version);
                *per_owner.entry(o.clone()).or_insert(true) &= ok;
            }
        }
        for (k, all) in per_owner {
            if all {
                self.model.confirm(&k);
                self.acked_version.entry(k).or_insert(self.version);
            } else {
                self.acked_version.remove(&k);
            }
        }
    }

    /// The status of every object.
    pub fn status(&self, state_problems: &[String]) -> ControlStatus {
        let objects = self
            .built
            .statuses
            .iter()
            .map(|(k, st)| {
                let in_snapshot = self.owners.contains(k);
                let envoy = if let (Some(m), true) = (self.nacked.get(k), !st.problems.is_empty()) {
                    EnvoyAck::Nacked { message: m.clone() }
                } else if !in_snapshot {
                    EnvoyAck::NotApplied
                } else if let Some(v) = self.acked_version.get(k) {
                    EnvoyAck::Acknowledged { version: *v }
                } else {
                    EnvoyAck::Pending
                };
                ObjectState { config: st.clone(), envoy }
            })
            .collect();
        ControlStatus {
            version: self.version,
            envoy_connected: self.envoy_connected,
            xds_mode: self.xds_mode,
            objects,
            // Configs too broken to name (no valid name or namespace) are reported with the files' problems.
            source_problems: self
                .loaded
                .problems
                .iter()
                .map(ParseProblem::to_string)
                .chain(self.parse_errors.iter().filter(|e| e.key.is_none()).map(ConfigError::to_string))
                .collect(),
            state_problems: state_problems.to_vec(),
        }
    }

    /// The model's latest build.
    pub fn built(&self) -> &Built {
        &self.built
    }
}
