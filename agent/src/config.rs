//! The agent's settings: each is a flag, a `CCC_AGENT_...` environment
//! variable and a key of the TOML file given with `--config` (flag, then
//! environment, then file, then default). Toolchain probes are configured in
//! the file only. Settings that cannot work (a capacity of 0, a zero
//! timeout) are refused here, at start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::config::{de_opt_duration, de_opt_size, load_toml, parse_duration, parse_size};

/// The default bound of output not yet acknowledged (`max_unacked_output`).
pub const DEFAULT_MAX_UNACKED_OUTPUT: u64 = 512 << 20;
use common::pki::Role;
use common::telemetry::LogFormat;
use common::tls::{TlsMaterial, TlsPaths};
use common::types::Specialty;
use serde::Deserialize;

use crate::toolchains::Probe;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below (keys in snake_case), and a
    /// [toolchains] table (probe, timeout, hide, extra).
    #[arg(long, env = "CCC_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The coordinator's gRPC URL [default: https://127.0.0.1:7443].
    #[arg(long, env = "CCC_AGENT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Directory of the cluster PKI [default: certs].
    #[arg(long, env = "CCC_AGENT_CERTS_DIR")]
    pub certs_dir: Option<PathBuf>,
    /// Cluster CA certificate [default: <certs-dir>/ca.pem].
    #[arg(long, env = "CCC_AGENT_CA")]
    pub ca: Option<PathBuf>,
    /// This agent's certificate; its CN is the agent's id [default: the one <certs-dir>/agent-*.pem].
    #[arg(long, env = "CCC_AGENT_CERT")]
    pub cert: Option<PathBuf>,
    /// This agent's private key [default: the certificate's name with -key.pem].
    #[arg(long, env = "CCC_AGENT_KEY")]
    pub key: Option<PathBuf>,
    /// Where the agent keeps workspaces and buffers [default: data/agent-<name>].
    #[arg(long, env = "CCC_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Kinds of work this PC takes: backend, frontend, testing, devops, general [default: general].
    #[arg(long, env = "CCC_AGENT_SPECIALTIES", value_delimiter = ',')]
    pub specialties: Option<Vec<Specialty>>,
    /// Tasks run at once [default: 1].
    #[arg(long, env = "CCC_AGENT_CAPACITY")]
    pub capacity: Option<u32>,
    /// Labels as key=value, comma-separated (e.g. gpu=yes,os=debian).
    #[arg(long, env = "CCC_AGENT_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Option<Vec<(String, String)>>,
    /// First delay before reconnecting; doubles up to --reconnect-max [default: 500ms].
    #[arg(long, env = "CCC_AGENT_RECONNECT_INITIAL", value_parser = parse_duration)]
    pub reconnect_initial: Option<Duration>,
    /// Longest delay between reconnection attempts [default: 15s].
    #[arg(long, env = "CCC_AGENT_RECONNECT_MAX", value_parser = parse_duration)]
    pub reconnect_max: Option<Duration>,
    /// Log format: pretty or json [default: pretty].
    #[arg(long, env = "CCC_AGENT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The Claude Code CLI: a path (a relative one from the directory the
    /// agent starts in) or a name looked up on PATH; checked with --version
    /// at start [default: claude].
    #[arg(long, env = "CCC_AGENT_CLAUDE")]
    pub claude: Option<String>,
    /// --max-turns given to the CLI [default: 40].
    #[arg(long, env = "CCC_AGENT_MAX_TURNS")]
    pub max_turns: Option<u32>,
    /// --model given to the CLI [default: the CLI's own].
    #[arg(long, env = "CCC_AGENT_MODEL")]
    pub model: Option<String>,
    /// How long one CLI run may take at most [default: 60m; the coordinator's deadline may be shorter].
    #[arg(long, env = "CCC_AGENT_CLAUDE_TIMEOUT", value_parser = parse_duration)]
    pub claude_timeout: Option<Duration>,
    /// On shutdown, how long running tasks get to stop and report [default: 10s].
    #[arg(long, env = "CCC_AGENT_STOP_GRACE", value_parser = parse_duration)]
    pub stop_grace: Option<Duration>,
    /// Output not yet acknowledged by the coordinator (kept in the spool)
    /// beyond which the agent stops reading its CLI runs' output until
    /// acknowledgements catch up, e.g. `512MiB` [default: 512MiB].
    #[arg(long, env = "CCC_AGENT_MAX_UNACKED_OUTPUT", value_parser = parse_size)]
    pub max_unacked_output: Option<u64>,
    /// How long a git server may take to answer, when connecting or during
    /// a fetch or push, before the attempt gives up [default: 2m].
    #[arg(long, env = "CCC_AGENT_GIT_NETWORK_TIMEOUT", value_parser = parse_duration)]
    pub git_network_timeout: Option<Duration>,
    /// Private key for ssh:// and git@host: remotes, used when no ssh-agent
    /// (SSH_AUTH_SOCK) offers one that works [default: the ssh-agent only].
    #[arg(long, env = "CCC_AGENT_GIT_SSH_KEY")]
    pub git_ssh_key: Option<PathBuf>,
    /// The known_hosts file that SSH git servers' host keys are checked
    /// against; an unknown or changed key fails the attempt [default: ~/.ssh/known_hosts].
    #[arg(long, env = "CCC_AGENT_GIT_KNOWN_HOSTS")]
    pub git_known_hosts: Option<PathBuf>,
    /// While the CLI cannot work (missing, not logged in, invalid API key),
    /// how often it is checked again [default: 5m].
    #[arg(long, env = "CCC_AGENT_HEALTH_CHECK_INTERVAL", value_parser = parse_duration)]
    pub health_check_interval: Option<Duration>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not key=value"))?;
    if k.trim().is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub version: Option<u32>,
    pub coordinator: Option<String>,
    pub certs_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub specialties: Option<Vec<Specialty>>,
    pub capacity: Option<u32>,
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub reconnect_initial: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub reconnect_max: Option<Duration>,
    pub log_format: Option<String>,
    #[serde(default)]
    pub toolchains: ToolchainsConfig,
    #[serde(default)]
    pub claude: ClaudeFileConfig,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stop_grace: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_unacked_output: Option<u64>,
    #[serde(default)]
    pub tests: TestsFileConfig,
    #[serde(default)]
    pub git: GitFileConfig,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub health_check_interval: Option<Duration>,
}

