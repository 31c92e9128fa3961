//! Process signals for the daemon: SIGHUP forces a renewal, SIGTERM and SIGINT stop it.

use tokio::signal::unix::{SignalKind, signal};

use crate::daemon::Handle;

/// Installs the handlers (must run inside a tokio runtime); they feed `handle`.
pub fn install(handle: Handle) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP: renewing now");
                    handle.force();
                }
                Some(()) = term.recv() => {
                    tracing::info!("SIGTERM: stopping");
                    handle.shutdown();
                }
                Some(()) = int.recv() => {
                    tracing::info!("SIGINT: stopping");
                    handle.shutdown();
                }
                else => break,
            }
        }
    });
    Ok(())
}
