//! Every event in every state of the daemon's machine (a table), then the rules that take
//! several transitions: backoff growth and its bound, the retry_serial rule, the verify
//! retry, READY once, forced renewals and shutdown during an operation, the trust-bundle poll.

use super::*;
use std::time::{Duration, UNIX_EPOCH};

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600;
/// The planned renewal of the test cert, in seconds after T0.
const NEXT: u64 = 36_000;

fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0 + s)
}

fn policy() -> Policy {
    Policy {
        backoff_min: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        ..Policy::default()
    }
}

/// Received an hour before T0, valid until T0 + 20 h (notAfter − margin ≈ T0 + 18.95 h).
fn times() -> CertTimes {
    let t = at(0) - Duration::from_secs(3600);
    CertTimes::received(t, t, at(20 * 3600))
}

fn good(serial: &str) -> Disk {
    Disk {
        cert: Ok((serial.into(), times())),
        decision: Decision::At(at(NEXT)),
    }
}

fn due(serial: &str) -> Disk {
    Disk {
        decision: Decision::RenewNow,
        ..good(serial)
    }
}

fn missing() -> Disk {
    Disk {
        cert: Err("no cert".into()),
        decision: Decision::RenewNow,
    }
}

fn fail(error: &str, installed: Option<&str>) -> Failure {
    Failure {
        error: error.into(),
        installed: installed.map(str::to_string),
    }
}

/// A machine after `events`, all at T0. The jitter sample is 1 throughout: every backoff is
/// its cap (1 s, 2 s, 4 s, ...).
fn drive(verify: bool, events: Vec<Event>) -> Machine {
    let mut m = Machine::new(policy(), verify);
    for e in events {
        m.on(at(0), 1.0, e);
    }
    m
}

/// One line per action; times as `@seconds after T0`.
fn show(a: &Action) -> String {
    let t = |t: SystemTime| format!("@{}", t.duration_since(at(0)).unwrap().as_secs());
    let s = match a {
        Action::Observe => "observe".to_string(),
        Action::Renew { forced: false } => "renew".into(),
        Action::Renew { forced: true } => "renew forced".into(),
        Action::Verify => "verify".into(),
        Action::PollBundle => "poll bundle".into(),
        Action::SetReady(r) => format!("ready={r}"),
        Action::Notify(Notice::Ready) => "READY".into(),
        Action::Notify(Notice::Status(s)) => format!("STATUS {s}"),
        Action::Notify(Notice::Watchdog) => "WATCHDOG".into(),
        Action::Notify(Notice::Stopping) => "STOPPING".into(),
        Action::Persist(changes) => {
            let c: Vec<String> = changes
                .iter()
                .map(|c| match c {
                    Change::Installed { serial, .. } => format!("installed {serial}"),
                    Change::Succeeded { at } => format!("ok@{}", at - T0),
                    Change::Completed { at } => format!("done@{}", at - T0),
                    Change::Failed {
                        at,
                        error,
                        installed: None,
                    } => format!("fail@{} {error}", at - T0),
                    Change::Failed {
                        at,
                        error,
                        installed: Some(s),
                    } => format!("fail@{} {error} ({s})", at - T0),
                    Change::NextRenewal(n) => format!("next@{}", n - T0),
                    Change::Bundle { error: None } => "bundle ok".into(),
                    Change::Bundle { error: Some(e) } => format!("bundle refused: {e}"),
                })
                .collect();
            format!("persist {}", c.join(", "))
        }
        Action::Log(Log::Forced) => "log forced".into(),
        Action::Log(Log::NoUsableCert { reason }) => format!("log no usable cert: {reason}"),
        Action::Log(Log::RenewalFailed {
            error,
            failures,
            retry_at,
        }) => format!(
            "log renewal failed: {error} failures={failures} retry_at={}",
            t(*retry_at)
        ),
        Action::Log(Log::InstalledButFailed { error, retry_at }) => {
            format!(
                "log installed but failed: {error} retry_at={}",
                t(*retry_at)
            )
        }
        Action::Log(Log::ReloadFailed { error, retry_at }) => {
            format!("log reload failed: {error} retry_at={}", t(*retry_at))
        }
        Action::Log(Log::VerifyFailed { error, retry_at }) => {
            format!("log verify failed: {error} retry_at={}", t(*retry_at))
        }
        Action::Log(Log::Status { text, quiet }) => {
            format!("log {} {text}", if *quiet { "debug" } else { "info" })
        }
        Action::Log(Log::BundlePollFailed { error, next }) => {
            format!("log bundle poll failed: {error} next={}", t(*next))
        }
        Action::Log(Log::ShuttingDown) => "log shutting down".into(),
        Action::Stop => "stop".into(),
    };
    // Status texts carry RFC 3339 times.
    [0, 1, 2, 4, NEXT]
        .iter()
        .fold(s, |s, x| s.replace(&rfc3339(at(*x)), &format!("@{x}")))
}

