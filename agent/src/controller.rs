//! The one writer of desired state. It takes what the sources hold, builds the
//! xDS snapshot and the datapath snapshot from it, and follows what Envoy says
//! about each push: ACKs mark objects acknowledged, a NACK is traced back to
//! the objects whose resources Envoy refused, which are then set aside (their
//! last good version stays) so everything else keeps working.
//!
//! A Service is handed to Envoy only once Envoy has the listener that serves
//! it: a redirect joins the datapath snapshot when Envoy has ACKed every
//! resource of the object behind it (its listener with the Service's
//! frontends, the routes that warm it) and the dispatching listener. Before,
//! the Service keeps its plain forwarding; handed over earlier, a connection
//! would reach the dispatcher while no listener has its address, and get the
//! dispatcher's 503. A redirect in effect stays while the build still wants it
//! through the same listener (an edit of the object does not take the Service
//! back from Envoy while Envoy takes the edit). The first build's redirects
//! are in effect at once: they reach a new Envoy in one push with the
//! dispatcher, which warms together with them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use imbl::ordmap::DiffItem;
use serde::Serialize;

use crate::{
    k8s::{
        Collection, ObjKey, Objects,
        yaml::{Loaded, ParseProblem},
    },
    state::{
        Attachments, SliceIndex, Snapshot,
        policy::{PolicyState, l7::ListenerPorts},
    },
    xds::{
        acks::Acks,
        envoyconfig::{self, ConfigError, ConfigKey, EnvoyConfig},
        groups::{DEFAULT_GROUP_SIZE, Groups},
        model::{Built, ConfigStatus, ListenerBudget, Model, NodeInfo, RedirectKey, Serving},
        policy,
        ports::ProxyPorts,
        server::{AdsEvent, Published},
        translate::{self, qualify},
        visibility::{self, Visibility, VisibilityReport},
    },
};

/// A redirect: the port, object and listener it hands connections to.
type Handing = (u16, ConfigKey, String);

/// The redirects a build wants, and which of them each object serves.
#[derive(Default)]
struct Wanted {
    all: BTreeMap<RedirectKey, Handing>,
    by_owner: HashMap<ConfigKey, Vec<RedirectKey>>,
}

impl Wanted {
    fn of(built: &Built) -> Self {
        let mut w = Wanted::default();
        for (k, port) in &built.redirects {
            let Some((owner, listener)) = built.served_by.get(k) else { continue };
            crate::lean::push(w.by_owner.entry(owner.clone()).or_default(), k.clone());
            w.all.insert(k.clone(), (*port, owner.clone(), listener.clone()));
        }
        w
    }
}

/// Whether Envoy has the dispatching listener and its routes as built (or
/// the build has none).
fn dispatcher_in(built: &Built, acks: &Acks) -> bool {
    [translate::LISTENER, translate::ROUTE].iter().all(|t| {
        let now = built.xds.types.get(*t).and_then(|m| m.get(translate::DISPATCH_LISTENER));
        now.is_none_or(|r| acks.has(t, r))
    })
}

/// Puts in effect the wanted redirects of `owners` (None: of every object)
/// whose object Envoy has (all its resources ACKed as built), once Envoy has
/// the dispatcher too. True if `live` changed.
fn hand_over(
    live: &mut BTreeMap<RedirectKey, Handing>,
    wanted: &Wanted,
    owners: Option<&[ConfigKey]>,
    built: &Built,
    acks: &Acks,
) -> bool {
    if !dispatcher_in(built, acks) {
        return false;
    }
    let mut changed = false;
    let mut add = |k: &RedirectKey, v: &Handing| {
        if !live.contains_key(k) && acks.complete(&v.1) {
            live.insert(k.clone(), v.clone());
            changed = true;
        }
    };
    match owners {
        None => wanted.all.iter().for_each(|(k, v)| add(k, v)),
        Some(owners) => {
            for k in owners.iter().filter_map(|o| wanted.by_owner.get(o)).flatten() {
                if let Some(v) = wanted.all.get(k) {
                    add(k, v);
                }
            }
        }
    }
    changed
}

/// The datapath's redirects: those in effect.
fn in_effect(live: &BTreeMap<RedirectKey, Handing>) -> crate::state::Redirects {
    live.iter().map(|(k, (port, _, _))| (k.clone(), *port)).collect()
}

/// The redirects in effect of these Services alone: what their datapath
/// entries read (an endpoint change copies these, not every redirect).
fn in_effect_of(live: &BTreeMap<RedirectKey, Handing>, services: &BTreeSet<ObjKey>) -> crate::state::Redirects {
    let of = |s: &ObjKey| live.range((s.clone(), None)..=(s.clone(), Some(u16::MAX)));
    services.iter().flat_map(of).map(|(k, (port, _, _))| (k.clone(), *port)).collect()
}

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
    /// The build's status, shared (see [`Built::statuses`]).
    #[serde(flatten, serialize_with = "shared")]
    pub config: Arc<ConfigStatus>,
    pub envoy: EnvoyAck,
}

/// The controller's view, for `weft status` and the API.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ControlStatus {
    pub version: u64,
    /// How many times the source handed over changed objects. A report
    /// with a higher count than before a change was made after the build
    /// that took the change in (its `version` or an earlier one): once the
    /// datapath's applied version reaches that `version`, the change is
    /// in the datapath (a newer version alone may come from Envoy's
    /// answers, built from the objects as they were).
    pub source_generation: u64,
    pub envoy_connected: bool,
    /// "delta" or "state-of-the-world", as Envoy's stream is.
    pub xds_mode: Option<&'static str>,
    /// Shared from report to report: a change lists again the objects
    /// whose state it changed (an edit of one of 10,000, or Envoy's ACK
    /// of it, lists one).
    pub objects: Listing,
    /// Documents of the objects directory that could not be read.
    pub source_problems: Vec<String>,
    /// Things the datapath snapshot could not represent.
    pub state_problems: Vec<String>,
    /// The Services that asked for HTTP visibility, and what became of it.
    pub l7_visibility: VisibilityReport,
}

/// Serializes a shared status as the status.
fn shared<S: serde::Serializer>(status: &Arc<ConfigStatus>, s: S) -> Result<S::Ok, S::Error> {
    status.as_ref().serialize(s)
}

/// Every object's state, by key; persistent, so a report shares it with
/// the one before and listing one object again costs that object.
#[derive(Clone, Debug, Default)]
pub struct Listing(imbl::OrdMap<ConfigKey, ObjectState>);

impl Listing {
    /// The objects' states, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &ObjectState> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(ConfigKey, ObjectState)> for Listing {
    fn from_iter<I: IntoIterator<Item = (ConfigKey, ObjectState)>>(states: I) -> Self {
        Listing(states.into_iter().collect())
    }
}

/// Serialized as the list of states.
impl Serialize for Listing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
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
    /// The EndpointSlices of `loaded` by Service, following each load (what
    /// a change of endpoints reads, instead of a pass over every slice).
    slices: SliceIndex,
    configs: Vec<EnvoyConfig>,
    /// The documents `configs` came from: (address of the shared document ->
    /// (the document, index in `configs`, the config's key)). A document a
    /// source hands over again unchanged is the same `Arc`: its config is
    /// moved over, not copied. (A build appends the generated visibility and
    /// policy configs to `configs`, after the documents' configs.)
    parsed: std::collections::HashMap<usize, (Arc<envoyconfig::ConfigDoc>, usize, ConfigKey)>,
    parse_errors: Vec<ConfigError>,
    /// Some(n): the first n of `configs` are the documents' configs, in
    /// their order, where `parsed` says (an edit replaces one in place).
    /// None: a load takes every document in again.
    documents: Option<usize>,
    version: u64,
    /// See [`ControlStatus::source_generation`].
    source_generation: u64,
    built: Built,
    /// What Envoy ACKed of the build, per resource and per object.
    acks: Acks,
    /// The build's listeners grouped for Envoy (what is published).
    groups: Groups,
    /// The redirects the build wants.
    wanted: Wanted,
    /// Objects Envoy refused, with its message (for the current spec).
    nacked: BTreeMap<ConfigKey, String>,
    envoy_connected: bool,
    xds_mode: Option<&'static str>,
    /// ACKed snapshot version per object, when all its resources are in.
    acked_version: HashMap<ConfigKey, u64>,
    /// weft-cni's attachments, when pods come through it.
    attachments: Option<Arc<Attachments>>,
    /// The redirects in effect (see the module doc): key -> the port, object
    /// and listener the build had for it when it took effect.
    live: BTreeMap<RedirectKey, Handing>,
    /// `live` changed since the last datapath snapshot.
    live_changed: bool,
    /// The agent config's `l7-visibility`.
    l7_default: Visibility,
    /// What the last build generated for HTTP visibility.
    visibility: VisibilityReport,
    /// The claims of user configs that decided it.
    claims: visibility::Claims,
    /// Generated visibility configs whose Service no longer asks, in their
    /// retired form, until when they stay (see [`RETIRE_AFTER`]).
    retiring: BTreeMap<ConfigKey, (EnvoyConfig, Instant)>,
    /// The visibility configs the last build generated.
    generated: Vec<EnvoyConfig>,
    /// Some(Services) while every change since the last build was of these
    /// Services' endpoints alone (EndpointSlices, Endpoints objects): the
    /// next build is taken by [`Controller::endpoints_changed`]. None: a
    /// full build is due.
    endpoints_only: Option<BTreeSet<ObjKey>>,
    /// Some(configs) while every change since the last build was of these
    /// configs' documents alone (added or edited: Some, removed: None):
    /// the next build is taken by [`Controller::configs_changed`]. None: a
    /// full build is due.
    configs_only: Option<BTreeMap<ConfigKey, Option<EnvoyConfig>>>,
    /// The configs the last full build appended to the documents' (the
    /// generated ones, the policies' listener).
    appended: Vec<EnvoyConfig>,
    /// The datapath snapshot last made, what an endpoint change patches.
    last_snapshot: Option<Arc<Snapshot>>,
    /// The objects' states as [`Controller::status`] last listed them.
    listing: Listing,
    /// The objects whose state may have changed since (None: any object's).
    /// once a build or Envoy's answers may have changed one.
    unlisted: Option<BTreeSet<ConfigKey>>,
    /// False: every build is a full build (the oracle in tests).
    incremental: bool,
}

