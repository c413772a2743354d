//! The flow API's certificates, so that deploy/ serves it with mutual TLS
//! by default: the operator keeps a CA, a server certificate for every node
//! and a client certificate (for `weft observe` and Hubble Relay) in Secrets
//! of its namespace, and issues new ones well before they expire.
//!
//! - [`CA_SECRET`] (`kubernetes.io/tls`): the CA's certificate and key, and
//!   `ca.crt`, the CAs clients and servers trust (the current one, and the
//!   one before it while certificates it signed may still be in use).
//! - [`SERVER_SECRET`] (Opaque): `<node>.crt` and `<node>.key` for every
//!   Node, and `ca.crt`. The agents' DaemonSet mounts it; each agent serves
//!   its own node's pair (`flows.tls` with `{node}` in the paths) and reads
//!   renewed files without a restart. Node names are DNS subdomains, so they
//!   are valid Secret keys.
//! - [`CLIENT_SECRET`] (`kubernetes.io/tls`): a client certificate and
//!   `ca.crt`, for `weft observe --tls-cert` and Hubble Relay.
//!
//! A server certificate names its node as Hubble names its agents:
//! [`weft_flow::names::flow_server_name`]. What was issued when, by which
//! CA and for which names, is kept in the Secrets' annotations, so a
//! restarted or new leader renews what is due and nothing else (no
//! certificate parser needed).
//!
//! When the names wanted change (another cluster name, or an upgrade that
//! names certificates differently; a renamed node is a new node), what
//! carries the old names is issued again at once, in the same Secrets: the
//! old certificate and key are overwritten. The CA's name holds the cluster
//! name, so another cluster name replaces the CA as its expiry would: the
//! old CA stays in `ca.crt` until it expires (its key is gone: it signs
//! nothing more), and every leaf is issued again by the new one.
//! Certificates issued before the names were recorded are taken to carry
//! other names (so leaves are issued again once, after the upgrade), except
//! the CA: its name held the cluster name it was issued with, which is taken
//! to be today's.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use weft_flow::names::{flow_client_name, flow_server_name, peer_service_server_name};

/// The CA's Secret.
pub const CA_SECRET: &str = "weft-flows-ca";
/// Every node's server certificate and key.
pub const SERVER_SECRET: &str = "weft-flows-server";
/// The client certificate for `weft observe` and Hubble Relay.
pub const CLIENT_SECRET: &str = "weft-flows-client";
/// The CA bundle's key in each Secret.
pub const CA_BUNDLE: &str = "ca.crt";
/// When each certificate of a Secret stops being valid: JSON, key -> unix seconds.
const NOT_AFTER: &str = "weft.io/not-after";
/// The CA that signed a Secret's certificates (a hash of its certificate).
const ISSUER: &str = "weft.io/issuer";
/// The names each certificate of a Secret was issued for: JSON, key -> names.
const NAMES: &str = "weft.io/names";

/// How long certificates are valid; each is renewed once less than a third
/// of its lifetime is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub leaf: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes { ca: Duration::from_secs(5 * 365 * 86400), leaf: Duration::from_secs(90 * 86400) }
    }
}

/// Why the certificates could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Secret {namespace}/{name}: {error}")]
    Api { namespace: String, name: String, error: kube::Error },
    #[error("issuing a certificate for {subject}: {error}")]
    Issue { subject: String, error: rcgen::Error },
    #[error("Secret {namespace}/{name}: {key}: {problem}")]
    Stored { namespace: String, name: String, key: String, problem: String },
}

/// A Secret's text entries and annotations as the operator reads and writes them.
#[derive(Clone, Debug, Default, PartialEq)]
struct Stored {
    data: BTreeMap<String, String>,
    not_after: BTreeMap<String, u64>,
    names: BTreeMap<String, Vec<String>>,
    issuer: String,
}

