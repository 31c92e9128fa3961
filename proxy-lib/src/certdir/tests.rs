//! Writer tests: layout, modes, pruning, legacy takeover, and a crash after every step; the
//! reader's retry.

use super::*;
use std::cell::Cell;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, UNIX_EPOCH};

use crate::bundle::CertBundle;
use crate::identity::Identity;
use crate::test_util::TestPki;

/// Fails every operation from step `crash_at` on, as a killed process would stop; the
/// crashing write leaves a torn (half-written, unsynced) file behind.
struct CrashingFs {
    crash_at: usize,
    step: Cell<usize>,
}

impl CrashingFs {
    fn new(crash_at: usize) -> Self {
        Self {
            crash_at,
            step: Cell::new(0),
        }
    }

    fn next(&self) -> io::Result<bool> {
        let s = self.step.get();
        self.step.set(s + 1);
        if s > self.crash_at {
            return Err(io::Error::other("crashed earlier"));
        }
        Ok(s == self.crash_at)
    }
}

fn crash() -> io::Error {
    io::Error::other("simulated crash")
}

impl FsOps for CrashingFs {
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.create_dir(path, mode)
    }
    fn write_new(&self, path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
        if self.next()? {
            // Torn write: half the bytes, no fsync.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)?;
            std::io::Write::write_all(&mut f, &data[..data.len() / 2])?;
            return Err(crash());
        }
        RealFs.write_new(path, data, mode, gid)
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.fsync_dir(path)
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.symlink(target, link)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.hard_link(from, to)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if self.next()? {
            return Err(crash());
        }
        RealFs.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        if self.next()? {
            // A half-removed tree: one file gone, the rest left.
            if let Some(e) = std::fs::read_dir(path)?.flatten().next() {
                std::fs::remove_file(e.path())?;
            }
            return Err(crash());
        }
        RealFs.remove_dir_all(path)
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_900_000_000)
}

fn identity() -> Identity {
    Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap()
}

fn bundle(pki: &TestPki) -> CertBundle {
    pki.leaf(
        &identity(),
        now() - Duration::from_secs(60),
        now() + Duration::from_secs(86_400),
    )
}

fn install(
    store: &Writer,
    fs: &dyn FsOps,
    b: &CertBundle,
    at: SystemTime,
) -> Result<PathBuf, FsError> {
    store.write(
        fs,
        &NewSet {
            chain: &b.chain,
            key: &b.key,
            anchors: b.anchors.certs(),
            anchors_sig: None,
        },
        at,
    )
}

/// What a reader sees: the serial of a complete, matching, chaining set.
fn reader_serial(dir: &Path) -> String {
    let (b, _) = CertBundle::load_dir(dir).expect("a reader loads a complete set");
    b.check(now())
        .expect("the set a reader sees is valid and matching");
    // The top-level paths form a matching set too, unless a crash interrupted the one-time
    // replacement of plain files (three names cannot be replaced at once; the next swap
    // completes it).
    let links = [CERT_FILE, KEY_FILE, CA_FILE]
        .iter()
        .filter(|f| {
            std::fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.file_type().is_symlink())
        })
        .count();
    if links == 3 || links == 0 {
        let top = crate::pem::read_certs(&dir.join(CERT_FILE)).unwrap();
        let key = PrivateKey::read(&dir.join(KEY_FILE)).unwrap();
        let via = CertBundle::from_parts(top, key, b.anchors.clone()).unwrap();
        via.check(now())
            .expect("top-level files form a matching set");
    }
    b.leaf.serial
}

#[test]
fn first_swap_creates_the_data_layout_with_exact_modes() {
    crate::install_crypto_provider();
    let pki = TestPki::new(now());
    let d = crate::test_util::fast_tempdir();
    let store = Writer::new(d.path(), None);
    let b = bundle(&pki);
    let v = install(&store, &RealFs, &b, now()).unwrap();
    assert_eq!(resolve(d.path()), v);
    for f in [CERT_FILE, KEY_FILE, CA_FILE] {
        let link = std::fs::read_link(d.path().join(f)).unwrap();
        assert_eq!(link, Path::new(DATA_LINK).join(f));
    }
    assert_eq!(mode_and_gid(&v.join(KEY_FILE)).unwrap().0, 0o600);
    assert_eq!(mode_and_gid(&v.join(CERT_FILE)).unwrap().0, 0o644);
    assert_eq!(reader_serial(d.path()), b.leaf.serial);
    // tls.crt holds the leaf followed by the intermediate.
    let chain = crate::pem::read_certs(&d.path().join(CERT_FILE)).unwrap();
    assert_eq!(chain, b.chain);
    assert_eq!(chain.len(), 2);
}