/// How long a retired visibility config's routes and clusters stay: Envoy's
/// drain time of the removed listener's connections, and a margin.
const RETIRE_AFTER: Duration = Duration::from_secs(crate::envoy::DRAIN_TIME.as_secs() + 5);

impl Controller {
    pub fn new(node_name: String, node_ip: Option<Ipv4Addr>, ports: ProxyPorts) -> Self {
        let mut c = Self {
            node_name,
            node_ip,
            model: Model::new(ports),
            loaded: Loaded::default(),
            slices: SliceIndex::default(),
            configs: Vec::new(),
            parsed: Default::default(),
            parse_errors: Vec::new(),
            documents: None,
            version: 0,
            source_generation: 0,
            built: Built::default(),
            acks: Acks::default(),
            groups: Groups::new(DEFAULT_GROUP_SIZE),
            wanted: Wanted::default(),
            nacked: BTreeMap::new(),
            envoy_connected: false,
            xds_mode: None,
            acked_version: HashMap::new(),
            attachments: None,
            live: BTreeMap::new(),
            live_changed: false,
            l7_default: Visibility::None,
            visibility: VisibilityReport::default(),
            claims: visibility::Claims::default(),
            retiring: BTreeMap::new(),
            generated: Vec::new(),
            endpoints_only: None,
            configs_only: None,
            appended: Vec::new(),
            last_snapshot: None,
            listing: Listing::default(),
            unlisted: None,
            incremental: true,
        };
        // The model knows whether its listeners are grouped.
        c.set_listener_groups(DEFAULT_GROUP_SIZE);
        c
    }

    /// Refuses configs whose listeners would not fit in Envoy's open files.
    pub fn set_listener_budget(&mut self, budget: ListenerBudget) {
        self.model.set_listener_budget(budget);
        self.endpoints_only = None;
        self.configs_only = None;
    }

    /// Groups the listeners Services are redirected to, at most `size` to a
    /// listener of Envoy (0: every listener on its own); see [`Groups`].
    pub fn set_listener_groups(&mut self, size: usize) {
        self.groups = Groups::new(size);
        self.model.set_grouped(self.groups.on());
        self.endpoints_only = None;
    }

    /// Takes what a source now holds: the configs of the documents that
    /// changed (see `parsed`; sources parse each document once, as they read it).
    pub fn load(&mut self, loaded: Loaded) {
        self.source_generation += 1;
        self.slices.follow(&self.loaded.objects.endpoint_slices, &loaded.objects.endpoint_slices);
        let objects = endpoint_changes(&self.loaded, &loaded);
        let same_documents = same_documents(&self.loaded, &loaded);
        match (self.endpoints_only.as_mut(), objects.as_ref().filter(|_| same_documents)) {
            (Some(services), Some(changed)) => services.extend(changed.iter().cloned()),
            _ => self.endpoints_only = None,
        }
        if !objects.is_some_and(|changed| changed.is_empty()) {
            self.configs_only = None;
        }
        if same_documents {
            // No config document changed (an endpoint change, say): the
            // configs and their parse stay as they are.
            self.loaded = loaded;
            return;
        }
        if self.incremental && self.documents_edited(&loaded) {
            self.loaded = loaded;
            return;
        }
        let mut before: Vec<Option<EnvoyConfig>> = std::mem::take(&mut self.configs).into_iter().map(Some).collect();
        let mut kept = std::mem::take(&mut self.parsed);
        self.parse_errors.clear();
        // The configs of documents that are not the ones held before.
        let mut added: Vec<EnvoyConfig> = Vec::new();
        for doc in &loaded.configs {
            let at = Arc::as_ptr(doc) as usize;
            let same = kept
                .remove(&at)
                .and_then(|(_, i, key)| before.get_mut(i).filter(|c| c.as_ref().is_some_and(|c| c.key == key))?.take());
            let config = match (same, &doc.parsed) {
                (Some(c), _) => c,
                (None, Ok(c)) => {
                    if self.configs_only.is_some() {
                        added.push(c.clone());
                    }
                    c.clone()
                }
                (None, Err(e)) => {
                    self.parse_errors.push(e.clone());
                    continue;
                }
            };
            self.parsed.insert(at, (doc.clone(), self.configs.len(), config.key.clone()));
            self.configs.push(config);
        }
        self.documents = Some(self.configs.len());
        // The documents held before and not now: their configs are gone,
        // unless a document read now has them.
        let removed: BTreeSet<ConfigKey> = kept.into_values().map(|(_, _, key)| key).collect();
        self.note_config_changes(added, &removed);
        self.loaded = loaded;
    }

    /// Takes in `loaded` when it holds as many config documents as held
    /// now and those that differ were edited from one usable config into
    /// another: each edited config replaces its old one where it stands,
    /// the rest is not looked at (an edit costs the edit, not a pass over
    /// every config). False, changing nothing, for any other change (a
    /// document added, removed, or not a usable config before or after):
    /// the caller takes every document in.
    fn documents_edited(&mut self, loaded: &Loaded) -> bool {
        let Some(documents) = self.documents else { return false };
        if loaded.configs.len() != self.loaded.configs.len() || self.configs.len() < documents {
            return false;
        }
        let mut edits = Vec::new();
        for (old, new) in self.loaded.configs.iter().zip(&loaded.configs) {
            if Arc::ptr_eq(old, new) {
                continue;
            }
            let at = Arc::as_ptr(old) as usize;
            let Some((_, i, key)) = self.parsed.get(&at) else { return false };
            let Ok(config) = &new.parsed else { return false };
            // A document moved from elsewhere in the list: take all in.
            if self.parsed.contains_key(&(Arc::as_ptr(new) as usize)) {
                return false;
            }
            if *i >= documents || self.configs[*i].key != *key {
                return false;
            }
            edits.push((at, *i, new, config));
        }
        // The configs appended after the documents' are appended again by the build.
        self.configs.truncate(documents);
        let mut removed = BTreeSet::new();
        for &(at, i, doc, config) in &edits {
            if let Some((_, _, key)) = self.parsed.remove(&at) {
                removed.insert(key);
            }
            self.configs[i] = config.clone();
            self.parsed.insert(Arc::as_ptr(doc) as usize, (doc.clone(), i, config.key.clone()));
        }
        let added = edits.into_iter().map(|(_, _, _, c)| c.clone()).collect();
        self.note_config_changes(added, &removed);
        true
    }

