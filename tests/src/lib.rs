//! Test kit shared by the end-to-end tests: locating the workspace binaries, temp dirs,
//! child processes that are always stopped, and free loopback ports.
#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Path of a workspace binary (`issuer`, `rotator`, `mtls-proxy`), built once on first use
/// with the same profile as the running test or example. Cargo's progress lines go to stderr.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = target_dir();
    BUILT.get_or_init(|| {
        let status = proxy_lib::test_util::cargo_build()
            .arg("--workspace")
            .status()
            .expect("run cargo build for the workspace binaries");
        assert!(
            status.success(),
            "cargo build of the workspace binaries failed"
        );
    });
    let path = dir.join(name);
    assert!(path.exists(), "binary {} was not built", path.display());
    path
}

/// `target/<profile>` of the running test or example.
pub fn target_dir() -> PathBuf {
    proxy_lib::test_util::profile_dir()
}

pub use proxy_lib::test_util::{ChildGuard, free_port, wait_for};

/// A plain HTTP/1.0 GET to 127.0.0.1:`port`: status code and body. An error when nothing
/// answers (yet), so it can be polled as a readiness signal.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {resp:?}")))?;
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((code, body.to_string()))
}

/// A temp dir for one test: removed when the test passes, kept (and its path printed) when
/// the test panics, so the configs, certs and logs of a failed run can be read.
#[derive(Debug)]
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A new empty temp dir.
    pub fn new() -> Self {
        Self(Some(tempfile::tempdir().expect("create a temp dir")))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "test failed: its working dir is kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// Installs a test log subscriber once (output captured by the test harness).
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// Whether interop tests must run (set by `.ci/run`): a missing tool is then a failure.
pub fn require_interop() -> bool {
    std::env::var("REQUIRE_INTEROP").is_ok_and(|v| v == "1")
}

/// Whether a command-line tool is on PATH.
pub fn have_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The workspace README.
pub fn readme() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first ```` ```sh ```` block after `marker` in `text`, each line's indentation removed
/// (a block inside a list item is indented). Panics naming the marker when there is none.
pub fn sh_block_after(text: &str, marker: &str) -> String {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("README: no {marker:?}"));
    let block = &text[start..];
    let open = block
        .find("```sh\n")
        .unwrap_or_else(|| panic!("README: no sh block after {marker:?}"))
        + "```sh\n".len();
    let close = block[open..]
        .find("```")
        .unwrap_or_else(|| panic!("README: unclosed sh block after {marker:?}"));
    block[open..open + close]
        .lines()
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `cmd` to completion and returns its output; panics with the command and its stderr
/// when it fails.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
