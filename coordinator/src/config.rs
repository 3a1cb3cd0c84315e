//! The coordinator's settings. Each is a flag, a `CCC_COORDINATOR_...`
//! environment variable (distinct from `ccc`'s `CCC_...` and the agent's
//! `CCC_AGENT_...`, so one shell can hold all three) and a key of the TOML
//! file given with `--config`; the flag wins, then the environment, then the
//! file, then the default. Settings that make no sense are refused at start
//! with the setting named.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::config::{de_opt_duration, de_opt_size, load_toml, parse_duration, parse_size};
use common::telemetry::LogFormat;
use common::tls::TlsPaths;
use serde::Deserialize;

use crate::core::CoreConfig;
use crate::github::GithubConfig;
use crate::github::config::{GithubArgs, GithubFile, RepoFile};
use crate::triage::Rules;

/// A usage-limit reset further away than this is not believed: the limits
/// Anthropic applies reset within hours, and a reset days away (a bad clock,
/// a bug, a hostile agent) would park a task and its agent indefinitely.
pub const DEFAULT_RATE_LIMIT_COOLDOWN_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "CCC_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the gRPC server (agents and admins) [default: 127.0.0.1:7443].
    #[arg(long, env = "CCC_COORDINATOR_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of the HTTP server (webhooks, health) [default: 127.0.0.1:8080].
    #[arg(long, env = "CCC_COORDINATOR_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Where the coordinator keeps its sled store [default: ./data/coordinator].
    #[arg(long, env = "CCC_COORDINATOR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of the cluster PKI made by `ccc certs` [default: certs].
    #[arg(long, env = "CCC_COORDINATOR_CERTS_DIR")]
    pub certs_dir: Option<PathBuf>,
    /// Cluster CA certificate [default: <certs-dir>/ca.pem].
    #[arg(long, env = "CCC_COORDINATOR_CA")]
    pub ca: Option<PathBuf>,
    /// Server certificate [default: <certs-dir>/coordinator.pem].
    #[arg(long, env = "CCC_COORDINATOR_CERT")]
    pub cert: Option<PathBuf>,
    /// Server private key [default: <certs-dir>/coordinator-key.pem].
    #[arg(long, env = "CCC_COORDINATOR_KEY")]
    pub key: Option<PathBuf>,
    /// Interval of heartbeats on agent streams [default: 5s].
    #[arg(long, env = "CCC_COORDINATOR_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// A stream silent this long is closed [default: 20s].
    #[arg(long, env = "CCC_COORDINATOR_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// How long a running task survives its agent's silence [default: 10m].
    #[arg(long, env = "CCC_COORDINATOR_LEASE_TIMEOUT", value_parser = parse_duration)]
    pub lease_timeout: Option<Duration>,
    /// An assignment not accepted within this time is requeued [default: 30s].
    #[arg(long, env = "CCC_COORDINATOR_ACCEPT_TIMEOUT", value_parser = parse_duration)]
    pub accept_timeout: Option<Duration>,
    /// How long one attempt may run on an agent [default: 60m].
    #[arg(long, env = "CCC_COORDINATOR_TASK_DEADLINE", value_parser = parse_duration)]
    pub task_deadline: Option<Duration>,
    /// Attempts a task may spend before it fails for good [default: 3].
    #[arg(long, env = "CCC_COORDINATOR_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Wait before retrying a failed attempt; doubles per failure [default: 10s].
    #[arg(long, env = "CCC_COORDINATOR_RETRY_BACKOFF", value_parser = parse_duration)]
    pub retry_backoff: Option<Duration>,
    /// Longest wait between attempts [default: 5m].
    #[arg(long, env = "CCC_COORDINATOR_RETRY_BACKOFF_MAX", value_parser = parse_duration)]
    pub retry_backoff_max: Option<Duration>,
    /// After this long in the queue, `general` agents may take any task [default: 2m].
    #[arg(long, env = "CCC_COORDINATOR_GENERAL_FALLBACK_AFTER", value_parser = parse_duration)]
    pub general_fallback_after: Option<Duration>,
    /// Output stored per task; past it a truncation marker is stored [default: 64MiB].
    #[arg(long, env = "CCC_COORDINATOR_OUTPUT_CAP", value_parser = parse_size)]
    pub output_cap: Option<u64>,
    /// The output of a task that ended longer ago than this is deleted (the
    /// task itself is kept), e.g. `30d` [default: output is kept].
    #[arg(long, env = "CCC_COORDINATOR_OUTPUT_RETENTION", value_parser = parse_duration)]
    pub output_retention: Option<Duration>,
    /// An agent that hit the API's usage limit gets no work for this long, or until the reset it reported [default: 5m].
    #[arg(long, env = "CCC_COORDINATOR_RATE_LIMIT_COOLDOWN", value_parser = parse_duration)]
    pub rate_limit_cooldown: Option<Duration>,
    /// The longest an agent-reported usage-limit reset is honoured; a reset further away is cut to this [default: 24h].
    #[arg(long, env = "CCC_COORDINATOR_RATE_LIMIT_COOLDOWN_MAX", value_parser = parse_duration)]
    pub rate_limit_cooldown_max: Option<Duration>,
    /// Log format: pretty or json [default: pretty].
    #[arg(long, env = "CCC_COORDINATOR_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Triage rules (TOML) that extend the built-in ones, or replace them
    /// with `extends = false`; try a file first with `ccc triage --rules`.
    #[arg(long, env = "CCC_COORDINATOR_TRIAGE_RULES")]
    pub triage_rules: Option<PathBuf>,
    /// GitHub's REST API: GitHub Enterprise's, or a local server in tests [default: https://api.github.com].
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_API_URL")]
    pub github_api_url: Option<String>,
    /// The GitHub token itself; prefer the environment or a file over the command line.
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// A file holding the GitHub token.
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_TOKEN_FILE")]
    pub github_token_file: Option<PathBuf>,
    /// The webhook secret itself; prefer the environment or a file over the command line.
    #[arg(long, env = "CCC_COORDINATOR_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// A GitHub App's id, instead of a token (with --github-app-key-file).
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_APP_ID")]
    pub github_app_id: Option<u64>,
    /// The GitHub App's private key (PEM).
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_APP_KEY_FILE")]
    pub github_app_key_file: Option<PathBuf>,
    /// A file holding the webhook secret; without a secret, deliveries are refused.
    #[arg(long, env = "CCC_COORDINATOR_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// How often open triggered issues are listed to find missed deliveries [default: 5m].
    #[arg(long, env = "CCC_COORDINATOR_GITHUB_RECONCILE_EVERY", value_parser = parse_duration)]
    pub github_reconcile_every: Option<Duration>,
    /// A webhook delivery id seen within this window is not handled again [default: 7d].
    #[arg(long, env = "CCC_COORDINATOR_DELIVERY_WINDOW", value_parser = parse_duration)]
    pub delivery_window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file format's version; only 1 exists.
    pub version: Option<u32>,
    pub grpc_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub certs_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub heartbeat_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub lease_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub accept_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub task_deadline: Option<Duration>,
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub retry_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub retry_backoff_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub general_fallback_after: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_size")]
    pub output_cap: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub output_retention: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rate_limit_cooldown: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rate_limit_cooldown_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_log_format")]
    pub log_format: Option<LogFormat>,
    pub triage_rules: Option<PathBuf>,
    #[serde(default)]
    pub github: GithubFile,
    #[serde(default)]
    pub repos: Vec<RepoFile>,
}

