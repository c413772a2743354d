//! Times as flows print them (Hubble's `Jan _2 15:04:05.000`, UTC), as
//! users give them (`--since 5m`, `--until 2026-11-27T10:00:00Z`), and as the
//! wire carries them (`google.protobuf.Timestamp`). Times are unix ns in a
//! `u64` everywhere else. The calendar (formatting and parsing dates) is
//! jiff's.

use std::time::{SystemTime, UNIX_EPOCH};

use jiff::{Span, SpanRelativeTo, Timestamp, civil::Date, tz::TimeZone};

/// Wall-clock now, unix ns.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A unix time in ns as a protobuf timestamp.
pub fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ns / 1_000_000_000) as i64, nanos: (ns % 1_000_000_000) as i32 }
}

/// A protobuf timestamp as unix ns (times before 1970 are 0, past 2554 the
/// largest).
pub fn ns_of(t: &prost_types::Timestamp) -> u64 {
    ns_of_parts(t.seconds, t.nanos)
}

/// Seconds and nanoseconds from the wire (a `Timestamp` or a `Duration`, of
/// any crate's generated type) as ns: negative is 0, too large the largest,
/// so no value a peer sends can overflow.
pub fn ns_of_parts(seconds: i64, nanos: i32) -> u64 {
    u64::try_from(seconds).unwrap_or(0).saturating_mul(1_000_000_000).saturating_add(u64::try_from(nanos).unwrap_or(0))
}

fn instant(ns: u64) -> Timestamp {
    // Every u64 of ns (until 2554) is a valid jiff timestamp.
    Timestamp::from_nanosecond(i128::from(ns)).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn ns_since_epoch(t: Timestamp) -> Option<u64> {
    u64::try_from(t.as_nanosecond()).ok()
}

/// `Nov 27 09:26:53.589` (UTC) of a unix time in ns.
pub fn stamp_milli(ns: u64) -> String {
    instant(ns).strftime("%b %e %H:%M:%S%.3f").to_string()
}

/// RFC 3339 (UTC, with ns) of a unix time in ns.
pub fn rfc3339(ns: u64) -> String {
    instant(ns).strftime("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

/// A duration like `30s`, `5m`, `1h30m`, `2d`, `500ms`, in ns (days are 24
/// hours). Negative durations are not durations here.
pub fn parse_duration(s: &str) -> Option<u64> {
    let span: Span = s.trim().parse().ok()?;
    let d = span.to_duration(SpanRelativeTo::days_are_24_hours()).ok()?;
    u64::try_from(d.as_nanos()).ok()
}

/// `2026-11-27T10:00:00Z`, `2026-11-27T10:00:00.5+01:00` or `2026-11-27`, in unix ns.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Ok(t) = s.parse::<Timestamp>() {
        return ns_since_epoch(t);
    }
    let day: Date = s.parse().ok()?;
    ns_since_epoch(day.to_zoned(TimeZone::UTC).ok()?.timestamp())
}

/// A time as `--since`/`--until` take it: relative to `now_ns` (`5m` means
/// five minutes ago) or absolute (RFC 3339).
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, NotATime> {
    if let Some(d) = parse_duration(s) {
        return Ok(now_ns.saturating_sub(d));
    }
    parse_rfc3339(s).ok_or_else(|| NotATime(s.to_owned()))
}

/// A `--since`/`--until` value that is neither a duration nor a time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a duration (5m, 1h) nor an RFC 3339 time (2026-11-27T10:00:00Z)")]
pub struct NotATime(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    /// Times from the wire never overflow: Envoy's and clients' timestamps
    /// reach year 9999 and durations 10,000 years (both past u64 ns).
    #[test]
    fn wire_times_saturate() {
        assert_eq!(ns_of_parts(1, 5), 1_000_000_005);
        assert_eq!(ns_of_parts(-5, 7), 7);
        assert_eq!(ns_of_parts(3, -1), 3_000_000_000);
        assert_eq!(ns_of_parts(253_402_300_799, 999_999_999), u64::MAX);
        assert_eq!(ns_of_parts(i64::MAX, i32::MAX), u64::MAX);
    }

    #[test]
    fn formats_and_parses() {
        // 2025-03-14T09:26:53.589Z, the wire-contract sheet's example.
        let t = parse_rfc3339("2025-03-14T09:26:53.589Z").unwrap();
        assert_eq!(stamp_milli(t), "Mar 14 09:26:53.589");
        assert_eq!(rfc3339(t), "2025-03-14T09:26:53.589000000Z");
        assert_eq!(parse_rfc3339("2025-03-14T10:26:53.589+01:00"), Some(t));
        assert_eq!(stamp_milli(parse_rfc3339("2026-11-02T00:00:00Z").unwrap()), "Nov  2 00:00:00.000");
        assert_eq!(parse_rfc3339("1970-01-01"), Some(0));
        assert_eq!(parse_duration("1h30m"), Some(5400 * 1_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_time("10s", 20_000_000_000), Ok(10_000_000_000));
        assert_eq!(parse_time("yesterday", 0), Err(NotATime("yesterday".into())));
    }

    #[test]
    fn durations_as_hubble_takes_them() {
        assert_eq!(parse_duration("2d"), Some(2 * 86_400 * 1_000_000_000));
        assert_eq!(parse_duration("1.5h"), Some(5400 * 1_000_000_000));
        assert_eq!(parse_duration("300us"), Some(300_000));
        assert_eq!(parse_duration("-5m"), None);
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339("2026-13-01"), None);
    }
}
