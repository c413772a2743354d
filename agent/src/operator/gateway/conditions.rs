//! Status conditions as the Gateway API wants them: each with the
//! generation it describes, a reason from the spec, and a transition time
//! that moves only when the status does; conditions of types weft does not
//! write (another controller's, or a policy's) are kept as they are.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition for `generation`; its transition time is set when written.
pub fn condition(type_: &str, ok: bool, reason: &str, message: impl Into<String>, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The conditions to write: `ours` (each keeping the transition time of the
/// condition of its type in `held` when the status is the same, else `now`),
/// then the conditions in `held` of types not in `ours` and not in `owned`
/// (types weft writes but no longer has an opinion on are dropped).
pub fn merge(ours: &[Condition], held: &[Condition], owned: &[&str], now: Timestamp) -> Vec<Condition> {
    let mut out: Vec<Condition> = ours
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.last_transition_time = held
                .iter()
                .find(|h| h.type_ == c.type_ && h.status == c.status)
                .map(|h| h.last_transition_time.clone())
                .unwrap_or(Time(now));
            c
        })
        .collect();
    out.extend(
        held.iter().filter(|h| !ours.iter().any(|c| c.type_ == h.type_) && !owned.contains(&h.type_.as_str())).cloned(),
    );
    out
}

/// Whether two condition lists say the same, transition times aside.
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_times_move_only_with_the_status_and_foreign_conditions_stay() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let held = merge(
            &[condition("Accepted", true, "Accepted", "", 1), condition("Programmed", false, "Pending", "", 1)],
            &[],
            &[],
            t0,
        );
        let mut foreign = condition("example.com/Audited", true, "Audited", "", 1);
        foreign.last_transition_time = Time(t0);
        let held = [held, vec![foreign.clone()]].concat();
        let next = merge(
            &[condition("Accepted", true, "Accepted", "", 2), condition("Programmed", true, "Programmed", "", 2)],
            &held,
            &["Accepted", "Programmed", "ResolvedRefs"],
            t1,
        );
        assert_eq!(next[0].last_transition_time, Time(t0), "Accepted stayed True");
        assert_eq!(next[0].observed_generation, Some(2));
        assert_eq!(next[1].last_transition_time, Time(t1), "Programmed became True");
        assert_eq!(next[2], foreign, "another controller's condition is kept");
        assert!(same(&next, &next.clone()));
        assert!(!same(&next, &held));
    }
}