fn deadline(m: &Machine) -> Option<u64> {
    m.next_deadline()
        .map(|t| t.duration_since(at(0)).unwrap().as_secs())
}

/// Every state the daemon can be in, reached through its own transitions at T0.
fn states() -> Vec<(&'static str, Machine)> {
    use Event::*;
    let renewing = vec![Start, Observed(due("A"))];
    let backoff = vec![
        Start,
        Observed(good("A")),
        Force,
        Observed(good("A")),
        Renewed {
            result: Err(fail("issuer down", None)),
            disk: good("A"),
        },
    ];
    let verify_backoff = vec![
        Start,
        Observed(good("A")),
        Verified {
            result: Err(fail("served another cert", None)),
            disk: good("A"),
        },
    ];
    let reload_backoff = vec![
        Start,
        Observed(due("A")),
        Renewed {
            result: Err(fail("reload failed", Some("B"))),
            disk: good("B"),
        },
    ];
    let with = |mut v: Vec<Event>, e: Event| {
        v.push(e);
        v
    };
    let resuming = |events: Vec<Event>| {
        let mut m = Machine::new(policy(), false).resuming(true);
        for e in events {
            m.on(at(0), 1.0, e);
        }
        m
    };
    // Polling the bundle every second: the first poll is due at T0 + 1 s.
    let polling = |events: Vec<(u64, Event)>| {
        let mut m = Machine::new(policy(), false).polling_bundle(Some(Duration::from_secs(1)));
        for (s, e) in events {
            m.on(at(s), 1.0, e);
        }
        m
    };
    let to_poll = vec![(0, Start), (0, Observed(good("A")))];
    let in_poll = vec![
        (0, Start),
        (0, Observed(good("A"))),
        (1, Deadline),
        (1, Observed(good("A"))),
    ];
    vec![
        ("starting", drive(false, vec![])),
        ("observing", drive(false, vec![Start])),
        ("waiting", drive(false, vec![Start, Observed(good("A"))])),
        ("backoff", drive(false, backoff.clone())),
        ("backoff, observing", drive(false, with(backoff, Deadline))),
        ("verify backoff", drive(true, verify_backoff.clone())),
        (
            "verify backoff, observing",
            drive(true, with(verify_backoff, Deadline)),
        ),
        ("reload backoff", drive(false, reload_backoff.clone())),
        (
            "reload backoff, observing",
            drive(false, with(reload_backoff, Deadline)),
        ),
        ("renewing", drive(false, renewing.clone())),
        ("verifying", drive(true, vec![Start, Observed(good("A"))])),
        (
            "reloading again (resumed, no [verify])",
            resuming(vec![Start, Observed(good("A"))]),
        ),
        ("renewing, stopping", drive(false, with(renewing, Shutdown))),
        (
            "stopped",
            drive(false, vec![Start, Observed(good("A")), Shutdown]),
        ),
        ("waiting, bundle poll at T0 + 1 s", polling(to_poll)),
        ("polling the bundle", polling(in_poll.clone())),
        (
            "polling the bundle, stopping",
            polling(with_at(in_poll, (1, Shutdown))),
        ),
    ]
}

fn with_at(mut v: Vec<(u64, Event)>, e: (u64, Event)) -> Vec<(u64, Event)> {
    v.push(e);
    v
}

