//! A cluster on loopback: a PKI made by the real `ccc certs`, the real
//! coordinator and agents, and `ccc` as the admin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::process::{Process, TestDir, bin};

/// How long a process gets to become ready in tests.
pub const READY: Duration = Duration::from_secs(20);

/// A cluster PKI in a directory, made with `ccc certs`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// CA, coordinator certificate for 127.0.0.1/localhost, admin `root`.
    pub fn create(dir: PathBuf) -> Self {
        let pki = Self { dir };
        pki.certs(&["init"]);
        pki.certs(&["server", "--san", "127.0.0.1,localhost"]);
        pki.certs(&["admin", "root"]);
        pki
    }

    pub fn certs(&self, args: &[&str]) -> Output {
        let out = Command::new(bin("ccc"))
            .arg("--certs-dir")
            .arg(&self.dir)
            .arg("certs")
            .args(args)
            .env_remove("CCC_CONFIG")
            .output()
            .expect("run ccc certs");
        assert!(
            out.status.success(),
            "ccc certs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Issues `agent-<name>.pem` into `dir` (its own directory, so the
    /// agent's default lookup finds exactly one).
    pub fn agent_certs(&self, name: &str, dir: &Path) -> PathBuf {
        self.certs(&["agent", name]);
        std::fs::create_dir_all(dir).expect("agent certs dir");
        for file in [
            "ca.pem".to_owned(),
            format!("agent-{name}.pem"),
            format!("agent-{name}-key.pem"),
        ] {
            std::fs::copy(self.dir.join(&file), dir.join(&file)).expect("copy cert");
        }
        dir.to_path_buf()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// The coordinator and agents of one test, with their directories.
pub struct Cluster {
    pub dir: TestDir,
    pub pki: Pki,
    pub coordinator: Option<Process>,
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub agents: Vec<Process>,
    /// Extra coordinator flags, e.g. shorter heartbeats.
    pub coordinator_args: Vec<String>,
    /// Environment variables of the coordinator (set before it starts).
    pub coordinator_env: Vec<(String, String)>,
    /// Where agents dial instead of the coordinator (e.g. a proxy).
    pub agent_target: Option<SocketAddr>,
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        Self::in_dir(TestDir::new(name))
    }

    pub fn in_dir(dir: TestDir) -> Self {
        let pki = Pki::create(dir.join("certs"));
        Self {
            dir,
            pki,
            coordinator: None,
            grpc_addr: None,
            http_addr: None,
            agents: Vec::new(),
            // Frequent heartbeats, and a silence timeout a loaded machine
            // does not reach by accident (a dropped connection is seen at
            // once anyway).
            coordinator_env: Vec::new(),
            coordinator_args: vec![
                "--heartbeat-interval".into(),
                "500ms".into(),
                "--heartbeat-timeout".into(),
                "15s".into(),
            ],
            agent_target: None,
        }
    }

    /// Sets coordinator flags (before it starts) as `--flag value` pairs,
    /// e.g. `["--lease-timeout", "3s"]`; a flag already set is replaced.
    pub fn with_coordinator_args(mut self, args: &[&str]) -> Self {
        for pair in args.chunks(2) {
            if let Some(at) = self.coordinator_args.iter().position(|a| a == pair[0]) {
                self.coordinator_args.drain(at..at + 2);
            }
            self.coordinator_args
                .extend(pair.iter().map(|a| (*a).to_owned()));
        }
        self
    }

    /// Sets an environment variable for the coordinator's next start.
    pub fn set_coordinator_env(&mut self, name: &str, value: &str) {
        self.coordinator_env.retain(|(n, _)| n != name);
        self.coordinator_env
            .push((name.to_owned(), value.to_owned()));
    }

    /// `ccc` with `args`; panics with its output unless it succeeds.
    pub fn ccc_ok(&self, args: &[&str]) -> String {
        let out = self.ccc(args);
        assert!(
            out.status.success(),
            "ccc {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The cluster's default repository (a real bare one, made on first use).
    pub fn repo(&self) -> String {
        let repo = self.dir.join("repo.git");
        if !repo.exists() {
            crate::git::bare_repo(
                self.dir.path(),
                "repo",
                &[("README.md", "# demo repository\n")],
            );
        }
        repo.display().to_string()
    }

    /// Submits a task on the default repository; returns its id.
    pub fn submit(&self, specialty: &str, title: &str, body: &str) -> String {
        self.submit_to(&self.repo(), specialty, title, body, &[])
    }

    /// Submits a task on repository `repo` with more `ccc submit` flags.
    pub fn submit_to(
        &self,
        repo: &str,
        specialty: &str,
        title: &str,
        body: &str,
        extra: &[&str],
    ) -> String {
        let mut args = vec![
            "submit",
            "--repo",
            repo,
            "--title",
            title,
            "--specialty",
            specialty,
        ];
        // An empty body is left out, so that `extra` may give `--body-file`.
        if !body.is_empty() {
            args.extend(["--body", body]);
        }
        args.extend_from_slice(extra);
        let out = self.ccc_ok(&args);
        out.split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no task id in {out:?}"))
            .to_owned()
    }

    /// `ccc task <id> --json`, parsed.
    pub fn task_json(&self, id: &str) -> Result<serde_json::Value, String> {
        let out = self.ccc(&["task", id, "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Waits until task `id` is in `state`; returns its JSON.
    pub fn wait_task(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        crate::process::eventually(timeout, || {
            let task = self.task_json(id)?;
            if task["state"] == state {
                Ok(task)
            } else {
                Err(format!(
                    "{id} is {} ({})",
                    task["state"], task["state_reason"]
                ))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An Admin API client over mutual TLS as admin `root`.
    pub async fn admin_client(
        &self,
    ) -> common::proto::admin_client::AdminClient<tonic::transport::Channel> {
        let tls = common::tls::TlsPaths::for_client(
            &self.pki.dir,
            common::pki::Role::Admin,
            None,
            None,
            None,
        )
        .expect("admin cert paths")
        .load()
        .expect("admin cert");
        let channel = tonic::transport::Endpoint::from_shared(self.url())
            .expect("url")
            .tls_config(tls.client_config())
            .expect("tls")
            .connect()
            .await
            .expect("connect to the coordinator");
        common::proto::admin_client::AdminClient::new(channel)
    }

    /// Starts the coordinator; on a restart it binds the same gRPC port
    /// (agents know that address) and opens the same data directory.
    pub fn start_coordinator(&mut self) -> SocketAddr {
        let grpc = self
            .grpc_addr
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut cmd = Command::new(bin("ccc-coordinator"));
        cmd.arg("--certs-dir")
            .arg(&self.pki.dir)
            .arg("--data-dir")
            .arg(self.dir.join("coordinator"))
            .args(["--grpc-listen", &grpc, "--http-listen", "127.0.0.1:0"])
            .args(&self.coordinator_args)
            .envs(
                self.coordinator_env
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str())),
            );
        // Counted before the start, so that the new line cannot be among them.
        let log = self.dir.join("coordinator.log");
        let already = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("coordinator listening")
            .count();
        let process = Process::spawn("coordinator", cmd, log);
        let line = crate::process::eventually(READY, || {
            let text = process.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("coordinator listening"))
                .collect();
            lines
                .get(already)
                .map(|l| (*l).to_owned())
                .ok_or_else(|| "not listening yet".to_owned())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", process.log_text()));
        let addr: SocketAddr = field(&line, "grpc_addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no grpc_addr in {line:?}"));
        self.grpc_addr = Some(addr);
        self.http_addr = field(&line, "http_addr").and_then(|a| a.parse().ok());
        self.coordinator = Some(process);
        addr
    }

    pub fn coordinator(&mut self) -> &mut Process {
        self.coordinator.as_mut().expect("coordinator started")
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc_addr.expect("coordinator started"))
    }

    /// Starts agent `name` with its own certificate directory; `extra` are
    /// more flags (e.g. `--specialties backend`).
    pub fn start_agent(&mut self, name: &str, extra: &[&str]) -> usize {
        self.start_agent_with_env(name, extra, &[])
    }

    /// Like `start_agent`, with environment variables for the agent (which
    /// its CLI processes inherit).
    pub fn start_agent_with_env(
        &mut self,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let certs_dir = self.dir.join(format!("agent-{name}-certs"));
        let certs = if certs_dir.join(format!("agent-{name}.pem")).exists() {
            certs_dir
        } else {
            self.pki.agent_certs(name, &certs_dir)
        };
        // The scripted stand-in, unless the test names another CLI.
        let claude = match extra.iter().position(|a| *a == "--claude") {
            Some(at) => PathBuf::from(extra.get(at + 1).copied().unwrap_or("claude")),
            None => bin("fake-claude"),
        };
        let extra: Vec<&str> = match extra.iter().position(|a| *a == "--claude") {
            Some(at) => extra[..at]
                .iter()
                .chain(extra.iter().skip(at + 2))
                .copied()
                .collect(),
            None => extra.to_vec(),
        };
        let mut cmd = self.agent_command_with(&certs, &claude);
        cmd.arg("--data-dir")
            .arg(self.dir.join(format!("agent-{name}")))
            .args(extra)
            .envs(env.iter().copied());
        let process = Process::spawn(
            &format!("agent {name}"),
            cmd,
            self.dir.join(format!("agent-{name}.log")),
        );
        self.agents.push(process);
        self.agents.len() - 1
    }

    /// A `ccc-agent` command aimed at this cluster (or at `agent_target`)
    /// with fast reconnects, running the `fake-claude` stand-in as its CLI.
    pub fn agent_command(&self, certs_dir: &Path) -> Command {
        self.agent_command_with(certs_dir, &bin("fake-claude"))
    }

    /// A `ccc-agent` command aimed at this cluster running `claude` as its CLI.
    pub fn agent_command_with(&self, certs_dir: &Path, claude: &Path) -> Command {
        let mut cmd = Command::new(bin("ccc-agent"));
        let target = self
            .agent_target
            .map_or_else(|| self.url(), |a| format!("https://{a}"));
        cmd.arg("--coordinator")
            .arg(target)
            .arg("--claude")
            .arg(claude)
            .arg("--certs-dir")
            .arg(certs_dir)
            .args(["--reconnect-initial", "100ms", "--reconnect-max", "1s"]);
        cmd
    }

    /// Runs `ccc` as admin `root` against this cluster.
    pub fn ccc(&self, args: &[&str]) -> Output {
        Command::new(bin("ccc"))
            .arg("--coordinator")
            .arg(self.url())
            .arg("--certs-dir")
            .arg(&self.pki.dir)
            .args(args)
            .env_remove("CCC_CONFIG")
            .output()
            .expect("run ccc")
    }

    /// `ccc agents --json`, parsed; an error string while it fails.
    pub fn agents_json(&self) -> Result<Vec<serde_json::Value>, String> {
        let out = self.ccc(&["agents", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Waits until `ccc agents` shows each of `names` in `state`.
    pub fn wait_agents(&self, names: &[&str], state: &str) -> Vec<serde_json::Value> {
        // Agents probe their toolchains before they connect, which takes a
        // while on a loaded machine.
        crate::process::eventually(Duration::from_secs(60), || {
            let agents = self.agents_json()?;
            for name in names {
                let found = agents
                    .iter()
                    .find(|a| a["agent_id"] == *name)
                    .ok_or_else(|| format!("{name} not listed"))?;
                if found["state"] != state {
                    return Err(format!("{name} is {}", found["state"]));
                }
            }
            Ok(agents)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The value of `key=value` in a human log line, or of `"key":"value"` in a
/// JSON one.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    if let Some(at) = line.find(&format!("\"{key}\":\"")) {
        let rest = &line[at + key.len() + 4..];
        return rest.split('"').next();
    }
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()
}