    /// Notes configs taken in from documents not held before (`added`) and
    /// those of documents no longer held (`removed`) in `configs_only`, or
    /// ends it where the build must decide which of two configs of one
    /// name stands.
    fn note_config_changes(&mut self, added: Vec<EnvoyConfig>, removed: &BTreeSet<ConfigKey>) {
        let Some(changes) = self.configs_only.as_mut() else { return };
        let mut keys: BTreeSet<ConfigKey> = BTreeSet::new();
        // Those of them a config held before has the name of.
        let mut held_before: BTreeSet<ConfigKey> = BTreeSet::new();
        for c in added {
            if !keys.insert(c.key.clone()) {
                // Two documents name it.
                self.configs_only = None;
                return;
            }
            let held = match changes.get(&c.key) {
                Some(was) => was.is_some(),
                None => self.built.statuses.contains_key(&c.key),
            };
            if held {
                held_before.insert(c.key.clone());
            }
            changes.insert(c.key.clone(), Some(c));
        }
        for key in removed {
            if !keys.contains(key) {
                changes.insert(key.clone(), None);
            }
        }
        // A config added beside one of that name held before (two
        // documents name it): the build decides which stands.
        if held_before.iter().any(|k| !removed.contains(k)) {
            self.configs_only = None;
        }
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

    /// Whether a retired visibility config is due to go (the next build
    /// removes it).
    pub fn retirement_due(&self) -> bool {
        let now = Instant::now();
        self.retiring.values().any(|(_, until)| *until <= now)
    }

    /// Sets the HTTP visibility of Services that have no annotation.
    pub fn set_l7_visibility(&mut self, default: Visibility) {
        self.l7_default = default;
        self.endpoints_only = None;
        self.configs_only = None;
    }

    /// Sets weft-cni's attachments (None: pods do not come through weft-cni).
    pub fn set_attachments(&mut self, attachments: Option<Arc<Attachments>>) {
        self.attachments = attachments;
        self.endpoints_only = None;
        self.configs_only = None;
    }

    /// Builds both snapshots from the current sources: after changes of
    /// endpoints alone, by [`Controller::endpoints_changed`], else whole.
    pub fn build(&mut self) -> (Arc<Snapshot>, Arc<Published>) {
        let services = std::mem::take(&mut self.endpoints_only);
        let configs = std::mem::take(&mut self.configs_only);
        let built = match (services, configs, self.last_snapshot.clone()) {
            (Some(services), _, Some(last)) if self.incremental && !self.retirement_due() => {
                self.endpoints_changed(&services, &last)
            }
            (None, Some(configs), Some(last)) if self.incremental && !self.retirement_due() => {
                self.relist(configs.keys().cloned());
                self.configs_changed(&configs, &last)
            }
            _ => None,
        };
        let built = built.unwrap_or_else(|| {
            // A whole build may change any object's state.
            self.unlisted = None;
            self.build_whole()
        });
        self.endpoints_only = Some(BTreeSet::new());
        self.configs_only = Some(BTreeMap::new());
        self.last_snapshot = Some(built.0.clone());
        built
    }

    /// The build after changes of some configs' documents alone (`changes`:
    /// each config added or edited, or removed: None): the model patches
    /// the last build ([`Model::configs_changed`]), and what follows it
    /// here costs what changed too: the ACK counts take the resources that
    /// changed, the redirects wanted and in effect those the change touched,
    /// and the datapath snapshot the Services whose redirects in effect
    /// changed. None where it does not apply (the caller builds whole):
    /// where the model's does not, when a changed config's claims on
    /// Services that ask for HTTP visibility may change what is generated
    /// ([`visibility::Claims::unchanged_by`]), a generated config is
    /// retiring, or a changed config serves a policy.
    fn configs_changed(
        &mut self,
        changes: &BTreeMap<ConfigKey, Option<EnvoyConfig>>,
        last: &Snapshot,
    ) -> Option<(Arc<Snapshot>, Arc<Published>)> {
        if !self.incremental || !self.retiring.is_empty() {
            return None;
        }
        if !changes.iter().all(|(k, c)| self.claims.unchanged_by(k, c.as_ref())) {
            return None;
        }
        let serves_policy =
            |k: &ConfigKey| {
                *k == policy::config_key()
                    || last.policy.listeners().iter().any(|l| {
                        l.clusterwide == k.clusterwide && l.namespace == k.key.namespace && l.config == k.key.name
                    })
            };
        if changes.keys().any(serves_policy) {
            return None;
        }
        let node = self.node_info();
        let before = self.built.xds.clone();
        let changed: BTreeMap<ConfigKey, Option<&EnvoyConfig>> =
            changes.iter().map(|(k, c)| (k.clone(), c.as_ref())).collect();
        let objects = &self.loaded.objects;
        let touched =
            self.model.configs_changed(&mut self.built, &changed, &self.parse_errors, objects, &self.slices, &node)?;
        // The configs the last full build appended to the documents' are as they were.
        self.configs.extend(self.appended.iter().cloned());
        self.acks.rebuilt(&before, &self.built.xds);
        // The redirects wanted, and in effect, that the change touched.
        let mut services = BTreeSet::new();
        for k in &touched {
            if let Some((_, owner, _)) = self.wanted.all.remove(k)
                && let Some(keys) = self.wanted.by_owner.get_mut(&owner)
            {
                keys.retain(|x| x != k);
                if keys.is_empty() {
                    self.wanted.by_owner.remove(&owner);
                }
            }
            if let (Some(port), Some((owner, listener))) = (self.built.redirects.get(k), self.built.served_by.get(k)) {
                crate::lean::push(self.wanted.by_owner.entry(owner.clone()).or_default(), k.clone());
                self.wanted.all.insert(k.clone(), (*port, owner.clone(), listener.clone()));
            }
            // A redirect in effect stays while the build wants it as it is.
            if self.live.get(k).is_some_and(|v| self.wanted.all.get(k) != Some(v)) {
                self.live.remove(k);
                services.insert(k.0.clone());
            }
        }
        let owners: Vec<ConfigKey> = changes.keys().cloned().collect();
        let before_live: BTreeSet<RedirectKey> = owners
            .iter()
            .filter_map(|o| self.wanted.by_owner.get(o))
            .flatten()
            .filter(|k| self.live.contains_key(*k))
            .cloned()
            .collect();
        hand_over(&mut self.live, &self.wanted, Some(&owners), &self.built, &self.acks);
        for k in owners.iter().filter_map(|o| self.wanted.by_owner.get(o)).flatten() {
            if self.live.contains_key(k) && !before_live.contains(k) {
                services.insert(k.0.clone());
            }
        }
        self.version += 1;
        self.live_changed = false;
        let mut snap = if services.is_empty() {
            last.clone()
        } else {
            let redirects: crate::state::Redirects = services
                .iter()
                .flat_map(|s| self.live.range((s.clone(), None)..=(s.clone(), Some(u16::MAX))))
                .map(|(k, (port, _, _))| (k.clone(), *port))
                .collect();
            last.with_endpoints_of(&services, &self.loaded.objects, &self.slices, &redirects)
        };
        snap.version = self.version;
        let published = Arc::new(Published { version: self.version, xds: self.groups.publish(&self.built.xds) });
        // The changed objects Envoy has as built (the others' resources did not change).
        for k in &owners {
            if self.acks.complete(k) {
                self.model.confirm(k);
                self.acked_version.entry(k.clone()).or_insert(self.version);
            } else {
                self.acked_version.remove(k);
            }
        }
        Some((Arc::new(snap), published))
    }

    /// The build after changes of the endpoints of `services` alone: their
    /// ClusterLoadAssignments and datapath entries are made again, the rest
    /// of the last build is kept (the objects' statuses, the other
    /// resources, the redirects, what Envoy has of them). None for a model
    /// that keeps nothing between builds.
    fn endpoints_changed(
        &mut self,
        services: &BTreeSet<ObjKey>,
        last: &Snapshot,
    ) -> Option<(Arc<Snapshot>, Arc<Published>)> {
        let objects = &self.loaded.objects;
        let replaced = self.model.endpoints_changed(&mut self.built, services, objects, &self.slices)?;
        // Generated endpoints belong to no object: no object's ACK count
        // changes, and an ACK of the old version is not one of the new.
        for (old, new) in &replaced {
            self.acks.replaced(translate::ENDPOINT, old, new);
            // (The objects borrowed: `relist` spelled out.)
            if let Some(unlisted) = self.unlisted.as_mut() {
                unlisted.extend(old.owner.iter().chain(&new.owner).cloned());
            }
        }
        self.version += 1;
        self.live_changed = false;
        let mut snap = last.with_endpoints_of(services, objects, &self.slices, &in_effect_of(&self.live, services));
        snap.version = self.version;
        let published = Arc::new(Published { version: self.version, xds: self.groups.publish(&self.built.xds) });
        Some((Arc::new(snap), published))
    }

    /// Builds both snapshots from the current sources, whole.
    fn build_whole(&mut self) -> (Arc<Snapshot>, Arc<Published>) {
        let node = self.node_info();
        let first = self.version == 0;
        // A document's config of a generated config's name (or the policy
        // one's) goes below: the documents' configs no longer stand where
        // `parsed` says.
        let appended_key = |c: &EnvoyConfig| visibility::is_generated(&c.key) || c.key == policy::config_key();
        if let Some(n) = self.documents
            && self.configs.get(..n).is_none_or(|docs| docs.iter().any(appended_key))
        {
            self.documents = None;
        }
        let (model, configs, parse_errors, built) =
            (&mut self.model, &mut self.configs, &self.parse_errors, &mut self.built);
        let (acks, wanted, live, live_changed) =
            (&mut self.acks, &mut self.wanted, &mut self.live, &mut self.live_changed);
        let objects = &self.loaded.objects;
        // Services that asked for HTTP visibility get their generated configs
        // (after the documents' configs, like the policy one).
        // One that goes is retired first: its listeners go, its routes and
        // clusters stay while Envoy drains the listeners' connections.
        let (now, retiring) = (Instant::now(), &mut self.retiring);
        configs.retain(|c| !visibility::is_generated(&c.key));
        let generated = visibility::configs(objects, self.l7_default, configs);
        let before = std::mem::replace(&mut self.generated, generated.configs.clone());
        retiring.retain(|k, (_, until)| *until > now && !generated.configs.iter().any(|c| c.key == *k));
        for old in before {
            if !generated.configs.iter().any(|c| c.key == old.key) {
                retiring.insert(old.key.clone(), (visibility::retired(&old), now + RETIRE_AFTER));
            }
        }
        configs.extend(generated.configs);
        configs.extend(retiring.values().map(|(c, _)| c.clone()));
        self.visibility = generated.report;
        self.claims = visibility::Claims::of(&self.visibility);
        self.visibility.retiring = retiring.keys().map(ToString::to_string).collect();
        // The policies decide what the proxy must do for them: the node's
        // policy listener joins the configs, and the ports of the listeners
        // rules hand connections to come back from the build.
        let mut snap =
            Snapshot::derive_with(objects, &self.node_name, self.node_ip, self.attachments.as_deref(), |p| {
                configs.retain(|c| c.key != policy::config_key());
                configs.extend(policy::config(&p.http));
                let named = p.listeners().into_iter().map(|l| qualify(&l.namespace, &l.config, &l.listener, false));
                model.set_policy_listeners(named.collect());
                let mut fresh = model.build(configs, parse_errors, objects, &node);
                // Shares what did not change with the last build: publishing
                // it, Envoy's stream and the ACK counts cost what changed.
                fresh.xds = fresh.xds.rebased_on(&built.xds);
                let before = std::mem::replace(built, fresh);
                acks.rebuilt(&before.xds, &built.xds);
                *wanted = Wanted::of(built);
                if first {
                    live.clone_from(&wanted.all);
                }
                // A redirect in effect stays while the build wants it as it is.
                let kept = live.len();
                live.retain(|k, v| wanted.all.get(k) == Some(v));
                *live_changed |= live.len() != kept;
                *live_changed |= hand_over(live, wanted, None, built, acks);
                (in_effect(live), proxy_ports(built, p))
            });
        self.version += 1;
        self.live_changed = false;
        snap.version = self.version;
        let published = Arc::new(Published { version: self.version, xds: self.groups.publish(&self.built.xds) });
        // The objects Envoy has as built: a changed one is not (until its
        // ACK), and the accepted version of one it has is confirmed.
        let appended = self.configs.iter().filter(|c| appended_key(c));
        self.appended = appended.cloned().collect();
        let acks = &self.acks;
        self.acked_version.retain(|k, _| acks.complete(k));
        for (k, _) in acks.owners().filter(|(_, complete)| *complete) {
            self.model.confirm(k);
            if !self.acked_version.contains_key(k) {
                self.acked_version.insert(k.clone(), self.version);
            }
        }
        (Arc::new(snap), published)
    }

    /// A new datapath snapshot if redirects took effect since the last one
    /// (Envoy ACKed the listeners that serve them).
    pub fn redirects_settled(&mut self) -> Option<Arc<Snapshot>> {
        if !std::mem::take(&mut self.live_changed) {
            return None;
        }
        self.version += 1;
        let (built, live) = (&self.built, &self.live);
        let mut snap = Snapshot::derive_with(
            &self.loaded.objects,
            &self.node_name,
            self.node_ip,
            self.attachments.as_deref(),
            |p| (in_effect(live), proxy_ports(built, p)),
        );
        snap.version = self.version;
        let snap = Arc::new(snap);
        self.last_snapshot = Some(snap.clone());
        Some(snap)
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
                self.acks.clear();
                self.acked_version.clear();
                self.unlisted = None;
                self.groups.reset();
                false
            }
            AdsEvent::Ack { type_url, resources, .. } => {
                // An ACK of a group is one of its members' listeners.
                let (resources, released) = match type_url.as_str() {
                    translate::LISTENER => self.groups.acked(resources),
                    _ => (resources, false),
                };
                // Costs what the ACK carries: the objects it completed are
                // in Envoy, and their Services can be handed to it (all
                // waiting ones, if it completed the dispatcher).
                let dispatcher_was_in = dispatcher_in(&self.built, &self.acks);
                let completed = self.acks.ack(&type_url, resources, &self.built.xds);
                self.relist(completed.iter().cloned());
                for k in &completed {
                    self.model.confirm(k);
                    if !self.acked_version.contains_key(k) {
                        self.acked_version.insert(k.clone(), self.version);
                    }
                }
                let owners = dispatcher_was_in.then_some(&completed[..]);
                self.live_changed |= hand_over(&mut self.live, &self.wanted, owners, &self.built, &self.acks);
                // A member Envoy took on its own is in its group again:
                // the next push has it.
                released
            }
            AdsEvent::Nack { type_url, message, resources } => {
                let nacked = match type_url.as_str() {
                    translate::LISTENER => self.groups.nacked(&resources, &message),
                    _ => crate::xds::groups::Nacked { names: resources, ..Default::default() },
                };
                let mut owners = self.blame(&type_url, &message, &nacked.names);
                let listeners = self.built.xds.types.get(&type_url);
                for n in nacked.blamed {
                    if let Some(o) = listeners.and_then(|m| m.get(&n)).and_then(|r| r.owner.clone()) {
                        owners.entry(o).or_default().push(n);
                    }
                }
                tracing::warn!(%type_url, ?owners, pulled = nacked.pulled, "Envoy refused an update: {message}");
                let kind = type_url.rsplit('.').next().unwrap_or(&type_url);
                for (key, names) in &owners {
                    let Some(cfg) = self.configs.iter().find(|c| c.key == *key) else { continue };
                    let what = names.iter().map(|n| format!("{kind} {n:?}")).collect::<Vec<_>>().join(", ");
                    let why = format!("{what}: {message}");
                    self.model.nack(key, &cfg.spec, why.clone());
                    self.nacked.insert(key.clone(), why);
                    self.relist([key.clone()]);
                }
                if !owners.is_empty() {
                    self.endpoints_only = None;
                    self.configs_only = None;
                }
                // Members of a refused group are not blamed yet when several
                // changed: the next push tries each on its own, and Envoy's
                // answer to it names the one at fault.
                !owners.is_empty() || nacked.pulled
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
                    let now = res.and_then(|m| m.get(*n)).map(|r| r.version);
                    self.acks.get(type_url, n) != now
                })
                .filter_map(owned)
                .collect(),
        )
    }

    /// Notes objects whose state may have changed: the next status lists them again.
    fn relist(&mut self, keys: impl IntoIterator<Item = ConfigKey>) {
        if let Some(unlisted) = self.unlisted.as_mut() {
            unlisted.extend(keys);
        }
    }

    /// The status of every object: those whose state may have changed since
    /// the last call listed again (every one by the oracle).
    pub fn status(&mut self, state_problems: &[String]) -> ControlStatus {
        match self.unlisted.take().filter(|_| self.incremental) {
            Some(keys) => {
                for k in keys {
                    match self.built.statuses.get(&k) {
                        Some(st) => drop(self.listing.0.insert(k.clone(), self.object_state(&k, st))),
                        None => drop(self.listing.0.remove(&k)),
                    }
                }
            }
            None => {
                let all = self.built.statuses.iter().map(|(k, st)| (k.clone(), self.object_state(k, st)));
                self.listing = Listing(all.collect());
            }
        }
        self.unlisted = Some(BTreeSet::new());
        let objects = self.listing.clone();
        ControlStatus {
            version: self.version,
            source_generation: self.source_generation,
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
            l7_visibility: self.visibility.clone(),
        }
    }

    /// An object's state, from the build and what Envoy said of it.
    fn object_state(&self, k: &ConfigKey, st: &Arc<ConfigStatus>) -> ObjectState {
        let in_snapshot = self.acks.owns(k);
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
    }

    /// The model's latest build.
    pub fn built(&self) -> &Built {
        &self.built
    }
}