/// `[tests]`: the test command per specialty, when neither the task nor the
/// repository (`.ccc/test`) names one; without any, it is guessed from the
/// repository's files (package.json, Cargo.toml, go.mod, pytest, Makefile).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestsFileConfig {
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    pub backend: Option<String>,
    pub frontend: Option<String>,
    pub testing: Option<String>,
    pub devops: Option<String>,
    pub general: Option<String>,
}

#[derive(Clone, Debug)]
pub struct TestsConfig {
    pub timeout: Duration,
    pub per_specialty: BTreeMap<Specialty, String>,
}

impl TestsConfig {
    pub fn for_specialty(&self, specialty: Specialty) -> Option<String> {
        self.per_specialty.get(&specialty).cloned()
    }
}

/// `[git]`: who commits, and what happens to work stopped at a limit.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitFileConfig {
    pub author_name: Option<String>,
    pub author_email: Option<String>,
    /// Push what the CLI changed when it stopped at its turn limit, budget
    /// or deadline (default true).
    pub push_incomplete: Option<bool>,
    /// How long the workspaces of failed attempts are kept (default 24h).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub keep_failed_for: Option<Duration>,
    /// How long a git server may take to answer (default 2m).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub network_timeout: Option<Duration>,
    /// Private key for SSH remotes when the ssh-agent has none that works.
    pub ssh_key: Option<PathBuf>,
    /// Host keys of SSH git servers (default ~/.ssh/known_hosts).
    pub known_hosts: Option<PathBuf>,
}