fn de_opt_log_format<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<LogFormat>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] common::config::Error),
    #[error("config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Rules(#[from] crate::triage::Error),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsPaths,
    pub core: CoreConfig,
    pub log_format: LogFormat,
    /// A TLS handshake must finish within this time.
    pub handshake_timeout: Duration,
    /// The triage rules every submitted task is read with.
    pub triage_rules: Arc<Rules>,
    /// Output of tasks ended longer ago is deleted; `None` keeps it.
    pub output_retention: Option<Duration>,
    pub github: Arc<GithubConfig>,
}

impl Config {
    pub fn resolve(args: Args) -> Result<Self, Error> {
        let file: FileConfig = load_toml(args.config.as_deref())?;
        common::config::check_version(file.version).map_err(Error::Invalid)?;
        let certs_dir = args
            .certs_dir
            .or(file.certs_dir)
            .unwrap_or_else(|| PathBuf::from("certs"));
        let heartbeat_interval = args
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(Duration::from_secs(5));
        let heartbeat_timeout = args
            .heartbeat_timeout
            .or(file.heartbeat_timeout)
            .unwrap_or(Duration::from_secs(20));
        let retry_backoff = args
            .retry_backoff
            .or(file.retry_backoff)
            .unwrap_or(Duration::from_secs(10));
        let rate_limit_cooldown = args
            .rate_limit_cooldown
            .or(file.rate_limit_cooldown)
            .unwrap_or(Duration::from_secs(300));
        let config = Self {
            grpc_listen: args
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7443))),
            http_listen: args
                .http_listen
                .or(file.http_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("data/coordinator")),
            tls: TlsPaths::for_server(
                &certs_dir,
                args.ca.or(file.ca),
                args.cert.or(file.cert),
                args.key.or(file.key),
            ),
            core: CoreConfig {
                heartbeat_interval,
                heartbeat_timeout,
                hello_timeout: heartbeat_timeout,
                lease_timeout: args
                    .lease_timeout
                    .or(file.lease_timeout)
                    .unwrap_or(Duration::from_secs(600)),
                accept_timeout: args
                    .accept_timeout
                    .or(file.accept_timeout)
                    .unwrap_or(Duration::from_secs(30)),
                task_deadline: args
                    .task_deadline
                    .or(file.task_deadline)
                    .unwrap_or(Duration::from_secs(3600)),
                max_attempts: args.max_attempts.or(file.max_attempts).unwrap_or(3),
                retry_backoff_initial: retry_backoff,
                retry_backoff_max: args
                    .retry_backoff_max
                    .or(file.retry_backoff_max)
                    .unwrap_or(Duration::from_secs(300)),
                general_fallback_after: args
                    .general_fallback_after
                    .or(file.general_fallback_after)
                    .unwrap_or(Duration::from_secs(120)),
                output_cap_bytes: args.output_cap.or(file.output_cap).unwrap_or(64 << 20),
                rate_limit_cooldown,
                rate_limit_cooldown_max: args
                    .rate_limit_cooldown_max
                    .or(file.rate_limit_cooldown_max)
                    .unwrap_or(DEFAULT_RATE_LIMIT_COOLDOWN_MAX),
                delivery_window: args
                    .delivery_window
                    .or(file.github.delivery_window)
                    .unwrap_or(crate::core::github::DEFAULT_DELIVERY_WINDOW),
            },
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Pretty),
            handshake_timeout: Duration::from_secs(10),
            output_retention: args.output_retention.or(file.output_retention),
            triage_rules: Arc::new(Rules::load_or_defaults(
                args.triage_rules.or(file.triage_rules).as_deref(),
            )?),
            github: Arc::new(
                GithubConfig::resolve(
                    GithubArgs {
                        api_url: args.github_api_url,
                        token: args.github_token,
                        token_file: args.github_token_file,
                        webhook_secret: args.webhook_secret,
                        webhook_secret_file: args.webhook_secret_file,
                        reconcile_every: args.github_reconcile_every,
                        app_id: args.github_app_id,
                        app_key_file: args.github_app_key_file,
                    },
                    file.github,
                    file.repos,
                )
                .map_err(Error::Invalid)?,
            ),
        };
        config.core.check().map_err(Error::Invalid)?;
        Ok(config)
    }
}

