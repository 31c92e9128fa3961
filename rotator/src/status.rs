//! `rotator status`: a read-only report on the cert dir, with Nagios-style exit codes.
//!
//! The report comes from the running daemon when one is reachable: with `metrics.listen` set,
//! `status` asks `GET /status` there first, and the daemon answers from its own record of its
//! state ([`Source`]), which stays right when the state file cannot be written (a full or
//! read-only filesystem). Without a daemon answering, the report is built from the state file.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use proxy_lib::clock::{SharedClock, rfc3339, unix_secs};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::renew::{Current, inspect, jitter_sample};
use crate::schedule::{self, Decision};
use crate::state::{Ledger, State};

/// How long `status` waits for the daemon's `/status` before reading the state file instead.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(3);

/// The overall verdict, with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Why the state file is behind what the daemon knows (it cannot be written), if it is.
    #[serde(default)]
    pub state_file: Option<String>,
    /// The anchors the host trusts: fingerprint (SHA-256 short form) and the signed bundle's
    /// sequence, or `bootstrap` on `trust_anchors`.
    #[serde(default)]
    pub trust_bundle: Option<String>,
    /// Why the last trust bundle the issuer offered was refused, while it still is (a
    /// WARNING at least).
    #[serde(default)]
    pub bundle_error: Option<String>,
    /// Where the time of the daemon's last successful rotation went (decision time and each
    /// stage); only the daemon's `/status` has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<crate::timing::RotationTiming>,
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
            state_file: None,
            trust_bundle: None,
            bundle_error: None,
            last_rotation: None,
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
                let d =
                    proxy_lib::human::duration(std::time::Duration::from_secs(s.unsigned_abs()));
                if s < 0 { format!("expired {d} ago") } else { d }
            }),
        );
        line("next renewal:", &self.next_renewal);
        line("last success:", &self.last_success);
        line("last error:", &self.last_error);
        line("state file:", &self.state_file);
        line("trust bundle:", &self.trust_bundle);
        line("bundle error:", &self.bundle_error);
        s
    }
}

/// The report `rotator status` prints: the running daemon's answer on `metrics.listen` when it
/// gives one within [`DAEMON_TIMEOUT`], else [`report`] from the state file. Blocks.
pub fn query(config: &Config, now: SystemTime) -> Report {
    if let Some(addr) = config.metrics_listen {
        let asked = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(from_daemon(addr, DAEMON_TIMEOUT)));
        match asked {
            Ok(r) => return r,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "no answer from the daemon; reading the state file")
            }
        }
    }
    report(config, now)
}

