//! Wall-clock time as the worker and its tools exchange it: Unix
//! milliseconds in headers and events, RFC 3339 for people.
//!
//! One definition of each, so that a stamp written by the worker and one
//! read by an operator tool can never disagree on the epoch, the unit or
//! the rounding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

/// Unix milliseconds now, by the wall clock every replica shares (the unit
/// of `cpw-first-attempt-ms`); 0 for a clock set before the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// A duration in whole milliseconds, saturating: a duration too long for a
/// `u64` of milliseconds is longer than anything it is compared with.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Unix milliseconds as RFC 3339 (UTC) with three digits of milliseconds,
/// always (`…51.180Z`, never `…51.18Z`: every time a tool prints lines up),
/// or `None` for a value no calendar holds (a corrupt header must not stop a
/// listing).
pub fn rfc3339_ms(ms: u64) -> Option<String> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(crate::contract::RFC3339_MILLIS)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            rfc3339_ms(1_700_000_000_180).as_deref(),
            Some("2023-11-14T22:13:20.180Z")
        );
        assert_eq!(
            rfc3339_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(rfc3339_ms(u64::MAX), None);
    }

    #[test]
    fn durations_saturate_in_milliseconds() {
        assert_eq!(millis(Duration::from_secs(3)), 3_000);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert!(now_ms() > 1_700_000_000_000, "a clock after 2023");
    }
}