/// Every event, in the order of the table's columns.
fn events() -> Vec<Event> {
    use Event::*;
    vec![
        Start,
        Observed(good("A")),
        Observed(good("B")),
        Observed(due("A")),
        Observed(missing()),
        Deadline,
        Force,
        Shutdown,
        Watchdog,
        Renewed {
            result: Ok(()),
            disk: good("B"),
        },
        Renewed {
            result: Err(fail("issuer down", None)),
            disk: due("A"),
        },
        Renewed {
            result: Err(fail("reload failed", Some("B"))),
            disk: good("B"),
        },
        Verified {
            result: Ok(()),
            disk: good("A"),
        },
        Verified {
            result: Err(fail("served another cert", None)),
            disk: good("A"),
        },
        BundlePolled {
            result: Ok(()),
            disk: good("A"),
        },
        BundlePolled {
            result: Err(fail("issuer down", None)),
            disk: good("A"),
        },
        BundlePolled {
            result: Err(fail("reload failed", Some("A"))),
            disk: good("A"),
        },
    ]
}

type Row = (&'static [&'static str], Option<u64>);

const NOTHING: &[&str] = &[];
const STOP: &[&str] = &["STOPPING", "log shutting down", "stop"];
const FORCED: &[&str] = &["log forced"];
const WATCHDOG: &[&str] = &["WATCHDOG"];
const FIRST_GOOD: &[&str] = &[
    "ready=true",
    "READY",
    "STATUS next renewal at @36000",
    "persist next@36000",
    "log info next renewal at @36000",
];

/// A state that only waits for `Start` or an operation's result: everything but the control
/// events changes nothing.
const fn idle(
    start: Row,
    shutdown: Row,
    results: [Row; 8],
    observed: [Row; 4],
    deadline: Row,
    force: Row,
    watchdog: Row,
) -> [Row; 17] {
    [
        start,
        observed[0],
        observed[1],
        observed[2],
        observed[3],
        deadline,
        force,
        shutdown,
        watchdog,
        results[0],
        results[1],
        results[2],
        results[3],
        results[4],
        results[5],
        results[6],
        results[7],
    ]
}

/// A sleeping state with deadline `d`: only the timer, SIGHUP, SIGTERM and the watchdog act.
const fn sleeping(d: u64) -> [Row; 17] {
    let n = (NOTHING, Some(d));
    idle(
        n,
        (STOP, None),
        [n; 8],
        [n; 4],
        (&["observe"], None),
        (&["log forced", "observe"], None),
        (WATCHDOG, Some(d)),
    )
}

/// An operation in progress: the control events are noted, results of other operations and
/// observations ignored.
const fn busy(shutdown: &'static [&'static str], results: [Row; 8]) -> [Row; 17] {
    let n = (NOTHING, None);
    idle(
        n,
        (shutdown, None),
        results,
        [n; 4],
        n,
        (FORCED, None),
        (WATCHDOG, None),
    )
}

/// Observing: the observation decides.
const fn observing(observed: [Row; 4]) -> [Row; 17] {
    let n = (NOTHING, None);
    idle(
        n,
        (STOP, None),
        [n; 8],
        observed,
        n,
        (FORCED, None),
        (WATCHDOG, None),
    )
}

