//! Telling whatever serves the cert to pick up a new one: a signal to the pid in a pidfile
//! (after checking it is still the expected process), an HTTP POST, and an exec'd command
//! with a timeout, in any combination.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};

use crate::config::{ReloadConfig, SignalHook};

/// Why a hook failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The pidfile could not be read or holds no pid.
    #[error("pidfile {path}: {reason}")]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The pid is not (or no longer) the expected process.
    #[error("pid {pid} is {found:?}, not the expected process {expected:?}; not signalled")]
    WrongProcess {
        /// The pid.
        pid: i32,
        /// Its name.
        found: String,
        /// The expected name.
        expected: String,
    },
    /// Sending the signal failed.
    #[error("cannot signal pid {pid}: {reason}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The OS error.
        reason: String,
    },
    /// The HTTP hook failed.
    #[error("POST {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What failed (status or transport error).
        reason: String,
    },
    /// The exec hook failed.
    #[error("exec {program}: {reason}")]
    Exec {
        /// The program.
        program: String,
        /// What failed (exit status, spawn error, timeout).
        reason: String,
    },
}

/// The outcome of one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// `signal`, `http` or `exec`.
    pub hook: &'static str,
    /// Its result.
    pub result: Result<(), ReloadError>,
}

/// Something that makes the cert's users reload it.
pub trait Reload: Send + Sync {
    /// Runs every configured hook once; one outcome per hook.
    fn reload(&self) -> impl Future<Output = Vec<HookOutcome>> + Send;
}

/// The configured hooks.
#[derive(Debug, Clone)]
pub struct Hooks {
    config: ReloadConfig,
    cert_dir: PathBuf,
}

impl Hooks {
    /// Hooks from the config; `cert_dir` is passed to the exec hook as `ROTATOR_CERT_DIR`.
    pub fn new(config: ReloadConfig, cert_dir: PathBuf) -> Self {
        Self { config, cert_dir }
    }
}

impl Reload for Hooks {
    async fn reload(&self) -> Vec<HookOutcome> {
        let mut out = Vec::new();
        if let Some(s) = &self.config.signal {
            out.push(HookOutcome {
                hook: "signal",
                result: signal(s),
            });
        }
        if let Some(url) = &self.config.http {
            out.push(HookOutcome {
                hook: "http",
                result: post(url, self.config.timeout).await,
            });
        }
        if let Some(argv) = &self.config.exec {
            out.push(HookOutcome {
                hook: "exec",
                result: exec(argv, self.config.timeout, &self.cert_dir).await,
            });
        }
        for o in &out {
            match &o.result {
                Ok(()) => tracing::info!(hook = o.hook, "reload hook ran"),
                // The renewal's error names every failed hook; it is logged once, by the caller.
                Err(e) => tracing::debug!(hook = o.hook, error = %e, "reload hook failed"),
            }
        }
        out
    }
}

/// Reads a pid from a pidfile. Blocks.
pub fn read_pid(path: &Path) -> Result<i32, ReloadError> {
    proxy_lib::process::read_pid(path).map_err(|reason| ReloadError::Pidfile {
        path: path.to_path_buf(),
        reason,
    })
}

fn signal(hook: &SignalHook) -> Result<(), ReloadError> {
    let pid = read_pid(&hook.pidfile)?;
    let names = proxy_lib::process::names(pid);
    if !proxy_lib::process::name_matches(&names, &hook.process_name) {
        return Err(ReloadError::WrongProcess {
            pid,
            found: names
                .first()
                .cloned()
                .unwrap_or_else(|| "no such process".into()),
            expected: hook.process_name.clone(),
        });
    }
    let p = rustix::process::Pid::from_raw(pid).ok_or_else(|| ReloadError::Signal {
        pid,
        reason: "invalid pid".into(),
    })?;
    rustix::process::kill_process(p, hook.signal.to_rustix()).map_err(|e| ReloadError::Signal {
        pid,
        reason: e.to_string(),
    })
}

async fn post(url: &str, timeout: Duration) -> Result<(), ReloadError> {
    let err = |reason: String| ReloadError::Http {
        url: url.to_string(),
        reason,
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let req = http::Request::post(url)
        .header(http::header::CONTENT_LENGTH, "0")
        .body(Empty::new())
        .map_err(|e| err(e.to_string()))?;
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| err(crate::client::error_chain(&e)))?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(err(format!("answered {status}")))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(err(format!(
                "no answer within {}",
                proxy_lib::human::duration(timeout)
            )))
        })
}

