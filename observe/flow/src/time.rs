//! Times as flows print them (Hubble's `Jan _2 15:04:05.000`, UTC), as
//! users give them (`--since 5m`, `--until 2026-11-27T10:00:00Z`), and as the
//! wire carries them (`google.protobuf.Timestamp`). Times are unix ns in a
//! `u64` everywhere else.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

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

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    // Era-based conversion: 400-year eras of 146,097 days, years starting in March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `Nov 27 09:26:53.589` (UTC) of a unix time in ns.
pub fn stamp_milli(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (_, m, d) = civil(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{} {:>2} {:02}:{:02}:{:02}.{:03}",
        MONTHS[m as usize - 1],
        d,
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ns % 1_000_000_000 / 1_000_000
    )
}

/// RFC 3339 (UTC, with ns) of a unix time in ns.
pub fn rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z", sod / 3600, sod % 3600 / 60, sod % 60, ns % 1_000_000_000)
}

/// A duration like `30s`, `5m`, `1h30m`, `2d`, `500ms`, in ns.
pub fn parse_duration(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86_400e9,
            _ => return None,
        };
        total += (n * scale) as u64;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// `2026-11-27T10:00:00Z`, `2026-11-27T10:00:00.5+01:00` or `2026-11-27`, in unix ns.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim();
    let num = |a: usize, b: usize| -> Option<i64> { s.get(a..b)?.parse().ok() };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)? as u32, num(8, 10)? as u32);
    if s.get(4..5)? != "-" || s.get(7..8)? != "-" || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if s.len() == 10 {
        return u64::try_from(days * 86_400).ok().map(|x| x * 1_000_000_000);
    }
    if !matches!(s.get(10..11)?, "T" | "t" | " ") || s.get(13..14)? != ":" || s.get(16..17)? != ":" {
        return None;
    }
    let (h, mi, se) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let mut rest = &s[19..];
    let mut frac_ns = 0u64;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        let digits = &r[..n.min(9)];
        frac_ns = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) && &r[3..4] == ":" => {
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (r[1..3].parse::<i64>().ok()? * 3600 + r[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    Some(u64::try_from(secs).ok()? * 1_000_000_000 + frac_ns)
}

/// A time as `--since`/`--until` take it: relative to `now_ns` (`5m` means
/// five minutes ago) or absolute (RFC 3339).
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, String> {
    if let Some(d) = parse_duration(s) {
        return Ok(now_ns.saturating_sub(d));
    }
    parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is neither a duration (5m, 1h) nor an RFC 3339 time (2026-11-27T10:00:00Z)"))
}

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
        assert!(parse_time("yesterday", 0).is_err());
        for days in [-1000, 0, 19_000, 20_000, 30_000] {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