/// Whether `new` holds the very config documents `old` does (sources hand
/// over an unchanged document as the same `Arc`, and unchanged documents as
/// a clone of the same vector).
fn same_documents(old: &Loaded, new: &Loaded) -> bool {
    old.configs.ptr_eq(&new.configs)
        || old.configs.len() == new.configs.len()
            && old.configs.iter().zip(&new.configs).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// The Services whose endpoints alone changed from `old` to `new`: those
/// of the EndpointSlices and Endpoints objects that were added, removed or
/// replaced. None if any object of another kind changed (config documents
/// are not compared). Sources hand over an unchanged object or document as the
/// same `Arc`, and their collections sharing what did not change: this costs
/// what changed (`diff` skips what the two share and compares pointers).
fn endpoint_changes(old: &Loaded, new: &Loaded) -> Option<BTreeSet<ObjKey>> {
    fn same<T>(a: &Collection<T>, b: &Collection<T>) -> bool {
        a.diff(b).next().is_none()
    }
    /// The objects added, removed or replaced (the old and the new one).
    fn changed<'a, T>(a: &'a Collection<T>, b: &'a Collection<T>) -> Vec<(&'a ObjKey, &'a T)> {
        let mut out = Vec::new();
        for d in a.diff(b) {
            match d {
                DiffItem::Add(k, x) | DiffItem::Remove(k, x) => out.push((k, &x.object)),
                DiffItem::Update { old: (k, x), new: (_, y) } => out.extend([(k, &x.object), (k, &y.object)]),
            }
        }
        out
    }
    // Every kind is named: one added to `Objects` must be said here too.
    let Objects {
        services,
        endpoint_slices,
        endpoints,
        pods,
        nodes,
        namespaces,
        secrets,
        network_policies,
        ingresses,
        ingress_classes,
        weft_nodes,
        gateway_classes,
        gateways,
        http_routes,
        grpc_routes,
        reference_grants,
        cilium_network_policies,
        cilium_clusterwide_network_policies,
    } = &old.objects;
    let n = &new.objects;
    let others = same(services, &n.services)
        && same(pods, &n.pods)
        && same(nodes, &n.nodes)
        && same(namespaces, &n.namespaces)
        && same(secrets, &n.secrets)
        && same(network_policies, &n.network_policies)
        && same(ingresses, &n.ingresses)
        && same(ingress_classes, &n.ingress_classes)
        && same(weft_nodes, &n.weft_nodes)
        && same(gateway_classes, &n.gateway_classes)
        && same(gateways, &n.gateways)
        && same(http_routes, &n.http_routes)
        && same(grpc_routes, &n.grpc_routes)
        && same(reference_grants, &n.reference_grants)
        && same(cilium_network_policies, &n.cilium_network_policies)
        && same(cilium_clusterwide_network_policies, &n.cilium_clusterwide_network_policies);
    if !others {
        return None;
    }
    let mut out = BTreeSet::new();
    for (k, slice) in changed(endpoint_slices, &n.endpoint_slices) {
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(crate::state::SERVICE_NAME_LABEL));
        if let Some(name) = service {
            out.insert(ObjKey::new(k.namespace.clone(), name.clone()));
        }
    }
    out.extend(changed(endpoints, &n.endpoints).into_iter().map(|(k, _)| k.clone()));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::yaml;

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
"#;

    /// An EnvoyConfig redirecting `service` to its listener, whose route goes
    /// to `route_to` with a timeout of `timeout` seconds.
    fn config(name: &str, service: &str, route_to: &str, timeout: u32) -> String {
        format!(
            r#"
---
apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  services: [{{name: {service}}}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          rds: {{route_config_name: r}}
          http_filters: [{{name: envoy.filters.http.router}}]
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: r
    virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: {route_to}, timeout: {timeout}s}}}}]}}]
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: {route_to}
    type: EDS
