//! Pidfiles and the processes they name: parsing a pid, and telling what program a live pid
//! runs (from `/proc`), so a pidfile left behind by a dead process, or naming a pid the kernel
//! has since given to another program, is never trusted.

use std::path::Path;

/// Parses a pidfile's text (one decimal pid, surrounding whitespace allowed). Pids 0 and 1 are
/// refused: signalling them means the process group or init.
pub fn parse_pid(text: &str) -> Result<i32, String> {
    let t = text.trim();
    let pid: i32 = t.parse().map_err(|_| format!("{t:?} is not a pid"))?;
    if pid <= 1 {
        return Err(format!("pid {pid} cannot be a pidfile's process"));
    }
    Ok(pid)
}

/// Reads and parses a pidfile. Blocks.
pub fn read_pid(path: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse_pid(&text)
}

/// The names a live process goes by: `/proc/<pid>/comm` (the kernel truncates it to 15 bytes)
/// and the file name of `/proc/<pid>/exe` (readable only for our own user's processes). Empty
/// when there is no such process. Blocks briefly.
pub fn names(pid: i32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        names.push(c.trim_end_matches('\n').to_string());
    }
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe"))
        && let Some(n) = exe.file_name()
    {
        names.push(
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        );
    }
    names
}

/// Whether `names` (from [`names`]) match `expected`; a 15-byte `comm` matches a longer name it
/// is the start of.
pub fn name_matches(names: &[String], expected: &str) -> bool {
    let short: String = expected.chars().take(15).collect();
    names
        .iter()
        .any(|n| n == expected || (n.len() == 15 && *n == short))
}

/// Whether `pid` is a live process running `expected` (see [`name_matches`]).
pub fn is_running(pid: i32, expected: &str) -> bool {
    name_matches(&names(pid), expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_parse_with_whitespace_and_0_1_are_refused() {
        assert_eq!(parse_pid(" 4242\n"), Ok(4242));
        for bad in ["", "abc", "12x", "-5", "0", "1"] {
            assert!(parse_pid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comm_names_are_compared_with_truncation() {
        assert!(name_matches(&["nginx".into()], "nginx"));
        assert!(!name_matches(&["nginx".into()], "postgres"));
        assert!(name_matches(
            &["mtls-proxy-long".into()],
            "mtls-proxy-longer-name"
        ));
        assert!(!name_matches(&[], "x"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn our_own_process_is_running_under_its_own_name_only() {
        let me = std::process::id() as i32;
        let mine = names(me);
        assert!(!mine.is_empty());
        assert!(is_running(me, &mine[0]));
        assert!(!is_running(me, "certainly-not-this-program"));
        // A reaped child is no process at all.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!is_running(pid, "true"));
    }
}