impl Stored {
    fn of(s: Secret) -> Stored {
        let data = s
            .data
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v)))
            .collect();
        let ann = s.metadata.annotations.unwrap_or_default();
        let not_after = ann.get(NOT_AFTER).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        let names = ann.get(NAMES).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        Stored { data, not_after, names, issuer: ann.get(ISSUER).cloned().unwrap_or_default() }
    }

    /// Whether `key`'s certificate was issued for exactly `names` (one
    /// whose names were not recorded was not).
    fn names_are(&self, key: &str, names: &[String]) -> bool {
        self.names.get(key).is_some_and(|n| n == names)
    }

    /// Whether `key`'s certificate needs a new one at `now`.
    fn due(&self, key: &str, now: u64, lifetime: Duration) -> bool {
        let Some(end) = self.not_after.get(key) else { return true };
        end.saturating_sub(now) < lifetime.as_secs() / 3
    }
}

/// A key pair and certificate, in PEM.
struct Issued {
    cert: String,
    key: String,
    not_after: u64,
}

fn distinguished(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, cn);
    dn
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    // SAFETY: a valid buffer of that length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        // Unique enough for certificates only this operator issues.
        b[..8].copy_from_slice(&weft_flow::time::now_ns().to_be_bytes());
    }
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

fn window(params: &mut CertificateParams, now: u64, lifetime: Duration) -> u64 {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // An hour back: nodes' clocks differ a little.
    params.not_before = epoch + Duration::from_secs(now.saturating_sub(3600));
    let not_after = now.saturating_add(lifetime.as_secs());
    params.not_after = epoch + Duration::from_secs(not_after);
    not_after
}

/// The CA's parameters: the same for every certificate it ever issues, so
/// an operator that reads the key back can sign as it (the issuer name and
/// key identifier come from them).
fn ca_params(cluster: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = distinguished(&ca_name(cluster));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// The CA's common name: leaves name their issuer by it, so a CA of another
/// cluster name cannot sign for this one.
fn ca_name(cluster: &str) -> String {
    format!("weft flows CA ({cluster})")
}

fn new_ca(cluster: &str, now: u64, lifetime: Duration) -> Result<Issued, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut p = ca_params(cluster);
    p.serial_number = Some(random_serial());
    let not_after = window(&mut p, now, lifetime);
    let cert = p.self_signed(&key)?;
    Ok(Issued { cert: cert.pem(), key: key.serialize_pem(), not_after })
}

/// A leaf certificate for `name` (its common name and only DNS name).
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
    server: bool,
    now: u64,
    lifetime: Duration,
) -> Result<Issued, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name = distinguished(names.first().map_or("", String::as_str));
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    let not_after = window(&mut p, now, lifetime);
    let cert = p.signed_by(&key, issuer)?;
    Ok(Issued { cert: cert.pem(), key: key.serialize_pem(), not_after })
}

fn fingerprint(cert_pem: &str) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(cert_pem.trim().as_bytes());
    format!("{:016x}", h.finish())
}

/// Keeps the flow API's Secrets (see the module doc).
pub struct FlowCerts {
    secrets: Api<Secret>,
    namespace: String,
    cluster: String,
    field_manager: String,
    lifetimes: Lifetimes,
}

/// What one [`FlowCerts::reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Renewed {
    pub ca: bool,
    /// Nodes whose server certificate was issued.
    pub servers: Vec<String>,
    /// Nodes whose certificate was dropped (the Node is gone).
    pub removed: Vec<String>,
    pub client: bool,
}

impl Renewed {
    pub fn any(&self) -> bool {
        self.ca || self.client || !self.servers.is_empty() || !self.removed.is_empty()
    }
}

impl FlowCerts {
    pub fn new(client: Client, namespace: &str, cluster: &str, field_manager: &str, lifetimes: Lifetimes) -> Self {
        FlowCerts {
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
            field_manager: field_manager.to_owned(),
            lifetimes,
        }
    }