"#
        )
    }

    fn load(c: &mut Controller, text: &str) {
        let mut l = yaml::Loaded::default();
        yaml::load_text(std::path::Path::new("o.yaml"), text, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        c.load(l);
    }

    /// What the agent keeps per EnvoyConfig from its file to the xDS
    /// snapshot, with the Service and EndpointSlice it serves (the
    /// control-plane bench's objects): the source's objects and parsed
    /// documents, the controller's configs, the model's translations and
    /// the snapshot, counted by the test allocator. At 10,000 configs this is
    /// most of what the agent holds.
    #[test]
    fn a_config_costs_a_bounded_number_of_bytes_from_its_file_to_the_snapshot() {
        const N: usize = 200;
        let objects = envoyconfig::bench_objects;
        // Descriptor pools and other process-wide caches fill on first use.
        let mut c = Controller::new("node1".into(), None, ProxyPorts::ephemeral());
        load(&mut c, &objects(N..N + 1));
        drop(c.build());
        drop(c);
        let text = objects(0..N);
        let mut c = Controller::new("node1".into(), None, ProxyPorts::ephemeral());
        let ((), held) = crate::test_alloc::held_after(|| {
            load(&mut c, &text);
            drop(c.build());
        });
        let status = c.status(&[]);
        let valid = status.objects.iter().filter(|o| o.config.problems.is_empty()).count();
        assert_eq!(valid, N, "{:?}", status.objects.iter().find(|o| !o.config.problems.is_empty()));
        let per_config = held / N as isize;
        println!("the agent keeps {per_config} bytes per config, with its Service and EndpointSlice ({held} for {N})");
        // 38,171 bytes while sources kept each document as JSON values and
        // its config kept its resources as JSON values again; 17,000 since;
        // 16,500 once a translation's lists kept no room to grow; 18,200
        // with what the model keeps for edits (`Model::configs_changed`:
        // the index of accepted names, redirects and EDS Services, 1,700).
        // 18,161 on main 319e2e5; listener groups add 1,564 (19,725): the
        // grouped listener Envoy gets holds a second encoding of each
        // config's filter chain, and the groups' index of members. 17,500
        // once a translation's reduced listeners stopped taking a whole
        // `Listener`'s room each (2,240). 15,900 once a resource's type URL
        // and version were no strings of their own (500) and the indexes'
        // lists per Service or owner took the room they hold (1,100).
        // 14,900 once the kept translation's listener no longer held the
        // agent's access log (983), which the model adds as it shapes.
        // 13,900 once a listener that joins a group no longer held it
        // either (its group's listener gives each chain the log).
        assert!(per_config < 14_500, "{per_config} bytes per config");
    }

    /// Envoy ACKs every resource of the current build (the listeners as
    /// published, in groups).
    fn ack_all(c: &mut Controller) {
        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
        for type_url in types {
            let published = c.groups.published().filter(|_| type_url == translate::LISTENER);
            let resources = published
                .map_or_else(|| c.built().xds.types[&type_url].clone(), Clone::clone)
                .values()
                .map(|r| (r.name.clone(), r.version))
                .collect();
            c.on_event(AdsEvent::Ack { type_url, version: String::new(), resources });
        }
    }

    fn handed(snap: &Snapshot) -> Vec<String> {
        snap.proxied().into_iter().map(|(f, _)| format!("{}:{}", f.addr, f.port)).collect()
    }

    /// Whether each object of the build has every resource ACKed as built,
    /// from a walk over every resource (what every ACK event cost before the
    /// counts): the oracle of [`Acks`].
    fn complete_by_walking(c: &Controller) -> BTreeMap<ConfigKey, bool> {
        let mut out: BTreeMap<ConfigKey, bool> = BTreeMap::new();
        for (t, m) in &c.built.xds.types {
            for r in m.values() {
                let Some(o) = &r.owner else { continue };
                *out.entry(o.clone()).or_insert(true) &= c.acks.has(t, r);
            }
        }
        out
    }

    /// The redirects in effect recomputed from every wanted one (what every
    /// ACK event cost before): those the build no longer wants as they were
    /// go; those whose object Envoy has join, once it has the dispatcher.
    fn settle_by_walking(live: &mut BTreeMap<RedirectKey, Handing>, c: &Controller) {
        let complete = complete_by_walking(c);
        let wanted = Wanted::of(&c.built).all;
        live.retain(|k, v| wanted.get(k) == Some(v));
        if dispatcher_in(&c.built, &c.acks) {
            for (k, v) in wanted {
                if !live.contains_key(&k) && complete.get(&v.1) == Some(&true) {
                    live.insert(k, v);
                }
            }
        }
    }

    /// The ACK bookkeeping that costs what an ACK carries gives what a walk
    /// over every resource and redirect gives, after every step of random
    /// sequences of config changes (edits, deletes, clashes), partial and
    /// stale ACKs, NACKs and Envoy reconnecting: the same objects in Envoy
    /// (and acknowledged in the status), the same redirects in effect.
    #[test]
    fn ack_counts_equal_a_walk_over_every_resource_after_every_random_step() {
        let mut rng = crate::xds::acks::tests::Rng(0x5eed_0012);
        for run in 0..10 {
            let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
            let mut live: BTreeMap<RedirectKey, Handing> = BTreeMap::new();
            let mut log = Vec::new();
            let mut built_once = false;
            for step in 0..100 {
                let build = match rng.below(20) {
                    0 | 1 => {
                        // web-l7 and api-l7 serve their Services; web-too
                        // clashes with web-l7 (web redirected twice) and
                        // api-as-web defines api-l7's cluster again.
                        // Sometimes none (the dispatcher goes, and comes back unACKed).
                        let mut text = SERVICES.to_owned();
                        let mask = rng.below(16);
                        for (i, (name, service, route_to)) in [
                            ("web-l7", "web", "default/web"),
                            ("api-l7", "api", "default/api"),
                            ("web-too", "web", "default/web2"),
                            ("api-as-web", "web", "default/api"),
                        ]
                        .into_iter()
                        .enumerate()
                        {
                            if mask & (1 << i) != 0 {
                                text.push_str(&config(name, service, route_to, 1 + rng.below(3) as u32));
                            }
                        }
                        log.push(format!("load {}", text.matches("kind: EnvoyConfig").count()));
                        load(&mut c, &text);
                        true
                    }
                    2..=17 => {
                        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
                        let Some(type_url) = types.get(rng.below(types.len().max(1) as u64) as usize).cloned() else {
                            continue;
                        };
                        // A random part (some stale), all but the dispatcher's, or all.
                        let part = rng.below(3);
                        let resources = c
                            .built()
                            .xds
                            .of(&type_url)
                            .filter_map(|r| match (part, rng.below(4)) {
                                (1, _) if r.name == translate::DISPATCH_LISTENER => None,
                                (0, 0) => None,
                                (0, 1) => Some((r.name.clone(), !r.version)),
                                _ => Some((r.name.clone(), r.version)),
                            })
                            .collect();
                        log.push(format!("ack {type_url}"));
                        c.on_event(AdsEvent::Ack { type_url, version: String::new(), resources })
                    }
                    18 => {
                        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
                        let Some(type_url) = types.iter().find(|t| t.ends_with("Cluster")).cloned() else { continue };
                        let resources: Vec<String> = c.built().xds.of(&type_url).map(|r| r.name.clone()).collect();
                        let Some(name) = resources.get(rng.below(resources.len().max(1) as u64) as usize).cloned()
                        else {
                            continue;
                        };
                        log.push(format!("nack {name}"));
                        let message = format!("cluster {name}: refused");
                        c.on_event(AdsEvent::Nack { type_url, message, resources: vec![name] })
                    }
                    _ => {
                        log.push("reconnect".into());
                        c.on_event(AdsEvent::Disconnected)
                    }
                };
                if build {
                    c.build();
                    if !built_once {
                        live = Wanted::of(&c.built).all;
                        built_once = true;
                    }
                }
                if built_once {
                    settle_by_walking(&mut live, &c);
                }
                let at = format!("run {run} step {step} after {log:?}");
                let complete = complete_by_walking(&c);
                let counted: BTreeMap<ConfigKey, bool> = c.acks.owners().map(|(k, d)| (k.clone(), d)).collect();
                assert_eq!(counted, complete, "{at}");
                let in_envoy: Vec<&ConfigKey> = complete.iter().filter(|(_, d)| **d).map(|(k, _)| k).collect();
                let mut acknowledged: Vec<&ConfigKey> = c.acked_version.keys().collect();
                acknowledged.sort();
                assert_eq!(acknowledged, in_envoy, "{at}");
                assert_eq!(c.live, live, "{at}");
                for o in c.status(&[]).objects.iter() {
                    let key = c.built.statuses.iter().find(|(_, s)| s.object == o.config.object).map(|(k, _)| k);
                    let complete = key.and_then(|k| complete.get(k)) == Some(&true);
                    if !matches!(o.envoy, EnvoyAck::Nacked { .. } | EnvoyAck::NotApplied) {
                        assert_eq!(matches!(o.envoy, EnvoyAck::Acknowledged { .. }), complete, "{at}: {o:?}");
                    }
                }
            }
        }
    }

    /// Endpoints `10.1.1.<b>` for Service `service`, one EndpointSlice.
    fn slice_of(service: &str, backends: &[u64]) -> String {
        let eps: Vec<String> = backends.iter().map(|b| format!("{{addresses: [10.1.1.{b}]}}")).collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
    }

    fn parsed(text: &str) -> yaml::Loaded {
        let mut l = yaml::Loaded::default();
        yaml::load_text(std::path::Path::new("o.yaml"), text, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        l
    }

    /// What a source hands over: the same objects and documents (`Arc`s).
    fn handed_over(world: &yaml::Loaded) -> yaml::Loaded {
        yaml::Loaded { objects: world.objects.clone(), configs: world.configs.clone(), ..Default::default() }
    }

    /// A build after changes of endpoints alone patches the last build
    /// (see [`Controller::endpoints_changed`]), as does one after changes
    /// of config documents alone ([`Controller::configs_changed`]): after
    /// every step of random sequences of endpoint changes, config edits,
    /// adds and deletes, Service changes, ACKs and NACKs, it equals a
    /// controller that builds whole every time (the xDS resources,
    /// statuses, redirects, datapath snapshot, report). Half the runs have
    /// a Service that asks for HTTP visibility (a generated config beside
    /// the users'), which config changes are followed beside too.
    #[test]
    fn builds_after_endpoint_changes_equal_whole_builds_after_every_random_step() {
        let mut rng = crate::xds::acks::tests::Rng(0x5eed_e4d5);
        let mut patched_some = 0;
        let (mut followed, mut offered, mut followed_seen) = (0, 0, 0);
        for run in 0..8 {
            let mut fast = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
            let mut whole = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
            whole.incremental = false;
            let mut text = format!("{SERVICES}{}{}", slice_of("web", &[12]), slice_of("api", &[13]));
            text.push_str(&config("web-l7", "web", "default/web", 1));
            if run % 2 == 0 {
                // A second config taking its endpoints from web too.
                text.push_str(&config("api-l7", "api", "default/web2", 1));
                text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: default}\nspec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}\n");
            }
            if run % 4 >= 2 {
                // A Service that asks for HTTP visibility: its generated
                // config is built with the others (no config claims it).
                text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: seen, namespace: default, annotations: {weft.io/l7-visibility: http}}\nspec: {clusterIP: 10.96.0.13, ports: [{name: http, port: 80}]}\n");
            }
            let mut world = parsed(&text);
            for c in [&mut fast, &mut whole] {
                c.load(handed_over(&world));
                c.build();
            }
            if run % 4 >= 2 {
                assert_eq!(fast.visibility.services.len(), 1, "{:?}", fast.visibility);
            }
            let report = |c: &mut Controller| serde_json::to_value(c.status(&[])).unwrap();
            let mut log = Vec::new();
            for step in 0..60 {
                let mut changed = true;
                let what = rng.below(12);
                let config_step = matches!(what, 4 | 10 | 11);
                match what {
                    0..=3 => {
                        let service = ["web", "api", "web2"][rng.below(3) as usize];
                        let backends: Vec<u64> = (10..14).filter(|_| rng.below(2) == 0).collect();
                        log.push(format!("endpoints of {service}: {backends:?}"));
                        world
                            .objects
                            .endpoint_slices
                            .extend(parsed(&slice_of(service, &backends)).objects.endpoint_slices);
                    }
                    4 => {
                        let timeout = 1 + rng.below(3) as u32;
                        log.push(format!("web-l7 timeout {timeout}"));
                        let edited = parsed(&config("web-l7", "web", "default/web", timeout));
                        let i = world.configs.iter().position(|d| d.name.as_deref() == Some("web-l7")).unwrap();
                        world.configs[i] = edited.configs[0].clone();
                    }
                    5 => {
                        log.push("api's Service again".into());
                        world
                            .objects
                            .services
                            .extend(parsed(SERVICES).objects.services.into_iter().filter(|(k, _)| k.name == "api"));
                    }
                    6 | 7 => {
                        changed = false;
                        let types: Vec<_> = fast.built().xds.types.keys().cloned().collect();
                        let Some(type_url) = types.get(rng.below(types.len().max(1) as u64) as usize).cloned() else {
                            continue;
                        };
                        let resources: BTreeMap<String, u64> =
                            fast.built().xds.of(&type_url).map(|r| (r.name.clone(), r.version)).collect();
                        log.push(format!("ack {type_url}"));
                        let ev = AdsEvent::Ack { type_url, version: String::new(), resources };
                        changed |= fast.on_event(ev.clone());
                        assert_eq!(changed, whole.on_event(ev));
                        let (a, b) = (fast.redirects_settled(), whole.redirects_settled());
                        assert_eq!(a, b, "run {run}, step {step}: {log:#?}");
                        // The objects an ACK completed are listed again.
                        assert_eq!(report(&mut fast), report(&mut whole), "run {run}, step {step}: {log:#?}");
                    }
                    8 => {
                        let type_url = translate::CLUSTER.to_owned();
                        let names: Vec<String> = fast.built().xds.of(&type_url).map(|r| r.name.clone()).collect();
                        let Some(name) = names.get(rng.below(names.len().max(1) as u64) as usize).cloned() else {
                            continue;
                        };
                        log.push(format!("nack {name}"));
                        let ev = AdsEvent::Nack {
                            type_url,
                            message: format!("cluster {name}: refused"),
                            resources: vec![name],
                        };
                        changed = fast.on_event(ev.clone());
                        assert_eq!(changed, whole.on_event(ev));
                    }
                    10 | 11 => {
                        // A config for a Service of its own comes or goes.
                        let at = world.configs.iter().position(|d| d.name.as_deref() == Some("side"));
                        match at {
                            Some(i) if rng.below(2) == 0 => {
                                log.push("side removed".into());
                                world.configs.remove(i);
                            }
                            _ => {
                                let timeout = 1 + rng.below(3) as u32;
                                log.push(format!("side put, timeout {timeout}"));
                                let doc = parsed(&config("side", "side", "default/side", timeout)).configs[0].clone();
                                match at {
                                    Some(i) => drop(world.configs.set(i, doc)),
                                    None => world.configs.push_back(doc),
                                }
                            }
                        }
                    }
                    _ => log.push("read again, nothing changed".into()),
                }
                if !changed {
                    continue;
                }
                fast.load(handed_over(&world));
                whole.load(handed_over(&world));
                // An edit taken in place equals every document taken in.
                let at = format!("run {run}, step {step}, after {log:#?}");
                assert_eq!(fast.configs, whole.configs, "{at}");
                assert_eq!(fast.parse_errors, whole.parse_errors, "{at}");
                assert_eq!(fast.configs_only, whole.configs_only, "{at}");
                if fast.endpoints_only.as_ref().is_some_and(|s| !s.is_empty()) {
                    patched_some += 1;
                }
                let before = fast.model.changes_followed();
                let (snap_a, pub_a) = fast.build();
                let (snap_b, pub_b) = whole.build();
                if run % 2 == 1 {
                    followed += fast.model.changes_followed() - before;
                    offered += u64::from(config_step);
                    if run % 4 == 3 {
                        followed_seen += fast.model.changes_followed() - before;
                    }
                }
                assert_eq!(fast.slices, SliceIndex::of(&fast.loaded.objects), "{at}");
                assert!(fast.built == whole.built, "{at}\nfast: {:#?}\nwhole: {:#?}", fast.built, whole.built);
                assert_eq!(snap_a, snap_b, "{at}");
                assert_eq!(pub_a.xds, pub_b.xds, "{at}");
                assert_eq!(report(&mut fast), report(&mut whole), "{at}");
            }
        }
        assert!(patched_some > 20, "endpoint changes were patched {patched_some} times");
        // Runs with api-l7 have it rejected (its cluster's endpoints lead
        // nowhere): after such a build every change is built whole.
        println!("config changes: {followed} of {offered} followed (runs without a rejected config)");
        assert!(followed * 2 > offered, "config changes were followed {followed} times of {offered}");
        assert!(followed_seen > 0, "no config change was followed beside a Service that asks for HTTP visibility");
    }

    /// Loading again parses only documents that are not the same `Arc`:
    /// what comes out equals a parse of every document.
    #[test]
    fn loads_reuse_parses_of_unchanged_documents_only() {
        let text = |timeout: u32| {
            format!(
                "{SERVICES}{}{}",
                config("web-l7", "web", "default/web", 1),
                config("api-l7", "api", "default/api", timeout)
            )
        };
        let parse_all =
            |l: &Loaded| -> Vec<EnvoyConfig> { l.configs.iter().filter_map(|d| d.parsed.clone().ok()).collect() };
        let read = |t: &str| {
            let mut l = yaml::Loaded::default();
            yaml::load_text(std::path::Path::new("o.yaml"), t, &mut l);
            l
        };
        let mut c = Controller::new("node1".into(), None, ProxyPorts::ephemeral());
        let first = read(&text(1));
        let mut again = Loaded::default();
        again.merge(&first);
        c.load(first);
        assert_eq!(c.configs, parse_all(&again));
        // web's document as it was (the same Arc), api's edited, a third added, in another order.
        let edited = read(&text(2));
        let mut next = Loaded::default();
        next.configs.push_back(edited.configs[1].clone());
        next.configs.push_back(again.configs[0].clone());
        next.configs.push_back(read(&config("third", "web", "default/web", 1)).configs[0].clone());
        let expected = parse_all(&next);
        assert_eq!(expected.len(), 3);
        c.load(next);
        assert_eq!(c.configs, expected);
        assert!(c.configs[0].spec != expected_first(&again), "api's edit is in");
        // Gone from the source: gone from the controller.
        c.load(Loaded::default());
        assert!(c.configs.is_empty() && c.parsed.is_empty());
    }

    /// A Service annotated for HTTP visibility gets a generated config: it is
    /// handed to Envoy once Envoy ACKed it, shows in the status like a user's
    /// config, yields to a user's config, and goes back to plain forwarding
    /// (with nothing of it left in the xDS snapshot) when the annotation goes.
    #[test]
    fn an_annotated_service_is_served_by_a_generated_config_until_a_user_config_or_removal() {
        let annotated = SERVICES.replacen(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, annotations: {weft.io/l7-visibility: http}}",
            1,
        );
        assert_ne!(annotated, SERVICES);
        let generated = "EnvoyConfig default/weft:l7:web";
        let listed = |c: &mut Controller| c.status(&[]).objects.iter().any(|o| o.config.object == generated);
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        load(&mut c, SERVICES);
        let (snap, _) = c.build();
        assert!(handed(&snap).is_empty() && !listed(&mut c));
        ack_all(&mut c);

        load(&mut c, &annotated);
        let (snap, published) = c.build();
        assert!(handed(&snap).is_empty(), "not handed before Envoy ACKed the listener");
        assert!(c.built().xds.contains(translate::LISTENER, "default/weft:l7:web/http-80"));
        assert!(published.xds.types[translate::LISTENER].keys().any(|n| Groups::is_group(n)), "in a group");
        ack_all(&mut c);
        let snap = c.redirects_settled().expect("handed once Envoy has it");
        assert_eq!(handed(&snap), ["10.96.0.10:80"]);
        let status = c.status(&[]);
        let obj = status.objects.iter().find(|o| o.config.object == generated).expect("listed");
        assert!(matches!(obj.envoy, EnvoyAck::Acknowledged { .. }), "{:?}", obj.envoy);
        assert!(obj.config.origin.contains("weft.io/l7-visibility"), "{}", obj.config.origin);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["l7-visibility"]["services"],
            serde_json::json!([{"service": "default/web", "set-by": "service-annotation", "state": "generated",
                                "config": generated, "ports": [80]}])
        );

        // A user's config for the Service wins; the status says so.
        load(&mut c, &format!("{annotated}{}", config("mine", "web", "default/web", 1)));
        let (_, published) = c.build();
        assert!(!published.xds.contains(translate::LISTENER, "default/weft:l7:web/http-80"));
        let status = c.status(&[]);
        assert_eq!(status.l7_visibility.retiring, [generated], "its routes and clusters stay a while");
        assert_eq!(
            status.l7_visibility.services[0].state,
            visibility::VisibilityState::UserConfigWins { config: "EnvoyConfig default/mine".into() }
        );
        ack_all(&mut c);
        let snap = c.redirects_settled().expect("the user's listener serves it");
        assert_eq!(handed(&snap), ["10.96.0.10:80"]);

        // Back to the generated one, then the annotation goes: plain at once.
        load(&mut c, &annotated);
        c.build();
        ack_all(&mut c);
        assert_eq!(handed(&c.redirects_settled().expect("generated again")), ["10.96.0.10:80"]);
        load(&mut c, SERVICES);
        let (snap, published) = c.build();
        assert!(handed(&snap).is_empty(), "plain forwarding");
        // Retired: the listener goes; the routes, clusters and endpoints
        // that the draining connections' requests need stay.
        assert!(!published.xds.contains(translate::LISTENER, "default/weft:l7:web/http-80"));
        assert!(published.xds.contains(translate::CLUSTER, "default/weft:l7:web/port-80"));
        assert!(published.xds.contains(translate::ROUTE, "default/weft:l7:web/http-80"));
        assert!(published.xds.contains(translate::ENDPOINT, "default/web:80"));
        let status = c.status(&[]);
        assert!(status.l7_visibility.services.is_empty());
        assert_eq!(status.l7_visibility.retiring, [generated]);
        let obj = status.objects.iter().find(|o| o.config.object == generated).expect("listed while retiring");
        assert!(obj.config.problems.is_empty(), "{:?}", obj.config.problems);
        assert!(!c.retirement_due());
        // Its time is up: the next build removes the rest.
        for (_, until) in c.retiring.values_mut() {
            *until = Instant::now();
        }
        assert!(c.retirement_due());
        let (snap, published) = c.build();
        assert!(handed(&snap).is_empty() && !listed(&mut c) && c.status(&[]).l7_visibility.retiring.is_empty());
        let left: Vec<_> =
            published.xds.types.values().flat_map(|m| m.keys()).filter(|n| n.contains("weft:l7")).collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!published.xds.contains(translate::ENDPOINT, "default/web:80"));
    }

    fn expected_first(l: &Loaded) -> Arc<crate::k8s::crd::EnvoyConfigSpec> {
        l.configs[1].parsed.clone().expect("api's config").spec
    }

    /// Envoy ACKs every resource of a config added beside none but the
    /// dispatcher's (new: it went with the last config): its Service is
    /// handed over once the dispatcher is ACKed too, by that ACK alone.
    #[test]
    fn a_service_waits_for_the_dispatcher_too() {
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        load(&mut c, SERVICES);
        c.build();
        ack_all(&mut c);
        load(&mut c, &format!("{SERVICES}{}", config("web-l7", "web", "default/web", 1)));
        let (snap, _) = c.build();
        assert!(handed(&snap).is_empty());
        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
        for type_url in &types {
            let resources = c
                .built()
                .xds
                .of(type_url)
                .filter(|r| r.name != translate::DISPATCH_LISTENER)
                .map(|r| (r.name.clone(), r.version))
                .collect();
            c.on_event(AdsEvent::Ack { type_url: type_url.clone(), version: String::new(), resources });
        }
        let web = ConfigKey { clusterwide: false, key: crate::k8s::ObjKey::new("default", "web-l7") };
        assert!(c.acks.complete(&web), "every resource of web-l7 is ACKed");
        assert!(c.redirects_settled().is_none(), "not handed before Envoy has the dispatcher");
        for type_url in types {
            let resources = c
                .built()
                .xds
                .of(&type_url)
                .filter(|r| r.name == translate::DISPATCH_LISTENER)
                .map(|r| (r.name.clone(), r.version))
                .collect();
            c.on_event(AdsEvent::Ack { type_url, version: String::new(), resources });
        }
        assert_eq!(handed(&c.redirects_settled().expect("handed with the dispatcher")), ["10.96.0.10:80"]);
    }

    /// web's config and api's (with a timeout of `api_timeout` seconds).
    fn web_and_api(api_timeout: u32) -> String {
        format!(
            "{SERVICES}{}{}",
            config("web-l7", "web", "default/web", 1),
            config("api-l7", "api", "default/api", api_timeout)
        )
    }

    /// Envoy's answer to a published snapshot: a NACK of the listeners
    /// `refused` names (those whose name contains it), an ACK of the rest.
    fn answer(c: &mut Controller, published: &Published, refused: &str) -> bool {
        let mut rebuild = false;
        for (type_url, m) in &published.xds.types {
            let (bad, good): (Vec<_>, Vec<_>) =
                m.values().partition(|r| !refused.is_empty() && r.name.contains(refused));
            let resources = good.iter().map(|r| (r.name.clone(), r.version)).collect();
            rebuild |= c.on_event(AdsEvent::Ack { type_url: type_url.clone(), version: String::new(), resources });
            for r in bad {
                let message = format!("Error adding/updating listener(s) {}: no such filter", r.name);
                let ev = AdsEvent::Nack { type_url: type_url.clone(), message, resources: vec![r.name.clone()] };
                rebuild |= c.on_event(ev);
            }
        }
        rebuild
    }

    fn envoy_ack_of(c: &mut Controller, name: &str) -> EnvoyAck {
        let status = c.status(&[]);
        let o = status.objects.iter().find(|o| o.config.object == format!("EnvoyConfig default/{name}"));
        o.map(|o| o.envoy.clone()).unwrap_or(EnvoyAck::NotApplied)
    }

    /// Two new configs share a group; Envoy refuses the group: neither is
    /// blamed, both are served on their own next, and Envoy's refusal of
    /// one of those names the config at fault alone, as without groups.
    #[test]
    fn a_nack_of_a_group_blames_the_config_at_fault_alone() {
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        load(&mut c, &web_and_api(1));
        let (_, published) = c.build();
        let listeners: Vec<&String> = published.xds.types[translate::LISTENER].keys().collect();
        assert_eq!(listeners.len(), 2, "the dispatcher and one group: {listeners:?}");
        assert!(answer(&mut c, &published, crate::xds::groups::GROUP_PREFIX), "a push is due");
        assert_eq!(envoy_ack_of(&mut c, "web-l7"), EnvoyAck::Pending);
        assert_eq!(envoy_ack_of(&mut c, "api-l7"), EnvoyAck::Pending);
        let (_, published) = c.build();
        let listeners: Vec<&String> = published.xds.types[translate::LISTENER].keys().collect();
        assert_eq!(listeners, ["default/api-l7/l", "default/web-l7/l", translate::DISPATCH_LISTENER]);
        assert!(answer(&mut c, &published, "default/api-l7/l"), "api is rejected: a build is due");
        let (_, published) = c.build();
        answer(&mut c, &published, "");
        let api = envoy_ack_of(&mut c, "api-l7");
        assert!(matches!(api, EnvoyAck::Nacked { ref message } if message.contains("no such filter")), "{api:?}");
        let web = envoy_ack_of(&mut c, "web-l7");
        assert!(matches!(web, EnvoyAck::Acknowledged { .. }), "{web:?}");
    }

    #[test]
    fn a_service_is_handed_to_envoy_once_envoy_acked_its_listener() {
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        // The first build's redirects reach Envoy with the dispatcher: in effect at once.
        load(&mut c, &format!("{SERVICES}{}", config("web-l7", "web", "default/web", 1)));
        let (snap, _) = c.build();
        let web = handed(&snap);
        assert_eq!(web.len(), 1, "{web:?}");
        assert!(web[0].contains("10.96.0.10"), "{web:?}");
        ack_all(&mut c);
        assert!(c.redirects_settled().is_none(), "nothing new to hand");

        // A config added while the dispatcher serves: api stays plain until
        // Envoy ACKed its listener, routes and cluster.
        load(&mut c, &web_and_api(1));
        let (snap, _) = c.build();
        assert_eq!(handed(&snap), web, "api is not handed before Envoy has its listener");
        let api = ConfigKey { clusterwide: false, key: crate::k8s::ObjKey::new("default", "api-l7") };
        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
        for type_url in types {
            // Everything but api's listener.
            let resources = c
                .built()
                .xds
                .of(&type_url)
                .filter(|r| !(type_url == translate::LISTENER && r.owner.as_ref() == Some(&api)))
                .map(|r| (r.name.clone(), r.version))
                .collect();
            c.on_event(AdsEvent::Ack { type_url, version: String::new(), resources });
        }
        assert!(c.redirects_settled().is_none(), "its listener is not ACKed yet");
        ack_all(&mut c);
        let snap = c.redirects_settled().expect("api handed once its listener is ACKed");
        let both = handed(&snap);
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(snap.version > 2, "a new datapath version: {}", snap.version);

        // An edit of api's config does not take api back from Envoy while Envoy takes it.
        load(&mut c, &web_and_api(2));
        let (snap, _) = c.build();
        assert_eq!(c.built().statuses[&api].serving, crate::xds::model::Serving::Current, "the edit is accepted");
        assert_eq!(handed(&snap), both);

        // Deleted: not handed any more, at once.
        load(&mut c, &format!("{SERVICES}{}", config("web-l7", "web", "default/web", 1)));
        let (snap, _) = c.build();
        assert_eq!(handed(&snap), web);
        ack_all(&mut c);

        // Added again as it was: Envoy was told to remove its resources, so
        // their earlier ACK does not count; handed once ACKed again.
        let with_api = format!(
            "{SERVICES}{}{}",
            config("web-l7", "web", "default/web", 1),
            config("api-l7", "api", "default/api", 2)
        );
        load(&mut c, &with_api);
        let (snap, _) = c.build();
        assert_eq!(handed(&snap), web, "not handed on the strength of the ACK before its removal");
        assert!(c.redirects_settled().is_none());
        ack_all(&mut c);
        assert_eq!(handed(&c.redirects_settled().expect("handed once ACKed again")), both);
    }
}

