//! The typed values of the configuration: addresses, the anchor source, reload hooks and the
//! verify step.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use proxy_lib::verify::TrustAnchors;

/// A `host:port` address (host may be a name or an IP; IPv6 in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// Resolves to socket addresses. Blocks (DNS).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_host_port(s)
    }
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(HostPort {
            host: sa.ip().to_string(),
            port: sa.port(),
        });
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
    if host.is_empty() || host.contains(':') || host.contains('/') {
        return Err(format!("{s:?} is not host:port"));
    }
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorSource {
    /// A PEM file, re-read on every rotation.
    File(PathBuf),
    /// PEM text given inline (e.g. `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`).
    Pem(String),
}

impl AnchorSource {
    /// Loads the anchors. Blocks for a file.
    pub fn load(&self) -> Result<TrustAnchors, proxy_lib::verify::VerifyError> {
        match self {
            AnchorSource::File(p) => TrustAnchors::read(p),
            AnchorSource::Pem(text) => TrustAnchors::from_bytes(text.as_bytes(), "trust_anchors"),
        }
    }
}

/// A signal the signal hook can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSignal {
    /// SIGHUP.
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
}

impl FromStr for ReloadSignal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl ReloadSignal {
    /// Parses `HUP`, `SIGHUP`, `USR1`, `SIGUSR2`, ... (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase();
        match up.strip_prefix("SIG").unwrap_or(&up) {
            "HUP" => Ok(Self::Hup),
            "USR1" => Ok(Self::Usr1),
            "USR2" => Ok(Self::Usr2),
            _ => Err(format!("{s:?} is not one of HUP, USR1, USR2")),
        }
    }

    /// The rustix signal.
    pub fn to_rustix(self) -> rustix::process::Signal {
        match self {
            Self::Hup => rustix::process::Signal::HUP,
            Self::Usr1 => rustix::process::Signal::USR1,
            Self::Usr2 => rustix::process::Signal::USR2,
        }
    }
}

/// Signal a process found through its pidfile, after checking it is the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalHook {
    /// The pidfile.
    pub pidfile: PathBuf,
    /// The signal.
    pub signal: ReloadSignal,
    /// Expected `/proc/<pid>/comm` (or the file name of `/proc/<pid>/exe`).
    pub process_name: String,
}

/// The reload hooks run after each rotation (any combination).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadConfig {
    /// Signal a process.
    pub signal: Option<SignalHook>,
    /// POST to this URL.
    pub http: Option<String>,
    /// Run this argv.
    pub exec: Option<Vec<String>>,
    /// Timeout of the HTTP and exec hooks.
    pub timeout: Duration,
}

impl ReloadConfig {
    /// Whether any hook is configured.
    pub fn is_empty(&self) -> bool {
        self.signal.is_none() && self.http.is_none() && self.exec.is_none()
    }
}

/// The verify step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    /// The TLS listener.
    pub addr: HostPort,
    /// Server name to verify (default: the identity).
    pub server_name: Option<String>,
    /// Reload+verify attempts.
    pub attempts: u32,
    /// Pause between reload and handshake.
    pub delay: Duration,
}
