//! `ccc-agent`: runs on each PC of the cluster.

use std::io::Write;

use agent::config::{Args, Config};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Claude Code Cluster agent: connects to the coordinator over mutual TLS,
/// identified by its certificate, and advertises this PC's specialties,
/// slots and toolchains.
///
/// Every setting is a flag, an environment variable (shown below) and a key
/// of the TOML file given with --config; flags win over the environment,
/// which wins over the file.
#[derive(Parser, Debug)]
#[command(name = "ccc-agent", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version land here too; output into a closed
            // pipe (`ccc-agent --help | head`) is not an error worth a word.
            let _ = e.print();
            return if e.use_stderr() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
    common::tls::install_crypto_provider();
    match run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ccc-agent: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes in words, each said once: a cause whose text
/// its parent already quotes is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::resolve(args)?;
    // Before the runtime: it sets libgit2 globals no thread may race with.
    agent::workspace::set_network_timeout(config.git_network_timeout)?;
    common::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        agent::run(config, shutdown).await?;
        anyhow::Ok(())
    })
}

/// SIGTERM or SIGINT starts a graceful stop.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let signal = common::signal::terminated().await;
    tracing::info!("{signal}: stopping");
    shutdown.cancel();
}
