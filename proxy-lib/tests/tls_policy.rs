//! Every rustls config in the workspace comes from the floor's TLS policy (`proxy_lib::tls`):
//! the workspace's Rust sources (not `target/`) are searched for the calls that build a
//! config or a verifier, and any hit outside `proxy-lib/src/tls/` fails, unless the file is on
//! [`ALLOWED`] below.

use std::path::{Path, PathBuf};

/// The calls that build a rustls config or verifier, or loosen one.
const BUILDERS: &[&str] = &[
    "ServerConfig::builder",
    "ClientConfig::builder",
    "ServerConfig::builder_with_provider",
    "ClientConfig::builder_with_provider",
    "WebPkiClientVerifier::builder",
    "WebPkiServerVerifier::builder",
    "with_no_client_auth",
    "dangerous()",
];

/// Where the policy lives.
const POLICY_DIR: &str = "proxy-lib/src/tls/";

/// Test and bench code that builds configs of its own, and why. Each stands in for a peer that
/// is not built from this workspace's policy, so a mistake in the policy cannot hide on both
/// ends of a test handshake; none is compiled into a shipped binary.
const ALLOWED: &[(&str, &str)] = &[
    (
        "proxy-lib/tests/proxy/support.rs",
        "mesh clients of the proxy under test, including deliberately broken ones (no client cert)",
    ),
    (
        "proxy-lib/benches/proxy.rs",
        "the benchmark's client, a peer of the proxy under test",
    ),
    (
        "issuer/benches/certify.rs",
        "the benchmark's client, a peer of the issuer under test",
    ),
    (
        "issuer/tests/common/mod.rs",
        "clients of the issuer under test, with and without a client cert, at a chosen clock",
    ),
    (
        "issuer/tests/linkerd_proxy.rs",
        "linkerd2-proxy's client and server configs (its backends' suites, its TLS 1.2 offer)",
    ),
    (
        "rotator/tests/linkerd_peer.rs",
        "linkerd2-proxy's server config, as a peer of the rotator's certificate",
    ),
    (
        "proxy-lib/src/test_util.rs",
        "test-util fake consumer (nginx-like, TLS 1.2 allowed) the rotator's verify step talks to",
    ),
];

/// This file names the calls it searches for.
const SELF: &str = "proxy-lib/tests/tls_policy.rs";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy-lib sits in the workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping `target/` and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if kind.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// `(file, line number, line)` for every builder call outside the policy, with `/`-separated
/// paths relative to the workspace root.
fn builder_calls() -> Vec<(String, usize, String)> {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 50,
        "found only {} Rust files under {}",
        files.len(),
        root.display()
    );
    let mut hits = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(&root)
            .expect("under the root")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        if rel.starts_with(POLICY_DIR) || rel == SELF {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (n, line) in text.lines().enumerate() {
            if BUILDERS.iter().any(|b| line.contains(b)) {
                hits.push((rel.clone(), n + 1, line.trim().to_string()));
            }
        }
    }
    hits
}

#[test]
fn every_rustls_config_comes_from_the_floor_tls_module() {
    let hits = builder_calls();
    let outside: Vec<String> = hits
        .iter()
        .filter(|(file, _, _)| !ALLOWED.iter().any(|(a, _)| a == file))
        .map(|(file, n, line)| format!("{file}:{n}: {line}"))
        .collect();
    assert!(
        outside.is_empty(),
        "rustls configs built outside proxy_lib::tls (use proxy_lib::tls::{{Acceptor, Connector, \
         server_config, client_config}}):\n{}",
        outside.join("\n")
    );
    // The list stays honest: a file that no longer builds configs leaves it.
    for (file, why) in ALLOWED {
        assert!(
            hits.iter().any(|(f, _, _)| f == file),
            "{file} is allowed to build rustls configs ({why}) but no longer does: drop it from ALLOWED"
        );
    }
}

#[test]
fn the_search_finds_builder_calls() {
    // The policy module itself builds configs: the search must see them there.
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root.join(POLICY_DIR), &mut files);
    let text: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read"))
        .collect();
    for b in [
        "ServerConfig::builder",
        "ClientConfig::builder",
        "with_no_client_auth",
        "dangerous()",
    ] {
        assert!(text.contains(b), "{b} not found in {POLICY_DIR}");
    }
}
