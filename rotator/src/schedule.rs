//! When to renew: the pure renewal rule, the retry backoff, and cron schedules.
//!
//! Nothing here reads a clock or a random number generator: `now` and jitter samples are
//! arguments, so every decision can be tested exhaustively.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use proxy_lib::validity::Window;

/// The longest the daemon ever sleeps before looking at the wall clock again (suspends and
/// clock steps are noticed within this much time).
pub const MAX_SLEEP: Duration = Duration::from_secs(300);

/// The times that matter for renewing one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertTimes {
    /// When the cert was received (or, for a cert found on disk, notBefore + skew allowance).
    pub issued: SystemTime,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

impl CertTimes {
    /// A cert just received at `now`.
    pub fn received(now: SystemTime, not_before: SystemTime, not_after: SystemTime) -> Self {
        Self {
            issued: now.clamp(not_before.min(not_after), not_after),
            not_before,
            not_after,
        }
    }

    /// A cert found on disk: the issuer backdated notBefore by `skew`, so it was issued at
    /// notBefore + skew (never later than notAfter).
    pub fn found_on_disk(not_before: SystemTime, not_after: SystemTime, skew: Duration) -> Self {
        Self {
            issued: (not_before + skew).min(not_after),
            not_before,
            not_after,
        }
    }

    /// notAfter − notBefore.
    pub fn lifetime(&self) -> Duration {
        Window::new(self.not_before, self.not_after).lifetime()
    }

    /// notAfter − issued: the part of the life the rotator can plan with.
    pub fn usable_life(&self) -> Duration {
        self.not_after
            .duration_since(self.issued)
            .unwrap_or_default()
    }

    /// The latest instant the rotator lets a renewal wait for: notAfter − margin·lifetime.
    pub fn latest(&self, policy: &Policy) -> SystemTime {
        let m = self.lifetime().mul_f64(policy.margin);
        self.not_after.checked_sub(m).unwrap_or(self.not_before)
    }
}

/// The renewal policy (validated by the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Fraction of the usable life after which to renew, in (0, 1).
    pub renew_at: f64,
    /// ± fraction of the usable life, in [0, 0.5).
    pub jitter: f64,
    /// Fraction of the lifetime kept as a safety margin before notAfter.
    pub margin: f64,
    /// Backdating of notBefore assumed for certs found on disk.
    pub clock_skew: Duration,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Retry delay cap.
    pub backoff_max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        use crate::config::*;
        Self {
            renew_at: DEFAULT_RENEW_AT,
            jitter: DEFAULT_JITTER,
            margin: DEFAULT_MARGIN,
            clock_skew: DEFAULT_CLOCK_SKEW,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// What to do about a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Renew at once.
    RenewNow,
    /// Renew at this instant (always after `now`).
    At(SystemTime),
}

/// The renewal instant for `cert` at `now`: issued + (renew_at + jitter·sample)·(notAfter −
/// issued), never after notAfter − margin; "renew now" when that is not in the future.
///
/// `sample` is a jitter sample in [-1, 1] (clamped). With a cron `schedule`, the cert is
/// renewed at the first fire time after it was issued, or at notAfter − margin if that
/// comes first. Pure.
pub fn next_renewal(
    cert: &CertTimes,
    now: SystemTime,
    policy: &Policy,
    sample: f64,
    schedule: Option<&CronSchedule>,
) -> Decision {
    let latest = cert.latest(policy);
    let target = match schedule {
        Some(cron) => cron
            .next_after(cert.issued)
            .map_or(latest, |t| t.min(latest)),
        None => {
            let s = if sample.is_finite() {
                sample.clamp(-1.0, 1.0)
            } else {
                0.0
            };
            let frac = (policy.renew_at + policy.jitter * s).clamp(0.0, 1.0);
            (cert.issued + cert.usable_life().mul_f64(frac)).min(latest)
        }
    };
    if target <= now {
        Decision::RenewNow
    } else {
        Decision::At(target)
    }
}

/// The delay before retry number `attempt` (0 for the first retry): exponential from
/// `backoff_min`, capped at `backoff_max`, with full jitter (`sample` in [0, 1]) but never
/// below `backoff_min`. Pure.
pub fn backoff(attempt: u32, policy: &Policy, sample: f64) -> Duration {
    let cap = policy
        .backoff_min
        .saturating_mul(1u32 << attempt.min(30))
        .min(policy.backoff_max);
    let s = if sample.is_finite() {
        sample.clamp(0.0, 1.0)
    } else {
        1.0
    };
    cap.mul_f64(s).max(policy.backoff_min)
}