/// The expected actions and next deadline for each state (rows, in the order of
/// [`states`]) and event (columns, in the order of [`events`]), all at T0 + 1 s.
const TABLE: [[Row; 17]; 17] = {
    let n = (NOTHING, None);
    [
        // starting
        idle(
            (&["observe"], None),
            (STOP, None),
            [n; 8],
            [n; 4],
            n,
            (FORCED, None),
            (WATCHDOG, None),
        ),
        // observing
        observing([
            (FIRST_GOOD, Some(NEXT)),
            (FIRST_GOOD, Some(NEXT)),
            (&["renew"], None),
            (&["log no usable cert: no cert", "renew"], None),
        ]),
        // waiting
        sleeping(NEXT),
        // backoff: the renewal failed at T0, retried at T0 + 1 s
        sleeping(1),
        // backoff, observing at the retry time: due, whatever is on disk
        observing([
            (&["renew"], None),
            (&["renew"], None),
            (&["renew"], None),
            (&["renew"], None),
        ]),
        // verify backoff: the verify failed at T0, checked again at T0 + 1 s
        sleeping(1),
        // verify backoff, observing at the check time
        observing([
            (&["verify"], None),
            (&["verify"], None),
            (&["renew"], None),
            (&["log no usable cert: no cert", "renew"], None),
        ]),
        // reload backoff: the hooks of the new cert B failed at T0 (no [verify]), run again at
        // T0 + 1 s
        sleeping(1),
        // reload backoff, observing at the retry time: the hooks run again, the renewal wins
        observing([
            (&["verify"], None),
            (&["verify"], None),
            (&["renew"], None),
            (&["log no usable cert: no cert", "renew"], None),
        ]),
        // renewing (cert A due)
        busy(
            NOTHING,
            [
                (FIRST_GOOD_AFTER_RENEWAL, Some(NEXT)),
                (RENEWAL_FAILED, Some(2)),
                (INSTALLED_BUT_FAILED, Some(2)),
                n,
                n,
                n,
                n,
                n,
            ],
        ),
        // verifying (cert A found at start with [verify])
        busy(
            NOTHING,
            [
                n,
                n,
                n,
                (
                    &[
                        "ready=true",
                        "READY",
                        "STATUS next renewal at @36000",
                        "persist done@1, next@36000",
                        "log info next renewal at @36000",
                    ],
                    Some(NEXT),
                ),
                (
                    &[
                        "log verify failed: served another cert retry_at=@2",
                        "ready=false",
                        "STATUS the listener does not serve the new cert yet; checking again at @2",
                        "persist fail@1 served another cert, next@2",
                        "log debug the listener does not serve the new cert yet; checking again at @2",
                    ],
                    Some(2),
                ),
                n,
                n,
                n,
            ],
        ),
        // reloading again: a daemon started over a state file that says the last reload failed
        busy(
            NOTHING,
            [
                n,
                n,
                n,
                (
                    &[
                        "ready=true",
                        "READY",
                        "STATUS next renewal at @36000",
                        "persist done@1, next@36000",
                        "log info next renewal at @36000",
                    ],
                    Some(NEXT),
                ),
                (
                    &[
                        "log reload failed: served another cert retry_at=@2",
                        "ready=true",
                        "READY",
                        "STATUS the reload hooks failed; running them again at @2",
                        "persist fail@1 served another cert, next@2",
                        "log debug the reload hooks failed; running them again at @2",
                    ],
                    Some(2),
                ),
                n,
                n,
                n,
            ],
        ),
        // renewing, stopping: the renewal ends, is recorded, then the daemon stops
        busy(
            NOTHING,
            [
                (
                    &["persist ok@1", "STOPPING", "log shutting down", "stop"],
                    None,
                ),
                (
                    &[
                        "log renewal failed: issuer down failures=1 retry_at=@2",
                        "persist fail@1 issuer down",
                        "STOPPING",
                        "log shutting down",
                        "stop",
                    ],
                    None,
                ),
                (
                    &[
                        "log installed but failed: reload failed retry_at=@2",
                        "persist fail@1 reload failed (B)",
                        "STOPPING",
                        "log shutting down",
                        "stop",
                    ],
                    None,
                ),
                n,
                n,
                n,
                n,
                n,
            ],
        ),
        // stopped
        [n; 17],
        // waiting, the bundle poll due at T0 + 1 s (before the renewal at T0 + 36000 s)
        sleeping(1),
        // polling the bundle
        busy(
            NOTHING,
            [
                n,
                n,
                n,
                n,
                n,
                (NOTHING, Some(2)),
                (&["log bundle poll failed: issuer down next=@2"], Some(2)),
                (BUNDLE_INSTALLED_BUT_FAILED, Some(2)),
            ],
        ),
        // polling the bundle, stopping: the poll ends, is recorded, then the daemon stops
        busy(
            NOTHING,
            [
                n,
                n,
                n,
                n,
                n,
                (STOP, None),
                (
                    &[
                        "log bundle poll failed: issuer down next=@2",
                        "STOPPING",
                        "log shutting down",
                        "stop",
                    ],
                    None,
                ),
                (
                    &[
                        "log installed but failed: reload failed retry_at=@2",
                        "persist fail@1 reload failed (A)",
                        "STOPPING",
                        "log shutting down",
                        "stop",
                    ],
                    None,
                ),
            ],
        ),
    ]
};

