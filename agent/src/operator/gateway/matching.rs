//! Route matches and their order, as Envoy route entries: one entry per
//! match of a rule (a rule's matches are alternatives), ordered by the
//! Gateway API's precedence, which Envoy's first-match-wins then honours.
//!
//! Precedence within a host: Exact paths, then the longest PathPrefix (a
//! RegularExpression path ranks between the two, longest first: its order is
//! implementation-specific), then a method match, then the most header
//! matches, then the most query-parameter matches; ties go to the oldest
//! route, then to the first by `namespace/name`, then to rule and match order.

use std::cmp::Reverse;

use serde_json::{Value, json};

/// A match or duration a route rule gives that weft cannot serve; the rule's
/// translation says which field it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    #[error("path {0:?} must start with '/'")]
    RelativePath(String),
    #[error("path type {0:?} is not Exact, PathPrefix or RegularExpression")]
    PathType(String),
    #[error("header match type {0:?} is not Exact or RegularExpression")]
    HeaderType(String),
    #[error("query parameter match type {0:?} is not Exact or RegularExpression")]
    QueryType(String),
    #[error("duration {0:?} is not like 1h, 10s, 500ms or 1m30s")]
    Duration(String),
}

/// A path match: (rank, Envoy `RouteMatch` path fields). Rank 0: exact; 1:
/// regular expression; 2: prefix.
pub fn path(kind: &str, value: &str) -> Result<(u8, Value), MatchError> {
    match kind {
        "Exact" | "PathPrefix" if !value.starts_with('/') => Err(MatchError::RelativePath(value.into())),
        "Exact" => Ok((0, json!({ "path": value }))),
        "PathPrefix" if value.trim_end_matches('/').is_empty() => Ok((2, json!({ "prefix": "/" }))),
        // Whole path elements: /foo matches /foo and /foo/bar, not /foobar; a trailing / is ignored.
        "PathPrefix" => Ok((2, json!({ "path_separated_prefix": value.trim_end_matches('/') }))),
        "RegularExpression" => Ok((1, json!({ "safe_regex": { "regex": value } }))),
        other => Err(MatchError::PathType(other.into())),
    }
}

/// A header (or gRPC metadata) match on `name`.
pub fn header(kind: &str, name: &str, value: &str) -> Result<Value, MatchError> {
    let string_match = match kind {
        "Exact" => json!({ "exact": value }),
        "RegularExpression" => json!({ "safe_regex": { "regex": value } }),
        other => return Err(MatchError::HeaderType(other.into())),
    };
    Ok(json!({ "name": name.to_ascii_lowercase(), "string_match": string_match }))
}

/// A query parameter match on `name`.
pub fn query(kind: &str, name: &str, value: &str) -> Result<Value, MatchError> {
    let string_match = match kind {
        "Exact" => json!({ "exact": value }),
        "RegularExpression" => json!({ "safe_regex": { "regex": value } }),
        other => return Err(MatchError::QueryType(other.into())),
    };
    Ok(json!({ "name": name, "string_match": string_match }))
}

/// Where a route entry stands among the entries of one host (smaller first).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    pub path_rank: u8,
    pub path_len: Reverse<usize>,
    pub method: Reverse<bool>,
    pub headers: Reverse<usize>,
    pub queries: Reverse<usize>,
    /// The route's creation time (RFC 3339 sorts as text), then `namespace/name`.
    pub created: String,
    pub route: String,
    pub rule: usize,
    pub matched: usize,
}

/// A Gateway API duration (`1h`, `500ms`, `1m30s`: up to four number-unit
/// pairs, each number up to five digits) in milliseconds.
pub fn duration_ms(text: &str) -> Result<u64, MatchError> {
    let bad = || MatchError::Duration(text.into());
    let mut total: u64 = 0;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        parts += 1;
        total = n.checked_mul(unit).and_then(|ms| total.checked_add(ms)).ok_or_else(bad)?;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// Milliseconds as an Envoy (proto-JSON) duration: `1.500s`.
pub fn envoy_duration(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefixes_match_whole_elements_and_ignore_a_trailing_slash() {
        assert_eq!(path("PathPrefix", "/").unwrap(), (2, json!({ "prefix": "/" })));
        assert_eq!(path("PathPrefix", "/v2/").unwrap(), (2, json!({ "path_separated_prefix": "/v2" })));
        assert_eq!(path("Exact", "/one").unwrap(), (0, json!({ "path": "/one" })));
        assert_eq!(path("RegularExpression", "/a.*").unwrap().0, 1);
        assert!(path("Exact", "one").unwrap_err().to_string().contains("must start with '/'"));
        assert_eq!(path("Exact", "one"), Err(MatchError::RelativePath("one".into())));
        assert_eq!(header("Prefix", "x", "y"), Err(MatchError::HeaderType("Prefix".into())));
        assert!(path("Glob", "/").is_err());
    }

    #[test]
    fn durations_read_like_the_api_writes_them() {
        assert_eq!(duration_ms("1s"), Ok(1_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("1h1m1s1ms"), Ok(3_661_001));
        assert_eq!(duration_ms("0s"), Ok(0));
        for bad in ["", "1", "s", "1d", "123456s", "1s1s1s1s1s", "-1s", "1.5s", "١s"] {
            assert!(duration_ms(bad).is_err(), "{bad:?}");
        }
        assert_eq!(envoy_duration(1_500), "1.500s");
        assert_eq!(envoy_duration(0), "0.000s");
    }

    #[test]
    fn precedence_puts_exact_before_longer_prefixes_before_shorter_and_more_matches_first() {
        let p = |path_rank, len, method, headers, queries, created: &str| Precedence {
            path_rank,
            path_len: Reverse(len),
            method: Reverse(method),
            headers: Reverse(headers),
            queries: Reverse(queries),
            created: created.into(),
            route: String::new(),
            rule: 0,
            matched: 0,
        };
        let mut v = [
            p(2, 1, false, 0, 0, "b"),
            p(2, 5, false, 0, 0, "b"),
            p(0, 2, false, 0, 0, "b"),
            p(2, 5, false, 2, 0, "b"),
            p(2, 5, true, 0, 0, "b"),
            p(2, 5, false, 0, 0, "a"),
        ];
        v.sort();
        let order: Vec<(u8, usize, bool, usize, String)> =
            v.iter().map(|p| (p.path_rank, p.path_len.0, p.method.0, p.headers.0, p.created.clone())).collect();
        assert_eq!(
            order,
            [
                (0, 2, false, 0, "b".into()),
                (2, 5, true, 0, "b".into()),
                (2, 5, false, 2, "b".into()),
                (2, 5, false, 0, "a".into()),
                (2, 5, false, 0, "b".into()),
                (2, 1, false, 0, "b".into()),
            ]
        );
    }
}