/// When to retry after a failed renewal at `now`: `now` + [`backoff`], but never past
/// notAfter − margin of the cert still in place (unless that moment has already passed). Pure.
pub fn retry_at(
    now: SystemTime,
    attempt: u32,
    cert: Option<&CertTimes>,
    policy: &Policy,
    sample: f64,
) -> SystemTime {
    let t = now + backoff(attempt, policy, sample);
    match cert {
        Some(c) if c.latest(policy) > now => t.min(c.latest(policy)),
        _ => t,
    }
}

/// How long to sleep toward `deadline`: never more than [`MAX_SLEEP`] (so a suspend or
/// clock step is noticed), zero when the deadline has passed. Pure.
pub fn sleep_for(now: SystemTime, deadline: SystemTime) -> Duration {
    deadline
        .duration_since(now)
        .unwrap_or_default()
        .min(MAX_SLEEP)
}

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule {expr:?}: {reason}")]
pub struct CronError {
    /// The expression.
    pub expr: String,
    /// What was wrong.
    pub reason: String,
}

/// A cron schedule (UTC): a standard 5-field crontab line, or the `cron` crate's own
/// 6/7-field form (seconds first, optional year).
///
/// A 5-field line is translated for the crate: `0` seconds is prepended, and numeric
/// weekdays (crontab: 0–7, Sunday = 0 or 7) are rewritten to the crate's 1–7 counted from
/// Sunday, including ranges, lists and steps; weekday names pass through. As in crontab,
/// when both day-of-month and day-of-week are restricted the schedule fires when *either*
/// matches.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    source: String,
    schedules: Vec<cron::Schedule>,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl CronSchedule {
    /// Parses a crontab line or a 6/7-field cron expression.
    pub fn parse(expr: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError {
            expr: expr.to_string(),
            reason,
        };
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let crate_exprs = match fields.len() {
            1 if fields[0].starts_with('@') => vec![fields[0].to_string()],
            5 => {
                let [min, hour, dom, mon, dow] =
                    [fields[0], fields[1], fields[2], fields[3], fields[4]];
                let dow = translate_weekdays(dow).map_err(err)?;
                let restricted = |f: &str| f != "*" && f != "?";
                if restricted(dom) && restricted(&dow) {
                    // crontab: either field matching fires; the crate requires both.
                    vec![
                        format!("0 {min} {hour} {dom} {mon} *"),
                        format!("0 {min} {hour} * {mon} {dow}"),
                    ]
                } else {
                    vec![format!("0 {min} {hour} {dom} {mon} {dow}")]
                }
            }
            6 | 7 => vec![fields.join(" ")],
            n => {
                return Err(err(format!(
                    "expected 5 fields (crontab) or 6/7 fields (seconds first), got {n}"
                )));
            }
        };
        let schedules = crate_exprs
            .iter()
            .map(|e| cron::Schedule::from_str(e).map_err(|x| err(x.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            source: expr.to_string(),
            schedules,
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first fire time strictly after `t`, if any.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let after: DateTime<Utc> = t.into();
        self.schedules
            .iter()
            .filter_map(|s| s.after(&after).next())
            .min()
            .map(SystemTime::from)
    }
}

/// Rewrites a crontab weekday field (0–7, Sunday = 0 or 7) into the cron crate's 1–7 from
/// Sunday. Numeric items (values, ranges, steps, `*/n`) are expanded to the days they
/// denote; items with names pass through unchanged.
fn translate_weekdays(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let mut out: Vec<String> = Vec::new();
    let mut days = [false; 7]; // indexed by crontab day, Sunday = 0
    for item in field.split(',') {
        if item.chars().any(|c| c.is_ascii_alphabetic()) {
            out.push(item.to_string());
            continue;
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s
                    .parse()
                    .map_err(|_| format!("weekday step {s:?} is not a number"))?;
                if s == 0 {
                    return Err("weekday step must not be 0".into());
                }
                (r, s)
            }
            None => (item, 1),
        };
        let num = |s: &str| -> Result<u32, String> {
            let n: u32 = s
                .parse()
                .map_err(|_| format!("weekday {s:?} is not a number from 0 to 7"))?;
            if n > 7 {
                return Err(format!("weekday {n} is out of range 0-7"));
            }
            Ok(n)
        };
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("weekday range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = num(range)?;
            // "n/s" in crontab means from n to the end of the range.
            (a, if item.contains('/') { 7 } else { a })
        };
        let mut d = lo;
        while d <= hi {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    for (i, on) in days.iter().enumerate() {
        if *on {
            out.push((i + 1).to_string());
        }
    }
    if out.is_empty() {
        return Err(format!("weekday field {field:?} selects no day"));
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    const H: u64 = 3600;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn day_cert(issued: u64) -> CertTimes {
        CertTimes::received(at(issued), at(issued - 20), at(issued - 20 + 24 * H))
    }

    #[test]
    fn renews_at_70_percent_of_the_life_left_when_received() {
        let p = Policy::default();
        let c = day_cert(1_000_000);
        let d = next_renewal(&c, at(1_000_000), &p, 0.0, None);
        let expect = c.issued + c.usable_life().mul_f64(0.7);
        assert_eq!(d, Decision::At(expect));
        // Jitter moves it by at most 10 % of the life either way.
        let Decision::At(lo) = next_renewal(&c, at(1_000_000), &p, -1.0, None) else {
            panic!()
        };
        let Decision::At(hi) = next_renewal(&c, at(1_000_000), &p, 1.0, None) else {
            panic!()
        };
        assert_eq!(lo, c.issued + c.usable_life().mul_f64(0.6));
        assert_eq!(hi, c.issued + c.usable_life().mul_f64(0.8));
        // Past the point it is "renew now".
        assert_eq!(next_renewal(&c, hi, &p, 1.0, None), Decision::RenewNow);
    }

    #[test]
    fn a_cert_found_on_disk_counts_from_not_before_plus_skew() {
        let c = CertTimes::found_on_disk(at(100), at(100 + 10), Duration::from_secs(20));
        assert_eq!(c.issued, at(110), "clamped to notAfter");
        let c = CertTimes::found_on_disk(at(100), at(100 + 1000), Duration::from_secs(20));
        assert_eq!(c.issued, at(120));
    }

    #[test]
    fn short_test_lifetimes_measure_from_receipt() {
        // A 10 s cert backdated 20 s: received when only 10 s of its 30 s window remain.
        let c = CertTimes::received(at(1000), at(980), at(1010));
        let p = Policy::default();
        let Decision::At(t) = next_renewal(&c, at(1000), &p, 0.0, None) else {
            panic!()
        };
        assert_eq!(t, at(1007));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let p = Policy::default();
        assert_eq!(backoff(0, &p, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, &p, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(20, &p, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX, &p, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(5, &p, 0.5), Duration::from_secs(16));
        assert_eq!(backoff(5, &p, 0.0), p.backoff_min);
    }

    #[test]
    fn retries_never_sleep_past_not_after_minus_margin() {
        let p = Policy::default();
        let c = day_cert(1_000_000);
        let latest = c.latest(&p);
        let now = latest - Duration::from_secs(10);
        assert_eq!(retry_at(now, 30, Some(&c), &p, 1.0), latest);
        assert_eq!(
            retry_at(now, 0, Some(&c), &p, 1.0),
            now + Duration::from_secs(1)
        );
        let after = latest + Duration::from_secs(1);
        assert_eq!(
            retry_at(after, 30, Some(&c), &p, 1.0),
            after + p.backoff_max
        );
    }

    #[test]
    fn sleeps_are_capped_at_five_minutes() {
        assert_eq!(sleep_for(at(0), at(10 * H)), MAX_SLEEP);
        assert_eq!(sleep_for(at(0), at(10)), Duration::from_secs(10));
        assert_eq!(sleep_for(at(10), at(0)), Duration::ZERO);
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> SystemTime {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap().into()
    }

    #[test]
    fn crontab_weekday_pins_sunday_as_0_and_7() {
        // 2026-11-27 is a Friday; the next Sunday is 2026-11-29.
        let fri = utc(2026, 11, 27, 12, 0);
        for expr in ["30 2 * * 0", "30 2 * * 7", "30 2 * * Sun"] {
            let s = CronSchedule::parse(expr).unwrap();
            assert_eq!(s.next_after(fri), Some(utc(2026, 11, 29, 2, 30)), "{expr}");
        }
        // Monday is 1 in crontab (2 in the crate).
        let s = CronSchedule::parse("0 4 * * 1").unwrap();
        assert_eq!(s.next_after(fri), Some(utc(2026, 11, 30, 4, 0)));
        // Friday–Sunday range crossing the 6/7 boundary: Fri 27 at 23:00 is next.
        let s = CronSchedule::parse("0 23 * * 5-7").unwrap();
        assert_eq!(s.next_after(fri), Some(utc(2026, 11, 27, 23, 0)));
        // Saturday then Sunday come next.
        let sat = utc(2026, 11, 28, 0, 0);
        assert_eq!(s.next_after(sat), Some(utc(2026, 11, 28, 23, 0)));
        let sun = utc(2026, 11, 29, 0, 0);
        assert_eq!(s.next_after(sun), Some(utc(2026, 11, 29, 23, 0)));
        let mon = utc(2026, 11, 30, 0, 0);
        assert_eq!(s.next_after(mon), Some(utc(2026, 12, 4, 23, 0)));
    }

    #[test]
    fn crontab_weekday_lists_and_steps_translate() {
        assert_eq!(translate_weekdays("0").unwrap(), "1");
        assert_eq!(translate_weekdays("7").unwrap(), "1");
        assert_eq!(translate_weekdays("1-5").unwrap(), "2,3,4,5,6");
        assert_eq!(translate_weekdays("*/2").unwrap(), "1,3,5,7");
        assert_eq!(translate_weekdays("1/3").unwrap(), "1,2,5");
        assert_eq!(translate_weekdays("6,0").unwrap(), "1,7");
        assert_eq!(translate_weekdays("Mon-Fri").unwrap(), "Mon-Fri");
        assert!(translate_weekdays("8").is_err());
        assert!(translate_weekdays("5-1").is_err());
        assert!(translate_weekdays("*/0").is_err());
    }

    #[test]
    fn crontab_day_of_month_or_weekday_fires_on_either() {
        // 1st of the month OR Sunday, at 00:00.
        let s = CronSchedule::parse("0 0 1 * 0").unwrap();
        let fri = utc(2026, 11, 27, 12, 0);
        assert_eq!(s.next_after(fri), Some(utc(2026, 11, 29, 0, 0)));
        let mon = utc(2026, 11, 30, 0, 0);
        assert_eq!(s.next_after(mon), Some(utc(2026, 12, 1, 0, 0)));
    }

    #[test]
    fn six_and_seven_field_forms_pass_through() {
        let s = CronSchedule::parse("15 30 2 * * Sun").unwrap();
        let fri = utc(2026, 11, 27, 12, 0);
        assert_eq!(
            s.next_after(fri),
            Some(utc(2026, 11, 29, 2, 30) + Duration::from_secs(15))
        );
        // In the crate's own form 1 is Sunday.
        let s = CronSchedule::parse("0 30 2 * * 1 2026").unwrap();
        assert_eq!(s.next_after(fri), Some(utc(2026, 11, 29, 2, 30)));
        assert!(CronSchedule::parse("* * *").is_err());
        assert!(CronSchedule::parse("61 * * * *").is_err());
    }

    #[test]
    fn cron_renews_at_the_first_fire_after_issue_capped_by_the_margin() {
        let p = Policy::default();
        let issued = utc(2026, 11, 27, 12, 0);
        let c = CertTimes::received(issued, issued, issued + Duration::from_secs(7 * 24 * H));
        let s = CronSchedule::parse("30 2 * * 0").unwrap();
        assert_eq!(
            next_renewal(&c, issued, &p, 0.0, Some(&s)),
            Decision::At(utc(2026, 11, 29, 2, 30))
        );
        assert_eq!(
            next_renewal(&c, utc(2026, 11, 29, 2, 30), &p, 0.0, Some(&s)),
            Decision::RenewNow
        );
        // A monthly schedule never lets a 1-day cert run past its margin.
        let short = CertTimes::received(issued, issued, issued + Duration::from_secs(24 * H));
        let monthly = CronSchedule::parse("0 0 1 * *").unwrap();
        assert_eq!(
            next_renewal(&short, issued, &p, 0.0, Some(&monthly)),
            Decision::At(short.latest(&p))
        );
    }

    proptest! {
        #[test]
        fn decision_is_now_or_a_future_deadline_within_the_margin(
            nb in 0u64..4_000_000_000,
            life in 1u64..(400 * 24 * H),
            recv_off in 0u64..(500 * 24 * H),
            now_off in 0u64..(500 * 24 * H),
            renew_at in 0.05f64..0.95,
            jitter in 0.0f64..0.5,
            margin in 0.0f64..0.5,
            sample in -2.0f64..2.0,
            on_disk in any::<bool>(),
        ) {
            let jitter = jitter.min(renew_at - 0.01).min(0.99 - renew_at).max(0.0);
            let p = Policy { renew_at, jitter, margin, ..Policy::default() };
            let (nb, na) = (at(nb), at(nb + life));
            let c = if on_disk {
                CertTimes::found_on_disk(nb, na, Duration::from_secs(20))
            } else {
                CertTimes::received(nb + Duration::from_secs(recv_off), nb, na)
            };
            let now = nb + Duration::from_secs(now_off);
            match next_renewal(&c, now, &p, sample, None) {
                Decision::RenewNow => {}
                Decision::At(t) => {
                    prop_assert!(t > now);
                    prop_assert!(t <= c.latest(&p));
                    prop_assert!(t <= na);
                }
            }
            let r = retry_at(now, (recv_off % 40) as u32, Some(&c), &p, sample.abs().min(1.0));
            prop_assert!(r > now);
            prop_assert!(r <= now + p.backoff_max);
            if c.latest(&p) > now {
                prop_assert!(r <= c.latest(&p));
            }
        }
    }
}