/// `[claude]`: how the CLI is run.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaudeFileConfig {
    pub path: Option<String>,
    /// Arguments added after the agent's own.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Environment for the CLI (e.g. ANTHROPIC_BASE_URL); added to the agent's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// acceptEdits (default; works as root), or another --permission-mode.
    pub permission_mode: Option<String>,
    /// The prompt, with {title} {body} {url} {number} {task} {specialty}
    /// {technologies} {branch} replaced; default: the built-in prompt.
    pub prompt_template: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    pub model: Option<String>,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    pub append_system_prompt: Option<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub kill_grace: Option<Duration>,
}

/// The CLI invocation, resolved.
#[derive(Clone, Debug)]
pub struct ClaudeConfig {
    pub program: String,
    pub prompt_template: Option<String>,
    pub permission_mode: String,
    pub max_turns: u32,
    pub max_budget_usd: Option<f64>,
    pub model: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub append_system_prompt: Option<String>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub kill_grace: Duration,
}

impl ClaudeConfig {
    /// The prompt for a task: the configured template or the built-in one.
    pub fn prompt(&self, task: common::ids::TaskId, spec: &common::types::TaskSpec) -> String {
        match &self.prompt_template {
            Some(template) => crate::prompt::render(template, task, spec),
            None => crate::prompt::build(task, spec),
        }
    }
}

/// `[toolchains]`: which tools to look for at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolchainsConfig {
    /// Set to false to advertise no toolchains at all.
    #[serde(default = "yes")]
    pub probe: bool,
    /// Each probe's timeout [default: 5s].
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// Tools not to advertise even when present.
    #[serde(default)]
    pub hide: Vec<String>,
    /// More tools: `{ name = "deno", command = ["deno", "--version"] }`.
    #[serde(default)]
    pub extra: Vec<Probe>,
}

fn yes() -> bool {
    true
}

impl Default for ToolchainsConfig {
    fn default() -> Self {
        Self {
            probe: true,
            timeout: None,
            hide: Vec::new(),
            extra: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] common::config::Error),
    #[error(transparent)]
    Tls(#[from] common::tls::Error),
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Clone)]
pub struct Config {
    pub coordinator: String,
    pub tls: TlsMaterial,
    /// The CN of our certificate: the id the coordinator knows us by.
    pub name: String,
    pub data_dir: PathBuf,
    pub specialties: Vec<Specialty>,
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub log_format: LogFormat,
    pub toolchains: ToolchainsConfig,
    /// How long to wait for `Welcome` after opening the stream.
    pub welcome_timeout: Duration,
    pub claude: ClaudeConfig,
    /// On shutdown, how long running tasks get to stop and report.
    pub stop_grace: Duration,
    /// Unacknowledged output beyond which CLI output waits.
    pub max_unacked_output: usize,
    pub tests: TestsConfig,
    pub author: crate::workspace::Author,
    pub push_incomplete: bool,
    pub keep_failed_for: Duration,
    pub git_network_timeout: Duration,
    pub ssh: crate::workspace::SshConfig,
    /// While unhealthy, how often the CLI is checked again.
    pub health_check_interval: Duration,
}

