//! The host side under faults: reload hooks that fail, a full or read-only cert dir, crashes
//! mid-write. All on simulated time, in temp dirs, loopback only.

use super::*;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use proxy_lib::certdir::{leftovers, version_dirs};

use crate::reload::HookOutcome;
use crate::status::Level;

/// How a [`FaultFs`] fails.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Every operation from the step on fails with this OS error (ENOSPC, EROFS).
    Errno(i32),
    /// The process dies at the step: a write there is torn, every later step fails.
    Crash,
}

/// The real filesystem until step `from`, then [`Fault`].
#[derive(Debug)]
struct FaultFs {
    from: usize,
    fault: Fault,
    step: AtomicUsize,
}

impl FaultFs {
    fn new(from: usize, fault: Fault) -> Arc<Self> {
        Arc::new(Self {
            from,
            fault,
            step: AtomicUsize::new(0),
        })
    }

    /// Whether this step fails, and whether it is the crashing one.
    fn next(&self) -> io::Result<bool> {
        let s = self.step.fetch_add(1, Ordering::SeqCst);
        match self.fault {
            _ if s < self.from => Ok(false),
            Fault::Errno(n) => Err(io::Error::from_raw_os_error(n)),
            Fault::Crash if s == self.from => Ok(true),
            Fault::Crash => Err(io::Error::other("crashed earlier")),
        }
    }

    fn op(&self, real: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        if self.next()? {
            return Err(io::Error::other("simulated crash"));
        }
        real()
    }
}

impl FsOps for FaultFs {
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.op(|| RealFs.create_dir(path, mode))
    }
    fn write_new(&self, path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
        if self.next()? {
            // Torn: half the bytes, no fsync.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)?;
            std::io::Write::write_all(&mut f, &data[..data.len() / 2])?;
            return Err(io::Error::other("simulated crash"));
        }
        RealFs.write_new(path, data, mode, gid)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        self.op(|| RealFs.fsync_dir(path))
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.op(|| RealFs.symlink(target, link))
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(|| RealFs.hard_link(from, to))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(|| RealFs.rename(from, to))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.op(|| RealFs.remove_file(path))
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.op(|| RealFs.remove_dir_all(path))
    }
}

fn errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

/// A consumer that loads the cert set only when its reload hook runs (as nginx does); the
/// hook fails on the runs listed in `failing`.
#[derive(Debug, Clone)]
struct Consumer {
    dir: PathBuf,
    serving: Arc<Mutex<Option<CertBundle>>>,
    runs: Arc<AtomicUsize>,
    failing: Arc<Vec<usize>>,
}

impl Consumer {
    fn new(dir: &Path, failing: &[usize]) -> Self {
        Self {
            dir: dir.to_path_buf(),
            serving: Arc::default(),
            runs: Arc::default(),
            failing: Arc::new(failing.to_vec()),
        }
    }

    fn serving(&self) -> Option<CertBundle> {
        self.serving.lock().unwrap().clone()
    }
}

impl Reload for Consumer {
    async fn reload(&self) -> Vec<HookOutcome> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if self.failing.contains(&run) {
            Err(ReloadError::Exec {
                program: "nginx".into(),
                reason: "exit status: 1".into(),
            })
        } else {
            *self.serving.lock().unwrap() = CertBundle::load_dir(&self.dir).ok().map(|(b, _)| b);
            Ok(())
        };
        vec![HookOutcome {
            hook: "exec",
            result,
        }]
    }
}

fn rotator_with<R: Reload>(rig: &Rig, reload: R) -> Rotator<Arc<FakeIssuer>, R> {
    Rotator::new(
        rig.config.clone(),
        Arc::new(rig.clock.clone()),
        rig.issuer.clone(),
        reload,
        Metrics::new(),
    )
}

