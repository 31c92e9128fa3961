//! `rotator status`: a read-only report on the cert dir, with Nagios-style exit codes.

use std::time::SystemTime;

use proxy_lib::clock::{rfc3339, unix_secs};
use serde::Serialize;

use crate::config::Config;
use crate::renew::{Current, inspect, jitter_sample};
use crate::schedule::{self, Decision};
use crate::state::State;

/// The overall verdict, with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// 0: a valid cert, renewal on track.
    Ok,
    /// 1: renewal overdue or failing.
    Warning,
    /// 2: missing, expired or invalid.
    Critical,
    /// 3: cannot tell (e.g. the config is unusable).
    Unknown,
}

impl Level {
    /// The upper-case name (`OK`, `WARNING`, `CRITICAL`, `UNKNOWN`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }

    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Critical => 2,
            Level::Unknown => 3,
        }
    }
}

/// The report `status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The verdict.
    pub status: Level,
    /// Why, in one line.
    pub summary: String,
    /// The configured identity.
    pub identity: Option<String>,
    /// The cert dir.
    pub dir: Option<String>,
    /// Serial of the cert on disk.
    pub serial: Option<String>,
    /// SHA-256 of the cert on disk.
    pub sha256: Option<String>,
    /// notBefore (RFC 3339).
    pub not_before: Option<String>,
    /// notAfter (RFC 3339).
    pub not_after: Option<String>,
    /// Seconds until notAfter (negative when expired).
    pub seconds_left: Option<i64>,
    /// The next renewal (RFC 3339), "now" when due.
    pub next_renewal: Option<String>,
    /// Last successful rotation (RFC 3339).
    pub last_success: Option<String>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

impl Report {
    /// A report for when the config itself is unusable.
    pub fn unknown(reason: String) -> Self {
        Self {
            status: Level::Unknown,
            summary: reason,
            identity: None,
            dir: None,
            serial: None,
            sha256: None,
            not_before: None,
            not_after: None,
            seconds_left: None,
            next_renewal: None,
            last_success: None,
            last_error: None,
        }
    }

    /// Human-readable text, one field per line.
    pub fn text(&self) -> String {
        let mut s = format!("{}: {}\n", self.status.name(), self.summary);
        let mut line = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!("{k:<14}{v}\n"));
            }
        };
        line("identity:", &self.identity);
        line("dir:", &self.dir);
        line("serial:", &self.serial);
        line("sha256:", &self.sha256);
        line("not before:", &self.not_before);
        line("not after:", &self.not_after);
        line(
            "time left:",
            &self.seconds_left.map(|s| {
                if s < 0 {
                    format!(
                        "expired {} ago",
                        humantime::format_duration(std::time::Duration::from_secs(
                            s.unsigned_abs()
                        ))
                    )
                } else {
                    humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
                }
            }),
        );
        line("next renewal:", &self.next_renewal);
        line("last success:", &self.last_success);
        line("last error:", &self.last_error);
        s
    }
}

/// Builds the report for `config` at `now`. Blocks (reads the dir).
pub fn report(config: &Config, now: SystemTime) -> Report {
    let state = State::load(&config.dir);
    let mut r = Report::unknown(String::new());
    r.identity = Some(config.identity.to_string());
    r.dir = Some(config.dir.display().to_string());
    r.last_success = state.last_success.map(from_unix).map(rfc3339);
    // Read the leaf even when the set is unusable, to say what is there.
    if let Ok((b, _)) = proxy_lib::bundle::CertBundle::load_dir(&config.dir) {
        r.serial = Some(b.leaf.serial.clone());
        r.sha256 = Some(b.leaf.sha256.clone());
        r.not_before = Some(rfc3339(b.leaf.not_before));
        r.not_after = Some(rfc3339(b.leaf.not_after));
        r.seconds_left = Some(unix_secs(b.leaf.not_after) as i64 - unix_secs(now) as i64);
    }
    let failing = state.last_error.is_some()
        && state.last_error_at.unwrap_or(0) >= state.last_success.unwrap_or(0);
    if failing {
        r.last_error = state.last_error.clone();
    }
    match inspect(config, now) {
        Current::Unusable(why) => {
            r.status = Level::Critical;
            r.summary = why;
        }
        Current::Valid { times, leaf } => {
            let decision = schedule::next_renewal(
                &times,
                now,
                &config.policy,
                jitter_sample(&leaf.sha256),
                config.schedule.as_ref(),
            );
            r.next_renewal = Some(match decision {
                Decision::At(t) => rfc3339(t),
                Decision::RenewNow => "now".into(),
            });
            // Overdue: past the latest jittered renewal point by more than the backoff cap.
            let latest_plan = schedule::next_renewal(
                &times,
                times.issued,
                &config.policy,
                1.0,
                config.schedule.as_ref(),
            );
            let overdue = match latest_plan {
                Decision::At(t) => now > t + config.policy.backoff_max,
                Decision::RenewNow => true,
            };
            if failing {
                r.status = Level::Warning;
                r.summary = format!(
                    "renewal failing ({} attempts): {}",
                    state.failures,
                    state.last_error.clone().unwrap_or_default()
                );
            } else if overdue {
                r.status = Level::Warning;
                r.summary = "renewal overdue".into();
            } else {
                r.status = Level::Ok;
                r.summary = format!("valid until {}", rfc3339(times.not_after));
            }
        }
    }
    r
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}
