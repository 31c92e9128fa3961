//! Durations and counts as operators read them in messages: `1 day 2h`, `1.5s`, `1 attempt`,
//! `3 attempts` (never `1day` or `1 attempts`).

use std::fmt;
use std::time::Duration;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// A duration for humans: whole days spelled out (`1 day`, `2 days`), then `h`, `m` and `s`,
/// zero parts left out (`1 day 2h`, `1h 30m`, `5m`, `20s`). Below a minute the seconds keep
/// their milliseconds (`1.5s`); below a second it is milliseconds (`500ms`), then
/// microseconds. Above a minute sub-second parts are dropped.
pub fn duration(d: Duration) -> String {
    Human(d).to_string()
}

/// `n` and `noun`, with an `s` unless `n` is 1: `1 attempt`, `0 attempts`, `3 attempts`.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// [`duration`] as a `Display` value, for format strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let secs = d.as_secs();
        if secs == 0 {
            let (ms, us) = (d.subsec_millis(), d.subsec_micros());
            return match (ms, us) {
                (0, 0) if d.subsec_nanos() > 0 => write!(f, "{}ns", d.subsec_nanos()),
                (0, 0) => f.write_str("0s"),
                (0, us) => write!(f, "{us}µs"),
                (ms, _) => write!(f, "{ms}ms"),
            };
        }
        if secs < MINUTE {
            let ms = d.subsec_millis();
            if ms == 0 {
                return write!(f, "{secs}s");
            }
            let frac = format!("{ms:03}");
            return write!(f, "{secs}.{}s", frac.trim_end_matches('0'));
        }
        let mut parts = Vec::new();
        let days = secs / DAY;
        if days > 0 {
            parts.push(count(days, "day"));
        }
        for (value, unit) in [
            (secs % DAY / HOUR, "h"),
            (secs % HOUR / MINUTE, "m"),
            (secs % MINUTE, "s"),
        ] {
            if value > 0 {
                parts.push(format!("{value}{unit}"));
            }
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        let s = Duration::from_secs;
        for (d, want) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(50), "50ns"),
            (Duration::from_micros(250), "250µs"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(10_050), "10.05s"),
            (s(20), "20s"),
            (s(60), "1m"),
            (s(300), "5m"),
            (s(3600), "1h"),
            (s(5400), "1h 30m"),
            (s(86_399), "23h 59m 59s"),
            (s(86_400), "1 day"),
            (s(90_000), "1 day 1h"),
            (s(2 * 86_400 + 3 * 3600 + 4 * 60 + 5), "2 days 3h 4m 5s"),
            (Duration::from_millis(61_500), "1m 1s"),
        ] {
            assert_eq!(duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn counts_are_singular_only_for_one() {
        assert_eq!(count(1u32, "attempt"), "1 attempt");
        assert_eq!(count(0u32, "attempt"), "0 attempts");
        assert_eq!(count(3u64, "attempt"), "3 attempts");
    }
}