impl Config {
    pub fn resolve(args: Args) -> Result<Self, Error> {
        let file: FileConfig = load_toml(args.config.as_deref())?;
        common::config::check_version(file.version).map_err(Error::Invalid)?;
        let certs_dir = args
            .certs_dir
            .or(file.certs_dir)
            .unwrap_or_else(|| PathBuf::from("certs"));
        let paths = TlsPaths::for_client(
            &certs_dir,
            Role::Agent,
            args.ca.or(file.ca),
            args.cert.or(file.cert),
            args.key.or(file.key),
        )?;
        let tls = paths.load()?;
        let identity = tls.identity()?;
        if identity.role != Role::Agent {
            return Err(Error::Invalid(format!(
                "{} is a {} certificate; an agent needs one made by `ccc certs agent <name>`",
                paths.cert.display(),
                identity.role
            )));
        }
        let capacity = args.capacity.or(file.capacity).unwrap_or(1);
        if capacity == 0 || capacity > common::protocol::MAX_CAPACITY {
            return Err(Error::Invalid(format!(
                "capacity {capacity} is not within 1..={}",
                common::protocol::MAX_CAPACITY
            )));
        }
        let mut specialties = args
            .specialties
            .or(file.specialties)
            .unwrap_or_else(|| vec![Specialty::General]);
        specialties.sort();
        specialties.dedup();
        let labels = match args.labels {
            Some(pairs) => pairs.into_iter().collect(),
            None => file.labels.unwrap_or_default(),
        };
        let log_format = match args.log_format {
            Some(f) => f,
            None => file
                .log_format
                .map(|s| s.parse().map_err(Error::Invalid))
                .transpose()?
                .unwrap_or(LogFormat::Pretty),
        };
        let reconnect_initial = args
            .reconnect_initial
            .or(file.reconnect_initial)
            .unwrap_or(Duration::from_millis(500));
        // Given explicitly, it must exist; the default may not (no SSH remotes).
        let known_hosts = args.git_known_hosts.or(file.git.known_hosts);
        if let Some(path) = &known_hosts
            && !path.is_file()
        {
            return Err(Error::Invalid(format!(
                "git known_hosts {} is not a file",
                path.display()
            )));
        }
        let config = Self {
            coordinator: args
                .coordinator
                .or(file.coordinator)
                .unwrap_or_else(|| "https://127.0.0.1:7443".into()),
            // Absolute: git remotes and the CLI's working directory need it.
            data_dir: {
                let dir = args
                    .data_dir
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from(format!("data/agent-{}", identity.name)));
                std::path::absolute(&dir)
                    .map_err(|e| Error::Invalid(format!("data dir {}: {e}", dir.display())))?
            },
            name: identity.name,
            tls,
            specialties,
            capacity,
            labels,
            reconnect_initial,
            reconnect_max: args
                .reconnect_max
                .or(file.reconnect_max)
                .unwrap_or(Duration::from_secs(15))
                .max(reconnect_initial),
            log_format,
            toolchains: file.toolchains,
            welcome_timeout: Duration::from_secs(10),
            claude: ClaudeConfig {
                program: args
                    .claude
                    .or(file.claude.path)
                    .unwrap_or_else(|| "claude".into()),
                prompt_template: file.claude.prompt_template,
                permission_mode: file
                    .claude
                    .permission_mode
                    .unwrap_or_else(|| "acceptEdits".into()),
                max_turns: args.max_turns.or(file.claude.max_turns).unwrap_or(40),
                max_budget_usd: file.claude.max_budget_usd,
                model: args.model.or(file.claude.model),
                allowed_tools: file.claude.allowed_tools,
                disallowed_tools: file.claude.disallowed_tools,
                append_system_prompt: file.claude.append_system_prompt,
                extra_args: file.claude.extra_args,
                env: {
                    // Without it the CLI also calls Anthropic's own hosts
                    // (telemetry, bootstrap) whatever the base URL.
                    let mut env = BTreeMap::from([(
                        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_owned(),
                        "1".to_owned(),
                    )]);
                    env.extend(file.claude.env);
                    env.into_iter().collect()
                },
                timeout: args
                    .claude_timeout
                    .or(file.claude.timeout)
                    .unwrap_or(Duration::from_secs(3600)),
                kill_grace: file.claude.kill_grace.unwrap_or(Duration::from_secs(5)),
            },
            stop_grace: args
                .stop_grace
                .or(file.stop_grace)
                .unwrap_or(Duration::from_secs(10)),
            max_unacked_output: usize::try_from(
                args.max_unacked_output
                    .or(file.max_unacked_output)
                    .unwrap_or(DEFAULT_MAX_UNACKED_OUTPUT),
            )
            .unwrap_or(usize::MAX),
            tests: TestsConfig {
                timeout: file.tests.timeout.unwrap_or(Duration::from_secs(600)),
                per_specialty: [
                    (Specialty::Backend, file.tests.backend),
                    (Specialty::Frontend, file.tests.frontend),
                    (Specialty::Testing, file.tests.testing),
                    (Specialty::Devops, file.tests.devops),
                    (Specialty::General, file.tests.general),
                ]
                .into_iter()
                .filter_map(|(s, cmd)| cmd.map(|c| (s, c)))
                .collect(),
            },
            author: crate::workspace::Author {
                name: file
                    .git
                    .author_name
                    .unwrap_or_else(|| "Claude Code Cluster".into()),
                email: file
                    .git
                    .author_email
                    .unwrap_or_else(|| "claude-code-cluster@localhost".into()),
            },
            push_incomplete: file.git.push_incomplete.unwrap_or(true),
            keep_failed_for: file
                .git
                .keep_failed_for
                .unwrap_or(Duration::from_secs(86_400)),
            git_network_timeout: args
                .git_network_timeout
                .or(file.git.network_timeout)
                .unwrap_or(Duration::from_secs(120)),
            ssh: crate::workspace::SshConfig {
                key: args.git_ssh_key.or(file.git.ssh_key),
                known_hosts: known_hosts.or_else(|| {
                    std::env::var_os("HOME")
                        .map(|home| PathBuf::from(home).join(".ssh").join("known_hosts"))
                }),
            },
            health_check_interval: args
                .health_check_interval
                .or(file.health_check_interval)
                .unwrap_or(Duration::from_secs(300)),
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses settings that cannot work, naming the setting.
    fn check(&self) -> Result<(), Error> {
        let positive = [
            ("reconnect_initial", self.reconnect_initial),
            ("claude timeout (--claude-timeout)", self.claude.timeout),
            ("stop_grace", self.stop_grace),
            ("tests timeout", self.tests.timeout),
            ("git network_timeout", self.git_network_timeout),
            ("health_check_interval", self.health_check_interval),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(Error::Invalid(format!("{name} must be longer than 0")));
            }
        }
        // Below one chunk nothing could ever be sent.
        if self.max_unacked_output < common::protocol::MAX_OUTPUT_CHUNK {
            return Err(Error::Invalid(format!(
                "max_unacked_output ({} bytes) must be at least one output chunk ({} bytes)",
                self.max_unacked_output,
                common::protocol::MAX_OUTPUT_CHUNK
            )));
        }
        if self.stop_grace <= self.claude.kill_grace {
            return Err(Error::Invalid(format!(
                "stop_grace ({:?}) must be longer than the CLI's kill_grace ({:?}): running tasks could not be handed back",
                self.stop_grace, self.claude.kill_grace
            )));
        }
        if let Some(key) = &self.ssh.key
            && !key.is_file()
        {
            return Err(Error::Invalid(format!(
                "git ssh_key {} is not a file",
                key.display()
            )));
        }
        if self.claude.max_turns == 0 {
            return Err(Error::Invalid("max_turns must be at least 1".into()));
        }
        if let Some(budget) = self.claude.max_budget_usd
            && !(budget.is_finite() && budget > 0.0)
        {
            return Err(Error::Invalid(format!(
                "max_budget_usd {budget} is not a positive amount"
            )));
        }
        if self.claude.program.trim().is_empty() {
            return Err(Error::Invalid("the claude path is empty".into()));
        }
        if let Some(timeout) = self.toolchains.timeout
            && timeout.is_zero()
        {
            return Err(Error::Invalid(
                "toolchains timeout must be longer than 0".into(),
            ));
        }
        Ok(())
    }
}