fn resolve(dir: &Path) -> PathBuf {
    resolve_data_dir(dir)
}

#[test]
fn key_group_gives_0640_with_that_group() {
    let pki = TestPki::new(now());
    let d = crate::test_util::fast_tempdir();
    // Our own primary group is always one we may chown a file to.
    let gid = std::fs::metadata(d.path()).unwrap().gid();
    let store = Writer::new(d.path(), Some(gid));
    let v = install(&store, &RealFs, &bundle(&pki), now()).unwrap();
    assert_eq!(mode_and_gid(&v.join(KEY_FILE)).unwrap(), (0o640, gid));
}

#[test]
fn at_most_one_previous_version_remains() {
    let pki = TestPki::new(now());
    let d = crate::test_util::fast_tempdir();
    let store = Writer::new(d.path(), None);
    let mut last = Vec::new();
    for i in 0..4 {
        let v = install(
            &store,
            &RealFs,
            &bundle(&pki),
            now() + Duration::from_secs(i),
        )
        .unwrap();
        last.push(v.file_name().unwrap().to_string_lossy().into_owned());
    }
    let mut want = last[2..].to_vec();
    want.sort();
    assert_eq!(version_dirs(d.path()), want);
    assert!(leftovers(d.path()).is_empty());
}

#[test]
fn plain_files_from_an_old_script_are_moved_aside_and_replaced() {
    let pki = TestPki::new(now());
    let d = crate::test_util::fast_tempdir();
    let old = bundle(&pki);
    std::fs::write(d.path().join(CERT_FILE), certs_to_pem(&old.chain)).unwrap();
    std::fs::write(d.path().join(KEY_FILE), old.key.to_pem().as_bytes()).unwrap();
    std::fs::write(d.path().join(CA_FILE), certs_to_pem(old.anchors.certs())).unwrap();
    assert_eq!(reader_serial(d.path()), old.leaf.serial);

    let new = bundle(&pki);
    let store = Writer::new(d.path(), None);
    install(&store, &RealFs, &new, now()).unwrap();
    assert_eq!(reader_serial(d.path()), new.leaf.serial);
    for f in [CERT_FILE, KEY_FILE, CA_FILE] {
        assert!(
            std::fs::symlink_metadata(d.path().join(f))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    let aside: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(LEGACY_PREFIX))
        .collect();
    assert_eq!(aside.len(), 1);
    let kept = crate::pem::read_certs(&aside[0].path().join(CERT_FILE)).unwrap();
    assert_eq!(kept, old.chain);
}

#[test]
fn a_crash_after_any_step_leaves_the_old_or_the_new_set_and_the_next_swap_cleans_up() {
    crate::install_crypto_provider();
    let pki = TestPki::new(now());
    let mut total_steps = None;
    for fresh_dir in [false, true] {
        for k in 0..100 {
            let d = crate::test_util::fast_tempdir();
            let store = Writer::new(d.path(), None);
            let mut before = None;
            if fresh_dir {
                // First run over plain files from a script.
                let old = bundle(&pki);
                std::fs::write(d.path().join(CERT_FILE), certs_to_pem(&old.chain)).unwrap();
                std::fs::write(d.path().join(KEY_FILE), old.key.to_pem().as_bytes()).unwrap();
                std::fs::write(d.path().join(CA_FILE), certs_to_pem(old.anchors.certs())).unwrap();
                before = Some(old.leaf.serial.clone());
            } else {
                for i in 0..2 {
                    let b = bundle(&pki);
                    install(&store, &RealFs, &b, now() + Duration::from_secs(i)).unwrap();
                    before = Some(b.leaf.serial.clone());
                }
            }
            let before = before.unwrap();
            let new = bundle(&pki);
            let fs = CrashingFs::new(k);
            let res = install(&store, &fs, &new, now() + Duration::from_secs(10));
            let seen = reader_serial(d.path());
            assert!(
                seen == before || seen == new.leaf.serial,
                "crash at step {k}: reader saw {seen}"
            );
            let done = res.is_ok();
            if done {
                assert_eq!(seen, new.leaf.serial);
                total_steps.get_or_insert(fs.step.get());
            }
            // The next swap succeeds and leaves only the new and one previous version.
            let next = bundle(&pki);
            install(&store, &RealFs, &next, now() + Duration::from_secs(20)).unwrap();
            assert_eq!(reader_serial(d.path()), next.leaf.serial);
            assert!(
                version_dirs(d.path()).len() <= 2,
                "crash at {k}: {:?}",
                version_dirs(d.path())
            );
            assert!(
                leftovers(d.path()).is_empty(),
                "crash at {k}: {:?}",
                leftovers(d.path())
            );
            if done {
                break;
            }
        }
    }
    assert!(
        total_steps.unwrap() >= 10,
        "the swap has every step covered"
    );
}

#[test]
fn version_names_are_utc_stamps_that_the_pruner_recognises() {
    let t = UNIX_EPOCH + Duration::from_secs(86_400 + 3_723);
    assert_eq!(version_stamp(t), "1970_01_02_01_02_03");
    let name = version_name(now());
    assert!(is_version_name(&name), "{name}");
    for not in [
        "..data",
        "..pre-rotator.1970_01_02_01_02_03",
        "..1970_01_02.1",
        "x",
    ] {
        assert!(!is_version_name(not), "{not}");
    }
    assert!(is_leftover("..data_tmp.00ff") && is_leftover("..tls.key_tmp.00ff"));
    assert!(!is_leftover("...rotator-state.json.tmp.1") && !is_leftover(&name));
}

#[test]
fn a_write_leaves_other_files_of_the_dir_alone() {
    let pki = TestPki::new(now());
    let d = crate::test_util::fast_tempdir();
    // A caller's lock and state file, and its atomic-write temp file.
    for f in [
        "..rotator.lock",
        "..rotator-state.json",
        "...rotator-state.json.tmp.1",
    ] {
        std::fs::write(d.path().join(f), b"x").unwrap();
    }
    let store = Writer::new(d.path(), None);
    for i in 0..3 {
        install(
            &store,
            &RealFs,
            &bundle(&pki),
            now() + Duration::from_secs(i),
        )
        .unwrap();
    }
    for f in [
        "..rotator.lock",
        "..rotator-state.json",
        "...rotator-state.json.tmp.1",
    ] {
        assert_eq!(std::fs::read(d.path().join(f)).unwrap(), b"x", "{f}");
    }
}

/// An error that says whether it is a vanished file.
#[derive(Debug, PartialEq)]
enum ReadErr {
    Gone,
    Bad,
    Unstable(PathBuf),
}

impl SnapshotError for ReadErr {
    fn vanished(&self) -> bool {
        *self == ReadErr::Gone
    }
    fn unstable(dir: &Path) -> Self {
        ReadErr::Unstable(dir.to_path_buf())
    }
}

#[test]
fn the_reader_resolves_again_when_its_version_vanishes_and_gives_up_after_a_few_tries() {
    let d = tempfile::tempdir().unwrap();
    for v in ["..v1", "..v2"] {
        std::fs::create_dir(d.path().join(v)).unwrap();
    }
    std::os::unix::fs::symlink("..v1", d.path().join(DATA_LINK)).unwrap();
    // The writer swaps to ..v2 while ..v1 is being read.
    let mut seen = Vec::new();
    let (got, from) = read_snapshot(d.path(), |v| {
        seen.push(v.to_path_buf());
        if v.ends_with("..v1") {
            std::fs::remove_file(d.path().join(DATA_LINK)).unwrap();
            std::os::unix::fs::symlink("..v2", d.path().join(DATA_LINK)).unwrap();
            return Err(ReadErr::Gone);
        }
        Ok(7)
    })
    .unwrap();
    assert_eq!((got, from.clone()), (7, d.path().join("..v2")));
    assert_eq!(seen, vec![d.path().join("..v1"), from]);

    // Other errors are not retried.
    let mut calls = 0;
    let r: Result<((), _), _> = read_snapshot(d.path(), |_| {
        calls += 1;
        Err(ReadErr::Bad)
    });
    assert_eq!((r.unwrap_err(), calls), (ReadErr::Bad, 1));

    // A version that keeps vanishing: a few tries, then "unstable".
    let mut calls = 0;
    let r: Result<((), _), _> = read_snapshot(d.path(), |_| {
        calls += 1;
        Err(ReadErr::Gone)
    });
    assert_eq!(r.unwrap_err(), ReadErr::Unstable(d.path().to_path_buf()));
    assert_eq!(calls, READ_ATTEMPTS);

    // A plain dir (no ..data) is read once: a missing file there is just missing.
    let plain = tempfile::tempdir().unwrap();
    let mut calls = 0;
    let r: Result<((), _), _> = read_snapshot(plain.path(), |v| {
        assert_eq!(v, plain.path());
        calls += 1;
        Err(ReadErr::Gone)
    });
    assert_eq!((r.unwrap_err(), calls), (ReadErr::Gone, 1));
}

/// Fails every operation with one OS error, as a full (ENOSPC) or read-only (EROFS)
/// filesystem does.
struct RefusingFs(i32);

impl RefusingFs {
    fn refuse(&self) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(self.0))
    }
}

