//! Helpers shared by the benches (`cargo bench -p e2e`): percentiles, a filesystem's kind and
//! whether its fsync reaches stable storage, and a process's CPU time and peak RSS.

use std::path::Path;
use std::time::{Duration, Instant};

/// The `q`-quantile (0..=1) of `values` by the nearest-rank rule; 0 for none. Sorts `values`.
pub fn quantile(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// A filesystem, as `statfs` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsKind {
    /// Its name (`tmpfs`, `ext4`, `overlay`, ...) or `0x...` for a magic not listed here.
    pub name: &'static str,
    /// Its `f_type` magic.
    pub magic: u64,
    /// Whether an fsync there writes to stable storage: false for memory-backed filesystems
    /// (tmpfs, ramfs), where it returns at once with nothing to persist.
    pub fsync_is_real: bool,
}

/// The filesystem `path` is on (`statfs(2)`'s `f_type`).
pub fn fs_kind(path: &Path) -> std::io::Result<FsKind> {
    let st = rustix::fs::statfs(path)?;
    #[allow(clippy::unnecessary_cast)] // the field's width differs between targets
    let magic = st.f_type as u64;
    let (name, real) = match magic {
        0x0102_1994 => ("tmpfs", false),
        0x8584_58f6 => ("ramfs", false),
        0xef53 => ("ext4", true),
        0x5846_5342 => ("xfs", true),
        0x9123_683e => ("btrfs", true),
        0x794c_7630 => ("overlay", true),
        0x2fc1_2fc1 => ("zfs", true),
        0xf2f5_2010 => ("f2fs", true),
        _ => ("unknown", true),
    };
    Ok(FsKind {
        name,
        magic,
        fsync_is_real: real,
    })
}

/// The median time of `n` 4 KiB write + fsync pairs of a file in `dir` (removed afterwards):
/// tens of microseconds when fsync has nothing to persist, hundreds or more on a real disk.
pub fn fsync_cost(dir: &Path, n: usize) -> std::io::Result<Duration> {
    use std::io::Write;
    let path = dir.join(".fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let start = Instant::now();
        f.write_all(&[i as u8; 4096])?;
        f.sync_all()?;
        times.push(start.elapsed().as_nanos() as u64);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Duration::from_nanos(quantile(&mut times, 0.5)))
}

/// CPU time (user + system) and peak RSS of a process so far, from `/proc/<pid>/stat` and
/// `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcUsage {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Peak resident set size (`VmHWM`), bytes.
    pub peak_rss: u64,
}

/// [`ProcUsage`] of `pid`.
pub fn proc_usage(pid: u32) -> std::io::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) closed by the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or_else(|| std::io::Error::other("malformed /proc/<pid>/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (the state, field 3, comes first after
    // the name), in clock ticks: USER_HZ, which Linux fixes at 100 for every /proc interface.
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let cpu = Duration::from_millis((ticks(14 - 3) + ticks(15 - 3)) * 10);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    Ok(ProcUsage { cpu, peak_rss })
}

/// `issuer init --dir state`, then `edits` (pairs of text to find and its replacement) applied
/// to the `issuer.toml` it wrote. Panics naming what failed.
pub fn issuer_init(state: &Path, edits: &[(&str, &str)]) {
    crate::run_ok(
        std::process::Command::new(crate::bin("issuer"))
            .args(["init", "--dir"])
            .arg(state),
    );
    let toml = state.join("issuer.toml");
    let mut text = std::fs::read_to_string(&toml).expect("read issuer.toml");
    for (from, to) in edits {
        assert!(text.contains(from), "issuer.toml has no {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(&toml, text).expect("write issuer.toml");
}

/// An `issuer serve --dir state` on a free loopback port with leaf `lifetime`, its stdout and
/// stderr in `log.out` / `log.log`, once its `/ready` answers. Returns it and its port.
pub fn issuer_serve(
    state: &Path,
    log: &Path,
    lifetime: Duration,
) -> anyhow::Result<(crate::ChildGuard, u16)> {
    let (port, admin) = (crate::free_port(), crate::free_port());
    let mut child = crate::demo::spawn(
        std::process::Command::new(crate::bin("issuer"))
            .args(["serve", "--dir"])
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--lifetime", &format!("{}s", lifetime.as_secs())]),
        log,
    )?;
    crate::demo::wait_admin(
        &mut child,
        "the issuer",
        admin,
        "/ready",
        Duration::from_secs(120),
    )?;
    Ok((child, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), 50);
        assert_eq!(quantile(&mut v, 0.99), 99);
        assert_eq!(quantile(&mut v, 1.0), 100);
        assert_eq!(quantile(&mut [], 0.5), 0);
        assert_eq!(quantile(&mut [7], 0.99), 7);
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let u = proc_usage(std::process::id()).unwrap();
        assert!(u.peak_rss > 0);
        assert!(fs_kind(Path::new("/proc")).is_ok());
    }
}
