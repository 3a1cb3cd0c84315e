//! The agent: runs on each PC, holds one mTLS stream to the coordinator,
//! advertises what the PC can do (specialties, slots, toolchains).
//!
//! Code map: `config` resolves settings, `health` resolves and checks the
//! Claude Code CLI, `toolchains` probes the PC's tools, `session` is the
//! pure core and `driver` its event loop, `conn` keeps the coordinator link
//! alive, `executor` does one attempt with `workspace` (git2, nothing else
//! calls it), `runner` (the only place that spawns processes) and `prompt`,
//! and `spool` keeps unacknowledged output on disk.
//!
//! Start: settings, the CLI resolved and checked (missing or broken: an
//! error; not logged in: unhealthy), processes an earlier run left behind
//! ended, toolchains probed, then the coordinator link.

pub mod claude;
pub mod config;
pub mod conn;
pub mod driver;
pub mod executor;
pub mod health;
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
    Cli(#[from] health::Error),
    #[error("cannot tell the directory the agent was started in: {0}")]
    StartDir(std::io::Error),
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
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    // The CLI every attempt runs: resolved once, to an absolute path.
    let start_dir = std::env::current_dir().map_err(Error::StartDir)?;
    let path_var = std::env::var_os("PATH");
    let cli = health::resolve(&config.claude.program, &start_dir, path_var.as_deref())?;
    let cli_version = health::version(&cli, &config.claude.env).await?;
    config.claude.program = cli.display().to_string();
    let unhealthy = health::logged_in(&cli, &config.claude.env).await.err();
    info!(cli = %cli.display(), version = %cli_version, "Claude Code CLI found");
    // Before connecting: no process of an earlier run may still work on a
    // task the coordinator is about to hand to someone else.
    let ended = runner::end_orphans(
        &runner::Registry::new(&config.data_dir),
        config.claude.kill_grace,
    )
    .await;
    if ended > 0 {
        info!(processes = ended, "ended what an earlier run left running");
    }
    let mut toolchains = if config.toolchains.probe {
        let probes = toolchains::plan(&config.toolchains.hide, &config.toolchains.extra);
        let timeout = config.toolchains.timeout.unwrap_or(Duration::from_secs(5));
        toolchains::detect(probes, timeout).await
    } else {
        Vec::new()
    };
    toolchains.retain(|t| t.name != "claude");
    toolchains.push(common::types::Toolchain {
        name: "claude".into(),
        version: cli_version,
    });
    toolchains.sort();
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
    driver::Driver::run(config, advert, unhealthy, shutdown).await?;
    info!("agent stopped");
    Ok(())
}