impl FsOps for RefusingFs {
    fn create_dir(&self, _: &Path, _: u32) -> io::Result<()> {
        self.refuse()
    }
    fn write_new(&self, _: &Path, _: &[u8], _: u32, _: Option<u32>) -> io::Result<()> {
        self.refuse()
    }
    fn fsync_dir(&self, _: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn symlink(&self, _: &Path, _: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn hard_link(&self, _: &Path, _: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn remove_file(&self, _: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn remove_dir_all(&self, _: &Path) -> io::Result<()> {
        self.refuse()
    }
}

#[test]
fn the_writability_probe_leaves_nothing_and_names_the_os_error() {
    let d = crate::test_util::fast_tempdir();
    let dir = d.path().join("certs");
    let w = Writer::new(&dir, None);
    w.check_writable(&RealFs).unwrap();
    assert!(dir.is_dir(), "the probe creates a missing dir");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no probe left");
    for (errno, want) in [
        (rustix::io::Errno::NOSPC.raw_os_error(), "No space left"),
        (
            rustix::io::Errno::ROFS.raw_os_error(),
            "Read-only file system",
        ),
    ] {
        let e = w
            .check_writable(&RefusingFs(errno))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains("probe"), "{e}");
    }
}

#[test]
fn write_file_replaces_atomically_and_a_crashed_write_is_a_leftover_that_gets_removed() {
    let d = crate::test_util::fast_tempdir();
    let path = d.path().join("..state.json");
    write_file(&RealFs, &path, b"zero", PUBLIC_MODE).unwrap();
    write_file(&RealFs, &path, b"one", PUBLIC_MODE).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    assert_eq!(mode_and_gid(&path).unwrap().0, PUBLIC_MODE);
    assert!(leftovers(d.path()).is_empty());
    // A crash at each step leaves the old or the new content, whole; a temp file may stay.
    let mut left = 0;
    for k in 0..3 {
        let e = write_file(&CrashingFs::new(k), &path, b"two", PUBLIC_MODE);
        assert!(e.is_err(), "crash at {k}");
        let now = std::fs::read(&path).unwrap();
        assert!(now == b"one" || now == b"two", "crash at {k}: {now:?}");
        write_file(&RealFs, &path, b"one", PUBLIC_MODE).unwrap();
        left = leftovers(d.path()).len();
    }
    assert!(
        left > 0,
        "no crash left a temp file: the test proves nothing"
    );
    // Refused outright: nothing changes.
    let nospc = rustix::io::Errno::NOSPC.raw_os_error();
    assert!(write_file(&RefusingFs(nospc), &path, b"x", PUBLIC_MODE).is_err());
    // The next tidy-up removes every leftover and nothing else.
    std::fs::write(d.path().join("..rotator.lock"), b"").unwrap();
    assert_eq!(remove_leftovers(&RealFs, d.path()).unwrap(), left);
    assert!(leftovers(d.path()).is_empty());
    assert!(d.path().join("..rotator.lock").is_file());
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    assert!(is_leftover("...rotator-state.json.tmp.00000000000000ff"));
    assert!(!is_leftover(".tokens.tmp.00000000000000ff") && !is_leftover("..state.json"));
}
