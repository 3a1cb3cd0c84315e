//! `ccc-coordinator`: the cluster's coordinator process.

use clap::Parser;
use coordinator::config::{Args, Config};
use tokio_util::sync::CancellationToken;

/// Claude Code Cluster coordinator: accepts agents over mutual TLS, keeps
/// the cluster's state in sled and serves the Admin API.
///
/// Every setting is a flag, a CCC_COORDINATOR_* environment variable (shown
/// below) and a key of the TOML file given with --config; flags win over the
/// environment, which wins over the file. Settings that make no sense (a
/// zero timeout, --max-attempts 0, ...) are refused at start.
#[derive(Parser, Debug)]
#[command(name = "ccc-coordinator", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "ccc-coordinator: {}",
                common::telemetry::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::resolve(args)?;
    common::telemetry::init(config.log_format);
    common::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        coordinator::run(config, shutdown).await?;
        tracing::info!("coordinator stopped");
        anyhow::Ok(())
    })
}

/// SIGTERM or SIGINT starts a graceful stop.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let signal = common::signal::terminated().await;
    tracing::info!("{signal}: shutting down");
    shutdown.cancel();
}