/// Runs the exec hook in a process group of its own, so that on timeout the whole group is
/// killed: a hook's children (`sh -c 'reload &'`) must not outlive it holding the rotator's
/// stdout open, which would hang `out=$(rotator rotate ...)`.
async fn exec(argv: &[String], timeout: Duration, cert_dir: &Path) -> Result<(), ReloadError> {
    let err = |reason: String| ReloadError::Exec {
        program: argv[0].clone(),
        reason,
    };
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("ROTATOR_CERT_DIR", cert_dir)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(err(format!("exited with {status}"))),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => {
            if let Some(group) = group {
                // The group's id is the hook's pid, which stays reserved until it is reaped
                // below: the signal cannot reach an unrelated group.
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            Err(err(format!(
                "did not finish within {}; its process group was killed",
                proxy_lib::human::duration(timeout)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReloadSignal;

    #[tokio::test]
    async fn signal_hook_refuses_a_pid_that_is_not_the_expected_process() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("p.pid");
        // Our own pid: the test binary is not called "nginx", so it must not be signalled.
        std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
        let hooks = Hooks::new(
            ReloadConfig {
                signal: Some(SignalHook {
                    pidfile: pidfile.clone(),
                    signal: ReloadSignal::Hup,
                    process_name: "nginx".into(),
                }),
                ..ReloadConfig::default()
            },
            d.path().into(),
        );
        let out = hooks.reload().await;
        assert!(matches!(
            out[0].result,
            Err(ReloadError::WrongProcess { .. })
        ));
        std::fs::write(&pidfile, "garbage").unwrap();
        let out = hooks.reload().await;
        assert!(matches!(out[0].result, Err(ReloadError::Pidfile { .. })));
    }

    #[tokio::test]
    async fn exec_hook_reports_exit_status_and_times_out() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("marker");
        let cfg = |argv: Vec<&str>| ReloadConfig {
            exec: Some(argv.into_iter().map(String::from).collect()),
            timeout: Duration::from_millis(300),
            ..ReloadConfig::default()
        };
        let script = format!("echo \"$ROTATOR_CERT_DIR\" > {}", marker.display());
        let ok = Hooks::new(cfg(vec!["sh", "-c", &script]), d.path().into());
        assert_eq!(ok.reload().await[0].result, Ok(()));
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap().trim(),
            d.path().display().to_string()
        );
        let fail = Hooks::new(cfg(vec!["sh", "-c", "exit 3"]), d.path().into());
        assert!(matches!(
            fail.reload().await[0].result,
            Err(ReloadError::Exec { .. })
        ));
        let slow = Hooks::new(cfg(vec!["sleep", "5"]), d.path().into());
        let e = slow
            .reload()
            .await
            .remove(0)
            .result
            .unwrap_err()
            .to_string();
        assert!(e.contains("killed"), "{e}");
        let missing = Hooks::new(cfg(vec!["/nonexistent/prog"]), d.path().into());
        assert!(missing.reload().await[0].result.is_err());
    }

    /// A hook that times out is killed with everything it started: no process of its group
    /// is left (a background child would keep the rotator's stdout open).
    #[tokio::test]
    async fn a_timed_out_hook_leaves_no_process_of_its_group() {
        let d = tempfile::tempdir().unwrap();
        let pgid_file = d.path().join("pgid");
        // The group's id is the shell's pid; it starts a background child that would live
        // on, then blocks.
        let script = format!("echo $$ > {}; sleep 60 & sleep 60", pgid_file.display());
        let hooks = Hooks::new(
            ReloadConfig {
                exec: Some(vec!["sh".into(), "-c".into(), script]),
                // Room for the shell to start and write its pid even on a loaded machine.
                timeout: Duration::from_secs(2),
                ..ReloadConfig::default()
            },
            d.path().into(),
        );
        let e = hooks.reload().await.remove(0).result.unwrap_err();
        assert!(e.to_string().contains("process group was killed"), "{e}");
        let pgid: i32 = std::fs::read_to_string(&pgid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let group = rustix::process::Pid::from_raw(pgid).unwrap();
        // SIGKILL is sent before the hook returns; the orphaned child is gone once whoever
        // reaps orphans has reaped it (bounded wait, not a sleep to hope on).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match rustix::process::test_kill_process_group(group) {
                Err(rustix::io::Errno::SRCH) => break,
                _ if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("process group {pgid} still exists: {other:?}"),
            }
        }
    }
}
