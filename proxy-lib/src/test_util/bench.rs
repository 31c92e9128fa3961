//! What the workspace's benches share: on-CPU time of threads (Linux `schedstat`, which other
//! load on the machine does not skew, unlike wall-clock rates) and figures formatted for the
//! README's table.

use std::path::Path;
use std::time::Duration;

/// On-CPU time of the calling thread (zero where `/proc/thread-self/schedstat` is missing).
pub fn thread_cpu() -> Duration {
    schedstat(Path::new("/proc/thread-self/schedstat"))
}

/// On-CPU time of this process's threads whose name (`comm`) `wanted` accepts, summed (zero
/// where `/proc/self/task` is missing).
pub fn threads_cpu(wanted: impl Fn(&str) -> bool) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| wanted(c.trim())))
        .map(|t| schedstat(&t.path().join("schedstat")))
        .sum()
}

/// The first field of a `schedstat` file: nanoseconds on a CPU.
fn schedstat(path: &Path) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// `n` rounded to a whole number, with thousands separators (`12,345`); negatives as 0.
pub fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234.6), "1,235");
        assert_eq!(thousands(12_345_678.0), "12,345,678");
        assert_eq!(thousands(-5.0), "0");
    }

    #[test]
    fn cpu_time_of_this_thread_grows_while_it_works() {
        let before = thread_cpu();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        if Path::new("/proc/thread-self/schedstat").exists() {
            assert!(thread_cpu() > before);
            assert!(threads_cpu(|_| true) >= thread_cpu());
        } else {
            assert_eq!(thread_cpu(), Duration::ZERO);
        }
    }
}
