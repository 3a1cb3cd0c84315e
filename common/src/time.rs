//! Wall-clock time for persistence and display. The pure cores never read a
//! clock: drivers read [`UnixMillis::now`] and `Instant::now()` and pass both in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The one place that reads the system's wall clock.
    #[allow(clippy::disallowed_methods)]
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    pub fn to_timestamp(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: i64::try_from(self.0 / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from((self.0 % 1000) * 1_000_000).unwrap_or(0),
        }
    }

    pub fn from_timestamp(ts: &prost_types::Timestamp) -> Self {
        let secs = u64::try_from(ts.seconds).unwrap_or(0);
        let millis = u64::try_from(ts.nanos / 1_000_000).unwrap_or(0);
        Self(secs.saturating_mul(1000).saturating_add(millis))
    }

    /// RFC 3339 in UTC with second precision, e.g. `2026-11-25T09:47:49Z`.
    pub fn to_rfc3339(self) -> String {
        let Ok(secs) = i64::try_from(self.0 / 1000) else {
            return self.0.to_string();
        };
        match time::OffsetDateTime::from_unix_timestamp(secs) {
            Ok(t) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => self.0.to_string(),
        }
    }
}

/// Converts a duration to whole milliseconds for the wire, saturating.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_round_trips() {
        let t = UnixMillis(1_764_064_069_123);
        assert_eq!(t.to_rfc3339(), "2025-11-25T09:47:49Z");
        assert_eq!(UnixMillis::from_timestamp(&t.to_timestamp()), t);
    }
}