#[cfg(test)]
mod profile {
    //! Where one change's time goes with many configs loaded (not a test:
    //! `WEFT_PROFILE_CONFIGS=10000 cargo test --release -p weft-agent --lib
    //! controller::profile -- --ignored --nocapture`, under `perf record`).
    use std::time::Instant;

    use super::*;
    use crate::k8s::yaml;

    fn slice(i: usize, backends: &[&str]) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---\n",
            backends.iter().map(|b| format!("{{addresses: [{b}]}}")).collect::<Vec<_>>().join(", ")
        )
    }

    fn config(i: usize, timeout: u32) -> String {
        format!(
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: c{i}, namespace: default}}\nspec:\n  services: [{{name: s{i}}}]\n  resources:\n  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: c{i}-listener\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: c{i}\n          rds: {{route_config_name: c{i}-route}}\n          http_filters: [{{name: envoy.filters.http.router}}]\n  - \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n    name: c{i}-route\n    virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: /}}, route: {{cluster: default/s{i}, timeout: {timeout}s}}}}]}}]\n  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: default/s{i}\n    type: EDS\n---\n"
        )
    }

    fn parse(text: &str) -> yaml::Loaded {
        let mut l = yaml::Loaded::default();
        yaml::load_text(std::path::Path::new("o.yaml"), text, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        l
    }

    fn ack_all(c: &mut Controller) {
        let types: Vec<_> = c.built().xds.types.keys().cloned().collect();
        for type_url in types {
            let resources = c.built().xds.of(&type_url).map(|r| (r.name.clone(), r.version)).collect();
            c.on_event(AdsEvent::Ack { type_url, version: String::new(), resources });
        }
    }

    /// Takes in what a source handed over and builds: how long the load,
    /// the build and the status took, and what they made.
    fn take_in(c: &mut Controller, handed: yaml::Loaded) -> String {
        let t_load = Instant::now();
        c.load(handed);
        let t_build = Instant::now();
        let (snap, published) = c.build();
        let t_status = Instant::now();
        let status = c.status(&[]);
        let t_end = Instant::now();
        format!(
            "load {:?}, build {:?}, status {:?} ({} objects, {} resources, {} services)",
            t_build - t_load,
            t_status - t_build,
            t_end - t_status,
            status.objects.len(),
            published.xds.types.values().map(|m| m.len()).sum::<usize>(),
            snap.services.len(),
        )
    }

    #[test]
    #[ignore]
    fn one_change_with_many_configs_loaded() {
        let n = crate::profile_memory::configs_wanted();
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&crate::xds::envoyconfig::bench_service(i));
            text.push_str(&slice(i, &["10.1.1.12"]));
            text.push_str(&config(i, 1));
        }
        let world = parse(&text);
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        // The same changes built whole every time, for comparison.
        let mut whole = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        whole.incremental = false;
        let again = |w: &yaml::Loaded| yaml::Loaded {
            objects: w.objects.clone(),
            configs: w.configs.clone(),
            ..Default::default()
        };
        let with_whole = !std::env::var("WEFT_PROFILE_WHOLE").is_ok_and(|v| v == "0");
        for c in [&mut c, &mut whole].into_iter().take(if with_whole { 2 } else { 1 }) {
            c.load(again(&world));
            c.build();
            ack_all(c);
            c.build();
        }
        let mut world = world;
        for round in 0..10 {
            // One EndpointSlice (even rounds) or one config (odd) changes.
            let t0 = Instant::now();
            if round % 2 == 0 {
                let backends: &[&str] = if round % 4 == 0 { &["10.1.1.12", "10.1.2.11"] } else { &["10.1.1.12"] };
                let s = parse(&slice(0, backends));
                world.objects.endpoint_slices.extend(s.objects.endpoint_slices);
            } else {
                let edited = parse(&config(0, round));
                let i = world.configs.iter().position(|d| d.name.as_deref() == Some("c0")).unwrap();
                world.configs[i] = edited.configs[0].clone();
            }
            let handed = again(&world);
            let t_handed = t0.elapsed();
            let took = take_in(&mut c, handed);
            println!("{} round {round}: hand-over {t_handed:?}, {took}", if round % 2 == 0 { "slice" } else { "edit" });
            ack_all(&mut c);
            if !with_whole {
                continue;
            }
            whole.load(again(&world));
            let t_whole = Instant::now();
            whole.build();
            println!("  the same built whole: {:?}", t_whole.elapsed());
            ack_all(&mut whole);
        }
    }

    /// One EndpointSlice change as the agent takes it from an objects
    /// directory, the bench's layout: every object in one file, Service
    /// `s0`'s EndpointSlice in a file of its own, rewritten each round. The
    /// source's poll (it reads the changed file and hands over its world),
    /// the controller's load (and the drop of the world it held), the build
    /// and the status are timed apart.
    #[test]
    #[ignore]
    fn an_endpoint_change_through_the_directory_source() {
        let n = crate::profile_memory::configs_wanted();
        let dir = crate::profile_memory::empty_dir("dirsource");
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&crate::xds::envoyconfig::bench_service(i));
            if i > 0 {
                text.push_str(&slice(i, &["10.1.1.12"]));
            }
            text.push_str(&config(i, 1));
        }
        std::fs::write(dir.join("lab.yaml"), text).unwrap();
        std::fs::write(dir.join("s0.yaml"), slice(0, &["10.1.1.12"])).unwrap();
        let mut source = yaml::DirSource::new(dir.clone());
        let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
        c.load(source.poll().expect("the files"));
        c.build();
        ack_all(&mut c);
        c.build();
        for round in 0..6 {
            let backends: &[&str] = if round % 2 == 0 { &["10.1.1.12", "10.1.2.11"] } else { &["10.1.1.12"] };
            std::fs::write(dir.join("s0.yaml"), slice(0, backends)).unwrap();
            let t0 = Instant::now();
            let handed = source.poll().expect("s0.yaml changed");
            let t_poll = t0.elapsed();
            let took = take_in(&mut c, handed);
            println!("slice via the directory, round {round}: poll {t_poll:?}, {took}");
            ack_all(&mut c);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