fn spawn<R: Reload + 'static>(
    rotator: Rotator<Arc<FakeIssuer>, R>,
) -> (daemon::Handle, tokio::task::JoinHandle<()>) {
    let (handle, controls) = daemon::controls();
    let task = tokio::spawn(daemon::run(
        rotator,
        Arc::new(crate::notify::Silent),
        controls,
        LoopOptions {
            watchdog: None,
            seed: Some(11),
        },
    ));
    (handle, task)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_hook_failing_once_runs_again_and_the_consumer_never_serves_an_expired_cert() {
    let rig = rig(DAY, "");
    // Run 1 loads the first cert; run 2, after the first renewal, fails.
    let consumer = Consumer::new(&rig.config.dir, &[2]);
    let (handle, task) = spawn(rotator_with(&rig, consumer.clone()));
    advance(Duration::from_secs(1)).await;
    let first = consumer.serving().expect("the first cert is loaded");
    let mut served = vec![first.leaf.serial.clone()];
    // Ten days, looked at every ten simulated minutes: what the consumer serves is valid.
    for _ in 0..(10 * 24 * 6) {
        advance(Duration::from_secs(600)).await;
        let now = rig.clock.now();
        let b = consumer.serving().unwrap();
        b.check(now).unwrap_or_else(|e| {
            panic!(
                "the consumer serves an unusable cert after {} hook runs: {e}",
                consumer.runs.load(Ordering::SeqCst)
            )
        });
        if served.last() != Some(&b.leaf.serial) {
            served.push(b.leaf.serial.clone());
        }
    }
    handle.shutdown();
    task.await.unwrap();
    let rotations = rig.calls();
    assert!(rotations >= 12, "{rotations} rotations in ten days");
    // One extra run for the failed one; every cert installed was served.
    assert_eq!(consumer.runs.load(Ordering::SeqCst), rotations + 1);
    assert_eq!(served.len(), rotations);
    let state = State::load(&rig.config.dir);
    assert_eq!((state.unfinished, state.failures), (None, 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_daemon_started_over_a_failed_reload_runs_the_hooks_again_first() {
    let rig = rig(DAY, "");
    // A one-shot rotate installs a cert whose hook fails.
    let consumer = Consumer::new(&rig.config.dir, &[1]);
    let err = rotator_with(&rig, consumer.clone())
        .cycle(false)
        .await
        .unwrap_err();
    assert!(matches!(err, CycleError::Reload { .. }), "{err}");
    let serial = rig.serial_on_disk().unwrap();
    assert_eq!(
        State::load(&rig.config.dir).unfinished.as_deref(),
        Some(serial.as_str())
    );
    assert!(consumer.serving().is_none());
    // The daemon starts (no [verify]): it runs the hook at once, fetching nothing.
    let (handle, task) = spawn(rotator_with(&rig, consumer.clone()));
    advance(Duration::from_secs(1)).await;
    assert_eq!(consumer.runs.load(Ordering::SeqCst), 2);
    assert_eq!(consumer.serving().unwrap().leaf.serial, serial);
    assert_eq!(rig.calls(), 1);
    let state = State::load(&rig.config.dir);
    assert_eq!((state.unfinished, state.failures), (None, 0));
    handle.shutdown();
    task.await.unwrap();
}

/// Installs a first cert through the real filesystem; returns the dir's snapshot.
async fn installed(rig: &Rig) -> Vec<(String, Vec<u8>)> {
    rig.rotator().cycle(false).await.unwrap();
    snapshot(&rig.config.dir)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_full_or_read_only_cert_dir_keeps_the_old_set_and_status_warns_with_the_reason() {
    for (name, n, says) in [
        (
            "ENOSPC",
            errno(rustix::io::Errno::NOSPC),
            "No space left on device",
        ),
        (
            "EROFS",
            errno(rustix::io::Errno::ROFS),
            "Read-only file system",
        ),
    ] {
        // From the first step: the probe finds it before the issuer is asked.
        // From step 2 (the probe passed, the disk filled since): the swap fails.
        for (from, asks, what) in [
            (
                0,
                0,
                "the cert dir is not writable, so no cert was asked for",
            ),
            (2, 1, "installing the new cert failed"),
        ] {
            let rig = rig(DAY, "");
            let before = installed(&rig).await;
            let calls = rig.calls();
            let r = rig.rotator().with_fs(FaultFs::new(from, Fault::Errno(n)));
            let err = r.renew_due(true).await.unwrap_err().to_string();
            assert!(err.contains(what) && err.contains(says), "{name}: {err}");
            r.record_off_thread(vec![Change::Failed {
                at: unix_secs(rig.clock.now()),
                error: err.clone(),
                installed: None,
            }])
            .await;
            assert_eq!(rig.calls() - calls, asks, "{name} from step {from}");
            assert_eq!(
                snapshot(&rig.config.dir),
                before,
                "{name}: the old set stays"
            );
            assert!(leftovers(&rig.config.dir).is_empty(), "{name}");
            // The state file could not take the failure: the daemon's report has it.
            let report = r.status_source().report();
            assert_eq!(report.status, Level::Warning, "{name}: {}", report.text());
            assert!(
                report.summary.starts_with("renewal failing (1 attempt): ")
                    && report.summary.contains(says),
                "{name}: {}",
                report.summary
            );
            let file = report.state_file.as_deref().unwrap_or_default();
            assert!(
                file.starts_with("cannot write the state file") && file.contains(says),
                "{name}: {file}"
            );
            // While the file alone still says all is well.
            let stale = crate::status::report(&rig.config, rig.clock.now());
            assert_eq!(stale.status, Level::Ok, "{name}: {}", stale.text());
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn once_the_state_file_can_be_written_again_it_gets_every_change_it_missed() {
    let rig = rig(DAY, "");
    installed(&rig).await;
    let nospc = errno(rustix::io::Errno::NOSPC);
    // One rotator (the daemon): its writes fail for a while, then pass.
    let fs = Arc::new(Switch::default());
    let r = rig.rotator().with_fs(fs.clone());
    fs.refuse.store(nospc as usize, Ordering::SeqCst);
    let t0 = unix_secs(rig.clock.now());
    for at in [t0 + 10, t0 + 20] {
        r.record_off_thread(vec![Change::Failed {
            at,
            error: "cannot reach the issuer".into(),
            installed: None,
        }])
        .await;
    }
    assert_eq!(State::load(&rig.config.dir).failures, 0, "nothing written");
    assert!(r.status_source().report().state_file.is_some());
    fs.refuse.store(0, Ordering::SeqCst);
    r.record_off_thread(vec![Change::NextRenewal(99)]).await;
    let state = State::load(&rig.config.dir);
    assert_eq!(
        (state.failures, state.last_error_at, state.next_renewal),
        (2, Some(t0 + 20), Some(99))
    );
    let report = r.status_source().report();
    assert_eq!(report.state_file, None);
    assert_eq!(report.status, Level::Warning, "{}", report.text());
}

/// The real filesystem, refusing every operation with the errno in `refuse` while non-zero.
#[derive(Debug, Default)]
struct Switch {
    refuse: AtomicUsize,
}

impl Switch {
    fn check(&self) -> io::Result<()> {
        match self.refuse.load(Ordering::SeqCst) {
            0 => Ok(()),
            n => Err(io::Error::from_raw_os_error(n as i32)),
        }
    }
}

impl FsOps for Switch {
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.check().and_then(|()| RealFs.create_dir(path, mode))
    }
    fn write_new(&self, path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
        self.check()
            .and_then(|()| RealFs.write_new(path, data, mode, gid))
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.fsync_dir(path))
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.symlink(target, link))
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.hard_link(from, to))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.rename(from, to))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.remove_file(path))
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check().and_then(|()| RealFs.remove_dir_all(path))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_temp_file_survives_a_hundred_crashes_and_each_leaves_a_complete_set() {
    let rig = rig(DAY, "");
    installed(&rig).await;
    let assert_complete = |what: &str| {
        let (b, _) =
            CertBundle::load_dir(&rig.config.dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        b.check(rig.clock.now())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    // How many filesystem steps one forced cycle takes.
    let counting = FaultFs::new(usize::MAX, Fault::Crash);
    rig.rotator()
        .with_fs(counting.clone())
        .cycle(true)
        .await
        .unwrap();
    let steps = counting.step.load(Ordering::SeqCst);
    assert!(steps >= 12, "only {steps} steps in a cycle");
    let mut messy = 0;
    for i in 0..100 {
        // Each "process" dies at another step of a forced cycle.
        let k = i % steps;
        // (A crash in the last state write leaves the cycle itself a success.)
        let _ = rig
            .rotator()
            .with_fs(FaultFs::new(k, Fault::Crash))
            .cycle(true)
            .await;
        assert_complete(&format!("after crash {i} at step {k}"));
        if !leftovers(&rig.config.dir).is_empty() {
            messy += 1;
        }
        if i % 10 == 9 {
            // The next run that gets through tidies up whatever the crashes left.
            rig.rotator().cycle(true).await.unwrap();
            assert_complete(&format!("after the clean run following crash {i}"));
            let left = leftovers(&rig.config.dir);
            assert!(left.is_empty(), "after crash {i}: {left:?}");
            assert!(version_dirs(&rig.config.dir).len() <= 2);
        }
    }
    assert!(
        messy >= 10,
        "only {messy} crashes left a temp file: the test proves little"
    );
    // A daemon that only writes its state (nothing is due) tidies up too.
    let stale = rig.config.dir.join(format!(
        ".{}.tmp.00000000000000aa",
        crate::state::STATE_FILE
    ));
    std::fs::write(&stale, b"{").unwrap();
    let calls = rig.calls();
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(1)).await;
    handle.shutdown();
    task.await.unwrap();
    assert!(
        leftovers(&rig.config.dir).is_empty(),
        "{:?}",
        leftovers(&rig.config.dir)
    );
    assert_eq!(rig.calls(), calls, "the daemon fetched nothing");
}

#[tokio::test(flavor = "current_thread")]
async fn status_asks_the_daemon_and_falls_back_to_the_state_file() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rig = rig(DAY, &format!("[metrics]\nlisten = \"{addr}\"\n"));
    installed(&rig).await;
    // The daemon's state file cannot be written: its failure lives in its memory alone.
    let fs = Arc::new(Switch::default());
    fs.refuse
        .store(errno(rustix::io::Errno::ROFS) as usize, Ordering::SeqCst);
    let r = rig.rotator().with_fs(fs);
    let err = r.renew_due(true).await.unwrap_err();
    r.record_off_thread(vec![Change::Failed {
        at: unix_secs(rig.clock.now()),
        error: err.to_string(),
        installed: None,
    }])
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy_lib::admin::serve(
        listener,
        r.metrics().router().merge(r.status_source().router()),
        async move {
            let _ = stopped.await;
        },
    ));
    let config = rig.config.clone();
    let now = rig.clock.now();
    let asked = tokio::task::spawn_blocking(move || crate::status::query(&config, now))
        .await
        .unwrap();
    assert_eq!(asked.status, Level::Warning, "{}", asked.text());
    assert!(
        asked.summary.contains("Read-only file system"),
        "{}",
        asked.summary
    );
    assert!(asked.text().contains("state file:"), "{}", asked.text());
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    // No daemon answering: the state file's report.
    let config = rig.config.clone();
    let fallback = tokio::task::spawn_blocking(move || crate::status::query(&config, now))
        .await
        .unwrap();
    assert_eq!(fallback.status, Level::Ok, "{}", fallback.text());
    assert_eq!(fallback.state_file, None);
}
