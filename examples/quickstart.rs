//! Local demo: a real issuer, mtls-proxy and rotator daemon doing real rotations.
//!
//! ```sh
//! cargo run --release -p e2e --example quickstart [-- --rotations N --lifetime 15s --dir DIR]
//! ```
//! The three binaries run as child processes on 127.0.0.1 in a temp dir (or `--dir`, kept
//! for inspection); one long-lived connection through the proxy must survive every rotation.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut opts = testkit::demo::Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let parsed: Result<(), String> = match arg.as_str() {
            "--rotations" => value("--rotations").and_then(|v| {
                v.parse()
                    .map(|n| opts.rotations = n)
                    .map_err(|e| format!("--rotations: {e}"))
            }),
            "--lifetime" => value("--lifetime").and_then(|v| {
                humantime::parse_duration(&v)
                    .map(|d| opts.lifetime = d)
                    .map_err(|e| format!("--lifetime: {e}"))
            }),
            "--dir" => value("--dir").map(|v| opts.dir = Some(v.into())),
            "-h" | "--help" => {
                println!(
                    "quickstart: issuer + rotator + mtls-proxy doing real rotations on 127.0.0.1\n\n\
                     options:\n  --rotations N   rotations to watch (default 3)\n  \
                     --lifetime D    leaf lifetime, e.g. 15s (default 15s)\n  \
                     --dir DIR       keep everything (configs, certs, logs) in DIR (default: a temp dir)"
                );
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other:?} (try --help)")),
        };
        if let Err(e) = parsed {
            eprintln!("quickstart: {e}");
            return ExitCode::from(64);
        }
    }
    match testkit::demo::run(&opts, &mut std::io::stdout()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