/// `--flag` / `key` of a setting, for messages.
fn named(key: &str) -> String {
    format!("{} (--{})", key, key.replace('_', "-"))
}

impl CoreConfig {
    /// Refuses settings that make no sense, naming them.
    pub fn check(&self) -> Result<(), String> {
        for (key, value) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("lease_timeout", self.lease_timeout),
            ("accept_timeout", self.accept_timeout),
            ("task_deadline", self.task_deadline),
            ("retry_backoff", self.retry_backoff_initial),
            ("retry_backoff_max", self.retry_backoff_max),
            ("rate_limit_cooldown", self.rate_limit_cooldown),
            ("rate_limit_cooldown_max", self.rate_limit_cooldown_max),
        ] {
            if value.is_zero() {
                return Err(format!("{} must be longer than 0", named(key)));
            }
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(format!(
                "{} ({:?}) must be longer than {} ({:?})",
                named("heartbeat_timeout"),
                self.heartbeat_timeout,
                named("heartbeat_interval"),
                self.heartbeat_interval
            ));
        }
        if self.lease_timeout <= self.heartbeat_interval {
            return Err(format!(
                "{} ({:?}) must be longer than {} ({:?}): heartbeats renew leases",
                named("lease_timeout"),
                self.lease_timeout,
                named("heartbeat_interval"),
                self.heartbeat_interval
            ));
        }
        if self.max_attempts == 0 {
            return Err(format!("{} must be at least 1", named("max_attempts")));
        }
        if self.retry_backoff_max < self.retry_backoff_initial {
            return Err(format!(
                "{} ({:?}) must not be shorter than {} ({:?})",
                named("retry_backoff_max"),
                self.retry_backoff_max,
                named("retry_backoff"),
                self.retry_backoff_initial
            ));
        }
        if self.rate_limit_cooldown_max < self.rate_limit_cooldown {
            return Err(format!(
                "{} ({:?}) must not be shorter than {} ({:?})",
                named("rate_limit_cooldown_max"),
                self.rate_limit_cooldown_max,
                named("rate_limit_cooldown"),
                self.rate_limit_cooldown
            ));
        }
        if self.output_cap_bytes == 0 {
            return Err(format!("{} must be more than 0 bytes", named("output_cap")));
        }
        Ok(())
    }
}
