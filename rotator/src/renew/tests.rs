//! Cycle and daemon-loop tests against the in-process fake issuer, on simulated time.

use super::*;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use proxy_lib::certdir::{CERT_FILE, KEY_FILE};
use proxy_lib::clock::Clock;
use proxy_lib::identity::Identity;

use crate::daemon::{self, LoopOptions};
use crate::notify::{Notice, Notify};
use crate::testing::{CountingReload, FakeIssuer, ID, PausedClock, advance, config_in, identity};

const H: u64 = 3600;
const DAY: Duration = Duration::from_secs(24 * H);

/// 2026-11-27T12:00:00Z, a Friday.
fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_780_800)
}

struct Rig {
    _tmp: tempfile::TempDir,
    clock: PausedClock,
    issuer: Arc<FakeIssuer>,
    reloads: CountingReload,
    config: Config,
}

fn rig(lifetime: Duration, extra: &str) -> Rig {
    proxy_lib::install_crypto_provider();
    crate::testing::interest_in_everything();
    let tmp = crate::testing::fast_tempdir();
    let clock = PausedClock::new(start());
    let issuer = FakeIssuer::new(Arc::new(clock.clone()), lifetime);
    let config = config_in(tmp.path(), &issuer, extra);
    Rig {
        _tmp: tmp,
        clock,
        issuer,
        reloads: CountingReload::default(),
        config,
    }
}

impl Rig {
    fn rotator(&self) -> Rotator<Arc<FakeIssuer>, CountingReload> {
        Rotator::new(
            self.config.clone(),
            Arc::new(self.clock.clone()),
            self.issuer.clone(),
            self.reloads.clone(),
            Metrics::new(),
        )
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self._tmp.path().join(name)
    }

    fn calls(&self) -> usize {
        self.issuer.calls.load(Ordering::SeqCst)
    }

    fn serial_on_disk(&self) -> Option<String> {
        CertBundle::load_dir(&self.config.dir)
            .ok()
            .map(|(b, _)| b.leaf.serial)
    }
}

/// Records notifications with whether a valid cert was on disk at that moment.
#[derive(Debug, Default)]
struct Recorder {
    dir: PathBuf,
    clock: Option<PausedClock>,
    seen: Mutex<Vec<(Notice, bool)>>,
}

impl Notify for Recorder {
    fn notify(&self, notice: Notice) {
        let now = match &self.clock {
            Some(c) => c.now(),
            None => proxy_lib::clock::SystemClock.now(),
        };
        let valid = CertBundle::load_dir(&self.dir).is_ok_and(|(b, _)| b.check(now).is_ok());
        self.seen.lock().unwrap().push((notice, valid));
    }
}

