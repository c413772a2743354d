//! Kubernetes label selectors (`matchLabels` and `matchExpressions`): the one
//! matcher the agent uses, for NetworkPolicy pod and namespace selectors and
//! EnvoyConfig `nodeSelector`s. An operator it does not know is an error
//! that names it, never a silent match or miss: a selector that says more
//! than weft understands must not select (or spare) the wrong pods.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// What is wrong with a selector.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown operator {operator:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator {
        /// Its index in `matchExpressions`.
        index: usize,
        operator: String,
    },
}

impl SelectorError {
    /// The field at fault, under the selector (`matchExpressions[1].operator`).
    pub fn field(&self) -> String {
        match self {
            SelectorError::UnknownOperator { index, .. } => format!("matchExpressions[{index}].operator"),
        }
    }
}

/// Checks what [`matches`] would refuse, without labels to match.
pub fn check(sel: &LabelSelector) -> Result<(), SelectorError> {
    matches(sel, &BTreeMap::new()).map(|_| ())
}

/// Whether `labels` satisfy the selector; an empty selector selects
/// everything. Every expression is checked, so an unknown operator is an
/// error even when an earlier requirement already fails.
pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, SelectorError> {
    let mut all = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        all &= match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => !have.is_some_and(|h| values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => return Err(SelectorError::UnknownOperator { index, operator: other.to_owned() }),
        };
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn labels_and_expressions_all_have_to_hold() {
        let labels = BTreeMap::from([("role".to_string(), "infra".to_string()), ("zone".into(), "a".into())]);
        assert!(matches(&sel(serde_json::json!({})), &labels).unwrap());
        assert!(matches(&sel(serde_json::json!({"matchLabels": {"role": "infra"}})), &labels).unwrap());
        assert!(!matches(&sel(serde_json::json!({"matchLabels": {"role": "web"}})), &labels).unwrap());
        let exprs = |op: &str, values: serde_json::Value| {
            sel(serde_json::json!({"matchExpressions": [{"key": "zone", "operator": op, "values": values}]}))
        };
        assert!(matches(&exprs("In", serde_json::json!(["a", "b"])), &labels).unwrap());
        assert!(!matches(&exprs("NotIn", serde_json::json!(["a"])), &labels).unwrap());
        assert!(matches(&exprs("Exists", serde_json::json!(null)), &labels).unwrap());
        assert!(!matches(&exprs("DoesNotExist", serde_json::json!(null)), &labels).unwrap());
    }

    #[test]
    fn an_unknown_operator_is_an_error_naming_it() {
        let s = sel(serde_json::json!({
            "matchLabels": {"role": "nobody"},
            "matchExpressions": [{"key": "zone", "operator": "Exists"}, {"key": "zone", "operator": "Gt", "values": ["1"]}]
        }));
        let e = matches(&s, &BTreeMap::new()).unwrap_err();
        assert_eq!(e, SelectorError::UnknownOperator { index: 1, operator: "Gt".into() });
        assert_eq!(e.to_string(), "unknown operator \"Gt\" (expected In, NotIn, Exists or DoesNotExist)");
        assert_eq!(e.field(), "matchExpressions[1].operator");
        assert_eq!(check(&s), Err(e));
    }
}