/// Asks the daemon listening on `addr` (`0.0.0.0`/`::` mean this host) for its report.
pub async fn from_daemon(addr: SocketAddr, timeout: Duration) -> Result<Report, String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let uri: http::Uri = format!("http://{addr}/status")
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let ask = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| crate::client::error_chain(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("/status answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("/status answered no report: {e}"))
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// The daemon's side of `status`: the report built from its own record of its state.
#[derive(Clone)]
pub struct Source {
    config: Arc<Config>,
    clock: SharedClock,
    ledger: Arc<Mutex<Ledger>>,
    last_rotation: crate::timing::LastRotation,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

impl Source {
    pub(crate) fn new(config: Arc<Config>, clock: SharedClock, ledger: Arc<Mutex<Ledger>>) -> Self {
        Self {
            config,
            clock,
            ledger,
            last_rotation: Default::default(),
        }
    }

    /// Shows `last` as the report's `last_rotation`.
    pub(crate) fn with_last_rotation(mut self, last: crate::timing::LastRotation) -> Self {
        self.last_rotation = last;
        self
    }

    /// The report now: the state as the daemon recorded it last (the state file before the
    /// first transition), and why the state file is behind, if it is. Blocks (reads the dir).
    pub fn report(&self) -> Report {
        let (state, unsaved) = self
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let state = state.unwrap_or_else(|| State::load(&self.config.dir));
        let mut report = report_from(&self.config, self.clock.now(), &state, unsaved);
        report.last_rotation = self
            .last_rotation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        report
    }

    /// The `GET /status` route: [`Source::report`] as JSON (built off the runtime thread).
    pub fn router(self) -> axum::Router {
        axum::Router::new().route(
            "/status",
            axum::routing::get(move || {
                let source = self.clone();
                async move { axum::Json(crate::renew::blocking(move || source.report()).await) }
            }),
        )
    }
}

/// Builds the report for `config` at `now` from the state file. Blocks (reads the dir).
pub fn report(config: &Config, now: SystemTime) -> Report {
    report_from(config, now, &State::load(&config.dir), None)
}

/// Builds the report for `config` at `now` from `state`; `unsaved` says why the state file is
/// behind it (a WARNING at least). Blocks (reads the dir).
pub fn report_from(
    config: &Config,
    now: SystemTime,
    state: &State,
    unsaved: Option<String>,
) -> Report {
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
    // "renewal failing (N attempts): the last error", when the last attempt failed.
    let failure = failing.then(|| {
        r.last_error = state.last_error.clone();
        format!(
            "renewal failing ({}): {}",
            proxy_lib::human::count(state.failures, "attempt"),
            state.last_error.clone().unwrap_or_default()
        )
    });
    match inspect(config, now) {
        Current::Unusable(why) => {
            r.status = Level::Critical;
            // On a host that never got a cert, why the renewals fail is the news.
            r.summary = match failure {
                Some(f) => format!("{f}; {why}"),
                None => why,
            };
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
            if let Some(f) = failure {
                r.status = Level::Warning;
                r.summary = f;
            } else if overdue {
                r.status = Level::Warning;
                r.summary = "renewal overdue".into();
            } else {
                r.status = Level::Ok;
                r.summary = format!("valid until {}", rfc3339(times.not_after));
            }
        }
    }
    r.trust_bundle = crate::trust::current(&config.dir, &config.trust_anchors)
        .ok()
        .map(|t| {
            let fp = proxy_lib::trust_bundle::short(&t.fingerprint()).to_string();
            match t.sequence() {
                Some(s) => format!("{fp} (signed, sequence {s})"),
                None => format!("{fp} (bootstrap trust_anchors)"),
            }
        });
    if let Some(why) = &state.bundle_error {
        if r.status == Level::Ok {
            r.status = Level::Warning;
            r.summary.clone_from(why);
        }
        r.bundle_error = Some(why.clone());
    }
    if let Some(why) = unsaved {
        if r.status == Level::Ok {
            r.status = Level::Warning;
            r.summary.clone_from(&why);
        }
        r.state_file = Some(why);
    }
    r
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    use proxy_lib::clock::FakeClock;
    use proxy_lib::test_util::write_data_dir;

    use crate::config::MapEnv;
    use crate::testing::{FakeIssuer, config_in, identity};

    const DAY: Duration = Duration::from_secs(86_400);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_900_000_000)
    }

    fn setup() -> (tempfile::TempDir, std::sync::Arc<FakeIssuer>, Config) {
        proxy_lib::install_crypto_provider();
        let d = tempfile::tempdir().unwrap();
        let issuer = FakeIssuer::new(std::sync::Arc::new(FakeClock::new(now())), DAY);
        let c = config_in(d.path(), &issuer, "");
        (d, issuer, c)
    }

    fn install(issuer: &FakeIssuer, c: &Config, nb: SystemTime, na: SystemTime) -> String {
        std::fs::create_dir_all(&c.dir).unwrap();
        let b = issuer.pki.leaf(&identity(), nb, na);
        write_data_dir(&c.dir, &b);
        b.leaf.serial
    }

    fn json(r: &Report) -> serde_json::Value {
        serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap()
    }

    #[test]
    fn ok_for_a_fresh_cert_with_every_field() {
        let (_d, issuer, c) = setup();
        let serial = install(&issuer, &c, now() - Duration::from_secs(20), now() + DAY);
        let r = report(&c, now() + Duration::from_secs(3600));
        assert_eq!(r.status, Level::Ok, "{}", r.text());
        assert_eq!(r.status.exit_code(), 0);
        let j = json(&r);
        assert_eq!(j["status"], "OK");
        assert_eq!(j["serial"], serial.as_str());
        assert_eq!(j["identity"], identity().as_str());
        assert_eq!(j["seconds_left"], 23 * 3600);
        for k in ["sha256", "not_before", "not_after", "next_renewal"] {
            assert!(j[k].is_string(), "{k} missing in {j}");
        }
        let text = r.text();
        assert!(text.starts_with("OK: valid until"), "{text}");
        assert!(text.contains(&serial));
    }

    #[test]
    fn warning_when_renewal_is_overdue_or_failing() {
        let (_d, issuer, c) = setup();
        install(&issuer, &c, now() - Duration::from_secs(20), now() + DAY);
        // Past 80 % of the life plus the backoff cap, still valid: overdue.
        let late = now() + Duration::from_secs(21 * 3600);
        let r = report(&c, late);
        assert_eq!(
            (r.status, r.summary.as_str()),
            (Level::Warning, "renewal overdue")
        );
        assert_eq!(r.status.exit_code(), 1);
        // Failing: the last attempt failed after the last success.
        let st = State {
            last_success: Some(unix_secs(now())),
            last_error: Some("cannot reach the issuer".into()),
            last_error_at: Some(unix_secs(now()) + 60),
            failures: 3,
            ..State::default()
        };
        st.save(&c.dir).unwrap();
        let r = report(&c, now() + Duration::from_secs(120));
        assert_eq!(r.status, Level::Warning);
        assert_eq!(json(&r)["last_error"], "cannot reach the issuer");
        assert!(r.summary.contains("3 attempts"), "{}", r.summary);
    }

    #[test]
    fn critical_when_missing_expired_or_mismatched() {
        let (_d, issuer, c) = setup();
        let r = report(&c, now());
        assert_eq!(r.status, Level::Critical, "missing: {}", r.text());
        assert_eq!(r.status.exit_code(), 2);
        install(&issuer, &c, now() - DAY, now() - Duration::from_secs(1));
        let r = report(&c, now());
        assert_eq!(r.status, Level::Critical, "expired: {}", r.text());
        assert!(json(&r)["seconds_left"].as_i64().unwrap() < 0);
        install(&issuer, &c, now() - Duration::from_secs(20), now() + DAY);
        let other = crate::keygen::generate(&identity(), false).unwrap();
        let v = proxy_lib::certdir::resolve_data_dir(&c.dir);
        std::fs::write(v.join("tls.key"), other.key.to_pem().as_bytes()).unwrap();
        let r = report(&c, now());
        assert_eq!(r.status, Level::Critical, "mismatched: {}", r.text());
        assert!(r.summary.contains("does not match"), "{}", r.summary);
    }

    #[test]
    fn unknown_for_an_unusable_config_and_64_for_usage_errors() {
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join("bad.toml");
        std::fs::write(&bad, "identity = \"nope\"\n").unwrap();
        let env = MapEnv::default();
        let run = |args: &[&str]| crate::cli::main(args.iter().map(Into::into), &env);
        assert_eq!(
            run(&["rotator", "status", "--config", bad.to_str().unwrap()]),
            3
        );
        assert_eq!(
            run(&[
                "rotator",
                "status",
                "--json",
                "--config",
                bad.to_str().unwrap()
            ]),
            3
        );
        assert_eq!(run(&["rotator", "status", "--bogus"]), 64);
        assert_eq!(run(&["rotator"]), 64);
        assert_eq!(run(&["rotator", "rotate", "--force=maybe"]), 64);
        assert_eq!(run(&["rotator", "linkerd-bootstrap", "--dir", "x"]), 64);
        assert_eq!(
            run(&[
                "rotator",
                "linkerd-bootstrap",
                "--dir",
                "x",
                "--identity",
                "nope"
            ]),
            64
        );
        assert_eq!(run(&["rotator", "--help"]), 0);
        assert_eq!(run(&["rotator", "rotate", "--help"]), 0);
        // A config that does not validate is a config error for rotate/run.
        assert_eq!(
            run(&["rotator", "rotate", "--config", bad.to_str().unwrap()]),
            78
        );
    }
}
