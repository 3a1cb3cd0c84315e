//! The coordinator: accepts agents over mutual TLS, keeps agents and tasks
//! durably in sled, places tasks on agents, and lets admins steer it all.
//!
//! Code map: `core` decides (pure), `driver` runs the one event loop and
//! commits through `store` before acting, `grpc` adapts tonic to driver
//! commands (`feed` is what `WatchCluster` streams), `server` owns sockets
//! and TLS, `config` resolves settings, `health` says whether the
//! coordinator serves, `metrics` counts.

pub mod config;
pub mod core;
pub mod driver;
pub mod feed;
pub mod github;
pub mod grpc;
pub mod health;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
pub mod triage;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use common::ids::Attempt;

use crate::core::{Core, Restored};
use crate::driver::Driver;
use crate::store::{SledStore, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] common::tls::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("another coordinator is already using {}", .0.display())]
    DataDirInUse(std::path::PathBuf),
    #[error(transparent)]
    Server(#[from] server::Error),
    #[error(transparent)]
    Github(#[from] github::client::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Reads everything the core is rebuilt from.
pub fn restore(store: &dyn Store) -> Result<Restored, store::Error> {
    let agents = store.load_agents()?;
    let outbox = store.load_outbox()?;
    let owed: std::collections::BTreeSet<_> = outbox.iter().map(|e| e.task).collect();
    // One task at a time: of an ended task that owes GitHub nothing only
    // what the core indexes is kept, so a restart's memory does not peak
    // with the history.
    let mut tasks = Vec::new();
    let mut ended = Vec::new();
    store.scan_tasks(&mut |task| {
        if task.state.is_terminal() && !owed.contains(&task.id) {
            ended.push(crate::core::EndedTask::of(&task));
        } else {
            tasks.push(task);
        }
    })?;
    let mut output = std::collections::BTreeMap::new();
    for task in tasks.iter().filter(|t| !t.state.is_terminal()) {
        let attempt = task.current().map_or(Attempt(0), |a| a.attempt);
        output.insert(
            task.id,
            store.output_position(task.id, task.output_since, attempt)?,
        );
    }
    Ok(Restored {
        agents,
        tasks,
        ended,
        output,
        deliveries: store.load_deliveries()?,
        outbox,
    })
}

/// Starts the GitHub side when a token is configured: the outbox worker
/// (status comments, pull requests) and, for label-triggered repositories,
/// the reconciler.
fn start_github(
    config: &Config,
    client: Option<github::client::Client>,
    driver: &driver::DriverHandle,
    metrics: &metrics::Metrics,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(client) = client else {
        if !config.github.repos.is_empty() {
            tracing::warn!(
                "no GitHub token is configured: no status comments or pull requests are written, and missed webhook deliveries are not reconciled"
            );
        }
        return Vec::new();
    };
    let mut tasks = vec![tokio::spawn(github::outbox::run(
        client.clone(),
        driver.clone(),
        metrics.clone(),
        shutdown.clone(),
    ))];
    let labeled = config
        .github
        .repos
        .iter()
        .any(|r| matches!(r.trigger, github::config::Trigger::Label(_)));
    if labeled {
        tasks.push(tokio::spawn(github::reconcile::run(
            client,
            Arc::clone(&config.github),
            Arc::clone(&config.triage_rules),
            driver.clone(),
            shutdown.clone(),
        )));
    }
    tasks
}

/// Runs the coordinator until `shutdown` fires (or a fatal store error).
/// Health checks say NOT_SERVING until the store is restored and the driver
/// answers, and again as soon as it stops, before anything is drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let lifecycle = health::Lifecycle::new();
    let metrics = metrics::Metrics::new();
    let tls = config.tls.load()?;
    let server_tls = Arc::new(tls.server_config()?);
    std::fs::create_dir_all(&config.data_dir).map_err(io(format!(
        "cannot create data dir {}",
        config.data_dir.display()
    )))?;
    let store = SledStore::open(&config.data_dir.join("store")).map_err(|e| {
        if e.is_locked() {
            Error::DataDirInUse(config.data_dir.clone())
        } else {
            Error::Store(e)
        }
    })?;
    let restored = restore(&store)?;
    let admins = store.load_admins()?;
    info!(
        n_agents = restored.agents.len(),
        n_tasks = restored.tasks.len(),
        "state restored from the store"
    );
    let (now, wall) = driver::clock();
    let mut core = Core::new(config.core.clone(), restored, now, wall);
    core.restore_admins(admins);
    let store: Arc<dyn Store> = Arc::new(store);
    let (driver, handle, revoked_admins) = Driver::new(core, Arc::clone(&store));
    let driver = driver
        .with_metrics(metrics.clone())
        .with_output_retention(config.output_retention);

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(io(format!("cannot listen on {}", config.grpc_listen)))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(io(format!("cannot listen on {}", config.http_listen)))?;
    let grpc_addr = grpc_listener.local_addr().map_err(io("grpc address"))?;
    let http_addr = http_listener.local_addr().map_err(io("http address"))?;
    info!(%grpc_addr, %http_addr, "coordinator listening");

    let client = config
        .github
        .can_write()
        .then(|| github::client::Client::new(&config.github, metrics.clone()))
        .transpose()?;
    // What every part stops on: cancelled only once health says NOT_SERVING.
    let stop = CancellationToken::new();
    let mut driver_task = driver
        .spawn(stop.clone())
        .map_err(io("cannot start the driver's thread"))?;
    let incoming = server::tls_incoming(
        grpc_listener,
        server_tls,
        config.handshake_timeout,
        stop.clone(),
    );
    let grpc_task = tokio::spawn(server::serve_grpc(
        incoming,
        handle.clone(),
        store,
        revoked_admins,
        Arc::clone(&config.triage_rules),
        client.clone(),
        lifecycle.clone(),
        stop.clone(),
    ));
    let http_state = http::HttpState {
        driver: handle.clone(),
        github: Arc::clone(&config.github),
        rules: Arc::clone(&config.triage_rules),
        client: client.clone(),
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
    };
    let http_task = tokio::spawn(http::serve(http_listener, http_state, stop.clone()));
    let github_tasks = start_github(&config, client, &handle, &metrics, &stop);

    // The driver answers only once it has committed what restoring wrote.
    tokio::select! {
        answered = handle.call(|reply| driver::Command::MetricsSnapshot { reply }) => {
            if answered.is_ok() {
                lifecycle.serving();
                info!("coordinator ready");
            }
        }
        () = shutdown.cancelled() => {}
    }
    let driver_result = tokio::select! {
        result = &mut driver_task => {
            lifecycle.stopping("the coordinator's event loop stopped");
            Some(result)
        }
        () = shutdown.cancelled() => {
            lifecycle.stopping("shutting down");
            None
        }
    };
    // Whatever stopped the driver stops everything else too.
    stop.cancel();
    let driver_result = match driver_result {
        Some(result) => result,
        None => driver_task.await,
    };
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = grpc_task.await;
        let _ = http_task.await;
        for task in github_tasks {
            let _ = task.await;
        }
    })
    .await;
    if drained.is_err() {
        error!("servers did not stop within 5s");
    }
    let panicked = |why: String| Error::Io {
        what: "driver thread".into(),
        source: std::io::Error::other(why),
    };
    match driver_result {
        Ok(driver::Stopped::Shutdown) => Ok(()),
        Ok(driver::Stopped::CommitFailed(e)) => Err(e.into()),
        Ok(driver::Stopped::Panicked(why)) => Err(panicked(format!("it panicked: {why}"))),
        Err(_) => Err(panicked("it ended without an answer".into())),
    }
}
