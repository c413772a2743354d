//! Leader election with a coordination.k8s.io/v1 Lease: one operator
//! replica writes; the others wait until the holder stops renewing.
//!
//! Expiry is judged by this process's own clock from when it last saw the
//! record change (not by comparing timestamps written by another machine),
//! and every write is a compare-and-swap on the Lease's resourceVersion, so
//! two candidates can never both win.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The record last seen (its resourceVersion) and when it was seen to change.
    observed: Option<(String, Instant)>,
    leading: bool,
}

/// Why a round could not tell.
#[derive(Debug, thiserror::Error)]
#[error("Lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    namespace: String,
    name: String,
    source: kube::Error,
}

impl Elector {
    /// A candidate `identity` for the Lease `namespace/name`, held for `duration` without renewal.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
            leading: false,
        }
    }

    /// Whether the last round won.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    /// How often to call [`Elector::round`]: a third of the lease.
    pub fn retry_every(&self) -> Duration {
        self.duration / 3
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Acquires or renews the Lease if it can; returns whether this candidate leads.
    pub async fn round(&mut self) -> Result<bool, LeaseError> {
        let (namespace, name) = (self.api_namespace(), self.name.clone());
        let err = move |source| LeaseError { namespace: namespace.clone(), name: name.clone(), source };
        let current = match self.api.get_opt(&self.name).await {
            Ok(c) => c,
            Err(e) => {
                self.leading = false;
                return Err(err(e));
            }
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            self.leading = match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => true,
                Err(kube::Error::Api(s)) if s.code == 409 => false,
                Err(e) => return Err(err(e)),
            };
            return Ok(self.leading);
        };
        let rv = lease.resource_version().unwrap_or_default();
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv);
        if changed {
            self.observed = Some((rv, Instant::now()));
        }
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        let expired = holder.is_empty() || self.observed.as_ref().is_some_and(|(_, at)| at.elapsed() > held_for);
        let mine = holder == self.identity;
        if !mine && !expired {
            self.leading = false;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        lease.spec = Some(self.spec(transitions, if mine { spec.acquire_time } else { None }));
        self.leading = match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(l) => {
                self.observed = Some((l.resource_version().unwrap_or_default(), Instant::now()));
                true
            }
            Err(kube::Error::Api(s)) if s.code == 409 => false,
            Err(e) => {
                self.leading = false;
                return Err(err(e));
            }
        };
        Ok(self.leading)
    }

    fn api_namespace(&self) -> String {
        self.api.namespace().unwrap_or_default().to_owned()
    }
}