/// Every file under `dir` with its bytes, except the state file and the (empty) lock file the
/// state file is written under.
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            if name == crate::state::STATE_FILE || name == crate::store::LOCK_FILE {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.push((name, Vec::new()));
                stack.push(p);
            } else if m.file_type().is_symlink() {
                out.push((
                    name,
                    std::fs::read_link(&p)
                        .unwrap()
                        .display()
                        .to_string()
                        .into_bytes(),
                ));
            } else {
                out.push((name, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn first_cycle_installs_and_second_is_not_due() {
    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    let out = r.cycle(false).await.unwrap();
    let Outcome::Rotated { serial, next, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(rig.serial_on_disk().as_deref(), Some(serial.as_str()));
    assert_eq!(rig.reloads.0.load(Ordering::SeqCst), 1);
    assert_eq!(
        r.cycle(false).await.unwrap(),
        Outcome::NotDue { until: next }
    );
    assert_eq!(rig.calls(), 1);
    // The token went out trimmed.
    assert_eq!(
        rig.issuer.tokens.lock().unwrap()[0],
        b"the-secret-token-value"
    );
    let m = r.metrics().encode();
    assert!(
        m.contains("rotator_rotations_total{result=\"success\"} 1"),
        "{m}"
    );
    // The rotation's stages are kept for `/status`: the new serial, not forced, no verify.
    let t = r.last_rotation().expect("the stages of the rotation");
    assert_eq!(t.serial, serial);
    assert!(!t.forced);
    assert_eq!((t.verify_attempts, t.verify_us), (0, 0));
    let stages = t.prepare_us + t.keygen_csr_us + t.certify_us + t.validate_us;
    assert!(stages + t.bundle_us + t.swap_us + t.hook_us <= t.total_us);
    assert!(t.decided_unix_us > 0);
    assert_eq!(r.status_source().report().last_rotation, Some(t));
}

// A bootstrap that fails is retried with the same key and CSR (a single-use token is bound to
// the key of its first issuance, and the first answer may have been lost); once certified, the
// next renewal presents the installed cert, needs no token, and uses a new key.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn bootstrap_retries_keep_the_key_and_renewals_present_the_cert() {
    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    rig.issuer
        .script(|_, _| Err(IssueError::Timeout(Duration::from_secs(5))));
    assert!(r.cycle(false).await.is_err());
    let out = r.cycle(false).await.unwrap();
    let Outcome::Rotated { serial, .. } = out else {
        panic!("{out:?}")
    };
    {
        let csrs = rig.issuer.csrs.lock().unwrap();
        assert_eq!(csrs.len(), 2);
        assert_eq!(csrs[0], csrs[1], "the retry re-sends the same CSR");
        assert_eq!(*rig.issuer.presented.lock().unwrap(), vec![None, None]);
    }
    // The token file is gone: the valid cert is the credential.
    std::fs::remove_file(&rig.config.token_file).unwrap();
    let out = r.cycle(true).await.unwrap();
    assert!(matches!(out, Outcome::Rotated { .. }), "{out:?}");
    assert_eq!(
        rig.issuer.presented.lock().unwrap()[2].as_deref(),
        Some(serial.as_str())
    );
    assert!(rig.issuer.tokens.lock().unwrap()[2].is_empty());
    {
        let csrs = rig.issuer.csrs.lock().unwrap();
        assert_ne!(csrs[2], csrs[1], "a renewal uses a new key");
    }
    // Without a valid cert (expired) and without a token, nothing is asked for.
    rig.clock.fake.advance(2 * DAY);
    let e = r.cycle(false).await.unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
    assert_eq!(rig.calls(), 3);
}

type Tweak = fn(&mut rcgen::CertificateParams, SystemTime);

fn bad_tweaks() -> Vec<(&'static str, Tweak)> {
    vec![
        ("another identity", |p, _| {
            let o =
                Identity::parse("web.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
            p.subject_alt_names = vec![
                rcgen::SanType::DnsName(o.to_string().try_into().unwrap()),
                rcgen::SanType::URI(o.spiffe_id().try_into().unwrap()),
            ];
        }),
        ("an extra SAN", |p, _| {
            p.subject_alt_names
                .push(rcgen::SanType::DnsName("evil.example".try_into().unwrap()))
        }),
        ("expired", |p, now| {
            p.not_before = (now - Duration::from_secs(7200)).into();
            p.not_after = (now - Duration::from_secs(1)).into();
        }),
        ("valid only in the future", |p, now| {
            p.not_before = (now + Duration::from_secs(3600)).into();
            p.not_after = (now + Duration::from_secs(7200)).into();
        }),
    ]
}

/// Feeds every kind of bad answer to a forced cycle; each must be refused with the dir
/// (apart from the state file) byte-for-byte unchanged and no reload run.
async fn refuse_all(rig: &Rig, r: &mut Rotator<Arc<FakeIssuer>, CountingReload>) {
    let before = snapshot(&rig.config.dir);
    let reloads = rig.reloads.0.load(Ordering::SeqCst);
    let check = |what: &str, res: Result<Outcome, CycleError>| {
        let err = res.expect_err(what);
        assert!(matches!(err, CycleError::Invalid(_)), "{what}: {err}");
        assert_eq!(
            snapshot(&rig.config.dir),
            before,
            "{what}: something was written"
        );
    };
    for (what, tweak) in bad_tweaks() {
        rig.issuer.script(move |iss, req| {
            let now = iss.clock.now();
            Ok(iss.sign(&req.csr_der, |p| tweak(p, now)))
        });
        check(what, r.cycle(true).await);
    }
    rig.issuer.script(|iss, _| Ok(iss.sign_with_other_key()));
    check("another public key", r.cycle(true).await);
    let foreign = FakeIssuer::new(rig.issuer.clock.clone(), DAY);
    rig.issuer
        .script(move |_, req| Ok(foreign.sign(&req.csr_der, |_| {})));
    check("not chaining to ca.crt", r.cycle(true).await);
    for (what, bytes) in [
        ("garbage DER", b"\x30\x82\x01garbage".to_vec()),
        ("garbage bytes", b"garbage".to_vec()),
        ("empty response", Vec::new()),
    ] {
        rig.issuer.script(move |_, _| {
            Ok(crate::client::CertifyResponse {
                leaf: bytes,
                ..Default::default()
            })
        });
        check(what, r.cycle(true).await);
    }
    assert_eq!(
        rig.reloads.0.load(Ordering::SeqCst),
        reloads,
        "no reload for a refused answer"
    );
    if rig.config.dir.exists() {
        let state = State::load(&rig.config.dir);
        assert!(state.last_error.unwrap().contains("refused"));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn each_bad_issuer_answer_is_refused_and_nothing_is_written() {
    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    // Into an empty dir, then over an installed set.
    refuse_all(&rig, &mut r).await;
    assert!(rig.serial_on_disk().is_none());
    r.cycle(true).await.unwrap();
    let installed = rig.serial_on_disk().unwrap();
    refuse_all(&rig, &mut r).await;
    assert_eq!(rig.serial_on_disk().unwrap(), installed);
    assert!(r.metrics().rotations_with(false) >= 16);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_unusable_cert_on_disk_means_renew_now() {
    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    assert_eq!(r.decide().1, Decision::RenewNow, "missing");
    r.cycle(false).await.unwrap();
    assert!(matches!(r.decide().1, Decision::At(_)));
    let dir = rig.config.dir.clone();
    let version = proxy_lib::certdir::resolve_data_dir(&dir);

    // Mismatched key.
    let good_key = std::fs::read(version.join(KEY_FILE)).unwrap();
    let other = crate::keygen::generate(&identity(), false).unwrap();
    std::fs::write(version.join(KEY_FILE), other.key.to_pem().as_bytes()).unwrap();
    assert_eq!(inspect_decision(&rig), Decision::RenewNow, "mismatched key");
    std::fs::write(version.join(KEY_FILE), &good_key).unwrap();
    assert!(matches!(inspect_decision(&rig), Decision::At(_)));

    // Unreadable cert.
    let good_crt = std::fs::read(version.join(CERT_FILE)).unwrap();
    std::fs::write(version.join(CERT_FILE), b"garbage").unwrap();
    assert_eq!(inspect_decision(&rig), Decision::RenewNow, "garbage cert");
    std::fs::write(version.join(CERT_FILE), &good_crt).unwrap();

    // Another identity's cert.
    let other_id =
        Identity::parse("web.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
    let now = rig.clock.now();
    let b = rig
        .issuer
        .pki
        .leaf(&other_id, now - Duration::from_secs(20), now + DAY);
    proxy_lib::test_util::write_data_dir(&dir, &b);
    assert_eq!(r.decide().1, Decision::RenewNow, "another identity");

    // The configured anchors rotate to a new PKI: the cert no longer chains to them.
    let mut r = rig.rotator();
    r.cycle(true).await.unwrap();
    assert!(matches!(r.decide().1, Decision::At(_)));
    let anchors_file = rig.path_of("anchors.pem");
    let saved = std::fs::read(&anchors_file).unwrap();
    let other_pki = proxy_lib::test_util::TestPki::new(rig.clock.now());
    std::fs::write(
        &anchors_file,
        proxy_lib::pem::certs_to_pem([&other_pki.anchor, &other_pki.anchor]),
    )
    .unwrap();
    assert_eq!(r.decide().1, Decision::RenewNow, "anchors rotated");
    std::fs::write(&anchors_file, saved).unwrap();

    // Expired (time moves on while the files stay).
    let mut r = rig.rotator();
    r.cycle(true).await.unwrap();
    assert!(matches!(r.decide().1, Decision::At(_)));
    rig.clock.fake.advance(DAY * 2);
    assert_eq!(r.decide().1, Decision::RenewNow, "expired");
}

/// A cert whose DNS SAN differs from the identity only in ASCII case (and has the absolute
/// form's trailing dot) is the identity: it is accepted, judged usable on disk afterwards, and
/// not renewed again until it is due.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_san_differing_only_in_case_is_accepted_and_then_judged_usable() {
    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    rig.issuer.script(|iss, req| {
        Ok(iss.sign(&req.csr_der, |p| {
            let san = format!("{}.", ID.to_ascii_uppercase());
            p.subject_alt_names[0] = rcgen::SanType::DnsName(san.try_into().unwrap());
        }))
    });
    let out = r.cycle(false).await.unwrap();
    let Outcome::Rotated { next, .. } = out else {
        panic!("{out:?}")
    };
    let (bundle, _) = CertBundle::load_dir(&rig.config.dir).unwrap();
    assert_ne!(
        bundle.leaf.dns_sans,
        [ID.to_string()],
        "the SAN on disk is the odd one"
    );
    assert_eq!(inspect_decision(&rig), Decision::At(next));
    assert_eq!(
        r.cycle(false).await.unwrap(),
        Outcome::NotDue { until: next }
    );
    assert_eq!(rig.calls(), 1, "renewed again");
}

fn inspect_decision(rig: &Rig) -> Decision {
    rig.rotator().decide().1
}

/// Rotation times (issuer calls) recorded by a scripted issuer that otherwise signs.
fn record_calls(rig: &Rig, n: usize) -> Arc<Mutex<Vec<SystemTime>>> {
    let times = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..n {
        let t = times.clone();
        rig.issuer.script(move |iss, req| {
            let now = iss.clock.now();
            t.lock().unwrap().push(now);
            if iss.down.load(Ordering::SeqCst) {
                return Err(crate::client::IssueError::Connect {
                    addr: "fake".into(),
                    reason: "down".into(),
                });
            }
            Ok(iss.sign(&req.csr_der, |_| {}))
        });
    }
    times
}

fn spawn_daemon(
    rig: &Rig,
    notifier: Arc<dyn Notify>,
) -> (daemon::Handle, tokio::task::JoinHandle<()>) {
    let (handle, controls) = daemon::controls();
    let r = rig.rotator();
    let task = tokio::spawn(daemon::run(
        r,
        notifier,
        controls,
        LoopOptions {
            watchdog: None,
            seed: Some(7),
        },
    ));
    (handle, task)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn thirty_days_of_day_certs_renew_at_70_percent_and_never_expire() {
    let rig = rig(DAY, "");
    let times = record_calls(&rig, 100);
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    // Every simulated hour a valid cert is on disk (and every gap below is shorter than a
    // lifetime, so there is none in between either).
    advance(Duration::from_secs(1)).await;
    for _ in 0..(30 * 24) {
        advance(Duration::from_secs(3600)).await;
        let (b, _) = CertBundle::load_dir(&rig.config.dir).expect("a cert is installed");
        b.check(rig.clock.now()).expect("the cert on disk is valid");
    }
    handle.shutdown();
    task.await.unwrap();
    let t = times.lock().unwrap().clone();
    assert!(
        t.len() >= 30 * 24 / 20,
        "only {} rotations in 30 days",
        t.len()
    );
    for w in t.windows(2) {
        let gap = w[1].duration_since(w[0]).unwrap().as_secs_f64() / DAY.as_secs_f64();
        assert!(
            (0.6..=0.8 + 1e-6).contains(&gap),
            "renewed at {gap:.3} of the lifetime"
        );
    }
    assert_eq!(t[0], start(), "the first cert is fetched at once");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn issuer_outage_backs_off_exponentially_to_the_cap_and_recovers_within_one_period() {
    let rig = rig(DAY, "");
    let times = record_calls(&rig, 100_000);
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(1)).await;
    assert_eq!(times.lock().unwrap().len(), 1);
    rig.issuer.down.store(true, Ordering::SeqCst);
    advance(Duration::from_secs(20 * H)).await;
    let failed = times.lock().unwrap().clone();
    rig.issuer.down.store(false, Ordering::SeqCst);
    let up_at = rig.clock.now();
    let serial_before = rig.serial_on_disk();
    advance(Duration::from_secs(300)).await;
    handle.shutdown();
    task.await.unwrap();

    let attempts = &failed[1..];
    assert!(attempts.len() > 10, "{} attempts", attempts.len());
    let cap = Duration::from_secs(300);
    let mut longest = Duration::ZERO;
    for (i, w) in attempts.windows(2).enumerate() {
        let gap = w[1].duration_since(w[0]).unwrap();
        let bound = Duration::from_secs(1u64 << i.min(20)).min(cap);
        assert!(gap >= Duration::from_secs(1), "gap {i} is {gap:?}");
        assert!(
            gap <= bound + Duration::from_millis(1),
            "gap {i} is {gap:?} > {bound:?}"
        );
        longest = longest.max(gap);
    }
    assert!(
        longest >= cap / 2,
        "backoff never approached the cap: {longest:?}"
    );
    // After the issuer returns, a new cert within one backoff period.
    let all = times.lock().unwrap().clone();
    let recovered = all
        .iter()
        .find(|t| **t >= up_at)
        .expect("a call after the issuer returned");
    assert!(recovered.duration_since(up_at).unwrap() <= cap);
    assert_ne!(rig.serial_on_disk(), serial_before);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_ten_hour_suspend_is_noticed_within_five_minutes() {
    let rig = rig(DAY, "");
    let times = record_calls(&rig, 100);
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(10 * H)).await;
    assert_eq!(times.lock().unwrap().len(), 1, "not due after 10 h");
    // Suspend: the wall clock jumps 10 h, tokio's monotonic clock does not.
    rig.clock.fake.advance(Duration::from_secs(10 * H));
    advance(Duration::from_secs(300)).await;
    let t = times.lock().unwrap().clone();
    assert_eq!(t.len(), 2, "renewal after the suspend");
    let resumed = start() + Duration::from_secs(20 * H);
    assert!(t[1].duration_since(resumed).unwrap() <= Duration::from_secs(300));
    handle.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn cron_schedule_fires_on_sundays_at_its_time() {
    use chrono::{Datelike, Timelike};
    // 30-day certs so only the schedule triggers renewals.
    let rig = rig(DAY * 30, "schedule = \"30 3 * * 0\"\n");
    let times = record_calls(&rig, 100);
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(22 * 86_400)).await;
    handle.shutdown();
    task.await.unwrap();
    let t = times.lock().unwrap().clone();
    assert_eq!(t[0], start(), "no cert at start: fetched at once");
    let fires: Vec<chrono::DateTime<chrono::Utc>> = t[1..].iter().map(|x| (*x).into()).collect();
    assert_eq!(fires.len(), 3, "{fires:?}");
    for (i, f) in fires.iter().enumerate() {
        assert_eq!(f.weekday(), chrono::Weekday::Sun, "{f}");
        assert_eq!((f.hour(), f.minute(), f.second()), (3, 30, 0), "{f}");
        assert_eq!(f.day(), [29, 6, 13][i], "{f}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn sighup_forces_exactly_one_rotation_and_one_reload() {
    let rig = rig(DAY, "");
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(1)).await;
    assert_eq!((rig.calls(), rig.reloads.0.load(Ordering::SeqCst)), (1, 1));
    for i in 2..5 {
        handle.force();
        advance(Duration::from_secs(1)).await;
        assert_eq!((rig.calls(), rig.reloads.0.load(Ordering::SeqCst)), (i, i));
    }
    handle.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failed_forced_renewal_of_a_good_cert_is_retried_with_backoff_until_it_succeeds() {
    let rig = rig(DAY, "");
    let times = record_calls(&rig, 1_000);
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(1)).await;
    let first = rig.serial_on_disk().expect("first cert installed");
    // The cert is good for most of a day; a SIGHUP while the issuer is down must not be
    // forgotten until the normal schedule comes round.
    rig.issuer.down.store(true, Ordering::SeqCst);
    handle.force();
    advance(Duration::from_secs(60)).await;
    let failed = times.lock().unwrap().len() - 1;
    assert!(
        failed >= 3,
        "a failed forced renewal was retried {} times in a minute",
        failed - 1
    );
    assert_eq!(rig.serial_on_disk().as_deref(), Some(first.as_str()));
    rig.issuer.down.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(300)).await;
    let renewed = rig.serial_on_disk().expect("a cert on disk");
    assert_ne!(
        renewed, first,
        "the forced renewal never succeeded after the issuer returned"
    );
    // Once it succeeded the daemon is back on the normal schedule: no more calls.
    let calls = times.lock().unwrap().len();
    advance(Duration::from_secs(3600)).await;
    assert_eq!(times.lock().unwrap().len(), calls);
    handle.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ready_is_sent_only_after_a_valid_cert_is_installed() {
    let rig = rig(DAY, "");
    rig.issuer.down.store(true, Ordering::SeqCst);
    let rec = Arc::new(Recorder {
        dir: rig.config.dir.clone(),
        clock: Some(rig.clock.clone()),
        ..Recorder::default()
    });
    let (handle, task) = spawn_daemon(&rig, rec.clone());
    advance(Duration::from_secs(600)).await;
    assert!(
        !rec.seen
            .lock()
            .unwrap()
            .iter()
            .any(|(n, _)| *n == Notice::Ready),
        "READY while the issuer is down"
    );
    rig.issuer.down.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(600)).await;
    handle.shutdown();
    task.await.unwrap();
    let seen = rec.seen.lock().unwrap().clone();
    let ready: Vec<_> = seen.iter().filter(|(n, _)| *n == Notice::Ready).collect();
    assert_eq!(ready.len(), 1, "{seen:?}");
    assert!(ready[0].1, "READY before the cert was installed");
    assert!(
        seen.iter()
            .any(|(n, _)| matches!(n, Notice::Status(s) if s.starts_with("next renewal at")))
    );
    assert_eq!(seen.last().unwrap().0, Notice::Stopping);
}

/// Notifications as they come.
struct Channel(tokio::sync::mpsc::UnboundedSender<Notice>);

impl Notify for Channel {
    fn notify(&self, notice: Notice) {
        let _ = self.0.send(notice);
    }
}

/// While another process (a one-shot `rotate`) holds the store lock, the daemon's swap waits
/// for it off the runtime thread: `/metrics` and `/ready` keep answering meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn metrics_and_ready_answer_while_the_swap_waits_for_the_store_lock() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;
    let rig = rig(DAY, "");
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let (release, released_rx) = std::sync::mpsc::channel::<()>();
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = crate::store::Store::new(&rig.config.dir, None);
    let holder = {
        let released = released.clone();
        std::thread::spawn(move || {
            let guard = store.lock().unwrap();
            let _ = locked_tx.send(());
            // Released when the test says so; the timeout only keeps a daemon that blocks
            // its runtime thread from hanging the test forever.
            let _ = released_rx.recv_timeout(Duration::from_secs(30));
            released.store(true, Ordering::SeqCst);
            drop(guard);
        })
    };
    locked.await.unwrap();
    let (called_tx, called) = tokio::sync::oneshot::channel();
    rig.issuer.script(move |iss, req| {
        let _ = called_tx.send(());
        Ok(iss.sign(&req.csr_der, |_| {}))
    });
    let r = rig.rotator();
    let metrics = r.metrics().clone();
    let (notices, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (handle, controls) = daemon::controls();
    let task = tokio::spawn(daemon::run(
        r,
        Arc::new(Channel(notices)),
        controls,
        LoopOptions::default(),
    ));
    called.await.unwrap();
    // The daemon has its new cert and waits for the lock to install it.
    let router = metrics.router();
    for (path, want) in [
        ("/metrics", StatusCode::OK),
        ("/ready", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), want, "{path}");
    }
    assert!(
        !released.load(Ordering::SeqCst),
        "the admin endpoints answered only once the lock was released"
    );
    assert_eq!(rig.serial_on_disk(), None, "installed without the lock");
    release.send(()).unwrap();
    while let Some(n) = seen.recv().await {
        if n == Notice::Ready {
            break;
        }
    }
    assert!(rig.serial_on_disk().is_some());
    assert!(metrics.is_ready());
    handle.shutdown();
    task.await.unwrap();
    holder.join().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn the_token_and_key_never_reach_the_logs_or_other_files() {
    let (buf, _guard) = crate::testing::LogCapture::start(tracing::Level::TRACE);

    let rig = rig(DAY, "");
    let mut r = rig.rotator();
    r.cycle(false).await.unwrap();
    rig.issuer.script(|_, _| {
        Err(crate::client::IssueError::Status {
            code: tonic::Code::Unauthenticated,
            message: "bad token".into(),
        })
    });
    let e = r.cycle(true).await.unwrap_err();
    tracing::warn!(error = %e, "logged like the binary does");
    r.cycle(true).await.unwrap();

    let logs = buf.text();
    assert!(logs.contains("rotated"), "logs were captured: {logs}");
    assert!(
        !logs.contains("the-secret-token-value"),
        "token logged:\n{logs}"
    );
    let key = proxy_lib::pem::PrivateKey::read(&rig.config.dir.join(KEY_FILE)).unwrap();
    let key_pem = key.to_pem();
    // The base64 body without the fixed P-256 PKCS#8 prefix.
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let secret = &body[48..];
    assert!(!logs.replace('\n', "").contains(secret), "key logged");
    assert!(!logs.contains("PRIVATE KEY"));
    // The key's bytes appear in exactly one file: the version dir's tls.key.
    let der = key.pkcs8_der().to_vec();
    let mut holders = Vec::new();
    for (name, bytes) in snapshot(rig._tmp.path()) {
        let text = String::from_utf8_lossy(&bytes).replace('\n', "");
        if bytes.windows(der.len()).any(|w| w == der) || text.contains(secret) {
            holders.push(name);
        }
    }
    let version = proxy_lib::certdir::resolve_data_dir(&rig.config.dir);
    let expect = version
        .join(KEY_FILE)
        .strip_prefix(rig._tmp.path())
        .unwrap()
        .display()
        .to_string();
    assert_eq!(holders, vec![expect]);
    let _ = ID;
}

/// The config lines of a `[verify]` against `addr`: three attempts 10 ms apart.
fn verify_extra(addr: std::net::SocketAddr) -> String {
    format!("[verify]\naddr = \"{addr}\"\nattempts = 3\ndelay = \"10ms\"\n")
}

/// A rig on real time (sockets and handshakes need it), with `[verify]` at `addr`.
fn verify_rig(addr: std::net::SocketAddr) -> (tempfile::TempDir, Arc<FakeIssuer>, Config) {
    proxy_lib::install_crypto_provider();
    let tmp = crate::testing::fast_tempdir();
    let clock: proxy_lib::clock::SharedClock = Arc::new(proxy_lib::clock::SystemClock);
    let issuer = FakeIssuer::new(clock, DAY);
    let config = config_in(tmp.path(), &issuer, &verify_extra(addr));
    (tmp, issuer, config)
}

/// A [`verify_rig`] whose `[verify]` listener serves whatever is in the rig's cert dir.
async fn verify_rig_serving_its_dir() -> (
    tempfile::TempDir,
    Arc<FakeIssuer>,
    Config,
    crate::testing::FakeConsumer,
) {
    use crate::testing::{FakeConsumer, Serve};
    let (tmp, issuer, cfg0) = verify_rig("127.0.0.1:1".parse().unwrap());
    let server = FakeConsumer::start(Serve::FromDir(cfg0.dir.clone()), &issuer.pki.anchors()).await;
    let config = config_in(tmp.path(), &issuer, &verify_extra(server.addr));
    (tmp, issuer, config, server)
}

#[tokio::test(flavor = "current_thread")]
async fn verify_fails_after_retrying_the_reload_when_the_old_cert_is_still_served() {
    use crate::testing::{FakeConsumer, Serve};
    // The "old" cert the listener keeps serving.
    let (tmp, issuer, _) = verify_rig("127.0.0.1:1".parse().unwrap());
    let now = proxy_lib::clock::SystemClock.now();
    let old = issuer
        .pki
        .leaf(&identity(), now - Duration::from_secs(60), now + DAY);
    let server =
        FakeConsumer::start(Serve::Fixed(Box::new(old.clone())), &issuer.pki.anchors()).await;
    let config = config_in(tmp.path(), &issuer, &verify_extra(server.addr));
    let reloads = CountingReload::default();
    let metrics = Metrics::new();
    let mut r = Rotator::new(
        config.clone(),
        Arc::new(proxy_lib::clock::SystemClock),
        issuer.clone(),
        reloads.clone(),
        metrics.clone(),
    );
    let err = r.cycle(false).await.unwrap_err();
    let CycleError::Verify {
        attempts, error, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*attempts, 3);
    assert!(
        matches!(error, crate::verify::VerifyError::Mismatch { .. }),
        "{error}"
    );
    assert!(err.installed(), "the new cert itself is on disk");
    assert_eq!(
        reloads.0.load(Ordering::SeqCst),
        3,
        "the reload was retried"
    );
    assert_eq!(metrics.reloads_with(false), 3);
    assert_eq!(metrics.rotations_with(false), 1);
    let text = metrics.encode();
    assert!(
        text.contains("rotator_reloads_total{result=\"failure\"} 3"),
        "{text}"
    );
    let state = State::load(&config.dir);
    assert!(state.last_error.unwrap().contains("verify failed"));
    // The new cert was presented as the client cert each time.
    let new = CertBundle::load_dir(&config.dir).unwrap().0;
    let seen = server.seen(3).await;
    assert_eq!(seen, vec![new.leaf.sha256.clone(); 3]);
    assert_ne!(new.leaf.sha256, old.leaf.sha256);
}

#[tokio::test(flavor = "current_thread")]
async fn verify_passes_when_the_listener_serves_the_new_cert() {
    let (_tmp, issuer, config, server) = verify_rig_serving_its_dir().await;
    let reloads = CountingReload::default();
    let metrics = Metrics::new();
    let mut r = Rotator::new(
        config.clone(),
        Arc::new(proxy_lib::clock::SystemClock),
        issuer.clone(),
        reloads.clone(),
        metrics.clone(),
    );
    let out = r.cycle(false).await.unwrap();
    let Outcome::Rotated { sha256, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(reloads.0.load(Ordering::SeqCst), 1);
    assert_eq!(server.seen(1).await, vec![sha256.clone()]);
    assert_eq!(metrics.reloads_with(false), 0);
    assert_eq!(metrics.rotations_with(true), 1);
    // Again with --force: a new cert, presented and served.
    let Outcome::Rotated { sha256: second, .. } = r.cycle(true).await.unwrap() else {
        panic!()
    };
    assert_ne!(second, sha256);
    assert_eq!(server.seen(2).await.last(), Some(&second));
}

#[tokio::test(flavor = "current_thread")]
async fn with_verify_ready_waits_until_the_listener_serves_the_cert() {
    use crate::testing::{FakeConsumer, Serve};
    let (tmp, issuer, _) = verify_rig("127.0.0.1:1".parse().unwrap());
    let now = proxy_lib::clock::SystemClock.now();
    let old = issuer
        .pki
        .leaf(&identity(), now - Duration::from_secs(60), now + DAY);
    let server = FakeConsumer::start(Serve::Fixed(Box::new(old)), &issuer.pki.anchors()).await;
    let config = config_in(
        tmp.path(),
        &issuer,
        &format!(
            "[verify]\naddr = \"{}\"\nattempts = 2\ndelay = \"5ms\"\n\
             [backoff]\nmin = \"20ms\"\nmax = \"100ms\"\n",
            server.addr
        ),
    );
    let rec = Arc::new(Recorder {
        dir: config.dir.clone(),
        clock: None,
        ..Recorder::default()
    });
    let metrics = Metrics::new();
    let r = Rotator::new(
        config.clone(),
        Arc::new(proxy_lib::clock::SystemClock),
        issuer.clone(),
        CountingReload::default(),
        metrics.clone(),
    );
    let (handle, controls) = daemon::controls();
    let task = tokio::spawn(daemon::run(
        r,
        rec.clone(),
        controls,
        LoopOptions::default(),
    ));
    let ready = || {
        rec.seen
            .lock()
            .unwrap()
            .iter()
            .any(|(n, _)| *n == Notice::Ready)
    };
    // The cert gets installed but the listener keeps the old one: not ready, checks repeat.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        CertBundle::load_dir(&config.dir).is_ok(),
        "the cert is installed"
    );
    assert!(!ready(), "READY although the listener serves the old cert");
    assert!(!metrics.is_ready());
    assert!(server.seen(4).await.len() >= 4, "verify is retried");
    // The listener picks up the new cert: READY follows.
    server.set(Serve::FromDir(config.dir.clone()));
    for _ in 0..300 {
        if ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready(), "no READY after the listener serves the new cert");
    assert!(metrics.is_ready());
    assert_eq!(
        issuer.calls.load(Ordering::SeqCst),
        1,
        "no new cert fetched for a reload problem"
    );
    handle.shutdown();
    task.await.unwrap();
}

/// Reload hooks that fail while `failing` is set, counting every run.
#[derive(Debug, Default, Clone)]
struct FlakyReload {
    runs: Arc<std::sync::atomic::AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Reload for FlakyReload {
    async fn reload(&self) -> Vec<crate::reload::HookOutcome> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let result = if self.failing.load(Ordering::SeqCst) {
            Err(ReloadError::Exec {
                program: "reload-app".into(),
                reason: "exit status: 1".into(),
            })
        } else {
            Ok(())
        };
        vec![crate::reload::HookOutcome {
            hook: "exec",
            result,
        }]
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rotate_whose_hooks_failed_runs_them_again_next_time_instead_of_not_due() {
    let rig = rig(DAY, "");
    let hooks = FlakyReload::default();
    hooks.failing.store(true, Ordering::SeqCst);
    // Each `rotate` run is a fresh process: a fresh rotator.
    let rotate = || async {
        Rotator::new(
            rig.config.clone(),
            Arc::new(rig.clock.clone()),
            rig.issuer.clone(),
            hooks.clone(),
            Metrics::new(),
        )
        .cycle(false)
        .await
    };
    let status = || crate::status::report(&rig.config, rig.clock.now());

    let err = rotate().await.unwrap_err();
    assert!(matches!(err, CycleError::Reload { .. }), "{err}");
    let serial = rig.serial_on_disk().expect("the new cert is installed");
    assert_eq!(
        State::load(&rig.config.dir).unfinished.as_deref(),
        Some(serial.as_str())
    );
    let r = status();
    assert_eq!(r.status, crate::status::Level::Warning, "{}", r.text());
    assert!(
        r.summary
            .starts_with("renewal failing (1 attempt): new cert (serial"),
        "{}",
        r.summary
    );

    // Still failing: the next run tries the hooks again (not "not due"), fetching nothing.
    advance(Duration::from_secs(600)).await;
    let err = rotate().await.unwrap_err();
    assert!(matches!(err, CycleError::Reload { .. }), "{err}");
    assert!(status().summary.contains("(2 attempts)"));

    // The app takes the reload now: the run completes the rotation.
    hooks.failing.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(600)).await;
    let out = rotate().await.unwrap();
    let Outcome::Reloaded { serial: done, next } = out else {
        panic!("{out:?}")
    };
    assert_eq!(done, serial);
    assert!(next > rig.clock.now());
    assert_eq!(hooks.runs.load(Ordering::SeqCst), 3);
    assert_eq!(rig.calls(), 1, "no new cert for a reload problem");
    assert_eq!(rig.serial_on_disk().as_deref(), Some(serial.as_str()));
    let state = State::load(&rig.config.dir);
    assert_eq!((state.unfinished, state.last_error), (None, None));
    let r = status();
    assert_eq!(r.status, crate::status::Level::Ok, "{}", r.text());

    // And from then on, "not due" without running anything.
    assert_eq!(
        rotate().await.unwrap(),
        Outcome::NotDue { until: next },
        "the same renewal point"
    );
    assert_eq!(hooks.runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn on_a_fresh_host_with_the_issuer_down_each_attempt_logs_one_line_and_status_says_why() {
    let (logs, _guard) = crate::testing::LogCapture::start(tracing::Level::INFO);
    let rig = rig(DAY, "");
    rig.issuer.down.store(true, Ordering::SeqCst);
    assert!(!rig.config.dir.exists(), "a host that never got a cert");
    let (handle, task) = spawn_daemon(&rig, Arc::new(crate::notify::Silent));
    advance(Duration::from_secs(120)).await;
    handle.shutdown();
    task.await.unwrap();

    let attempts = rig.calls();
    assert!(attempts >= 5, "{attempts} attempts in 2 minutes");
    let text = logs.text();
    let lines: Vec<&str> = text.lines().collect();
    let failed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("renewal failed"))
        .collect();
    assert_eq!(failed.len(), attempts, "one line per attempt:\n{text}");
    for (i, l) in failed.iter().enumerate() {
        for want in [
            " WARN ",
            "error=cannot reach the issuer",
            &format!("failures={}", i + 1),
            "retry_at=",
        ] {
            assert!(l.contains(want), "{want:?} missing from {l}");
        }
    }
    assert!(!text.contains("cannot write the state file"), "{text}");
    // Besides those: why it renews (once) and the shutdown.
    assert_eq!(lines.len(), attempts + 2, "{text}");
    assert!(lines[0].contains("no usable cert on disk; renewing now"));
    assert!(lines[attempts + 1].contains("shutting down"));

    // `status` says why there is no cert, not only that tls.crt is missing.
    let r = crate::status::report(&rig.config, rig.clock.now());
    assert_eq!(r.status, crate::status::Level::Critical);
    let want = format!("renewal failing ({attempts} attempts): cannot reach the issuer at fake");
    assert!(r.summary.starts_with(&want), "{}", r.summary);
    assert!(
        r.summary.contains("cannot load the cert set"),
        "{}",
        r.summary
    );
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("cannot reach the issuer")),
        "{r:?}"
    );
}

/// A cert set on disk whose `tls.key` openssl wrote as SEC1, PKCS#1 or PKCS#8 (PEM or DER)
/// is read wherever the rotator reads a key: `inspect` judges it usable (no renewal),
/// `status` says OK, and the verify handshake presents it as the client certificate to a
/// listener that serves the same set.
#[tokio::test(flavor = "current_thread")]
async fn a_cert_set_whose_key_openssl_wrote_in_each_encoding_is_usable_and_verifies() {
    let keys_dir = tempfile::tempdir().unwrap();
    let Some(keys) = proxy_lib::test_keys::openssl_keys(keys_dir.path()) else {
        return;
    };
    let (_tmp, issuer, config, server) = verify_rig_serving_its_dir().await;
    let clock: proxy_lib::clock::SharedClock = Arc::new(proxy_lib::clock::SystemClock);
    let verify = config.verify.clone().unwrap();
    for (i, k) in keys.iter().enumerate() {
        let key = proxy_lib::key::PrivateKey::read(&k.path).unwrap();
        let now = clock.now();
        let set =
            issuer
                .pki
                .leaf_for_key(&identity(), &key, now - Duration::from_secs(60), now + DAY);
        let version = proxy_lib::test_util::write_data_dir(&config.dir, &set);
        std::fs::copy(&k.path, version.join(KEY_FILE)).unwrap();

        let mut r = Rotator::new(
            config.clone(),
            clock.clone(),
            issuer.clone(),
            CountingReload::default(),
            Metrics::new(),
        );
        let (_, decision) = r.decide();
        assert!(
            matches!(decision, Decision::At(_)),
            "{}: {decision:?}",
            k.name
        );
        let report = crate::status::report(&config, clock.now());
        assert_eq!(
            report.status,
            crate::status::Level::Ok,
            "{}: {}",
            k.name,
            report.summary
        );
        let (on_disk, _) = CertBundle::load_dir(&config.dir).unwrap();
        assert_eq!(on_disk.key.format(), k.format, "{}", k.name);
        let served =
            crate::verify::served_leaf_matches(&verify.addr, ID, &on_disk, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", k.name));
        assert_eq!(served, set.leaf.sha256, "{}", k.name);
        assert_eq!(server.seen(i + 1).await[i], set.leaf.sha256, "{}", k.name);
    }
    assert_eq!(issuer.calls.load(Ordering::SeqCst), 0);
}

mod bundle;
mod hardening;
