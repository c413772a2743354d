//! Hostnames as the Gateway API compares them: a listener's hostname and a
//! route's hostnames intersect, a request host is served by the most
//! specific listener hostname that matches it, and across routes the one
//! with the longest matching hostname goes first.
//!
//! A wildcard (`*.example.com`) matches any name with at least one more
//! label in front (`a.example.com`, `a.b.example.com`), never the bare
//! suffix (`example.com`), which is also how Envoy reads virtual host
//! domains and SNI server names.

use std::cmp::Ordering;

/// Whether `pattern` (exact or `*.`-wildcard) matches `host`, where `host`
/// may itself be a wildcard (then every name it matches must match `pattern`).
pub fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        None => !host.starts_with('*') && pattern.eq_ignore_ascii_case(host),
        // `suffix` keeps its leading dot: `*.a.com` never covers `a.com`.
        Some(suffix) => {
            let ends = |h: &str| {
                let (h, s) = (h.as_bytes(), suffix.as_bytes());
                h.len() > s.len() && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
            };
            match host.strip_prefix('*') {
                Some(host_suffix) => host_suffix.eq_ignore_ascii_case(suffix) || ends(host_suffix),
                None => ends(host),
            }
        }
    }
}

/// The hostnames a route serves under a listener: the intersection of the
/// listener's hostname (none: any) with the route's (none: any). `None`
/// when they do not intersect; `Some(["*"])` when neither restricts. Route
/// hostnames that are not DNS names (which the API's schema refuses too)
/// match nothing: they never become Envoy domains.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    if route.is_empty() {
        return Some(vec![listener.unwrap_or("*").to_owned()]);
    }
    let mut out: Vec<String> = Vec::new();
    for r in route.iter().filter(|r| valid(r)) {
        let Some(l) = listener else {
            if !out.contains(r) {
                out.push(r.clone());
            }
            continue;
        };
        // The narrower of the two, when one covers the other.
        let narrower = if covers(l, r) {
            Some(r.clone())
        } else if covers(r, l) {
            Some(l.to_owned())
        } else {
            None
        };
        if let Some(n) = narrower
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// How specific a hostname is, for ordering: exact before wildcard, then by
/// length; `*` (any) is the least specific. Greater is more specific.
pub fn specificity(host: &str) -> (bool, usize) {
    if host == "*" {
        return (false, 0);
    }
    (!host.starts_with('*'), host.len())
}

/// Orders hostnames most specific first.
pub fn most_specific_first(a: &str, b: &str) -> Ordering {
    specificity(b).cmp(&specificity(a)).then_with(|| a.cmp(b))
}

/// Checks a hostname as the API's schema does (RFC 1123 labels, an optional
/// leading `*.`), so that nothing else ever reaches Envoy's domains.
pub fn valid(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && host.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_deeper_names_but_not_their_suffix() {
        assert!(covers("*.example.com", "foo.example.com"));
        assert!(covers("*.example.com", "foo.bar.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "fooexample.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(covers("*.example.com", "*.bar.example.com"));
        assert!(!covers("*.bar.example.com", "*.example.com"));
        assert!(covers("foo.example.com", "FOO.example.com"));
        assert!(!covers("foo.example.com", "*.example.com"));
    }

    #[test]
    fn listener_and_route_hostnames_intersect_to_the_narrower() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(intersect(None, &[]), Some(v(&["*"])));
        assert_eq!(intersect(Some("very.specific.com"), &[]), Some(v(&["very.specific.com"])));
        assert_eq!(intersect(None, &v(&["a.com"])), Some(v(&["a.com"])));
        // The conformance suite's HTTPRouteHostnameIntersection cases.
        assert_eq!(
            intersect(Some("*.wildcard.io"), &v(&["bar.wildcard.io", "foo.bar.wildcard.io", "non.matching.com"])),
            Some(v(&["bar.wildcard.io", "foo.bar.wildcard.io"]))
        );
        assert_eq!(intersect(Some("very.specific.com"), &v(&["*.specific.com"])), Some(v(&["very.specific.com"])));
        assert_eq!(
            intersect(Some("*.anotherwildcard.io"), &v(&["*.anotherwildcard.io"])),
            Some(v(&["*.anotherwildcard.io"]))
        );
        assert_eq!(intersect(Some("*.wildcard.io"), &v(&["*.foo.wildcard.io"])), Some(v(&["*.foo.wildcard.io"])));
        assert_eq!(intersect(Some("very.specific.com"), &v(&["non.matching.com", "*.nonmatchingwildcard.io"])), None);
        assert_eq!(intersect(None, &v(&["bad host", "ok.com"])), Some(v(&["ok.com"])));
        assert_eq!(intersect(None, &v(&["bad host"])), None, "only bad names: nothing, not everything");
    }

    #[test]
    fn exact_names_are_more_specific_than_wildcards_and_longer_more_than_shorter() {
        let mut hosts = vec!["*", "*.example.com", "a.example.com", "*.b.example.com"];
        hosts.sort_by(|a, b| most_specific_first(a, b));
        assert_eq!(hosts, ["a.example.com", "*.b.example.com", "*.example.com", "*"]);
    }

    #[test]
    fn hostnames_are_checked_like_the_schema_does() {
        assert!(valid("foo.example.com") && valid("*.example.com") && valid("localhost"));
        assert!(!valid("*") && !valid("foo.*.com") && !valid("Foo.com") && !valid("a..b") && !valid("-a.com"));
        assert!(!valid("a.com:80") && !valid("1.2.3.4/8"));
    }
}
