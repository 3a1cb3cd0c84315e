//! Graceful stop on SIGTERM or SIGINT, the same in every binary.

/// Resolves when the process receives SIGTERM or SIGINT; returns its name.
/// If the handlers cannot be installed, never resolves (and logs why).
pub async fn terminated() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
