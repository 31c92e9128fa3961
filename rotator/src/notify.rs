//! systemd notifications (`Type=notify`): READY=1, STATUS=, WATCHDOG=1.

use std::time::Duration;

use crate::config::Env;

/// A notification to the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// READY=1 (a valid, and verified when configured, cert is installed).
    Ready,
    /// `STATUS=<text>`.
    Status(String),
    /// WATCHDOG=1.
    Watchdog,
    /// STOPPING=1.
    Stopping,
}

/// Where notifications go.
pub trait Notify: Send + Sync {
    /// Sends one notification; failures are logged, never fatal.
    fn notify(&self, notice: Notice);
}

/// The real service manager, via `NOTIFY_SOCKET` (nothing happens when it is unset).
#[derive(Debug, Clone, Copy, Default)]
pub struct Systemd;

impl Notify for Systemd {
    fn notify(&self, notice: Notice) {
        use sd_notify::NotifyState;
        let state = match &notice {
            Notice::Ready => NotifyState::Ready,
            Notice::Status(s) => NotifyState::Status(s),
            Notice::Watchdog => NotifyState::Watchdog,
            Notice::Stopping => NotifyState::Stopping,
        };
        if let Err(e) = sd_notify::notify(false, &[state]) {
            tracing::warn!(error = %e, ?notice, "sd_notify failed");
        }
    }
}

/// Nothing (one-shot commands).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Notify for Silent {
    fn notify(&self, _: Notice) {}
}

/// The watchdog ping interval: half of `WATCHDOG_USEC`, when it is set and `WATCHDOG_PID`
/// (if set) is this process.
pub fn watchdog_interval(env: &dyn Env) -> Option<Duration> {
    let usec: u64 = env.get("WATCHDOG_USEC")?.trim().parse().ok()?;
    if let Some(pid) = env.get("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MapEnv;

    #[test]
    fn watchdog_interval_is_half_the_usec_for_our_pid() {
        let pid = std::process::id().to_string();
        let env = MapEnv::from_pairs([
            ("WATCHDOG_USEC", "30000000"),
            ("WATCHDOG_PID", pid.as_str()),
        ]);
        assert_eq!(watchdog_interval(&env), Some(Duration::from_secs(15)));
        let other = MapEnv::from_pairs([("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "1")]);
        assert_eq!(watchdog_interval(&other), None);
        assert_eq!(watchdog_interval(&MapEnv::default()), None);
    }
}
