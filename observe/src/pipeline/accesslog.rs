//! Envoy's access log as the agent has Envoy write it: one JSON object per
//! HTTP exchange and line, with the keys of [`FORMAT`] (Envoy's command
//! operators in a `json_format`), and the parser that turns a line into an
//! [`L7Entry`]. The lines reach the agent through a spool file
//! (the `spool` module beside this one), which keeps them while the agent
//! is away.
//!
//! A line is input from a process tenants' traffic drives: nothing in it
//! is trusted. A line that does not parse is an error the reader counts
//! as a lost entry; no value in it can make the parser panic.

use std::{net::SocketAddrV4, str::FromStr};

use serde::Deserialize;

use super::record::{Http, L7Entry};

/// The access-log format: a JSON key per value, and the Envoy command
/// operator that fills it. Durations and times in nanoseconds; absent
/// values are `null`. Short keys: every byte is written for every request.
pub const FORMAT: &[(&str, &str)] = &[
    ("start", "%START_TIME(%s.%9f)%"),
    // Time to the last byte sent to the client.
    ("duration", "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:ns)%"),
    ("method", "%REQ(:METHOD)%"),
    ("scheme", "%REQ(:SCHEME)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("path", "%REQ(:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("code", "%RESPONSE_CODE%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("traceparent", "%REQ(TRACEPARENT)%"),
    ("tracestate", "%REQ(TRACESTATE)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("route", "%ROUTE_NAME%"),
    ("cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream", "%UPSTREAM_HOST%"),
    ("upstream_local", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("flags", "%RESPONSE_FLAGS%"),
    ("client", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("server", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    // The node's policy listener: the RBAC policy that allowed the request,
    // and the one that governed it (see [`policy_id`]).
    ("policy", "%DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_effective_policy_id)%"),
    ("governing", "%DYNAMIC_METADATA(envoy.filters.http.rbac:shadow_effective_policy_id)%"),
    // Which Envoy process wrote the line: the id the agent gave it in its
    // environment ([`WRITER_ENV`]), so lines are counted per Envoy against
    // the requests it served (entries it could not write are counted lost).
    ("envoy", "%ENVIRONMENT(WEFT_ENVOY_ID)%"),
];

/// The environment variable the agent starts Envoy with: a number unique to
/// that Envoy process on the node, larger for a later one (the start time
/// in unix ns). Each line carries it (the `envoy` key of [`FORMAT`]).
pub const WRITER_ENV: &str = "WEFT_ENVOY_ID";

/// The id the agent gives an RBAC policy of its policy listener: the rule id
/// of the network policy, the direction, and a number that keeps ids apart.
pub fn policy_id(rule_id: u32, ingress: bool, n: usize) -> String {
    format!("{rule_id}/{}/{n}", if ingress { "ingress" } else { "egress" })
}

/// The rule id and direction (`abi::DIR_*`) a [`policy_id`] names.
pub fn parse_policy_id(id: &str) -> Option<(u32, u8)> {
    let mut parts = id.split('/');
    let rule = parts.next()?.parse().ok()?;
    let dir = match parts.next()? {
        "ingress" => weft_ebpf::abi::DIR_INGRESS,
        "egress" => weft_ebpf::abi::DIR_EGRESS,
        _ => return None,
    };
    Some((rule, u8::try_from(dir).ok()?))
}

/// Why a line is not an entry.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not a JSON object of the format's keys and types.
    Json(String),
    /// `start` is not `<seconds>.<nanoseconds>`.
    Start(String),
    /// Longer than the reader accepts.
    TooLong(usize),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Json(e) => write!(f, "not an access-log entry: {e}"),
            LineError::Start(s) => write!(f, "start time {s:?} is not <seconds>.<nanoseconds>"),
            LineError::TooLong(n) => write!(f, "a line of {n} bytes or more"),
        }
    }
}

#[derive(Deserialize)]
struct Line {
    start: Option<String>,
    duration: Option<u64>,
    method: Option<String>,
    scheme: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    protocol: Option<String>,
    code: Option<u32>,
    request_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    user_agent: Option<String>,
    route: Option<String>,
    cluster: Option<String>,
    upstream: Option<String>,
    upstream_local: Option<String>,
    flags: Option<String>,
    client: Option<String>,
    server: Option<String>,
    policy: Option<String>,
    governing: Option<String>,
    envoy: Option<String>,
}

/// `<seconds>.<nanoseconds>` (nine digits at most) as unix ns.
fn unix_ns(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let nanos: u64 = match frac.len() {
        0 => 0,
        n => frac.parse::<u64>().ok()?.checked_mul(10u64.checked_pow(9u32.checked_sub(u32::try_from(n).ok()?)?)?)?,
    };
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

fn addr(s: Option<&str>) -> Option<SocketAddrV4> {
    SocketAddrV4::from_str(s?).ok()
}

fn protocol(p: Option<&str>) -> &'static str {
    match p {
        Some("HTTP/1.0") => "HTTP/1.0",
        Some("HTTP/1.1") => "HTTP/1.1",
        Some("HTTP/2") => "HTTP/2",
        Some("HTTP/3") => "HTTP/3",
        _ => "HTTP",
    }
}

/// One line (without its newline) as an entry.
pub fn parse(line: &[u8]) -> Result<L7Entry, LineError> {
    parse_entry(line).map(|(e, _)| e)
}

/// One line as an entry, and the id of the Envoy that wrote it
/// ([`WRITER_ENV`]; `None` when the line has none, e.g. an Envoy started
/// without it).
pub fn parse_entry(line: &[u8]) -> Result<(L7Entry, Option<u64>), LineError> {
    let l: Line = serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
    let start_ns = match l.start.as_deref() {
        None => 0,
        Some(s) => unix_ns(s).ok_or_else(|| LineError::Start(s.chars().take(64).collect()))?,
    };
    let text = |v: Option<String>| v.unwrap_or_default();
    let http = Http {
        method: text(l.method),
        scheme: text(l.scheme),
        authority: text(l.authority),
        path: text(l.path),
        protocol: protocol(l.protocol.as_deref()),
        code: l.code.unwrap_or(0),
        start_ns,
        duration_ns: l.duration.unwrap_or(0),
        request_id: text(l.request_id),
        traceparent: text(l.traceparent),
        tracestate: text(l.tracestate),
        user_agent: text(l.user_agent),
        route: text(l.route),
        upstream_cluster: text(l.cluster),
        upstream: addr(l.upstream.as_deref()),
        upstream_local: addr(l.upstream_local.as_deref()),
        // Envoy writes "-" when no flag is set.
        response_flags: l.flags.filter(|f| f != "-").unwrap_or_default(),
        policy: text(l.policy),
        governing_policy: text(l.governing),
        downstream_link: None,
        upstream_link: None,
    };
    let writer = l.envoy.and_then(|w| w.parse().ok());
    Ok((L7Entry { http, client: addr(l.client.as_deref()), server: addr(l.server.as_deref()) }, writer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two lines as Envoy 1.40 wrote them with [`FORMAT`]: a proxied
    /// request, and one Envoy refused (no route, no upstream).
    const PROXIED: &str = r#"{"authority":"hello.default","client":"10.1.1.11:43952","cluster":"default/hello-v1","code":200,"duration":3052511,"flags":"-","method":"GET","path":"/api/items/1?q=\"x\"","protocol":"HTTP/1.1","request_id":"780f744c-f856-4445-8ca8-4be1e3982320","route":null,"scheme":"http","server":"10.96.0.20:80","start":"1796100408.747686000","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","tracestate":null,"upstream":"10.1.2.11:8080","upstream_local":"192.168.50.1:39874","user_agent":"lab"}"#;
    const REFUSED: &str = r#"{"authority":null,"client":"127.0.0.1:53582","cluster":null,"code":426,"duration":138650,"flags":"DPE","method":null,"path":null,"protocol":"HTTP/1.1","request_id":null,"route":null,"scheme":null,"server":"127.0.0.1:39181","start":"1796100408.941077000","traceparent":null,"tracestate":null,"upstream":null,"upstream_local":null,"user_agent":null}"#;

    #[test]
    fn envoys_lines_become_entries() {
        let e = parse(PROXIED.as_bytes()).unwrap();
        let h = &e.http;
        assert_eq!(
            (h.method.as_str(), h.authority.as_str(), h.path.as_str()),
            ("GET", "hello.default", "/api/items/1?q=\"x\"")
        );
        assert_eq!((h.code, h.protocol, h.scheme.as_str()), (200, "HTTP/1.1", "http"));
        assert_eq!((h.start_ns, h.duration_ns), (1_796_100_408_747_686_000, 3_052_511));
        assert_eq!(h.upstream, Some("10.1.2.11:8080".parse().unwrap()));
        assert_eq!(h.upstream_local, Some("192.168.50.1:39874".parse().unwrap()));
        assert_eq!(h.upstream_cluster, "default/hello-v1");
        assert_eq!(h.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!((h.response_flags.as_str(), h.route.as_str(), h.tracestate.as_str()), ("", "", ""));
        assert_eq!(e.client, Some("10.1.1.11:43952".parse().unwrap()));
        assert_eq!(e.server, Some("10.96.0.20:80".parse().unwrap()));

        let r = parse(REFUSED.as_bytes()).unwrap();
        assert_eq!((r.http.code, r.http.response_flags.as_str(), r.http.method.as_str()), (426, "DPE", ""));
        assert_eq!((r.http.upstream, r.http.upstream_cluster.as_str()), (None, ""));
        assert_eq!(parse_entry(REFUSED.as_bytes()).unwrap().1, None, "a line of an Envoy without the id");
        let with_id = PROXIED.replace("}", r#","envoy":"1796100408000000001"}"#);
        assert_eq!(parse_entry(with_id.as_bytes()).unwrap().1, Some(1_796_100_408_000_000_001));
        let key = FORMAT.iter().find(|(k, _)| *k == "envoy").unwrap().1;
        assert_eq!(key, format!("%ENVIRONMENT({WRITER_ENV})%"));
    }

    #[test]
    fn bad_lines_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[]",
            "{\"code\": -1}",
            "{\"code\": 99999999999}",
            "{\"duration\": \"soon\"}",
            "{\"start\": \"yesterday\"}",
            "{\"start\": \"1.0000000001\"}",
            "{\"start\": \"99999999999999999999.5\"}",
            "{\"start\": \"1.-5\"}",
            "{\"method\": 7}",
            "{\"client\": {}}",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        // Unknown keys and odd addresses are tolerated: the rest is good.
        let e = parse(br#"{"code":200,"future":1,"client":"[::1]:5","upstream":"pipe"}"#).unwrap();
        assert_eq!((e.http.code, e.client, e.http.upstream), (200, None, None));
        assert_eq!(unix_ns("12"), Some(12_000_000_000));
        assert_eq!(unix_ns("12.5"), Some(12_500_000_000));
    }
}