/// A new bundle installed by a poll whose reload hooks failed: finished like a rotation.
const BUNDLE_INSTALLED_BUT_FAILED: &[&str] = &[
    "log installed but failed: reload failed retry_at=@2",
    "STATUS the reload hooks failed; running them again at @2",
    "persist fail@1 reload failed (A), next@2",
    "log debug the reload hooks failed; running them again at @2",
];

const FIRST_GOOD_AFTER_RENEWAL: &[&str] = &[
    "ready=true",
    "READY",
    "STATUS next renewal at @36000",
    "persist ok@1, next@36000",
    "log info next renewal at @36000",
];
const RENEWAL_FAILED: &[&str] = &[
    "log renewal failed: issuer down failures=1 retry_at=@2",
    "ready=true",
    "READY",
    "STATUS renewal failing (attempt 1); next try at @2",
    "persist fail@1 issuer down, next@2",
    "log debug renewal failing (attempt 1); next try at @2",
];
/// Without [verify]: the new cert is ready, its hooks run again after the backoff.
const INSTALLED_BUT_FAILED: &[&str] = &[
    "log installed but failed: reload failed retry_at=@2",
    "ready=true",
    "READY",
    "STATUS the reload hooks failed; running them again at @2",
    "persist fail@1 reload failed (B), next@2",
    "log debug the reload hooks failed; running them again at @2",
];

