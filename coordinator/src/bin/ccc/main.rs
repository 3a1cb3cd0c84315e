//! `ccc`: the cluster's admin CLI and certificate tool.
//!
//! `ccc certs ...` makes the cluster PKI; every other command calls the
//! coordinator's Admin API over mutual TLS with an admin certificate.
//! Errors are printed once, as one line of words; output into a closed pipe
//! (`ccc logs t-1 | head`) ends quietly.

mod admin;
mod table;
mod tasks;
mod top;
mod triage;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use common::pki::{PkiDir, Role, Validity};
use common::proto;

use crate::admin::{ConnArgs, Env, PkiArgs};
use crate::tasks::say;

/// Claude Code Cluster admin CLI: make the cluster's certificates, inspect
/// and steer agents and tasks.
///
/// Commands that call the coordinator need an admin certificate (`ccc certs
/// admin <name>`); by default the one certs/admin-*.pem is used. Their
/// connection options may also come before the command.
///
/// Exit codes: 0 success, 1 error, 2 usage; `ccc logs -f` and `ccc submit
/// --follow`: 3 the task failed (or its tests did), 4 the task was
/// cancelled.
#[derive(Parser, Debug)]
#[command(name = "ccc", version)]
struct Cli {
    #[command(flatten)]
    outer: OuterArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The connection options given before the command (hidden: each command
/// lists the ones it takes).
#[derive(Debug, clap::Args)]
struct OuterArgs {
    #[arg(long, hide = true)]
    config: Option<PathBuf>,
    #[arg(long, hide = true)]
    certs_dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    coordinator: Option<String>,
    #[arg(long, hide = true)]
    ca: Option<PathBuf>,
    #[arg(long, hide = true)]
    cert: Option<PathBuf>,
    #[arg(long, hide = true)]
    key: Option<PathBuf>,
}

impl OuterArgs {
    fn conn(self) -> ConnArgs {
        ConnArgs {
            pki: PkiArgs {
                config: self.config,
                certs_dir: self.certs_dir,
            },
            coordinator: self.coordinator,
            ca: self.ca,
            cert: self.cert,
            key: self.key,
        }
    }
}

/// An agent's id, for the agent commands.
#[derive(Debug, clap::Args)]
struct AgentArg {
    /// The agent's id (its certificate name).
    id: String,
    #[command(flatten)]
    conn: ConnArgs,
}

/// A task's id, for the task commands.
#[derive(Debug, clap::Args)]
struct TaskArg {
    /// The task's id (t-<n>).
    id: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make the cluster PKI: CA, coordinator, agent and admin certificates.
    Certs {
        #[command(flatten)]
        pki: PkiArgs,
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// List agents, connected or not, with why a drained or revoked one is so.
    Agents {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show one agent in detail: its tasks and free slots, and why it takes no work.
    Agent {
        #[command(flatten)]
        agent: AgentArg,
        /// Print JSON instead of a detail view.
        #[arg(long)]
        json: bool,
    },
    /// Ask a connected agent to take no new work until it reconnects or is undrained.
    Drain {
        #[command(flatten)]
        agent: AgentArg,
        /// Why, shown by `ccc agents` (your admin name is added).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a drained agent take work again (it reconnects at once).
    Undrain {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Revoke an agent: its stream is closed and it cannot connect until unrevoked.
    ///
    /// A name that has never connected can be revoked too, to block a leaked
    /// certificate before its first use.
    Revoke {
        #[command(flatten)]
        agent: AgentArg,
        /// Why, shown by `ccc agents` (your admin name is added).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a revoked agent connect again (e.g. its PC's certificate was re-issued).
    Unrevoke {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Forget an agent's record (e.g. a name made by mistake).
    ///
    /// Refused while it is connected or holds tasks, and while it is revoked.
    Forget {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// List admin certificates with a revocation record.
    Admins {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke an admin certificate: its every Admin call is refused.
    ///
    /// Your own certificate cannot be revoked (ask another admin).
    RevokeAdmin {
        /// The admin certificate's name (admin-<name>.pem).
        name: String,
        /// Why, shown by `ccc admins` and to the refused admin (your admin name is added).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Let a revoked admin certificate call the coordinator again.
    UnrevokeAdmin {
        /// The admin certificate's name (admin-<name>.pem).
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Triage an issue offline, as the coordinator would: specialty,
    /// complexity, technologies and the evidence. Needs no coordinator.
    Triage(triage::TriageArgs),
    /// Submit a task by hand; prints its id once it is durably queued.
    #[command(
        after_help = "Exit codes with --follow: 0 the task succeeded, 1 error, 2 usage, \
                            3 the task failed (or succeeded with failing tests), 4 the task was cancelled."
    )]
    Submit(Box<tasks::SubmitArgs>),
    /// List tasks, newest first.
    Tasks(tasks::ListArgs),
    /// Show a task: state, attempts, tests, and why each agent was chosen.
    Task {
        #[command(flatten)]
        task: TaskArg,
        /// Print JSON instead of a detail view.
        #[arg(long)]
        json: bool,
    },
    /// Print a task's output; -f follows it live until the task ends.
    #[command(
        after_help = "Exit codes with --follow: 0 the task succeeded, 1 error, 2 usage, \
                            3 the task failed (or succeeded with failing tests), 4 the task was cancelled.\n\
                            A follow survives a coordinator restart: it reconnects and goes on \
                            from the last line it printed."
    )]
    Logs {
        #[command(flatten)]
        task: TaskArg,
        /// Follow the output live until the task ends; the exit code tells how it ended.
        #[arg(short, long)]
        follow: bool,
        /// Print the output as stored: the CLI's stream-json events as they
        /// are, not as readable lines, and control characters kept even on a
        /// terminal (which otherwise gets only newlines and tabs).
        #[arg(long)]
        raw: bool,
    },
    /// A live view of the cluster: agents, running and recent tasks with their
    /// latest output, updated as the coordinator pushes changes.
    ///
    /// Keys: up/down (or k/j) select a task, enter (or l) follows its log,
    /// c cancels it (after a y), r retries it, esc or q goes back or quits.
    /// When standard output is not a terminal, prints the agents and tasks
    /// once as plain tables.
    #[command(
        after_help = "Turns and cost are reported when an attempt ends: a running task shows \"at end\"."
    )]
    Top(top::TopArgs),
    /// Cancel a task; a running one is stopped on its agent. Prints the state it is in after.
    Cancel {
        #[command(flatten)]
        task: TaskArg,
        /// Why, shown by `ccc task` (your admin name is added).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Queue a failed or cancelled task again with a fresh attempt budget.
    Retry {
        #[command(flatten)]
        task: TaskArg,
    },
}

/// Options of every certificate command.
#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long, conflicts_with = "keep_existing")]
    force: bool,
    /// If the certificate exists, keep it and say so instead of failing.
    #[arg(long)]
    keep_existing: bool,
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create the cluster CA (ca.pem, ca-key.pem).
    Init {
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long, conflicts_with = "keep_existing")]
        force: bool,
        /// If the CA exists, keep it and say so instead of failing.
        #[arg(long)]
        keep_existing: bool,
    },
    /// Issue the coordinator's server certificate (coordinator.pem).
    Server {
        /// Names and addresses agents use to reach the coordinator, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        san: Vec<String>,
        #[command(flatten)]
        issue: IssueArgs,
    },
    /// Issue an agent's client certificate (agent-<name>.pem); the name is its id.
    Agent {
        /// The agent's name: its id in the cluster.
        name: String,
        #[command(flatten)]
        issue: IssueArgs,
    },
    /// Issue an admin's client certificate (admin-<name>.pem).
    Admin {
        /// The admin's name, shown in the reasons it gives.
        name: String,
        #[command(flatten)]
        issue: IssueArgs,
    },
}

/// How a successful run ends.
pub enum Exit {
    Success,
    /// A followed task failed, or its tests did.
    TaskFailed,
    /// A followed task was cancelled.
    TaskCancelled,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::tls::install_crypto_provider();
    match run(cli, &admin::process_env()) {
        Ok(Exit::Success) => ExitCode::SUCCESS,
        Ok(Exit::TaskFailed) => ExitCode::from(3),
        Ok(Exit::TaskCancelled) => ExitCode::from(4),
        // The reader went away (`ccc logs t-1 | head`): nothing to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ccc: {}", common::telemetry::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli, env: &Env) -> anyhow::Result<Exit> {
    let outer = cli.outer.conn();
    match cli.cmd {
        Cmd::Certs { pki, cmd } => {
            certs(&pki.or(&outer.pki).certs_dir(env)?, cmd)?;
            Ok(Exit::Success)
        }
        Cmd::Triage(args) => {
            triage::run(args)?;
            Ok(Exit::Success)
        }
        cmd => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(admin_command(cmd, &outer, env))
        }
    }
}

/// Issues the certificate unless `keep` and it exists.
fn issue(
    cert: &Path,
    keep: bool,
    make: impl FnOnce() -> Result<Vec<PathBuf>, common::pki::Error>,
) -> anyhow::Result<()> {
    if keep && cert.exists() {
        return say(&format!("kept {} (it exists)\n", cert.display()));
    }
    for path in make()? {
        say(&format!("wrote {}\n", path.display()))?;
    }
    Ok(())
}

fn certs(dir: &Path, cmd: CertsCmd) -> anyhow::Result<()> {
    let pki = PkiDir::new(dir);
    match cmd {
        CertsCmd::Init {
            days,
            force,
            keep_existing,
        } => issue(&dir.join(common::pki::CA_FILE), keep_existing, || {
            pki.init(Validity::days_from_now(days), force)
        }),
        CertsCmd::Server { san, issue: args } => issue(
            &dir.join(common::pki::SERVER_FILE),
            args.keep_existing,
            || pki.issue_server(&san, Validity::days_from_now(args.days), args.force),
        ),
        CertsCmd::Agent { name, issue: args } => issue(
            &dir.join(format!("agent-{name}.pem")),
            args.keep_existing,
            || {
                pki.issue_client(
                    Role::Agent,
                    &name,
                    Validity::days_from_now(args.days),
                    args.force,
                )
            },
        ),
        CertsCmd::Admin { name, issue: args } => issue(
            &dir.join(format!("admin-{name}.pem")),
            args.keep_existing,
            || {
                pki.issue_client(
                    Role::Admin,
                    &name,
                    Validity::days_from_now(args.days),
                    args.force,
                )
            },
        ),
    }
}

/// A `proto` call's status as a readable error naming the call.
macro_rules! call {
    ($conn:expr, $client:expr, $what:literal, $call:expr) => {
        $call
            .await
            .map_err(|s| $conn.diagnosis.explain(s))
            .context($what)?
            .into_inner()
    };
}

async fn admin_command(cmd: Cmd, outer: &ConnArgs, env: &Env) -> anyhow::Result<Exit> {
    let conn_args = match &cmd {
        Cmd::Certs { .. } | Cmd::Triage(_) => unreachable!("handled without a connection"),
        Cmd::Agents { conn, .. }
        | Cmd::Admins { conn, .. }
        | Cmd::RevokeAdmin { conn, .. }
        | Cmd::UnrevokeAdmin { conn, .. } => conn.clone(),
        Cmd::Submit(args) => args.conn.clone(),
        Cmd::Tasks(args) => args.conn.clone(),
        Cmd::Top(args) => args.conn.clone(),
        Cmd::Agent { agent, .. }
        | Cmd::Drain { agent, .. }
        | Cmd::Undrain { agent }
        | Cmd::Revoke { agent, .. }
        | Cmd::Unrevoke { agent }
        | Cmd::Forget { agent } => agent.conn.clone(),
        Cmd::Task { task, .. }
        | Cmd::Logs { task, .. }
        | Cmd::Cancel { task, .. }
        | Cmd::Retry { task } => task.conn.clone(),
    };
    let conn = conn_args.or(outer).resolve(env)?;
    if let Cmd::Logs { task, follow, raw } = cmd {
        return tasks::logs(&conn, task.id, follow, raw).await;
    }
    if let Cmd::Top(args) = cmd {
        return top::run(conn, args).await;
    }
    let mut client = conn.client().await?;
    match cmd {
        Cmd::Certs { .. } | Cmd::Triage(_) | Cmd::Logs { .. } | Cmd::Top(_) => {
            unreachable!("handled above")
        }
        Cmd::Agents { json, .. } => {
            let agents = call!(
                conn,
                client,
                "ListAgents",
                client.list_agents(proto::ListAgentsRequest {})
            )
            .agents;
            if json {
                let all: Vec<_> = agents.iter().map(table::agent_json).collect();
                say(&format!("{}\n", serde_json::to_string_pretty(&all)?))?;
            } else {
                tasks::print_text(&table::agents_table(&agents))?;
            }
        }
        Cmd::Agent { agent, json } => {
            let agent = call!(
                conn,
                client,
                "GetAgent",
                client.get_agent(proto::GetAgentRequest { agent_id: agent.id })
            );
            if json {
                say(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&table::agent_json(&agent))?
                ))?;
            } else {
                tasks::print_text(&table::agent_detail(
                    &agent,
                    common::time::UnixMillis::now(),
                ))?;
            }
        }
        Cmd::Drain { agent, reason } => {
            let agent = call!(
                conn,
                client,
                "DrainAgent",
                client.drain_agent(proto::DrainAgentRequest {
                    agent_id: agent.id,
                    reason: reason.unwrap_or_default(),
                })
            );
            tasks::print_text(&format!(
                "{} is draining: {}\n",
                agent.agent_id, agent.drain_reason
            ))?;
        }
        Cmd::Undrain { agent } => {
            let agent = call!(
                conn,
                client,
                "UndrainAgent",
                client.undrain_agent(proto::UndrainAgentRequest { agent_id: agent.id })
            );
            say(&format!(
                "{} is undrained; it reconnects and takes work\n",
                agent.agent_id
            ))?;
        }
        Cmd::Revoke { agent, reason } => {
            let agent = call!(
                conn,
                client,
                "RevokeAgent",
                client.revoke_agent(proto::RevokeAgentRequest {
                    agent_id: agent.id,
                    reason: reason.unwrap_or_default(),
                })
            );
            tasks::print_text(&format!(
                "{} is revoked: {}\n",
                agent.agent_id, agent.revoked_reason
            ))?;
        }
        Cmd::Unrevoke { agent } => {
            let agent = call!(
                conn,
                client,
                "UnrevokeAgent",
                client.unrevoke_agent(proto::UnrevokeAgentRequest { agent_id: agent.id })
            );
            say(&format!(
                "{} is unrevoked; it may connect again\n",
                agent.agent_id
            ))?;
        }
        Cmd::Forget { agent } => {
            call!(
                conn,
                client,
                "ForgetAgent",
                client.forget_agent(proto::ForgetAgentRequest {
                    agent_id: agent.id.clone()
                })
            );
            say(&format!("{} is forgotten\n", agent.id))?;
        }
        Cmd::Admins { json, .. } => {
            let admins = call!(
                conn,
                client,
                "ListAdmins",
                client.list_admins(proto::ListAdminsRequest {})
            )
            .admins;
            if json {
                let all: Vec<_> = admins.iter().map(table::admin_json).collect();
                say(&format!("{}\n", serde_json::to_string_pretty(&all)?))?;
            } else {
                tasks::print_text(&table::admins_table(&admins))?;
            }
        }
        Cmd::RevokeAdmin { name, reason, .. } => {
            let admin = call!(
                conn,
                client,
                "RevokeAdmin",
                client.revoke_admin(proto::RevokeAdminRequest {
                    name,
                    reason: reason.unwrap_or_default(),
                })
            );
            tasks::print_text(&format!(
                "admin {} is revoked: {}\n",
                admin.name, admin.revoked_reason
            ))?;
        }
        Cmd::UnrevokeAdmin { name, .. } => {
            let admin = call!(
                conn,
                client,
                "UnrevokeAdmin",
                client.unrevoke_admin(proto::UnrevokeAdminRequest { name })
            );
            say(&format!("admin {} is unrevoked\n", admin.name))?;
        }
        Cmd::Submit(args) => {
            let follow = args.follow;
            let request = args.request()?;
            let task = call!(conn, client, "SubmitTask", client.submit_task(request));
            say(&format!(
                "{} {}\n",
                task.task_id,
                tasks::state_name(task.state)
            ))?;
            tasks::submit_notes(&task);
            if follow {
                return tasks::logs(&conn, task.task_id, true, false).await;
            }
        }
        Cmd::Tasks(args) => tasks::list(&mut client, &conn, args).await?,
        Cmd::Task { task, json } => {
            let task = call!(
                conn,
                client,
                "GetTask",
                client.get_task(proto::GetTaskRequest { task_id: task.id })
            );
            if json {
                say(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&tasks::task_json(&task))?
                ))?;
            } else {
                tasks::print_text(&tasks::task_detail(&task))?;
            }
        }
        Cmd::Cancel { task, reason } => {
            let task = call!(
                conn,
                client,
                "CancelTask",
                client.cancel_task(proto::CancelTaskRequest {
                    task_id: task.id,
                    reason: reason.unwrap_or_default(),
                })
            );
            tasks::print_text(&format!("{}\n", tasks::after_cancel(&task)))?;
        }
        Cmd::Retry { task } => {
            let task = call!(
                conn,
                client,
                "RetryTask",
                client.retry_task(proto::RetryTaskRequest { task_id: task.id })
            );
            say(&format!(
                "{} {}\n",
                task.task_id,
                tasks::state_name(task.state)
            ))?;
        }
    }
    Ok(Exit::Success)
}
