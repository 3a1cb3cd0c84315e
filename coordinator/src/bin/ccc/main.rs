//! `ccc`: the cluster's admin CLI and certificate tool.
//!
//! `ccc certs ...` makes the cluster PKI; every other command calls the
//! coordinator's Admin API over mutual TLS with an admin certificate.

mod admin;
mod table;
mod tasks;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use common::pki::{PkiDir, Role, Validity};

/// Claude Code Cluster admin CLI: make the cluster's certificates, inspect
/// and steer agents.
///
/// Admin commands need an admin certificate (`ccc certs admin <name>`); by
/// default the one certs/admin-*.pem is used.
#[derive(Parser, Debug)]
#[command(name = "ccc", version)]
struct Cli {
    #[command(flatten)]
    conn: admin::ConnArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make the cluster PKI: CA, coordinator, agent and admin certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// List agents, connected or not.
    Agents {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one agent in detail.
    Agent {
        /// The agent's id (its certificate name).
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its stream is closed and it can never connect again.
    ///
    /// A name that has never connected can be revoked too, to block a leaked
    /// certificate before its first use.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Ask a connected agent to take no new work until it reconnects.
    Drain {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Submit a task by hand; prints its id once it is durably queued.
    Submit {
        /// The repository: clone URL, local path or file:// URL.
        #[arg(long)]
        repo: String,
        /// What to do, in one line.
        #[arg(long)]
        title: String,
        /// The details (like an issue's body).
        #[arg(long, default_value = "", conflicts_with = "body_file")]
        body: String,
        /// Read the body from a file ("-" for stdin).
        #[arg(long)]
        body_file: Option<PathBuf>,
        /// Base branch [default: the remote's HEAD].
        #[arg(long, default_value = "")]
        base: String,
        /// backend, frontend, testing, devops or general [default: general].
        #[arg(long)]
        specialty: Option<common::types::Specialty>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Technologies involved, comma-separated (prefers agents with the toolchains).
        #[arg(long, value_delimiter = ',')]
        tech: Vec<String>,
        /// The issue number, for the branch name.
        #[arg(long, default_value_t = 0)]
        issue: u64,
        /// The test command [default: the repository's, else the agent's].
        #[arg(long, default_value = "")]
        test_command: String,
        /// A follow-up: continue this existing branch (e.g. after review comments).
        #[arg(long, default_value = "")]
        follow_up_branch: String,
    },
    /// List tasks, newest last.
    Tasks {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        specialty: Option<common::types::Specialty>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show a task: state, attempts, and why each agent was chosen.
    Task {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a task's output; -f follows it live until the task ends.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        /// Print the output as stored: the CLI's stream-json events as they
        /// are, not as readable lines, and control characters kept even on a
        /// terminal (which otherwise gets only newlines and tabs).
        #[arg(long)]
        raw: bool,
    },
    /// Cancel a task; a running one is stopped on its agent.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Queue a failed or cancelled task again.
    Retry { id: String },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create the cluster CA (ca.pem, ca-key.pem).
    Init {
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue the coordinator's server certificate (coordinator.pem).
    Server {
        /// Names and addresses agents use to reach the coordinator, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        san: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent's client certificate (agent-<name>.pem); the name is its id.
    Agent {
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue an admin's client certificate (admin-<name>.pem).
    Admin {
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    common::tls::install_crypto_provider();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ccc: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Certs(cmd) => certs(&cli.conn.certs_dir()?, cmd),
        cmd => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(admin_command(cli.conn, cmd))
        }
    }
}

fn certs(dir: &std::path::Path, cmd: CertsCmd) -> anyhow::Result<()> {
    let pki = PkiDir::new(dir);
    let written: Vec<PathBuf> = match cmd {
        CertsCmd::Init { days, force } => pki.init(Validity::days_from_now(days), force)?,
        CertsCmd::Server { san, days, force } => {
            pki.issue_server(&san, Validity::days_from_now(days), force)?
        }
        CertsCmd::Agent { name, days, force } => {
            pki.issue_client(Role::Agent, &name, Validity::days_from_now(days), force)?
        }
        CertsCmd::Admin { name, days, force } => {
            pki.issue_client(Role::Admin, &name, Validity::days_from_now(days), force)?
        }
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn admin_command(conn: admin::ConnArgs, cmd: Cmd) -> anyhow::Result<()> {
    let (mut client, diagnosis) = conn.connect().await?;
    match cmd {
        Cmd::Certs(_) => unreachable!("handled without a connection"),
        Cmd::Agents { json } => {
            let agents = client
                .list_agents(common::proto::ListAgentsRequest {})
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("ListAgents")?
                .into_inner()
                .agents;
            if json {
                let all: Vec<_> = agents.iter().map(table::agent_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                tasks::print_text(&table::agents_table(&agents));
            }
        }
        Cmd::Agent { id, json } => {
            let agent = client
                .get_agent(common::proto::GetAgentRequest { agent_id: id })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("GetAgent")?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&table::agent_json(&agent))?
                );
            } else {
                tasks::print_text(&table::agent_detail(&agent));
            }
        }
        Cmd::Revoke { id, reason } => {
            let agent = client
                .revoke_agent(common::proto::RevokeAgentRequest {
                    agent_id: id,
                    reason,
                })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("RevokeAgent")?
                .into_inner();
            println!("revoked {}", agent.agent_id);
        }
        Cmd::Drain { id, reason } => {
            let agent = client
                .drain_agent(common::proto::DrainAgentRequest {
                    agent_id: id,
                    reason,
                })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("DrainAgent")?
                .into_inner();
            println!("draining {}", agent.agent_id);
        }
        Cmd::Submit {
            repo,
            title,
            body,
            body_file,
            base,
            specialty,
            priority,
            tech,
            issue,
            test_command,
            follow_up_branch,
        } => {
            let body = match body_file {
                Some(path) if path.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => body,
            };
            let task = client
                .submit_task(common::proto::SubmitTaskRequest {
                    repo,
                    base_branch: base,
                    title,
                    body,
                    specialty: specialty.map_or(0, |s| common::wire::specialty_to_proto(s) as i32),
                    priority,
                    technologies: tech,
                    issue_number: issue,
                    test_command,
                    follow_up_branch,
                })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("SubmitTask")?
                .into_inner();
            println!("{} {}", task.task_id, tasks::state_name(task.state));
        }
        Cmd::Tasks {
            state,
            specialty,
            agent,
            repo,
            limit,
            json,
        } => {
            let state = state.map(|s| tasks::parse_state(&s)).transpose()?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_tasks(common::proto::ListTasksRequest {
                        state: state.map_or(0, |s| s as i32),
                        specialty: specialty
                            .map_or(0, |s| common::wire::specialty_to_proto(s) as i32),
                        agent_id: agent.clone().unwrap_or_default(),
                        repo: repo.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| diagnosis.explain(s))
                    .context("ListTasks")?
                    .into_inner();
                all.extend(page.tasks);
                page_token = page.next_page_token;
                if page_token.is_empty() || all.len() >= limit {
                    break;
                }
            }
            all.truncate(limit);
            if json {
                let all: Vec<_> = all.iter().map(tasks::task_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                tasks::print_text(&tasks::tasks_table(&all));
            }
        }
        Cmd::Task { id, json } => {
            let task = client
                .get_task(common::proto::GetTaskRequest { task_id: id })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("GetTask")?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tasks::task_json(&task))?
                );
            } else {
                tasks::print_text(&tasks::task_detail(&task));
            }
        }
        Cmd::Logs { id, follow, raw } => {
            tasks::logs(&mut client, &diagnosis, id, follow, raw).await?;
        }
        Cmd::Cancel { id, reason } => {
            let task = client
                .cancel_task(common::proto::CancelTaskRequest {
                    task_id: id,
                    reason,
                })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("CancelTask")?
                .into_inner();
            println!("{} {}", task.task_id, tasks::state_name(task.state));
        }
        Cmd::Retry { id } => {
            let task = client
                .retry_task(common::proto::RetryTaskRequest { task_id: id })
                .await
                .map_err(|s| diagnosis.explain(s))
                .context("RetryTask")?
                .into_inner();
            println!("{} {}", task.task_id, tasks::state_name(task.state));
        }
    }
    Ok(())
}