#[test]
fn every_event_in_every_state() {
    let states = states();
    assert_eq!(states.len(), TABLE.len());
    let mut wrong = Vec::new();
    for ((name, machine), rows) in states.iter().zip(TABLE.iter()) {
        let events = events();
        assert_eq!(events.len(), rows.len());
        for (event, (want, want_deadline)) in events.into_iter().zip(rows.iter()) {
            let mut m = machine.clone();
            let what = format!("{event:?}");
            let got: Vec<String> = m.on(at(1), 1.0, event).iter().map(show).collect();
            if got != *want || deadline(&m) != *want_deadline {
                wrong.push(format!(
                    "{name} + {what}:\n  got  {got:?} until {:?}\n  want {want:?} until {want_deadline:?}",
                    deadline(&m)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Feeds `event` at `s` seconds after T0, returning the actions shown.
fn on(m: &mut Machine, s: u64, event: Event) -> Vec<String> {
    m.on(at(s), 1.0, event).iter().map(show).collect()
}

#[test]
fn failed_renewals_back_off_exponentially_and_never_past_the_margin() {
    // A cert whose notAfter − margin is 100 s away.
    let near = CertTimes::received(at(0), at(0), at(105));
    assert_eq!(near.latest(&policy()), at(100) - Duration::from_millis(250));
    let disk = Disk {
        cert: Ok(("A".into(), near)),
        decision: Decision::RenewNow,
    };
    let mut m = drive(false, vec![Event::Start, Event::Observed(disk.clone())]);
    let mut now = 0;
    let mut retries = Vec::new();
    for _ in 0..8 {
        on(
            &mut m,
            now,
            Event::Renewed {
                result: Err(fail("issuer down", None)),
                disk: disk.clone(),
            },
        );
        let next = m.next_deadline().unwrap();
        retries.push(next.duration_since(at(now)).unwrap().as_millis());
        now = next.duration_since(at(0)).unwrap().as_secs().max(now);
        on(&mut m, now, Event::Deadline);
        let acts = on(&mut m, now + 1, Event::Observed(disk.clone()));
        assert_eq!(acts, ["renew"], "the retry is due");
        now += 1;
    }
    // 1, 2, 4, 8, 16, 32 s, then bounded by notAfter − margin (reached: retried at once).
    assert_eq!(&retries[..6], &[1000, 2000, 4000, 8000, 16000, 32000]);
    assert!(retries[6] < 32000, "{retries:?}");
}

#[test]
fn a_cert_installed_by_a_one_shot_rotate_cancels_the_retry_of_a_failed_forced_renewal() {
    use Event::*;
    let mut m = drive(
        false,
        vec![Start, Observed(good("A")), Force, Observed(good("A"))],
    );
    let acts = on(
        &mut m,
        0,
        Renewed {
            result: Err(fail("issuer down", None)),
            disk: good("A"),
        },
    );
    assert_eq!(
        acts[0],
        "log renewal failed: issuer down failures=1 retry_at=@1"
    );
    assert_eq!(deadline(&m), Some(1));
    // Before the retry, the same cert: the retry stands.
    on(&mut m, 0, Deadline);
    assert_eq!(on(&mut m, 0, Observed(good("A"))), NOTHING);
    assert_eq!(deadline(&m), Some(1));
    // Another good cert appeared: back on its normal schedule, no retry.
    on(&mut m, 0, Deadline);
    assert_eq!(
        on(&mut m, 0, Observed(good("B"))),
        [
            "STATUS next renewal at @36000",
            "persist next@36000",
            "log info next renewal at @36000"
        ]
    );
    assert_eq!(deadline(&m), Some(NEXT));
    on(&mut m, 1, Deadline);
    assert_eq!(on(&mut m, 1, Observed(good("B"))), NOTHING, "no renewal");
}

#[test]
fn a_failed_verify_is_retried_with_growing_backoff_not_bounded_by_the_cert() {
    use Event::*;
    // With [verify], a rotation whose verify failed: the cert stays, the check repeats.
    let near = CertTimes::received(at(0), at(0), at(21));
    let disk = Disk {
        cert: Ok(("B".into(), near)),
        decision: Decision::At(at(19)),
    };
    let mut m = drive(true, vec![Start, Observed(due("A"))]);
    let acts = on(
        &mut m,
        0,
        Renewed {
            result: Err(fail("verify failed", Some("B"))),
            disk: disk.clone(),
        },
    );
    assert_eq!(
        acts[0],
        "log installed but failed: verify failed retry_at=@1"
    );
    assert!(acts.contains(&"ready=false".to_string()), "{acts:?}");
    let mut now = 1;
    for want in [2, 4, 8, 16, 32] {
        on(&mut m, now, Deadline);
        assert_eq!(on(&mut m, now, Observed(disk.clone())), ["verify"]);
        let acts = on(
            &mut m,
            now,
            Verified {
                result: Err(fail("served another cert", None)),
                disk: disk.clone(),
            },
        );
        let retry = format!("retry_at=@{}", now + want);
        assert!(acts[0].ends_with(&retry), "{acts:?}");
        // The deadline is the earlier of the verify retry and the cert's renewal.
        assert_eq!(deadline(&m), Some((now + want).min(19)), "{acts:?}");
        now += want;
    }
    // The verify passes: READY, and the unfinished rotation is completed.
    on(&mut m, now, Deadline);
    on(&mut m, now, Observed(good("B")));
    let acts = on(
        &mut m,
        now,
        Verified {
            result: Ok(()),
            disk: good("B"),
        },
    );
    assert_eq!(
        acts,
        [
            "ready=true",
            "READY",
            "STATUS next renewal at @36000",
            &format!("persist done@{now}, next@36000"),
            "log info next renewal at @36000"
        ]
    );
}

#[test]
fn ready_is_sent_once_and_follows_the_cert() {
    use Event::*;
    let mut m = drive(false, vec![Start]);
    assert_eq!(
        on(&mut m, 0, Observed(good("A")))[..2],
        ["ready=true", "READY"]
    );
    // The cert expires while the issuer is down: not ready, and READY is not sent again later.
    on(&mut m, 0, Deadline);
    assert_eq!(
        on(&mut m, 0, Observed(missing())),
        ["log no usable cert: no cert", "renew"]
    );
    let acts = on(
        &mut m,
        0,
        Renewed {
            result: Err(fail("issuer down", None)),
            disk: missing(),
        },
    );
    assert_eq!(acts[1], "ready=false");
    on(&mut m, 1, Deadline);
    assert_eq!(
        on(&mut m, 1, Observed(missing())),
        ["renew"],
        "no second log"
    );
    let acts = on(
        &mut m,
        1,
        Renewed {
            result: Ok(()),
            disk: good("B"),
        },
    );
    assert!(acts.contains(&"ready=true".to_string()), "{acts:?}");
    assert!(!acts.contains(&"READY".to_string()), "{acts:?}");
}

#[test]
fn a_sighup_during_a_renewal_renews_again_after_it_forced() {
    use Event::*;
    let mut m = drive(false, vec![Start, Observed(due("A"))]);
    assert_eq!(on(&mut m, 0, Force), FORCED);
    let acts = on(
        &mut m,
        0,
        Renewed {
            result: Ok(()),
            disk: good("B"),
        },
    );
    assert_eq!(acts, ["persist ok@0", "renew forced"]);
    assert_eq!(
        m.phase(),
        &Phase::Renewing {
            serial_before: Some("B".into())
        }
    );
}

#[test]
fn the_watchdog_is_pinged_in_every_state_but_stopped() {
    for (name, m) in states() {
        let mut m = m.clone();
        let acts = on(&mut m, 1, Event::Watchdog);
        let want: &[&str] = if name == "stopped" { NOTHING } else { WATCHDOG };
        assert_eq!(acts, want, "{name}");
    }
}

#[test]
fn failed_hooks_without_verify_run_again_with_backoff_until_they_pass() {
    use Event::*;
    let mut m = drive(false, vec![Start, Observed(due("A"))]);
    let acts = on(
        &mut m,
        0,
        Renewed {
            result: Err(fail("reload failed", Some("B"))),
            disk: good("B"),
        },
    );
    assert_eq!(
        acts[0],
        "log installed but failed: reload failed retry_at=@1"
    );
    assert!(!acts.contains(&"ready=false".to_string()), "{acts:?}");
    let mut now = 1;
    for want in [2, 4, 8] {
        on(&mut m, now, Deadline);
        assert_eq!(on(&mut m, now, Observed(good("B"))), ["verify"]);
        let acts = on(
            &mut m,
            now,
            Verified {
                result: Err(fail("reload failed", None)),
                disk: good("B"),
            },
        );
        assert_eq!(
            acts[0],
            format!("log reload failed: reload failed retry_at=@{}", now + want)
        );
        assert_eq!(deadline(&m), Some(now + want));
        now += want;
    }
    on(&mut m, now, Deadline);
    on(&mut m, now, Observed(good("B")));
    let acts = on(
        &mut m,
        now,
        Verified {
            result: Ok(()),
            disk: good("B"),
        },
    );
    assert_eq!(
        acts,
        [
            "STATUS next renewal at @36000",
            &format!("persist done@{now}, next@36000"),
            "log info next renewal at @36000"
        ]
    );
    // Done: back on the cert's schedule, nothing runs again.
    assert_eq!(deadline(&m), Some(NEXT));
}

#[test]
fn the_bundle_is_polled_between_renewals_without_moving_the_plan() {
    use Event::*;
    let mut m = Machine::new(policy(), false).polling_bundle(Some(Duration::from_secs(600)));
    on(&mut m, 0, Start);
    let first = on(&mut m, 0, Observed(good("A")));
    assert!(
        first.contains(&"persist next@36000".to_string()),
        "{first:?}"
    );
    assert_eq!(deadline(&m), Some(600), "woken for the poll");
    assert_eq!(on(&mut m, 600, Deadline), ["observe"]);
    assert_eq!(on(&mut m, 600, Observed(good("A"))), ["poll bundle"]);
    // Polled: nothing to report, the plan unchanged, the next poll an interval later.
    let polled = BundlePolled {
        result: Ok(()),
        disk: good("A"),
    };
    assert!(on(&mut m, 601, polled).is_empty());
    assert_eq!(deadline(&m), Some(1201));
    // A due renewal is never delayed by a poll, and it fetches the bundle too.
    on(&mut m, 1201, Deadline);
    assert_eq!(on(&mut m, 1201, Observed(due("A"))), ["renew"]);
    on(
        &mut m,
        1300,
        Renewed {
            result: Ok(()),
            disk: good("B"),
        },
    );
    assert_eq!(deadline(&m), Some(1900));
    // Zero turns the poll off.
    let mut off = Machine::new(policy(), false).polling_bundle(Some(Duration::ZERO));
    on(&mut off, 0, Start);
    on(&mut off, 0, Observed(good("A")));
    assert_eq!(deadline(&off), Some(NEXT));
}