    fn api_error(&self, name: &str) -> impl Fn(kube::Error) -> CertError + '_ {
        let name = name.to_owned();
        move |error| CertError::Api { namespace: self.namespace.clone(), name: name.clone(), error }
    }

    async fn read(&self, name: &str) -> Result<Stored, CertError> {
        Ok(self.secrets.get_opt(name).await.map_err(self.api_error(name))?.map(Stored::of).unwrap_or_default())
    }

    async fn write(&self, name: &str, type_: &str, s: &Stored) -> Result<(), CertError> {
        let annotations = BTreeMap::from([
            (NOT_AFTER.to_owned(), serde_json::to_string(&s.not_after).unwrap_or_default()),
            (ISSUER.to_owned(), s.issuer.clone()),
            (NAMES.to_owned(), serde_json::to_string(&s.names).unwrap_or_default()),
        ]);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                annotations: Some(annotations),
                labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "weft".to_owned())])),
                ..Default::default()
            },
            type_: Some(type_.to_owned()),
            data: Some(s.data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()),
            ..Default::default()
        };
        let pp = PatchParams::apply(&self.field_manager).force();
        self.secrets.patch(name, &pp, &Patch::Apply(&secret)).await.map_err(self.api_error(name))?;
        Ok(())
    }

    /// Issues what is missing, due at `now` (unix seconds) or issued for
    /// other names, for `nodes`, drops certificates of nodes that are gone,
    /// and writes the Secrets that changed.
    pub async fn reconcile(&self, nodes: &BTreeSet<String>, now: u64) -> Result<Renewed, CertError> {
        let issue = |subject: &str| {
            let subject = subject.to_owned();
            move |error| CertError::Issue { subject: subject.clone(), error }
        };
        let mut done = Renewed::default();

        // The CA.
        let mut ca = self.read(CA_SECRET).await?;
        let ca_names = vec![ca_name(&self.cluster)];
        // A CA whose name was not recorded was issued before names were:
        // for the cluster name of then, taken to be today's.
        let renamed = ca.names.get("tls.crt").is_some_and(|n| *n != ca_names);
        if ca.due("tls.crt", now, self.lifetimes.ca) || !ca.data.contains_key("tls.key") || renamed {
            let new = new_ca(&self.cluster, now, self.lifetimes.ca).map_err(issue("the CA"))?;
            // The old CA stays trusted while what it signed may be in use.
            let mut trusted = vec![new.cert.clone()];
            if let (Some(old), Some(end)) = (ca.data.get("tls.crt"), ca.not_after.get("tls.crt"))
                && *end > now
            {
                trusted.push(old.clone());
                ca.not_after.insert("previous".into(), *end);
            }
            ca.data = BTreeMap::from([
                ("tls.crt".to_owned(), new.cert.clone()),
                ("tls.key".to_owned(), new.key),
                (CA_BUNDLE.to_owned(), trusted.concat()),
            ]);
            ca.not_after.insert("tls.crt".into(), new.not_after);
            ca.names = BTreeMap::from([("tls.crt".to_owned(), ca_names)]);
            ca.issuer = fingerprint(&new.cert);
            self.write(CA_SECRET, "kubernetes.io/tls", &ca).await?;
            done.ca = true;
        } else if ca.not_after.get("previous").is_some_and(|end| *end <= now) {
            // The previous CA expired: trust the current one only.
            let current = ca.data.get("tls.crt").cloned().unwrap_or_default();
            ca.data.insert(CA_BUNDLE.into(), current);
            ca.not_after.remove("previous");
            self.write(CA_SECRET, "kubernetes.io/tls", &ca).await?;
        }
        let stored = |k: &str| {
            ca.data.get(k).cloned().ok_or_else(|| CertError::Stored {
                namespace: self.namespace.clone(),
                name: CA_SECRET.into(),
                key: k.into(),
                problem: "missing".into(),
            })
        };
        let (ca_cert, bundle) = (stored("tls.crt")?, stored(CA_BUNDLE)?);
        let key = KeyPair::from_pem(&stored("tls.key")?).map_err(|e| CertError::Stored {
            namespace: self.namespace.clone(),
            name: CA_SECRET.into(),
            key: "tls.key".into(),
            problem: e.to_string(),
        })?;
        let issuer = Issuer::new(ca_params(&self.cluster), key);
        let ca_id = fingerprint(&ca_cert);

        // Every node's server certificate.
        let old = self.read(SERVER_SECRET).await?;
        let mut servers = Stored { issuer: ca_id.clone(), ..Default::default() };
        servers.data.insert(CA_BUNDLE.into(), bundle.clone());
        for node in nodes {
            let (crt, key) = (format!("{node}.crt"), format!("{node}.key"));
            // Its node's name, and the name newer Hubble Relays check on the
            // Peer service, which every agent serves on its flow port.
            let name = flow_server_name(node, &self.cluster);
            let names = vec![name.clone(), peer_service_server_name(&self.cluster)];
            let keep = old.issuer == ca_id
                && !old.due(&crt, now, self.lifetimes.leaf)
                && old.names_are(&crt, &names)
                && old.data.contains_key(&crt)
                && old.data.contains_key(&key);
            if keep {
                servers.data.insert(crt.clone(), old.data[&crt].clone());
                servers.data.insert(key.clone(), old.data[&key].clone());
                servers.not_after.insert(crt.clone(), old.not_after[&crt]);
                servers.names.insert(crt, names);
                continue;
            }
            let new = leaf(&issuer, &names, true, now, self.lifetimes.leaf).map_err(issue(&name))?;
            servers.data.insert(crt.clone(), new.cert);
            servers.data.insert(key, new.key);
            servers.not_after.insert(crt.clone(), new.not_after);
            servers.names.insert(crt, names);
            done.servers.push(node.clone());
        }
        done.removed = old
            .not_after
            .keys()
            .filter_map(|k| k.strip_suffix(".crt"))
            .filter(|n| !nodes.contains(*n))
            .map(str::to_owned)
            .collect();
        if servers != old {
            self.write(SERVER_SECRET, "Opaque", &servers).await?;
        }

        // The client certificate.
        let old = self.read(CLIENT_SECRET).await?;
        let mut client = old.clone();
        let name = flow_client_name(&self.cluster);
        let names = vec![name.clone()];
        if old.issuer != ca_id || old.due("tls.crt", now, self.lifetimes.leaf) || !old.names_are("tls.crt", &names) {
            let new = leaf(&issuer, &names, false, now, self.lifetimes.leaf).map_err(issue(&name))?;
            client.data = BTreeMap::from([("tls.crt".to_owned(), new.cert), ("tls.key".to_owned(), new.key)]);
            client.not_after = BTreeMap::from([("tls.crt".to_owned(), new.not_after)]);
            client.names = BTreeMap::from([("tls.crt".to_owned(), names)]);
            client.issuer = ca_id;
            done.client = true;
        }
        client.data.insert(CA_BUNDLE.into(), bundle);
        if client != old {
            self.write(CLIENT_SECRET, "kubernetes.io/tls", &client).await?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_a_ca_read_back_from_its_key() {
        let now = weft_flow::time::now_ns() / 1_000_000_000;
        let ca = new_ca("c1", now, Duration::from_secs(86400)).unwrap();
        // An operator that restarted: only the key and the parameters.
        let issuer = Issuer::new(ca_params("c1"), KeyPair::from_pem(&ca.key).unwrap());
        let name = flow_server_name("node-1.example", "c1");
        let server = leaf(&issuer, &[name], true, now, Duration::from_secs(3600)).unwrap();
        let client = leaf(&issuer, &[flow_client_name("c1")], false, now, Duration::from_secs(3600)).unwrap();
        assert_eq!(server.not_after, now + 3600);
        // rustls accepts them as the flow API and its clients use them.
        let tls = weft_observe::api::server::Tls {
            cert_pem: server.cert.clone().into_bytes(),
            key_pem: server.key.into_bytes(),
            client_ca_pem: Some(ca.cert.clone().into_bytes()),
        };
        tls.check().unwrap();
        assert!(client.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(fingerprint(&ca.cert), fingerprint(&server.cert));
    }

    #[test]
    fn certificates_are_due_in_the_last_third_of_their_life() {
        let life = Duration::from_secs(90);
        let s = Stored { not_after: BTreeMap::from([("a".into(), 1000)]), ..Default::default() };
        assert!(!s.due("a", 1000 - 31, life));
        assert!(s.due("a", 1000 - 29, life));
        assert!(s.due("a", 2000, life), "expired");
        assert!(s.due("b", 0, life), "never issued");
    }
}
