//! The agent: runs on each PC, holds one mTLS stream to the coordinator,
//! advertises what the PC can do (specialties, slots, toolchains).
//!
//! Code map: `config` resolves settings, `toolchains` probes the PC's tools,
//! `session` is the pure core and `driver` its event loop, `conn` keeps the
//! coordinator link alive, `executor` does one attempt with `workspace`
//! (git2, nothing else calls it), `runner` (the only place that spawns
//! processes) and `prompt`, and `spool` keeps unacknowledged output on disk.

pub mod config;
pub mod conn;
pub mod driver;
pub mod executor;
pub mod prompt;
pub mod runner;
pub mod session;
pub mod spool;
pub mod toolchains;
pub mod workspace;

use std::time::Duration;

use common::types::AgentAdvert;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Driver(#[from] driver::Error),
}

/// This PC's hostname, for display only (the id is the certificate's CN).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Probes the PC, then keeps the coordinator link until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let toolchains = if config.toolchains.probe {
        let probes = toolchains::plan(&config.toolchains.hide, &config.toolchains.extra);
        let timeout = config.toolchains.timeout.unwrap_or(Duration::from_secs(5));
        toolchains::detect(probes, timeout).await
    } else {
        Vec::new()
    };
    info!(
        agent = %config.name,
        specialties = ?config.specialties.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        capacity = config.capacity,
        toolchains = %toolchains.iter().map(|t| format!("{} {}", t.name, t.version)).collect::<Vec<_>>().join(", "),
        "agent starting"
    );
    let advert = AgentAdvert {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        specialties: config.specialties.clone(),
        capacity: config.capacity,
        labels: config.labels.clone(),
        toolchains,
        hostname: hostname(),
        // One per process, kept across reconnects: the coordinator tells a
        // reconnect of this process from a second process with our certificate.
        instance_id: {
            use rand::{Rng, SeedableRng};
            format!(
                "{:016x}",
                rand::rngs::SmallRng::from_os_rng().random::<u64>()
            )
        },
    };
    driver::Driver::run(config, advert, shutdown).await?;
    info!("agent stopped");
    Ok(())
}
