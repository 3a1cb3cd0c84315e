//! Task commands: submit, list, show, logs (with follow), cancel, retry.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::proto::{self, TaskInfo, TaskState, admin_client::AdminClient, task_event};
use common::time::UnixMillis;
use tonic::transport::Channel;

use crate::Exit;
use crate::admin::{ConnArgs, Connection};
use crate::table::{render, specialty_name};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The repository: clone URL, local path or file:// URL.
    #[arg(long)]
    repo: String,
    /// What to do, in one line.
    #[arg(long)]
    title: String,
    /// The details (like an issue's body) [default: none].
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the body from a file ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    body_file: Option<PathBuf>,
    /// Base branch [default: the remote's HEAD].
    #[arg(long, value_name = "BRANCH")]
    base: Option<String>,
    /// backend, frontend, testing, devops or general [default: general].
    #[arg(long)]
    specialty: Option<common::types::Specialty>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Technologies involved, comma-separated (prefers agents with the toolchains).
    #[arg(long, value_delimiter = ',')]
    tech: Vec<String>,
    /// The issue number, for the branch name [default: none].
    #[arg(long)]
    issue: Option<u64>,
    /// The test command [default: the repository's, else the agent's].
    #[arg(long, value_name = "COMMAND")]
    test_command: Option<String>,
    /// A follow-up: continue this existing branch (e.g. after review comments).
    #[arg(long, value_name = "BRANCH")]
    follow_up_branch: Option<String>,
    /// Then follow the task's output until it ends, like `ccc logs -f`; the
    /// exit code tells how it ended.
    #[arg(long, visible_alias = "wait")]
    pub follow: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

impl SubmitArgs {
    pub fn request(self) -> anyhow::Result<proto::SubmitTaskRequest> {
        let body = match self.body_file {
            Some(path) if path.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())
                .context("cannot read the body from stdin")?,
            Some(path) => std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?,
            None => self.body.unwrap_or_default(),
        };
        Ok(proto::SubmitTaskRequest {
            repo: self.repo,
            base_branch: self.base.unwrap_or_default(),
            title: self.title,
            body,
            specialty: self
                .specialty
                .map_or(0, |s| common::protocol::specialty_to_proto(s) as i32),
            priority: self.priority,
            technologies: self.tech,
            issue_number: self.issue.unwrap_or(0),
            test_command: self.test_command.unwrap_or_default(),
            follow_up_branch: self.follow_up_branch.unwrap_or_default(),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only tasks in this state: queued, assigned, running, finishing, succeeded, failed or cancelled.
    #[arg(long)]
    state: Option<String>,
    /// Only tasks whose latest attempt ended so: succeeded, tests_failed, no_changes, turn_limit,
    /// budget_exceeded, timed_out, cli_failed, rate_limited, push_rejected, cancelled,
    /// workspace_error, agent_fault, lease_expired, not_accepted, rejected or lost_by_agent.
    #[arg(long)]
    outcome: Option<String>,
    /// Only tasks of this specialty.
    #[arg(long)]
    specialty: Option<common::types::Specialty>,
    /// Only tasks that ran (an attempt) on this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only tasks on this repository (as submitted).
    #[arg(long)]
    repo: Option<String>,
    /// Show at most this many, the newest.
    #[arg(long, default_value_t = 20, conflicts_with = "all")]
    limit: usize,
    /// Show every matching task.
    #[arg(long)]
    all: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Writes text to standard output; a closed pipe comes back as an error
/// (`main` ends quietly on it) instead of a panic.
/// What `ccc submit` says besides the id, on standard error: how triage
/// routed a task the submitter gave no specialty, and why it waits.
pub fn submit_notes(task: &TaskInfo) {
    if let Some(t) = task.triage.as_ref().filter(|t| !t.specialty_given) {
        eprintln!(
            "triaged as {} (confidence {:.2}); see `ccc task {}` for the evidence",
            specialty_name(t.specialty),
            t.confidence,
            task.task_id
        );
    }
    if !task.waiting_reason.is_empty() {
        eprintln!("warning: {}", task.waiting_reason);
    }
}

pub fn say(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

pub fn state_name(value: i32) -> &'static str {
    match TaskState::try_from(value) {
        Ok(TaskState::NeedsInfo) => "needs_info",
        Ok(TaskState::Queued) => "queued",
        Ok(TaskState::Assigned) => "assigned",
        Ok(TaskState::Running) => "running",
        Ok(TaskState::Finishing) => "finishing",
        Ok(TaskState::Succeeded) => "succeeded",
        Ok(TaskState::Failed) => "failed",
        Ok(TaskState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn parse_state(s: &str) -> anyhow::Result<TaskState> {
    Ok(match s {
        "needs_info" => TaskState::NeedsInfo,
        "queued" => TaskState::Queued,
        "assigned" => TaskState::Assigned,
        "running" => TaskState::Running,
        "finishing" => TaskState::Finishing,
        "succeeded" => TaskState::Succeeded,
        "failed" => TaskState::Failed,
        "cancelled" => TaskState::Cancelled,
        other => anyhow::bail!(
            "unknown state {other:?} (needs_info, queued, assigned, running, finishing, succeeded, failed, cancelled)"
        ),
    })
}

fn outcome_name(attempt: &proto::TaskAttempt) -> String {
    if !attempt.outcome_name.is_empty() {
        return attempt.outcome_name.clone();
    }
    proto::Outcome::try_from(attempt.outcome)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("OUTCOME_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map(|t| UnixMillis::from_timestamp(t).to_rfc3339())
        .unwrap_or_default()
}

/// The state in words with its reason, said once: "succeeded: pushed
/// ccc/issue-1 at 1a2b3c", "failed (tests_failed): the tests failed; ...".
pub fn state_line(t: &TaskInfo) -> String {
    let state = state_name(t.state);
    let reason = t.state_reason.trim();
    if reason.is_empty() {
        return state.to_owned();
    }
    if !t.outcome.is_empty()
        && t.outcome != state
        && let Some(rest) = reason.strip_prefix(&format!("{}: ", t.outcome))
    {
        return format!("{state} ({}): {rest}", t.outcome);
    }
    format!("{state}: {reason}")
}

pub fn tasks_table(tasks: &[TaskInfo]) -> String {
    if tasks.is_empty() {
        return "no tasks\n".into();
    }
    let mut rows = vec![
        [
            "TASK",
            "STATE",
            "OUTCOME",
            "SPECIALTY",
            "PRIO",
            "TRY",
            "AGENT",
            "SOURCE",
            "TITLE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for t in tasks {
        let last = t.attempts.last();
        rows.push(vec![
            t.task_id.clone(),
            state_name(t.state).into(),
            if t.outcome.is_empty() {
                "-".into()
            } else {
                t.outcome.clone()
            },
            specialty_name(t.specialty).into(),
            t.priority.to_string(),
            format!("{}/{}", t.attempts.len(), t.max_attempts),
            last.map(|a| a.agent_id.clone()).unwrap_or_default(),
            source_short(t),
            t.title.chars().take(60).collect(),
        ]);
    }
    render(&rows)
}

/// Where a task came from, in a table cell: `owner/name#7` for an issue,
/// else the repository it works on.
fn source_short(t: &TaskInfo) -> String {
    if t.github_repo.is_empty() {
        t.repo.clone()
    } else {
        format!("{}#{}", t.github_repo, t.issue_number)
    }
}

/// Where a task came from, in words.
fn source_line(t: &TaskInfo) -> String {
    if t.github_repo.is_empty() {
        return format!("{} (by {})", t.source, t.author);
    }
    let mut line = format!(
        "{}#{} by {} ({})",
        t.github_repo, t.issue_number, t.author, t.issue_url
    );
    if !t.labels.is_empty() {
        line.push_str(&format!("; labels {}", t.labels.join(", ")));
    }
    line.push_str(&if t.delivery_id.is_empty() {
        "; found by the reconciler".to_owned()
    } else {
        format!("; delivery {}", t.delivery_id)
    });
    line
}

fn source_json(t: &TaskInfo) -> serde_json::Value {
    if t.github_repo.is_empty() {
        return serde_json::json!({ "kind": t.source, "author": t.author });
    }
    serde_json::json!({
        "kind": t.source,
        "repo": t.github_repo,
        "issue": t.issue_number,
        "url": t.issue_url,
        "author": t.author,
        "labels": t.labels,
        "delivery": t.delivery_id,
    })
}

/// The test run of an attempt: command, exit code, verdict, and the tail.
fn tests_lines(tests: &proto::TestSummary) -> String {
    if !tests.ran {
        return "  tests:    none ran\n".into();
    }
    let mut out = format!(
        "  tests:    {} (exit {}): {}\n",
        tests.command,
        tests.exit_code,
        if tests.passed { "passed" } else { "failed" }
    );
    let tail = tests.tail.trim_end();
    if !tail.is_empty() {
        for line in tail.lines() {
            out.push_str(&format!("    | {line}\n"));
        }
    }
    out
}

pub fn task_detail(t: &TaskInfo) -> String {
    let mut rows: Vec<Vec<String>> = [
        ("task", t.task_id.clone()),
        ("title", t.title.clone()),
        ("state", state_line(t)),
        ("repo", t.repo.clone()),
        ("base", t.base_branch.clone()),
        ("branch", t.branch.clone()),
        ("specialty", specialty_name(t.specialty).into()),
        ("technologies", t.technologies.join(", ")),
        ("priority", t.priority.to_string()),
        ("source", source_line(t)),
        (
            "tests",
            if t.test_command.is_empty() {
                "the repository's (.ccc/test), else the agent's".into()
            } else {
                t.test_command.clone()
            },
        ),
        (
            "attempts",
            format!("{} of at most {}", t.attempts.len(), t.max_attempts),
        ),
        ("created", time(t.created_at.as_ref())),
        ("updated", time(t.updated_at.as_ref())),
    ]
    .into_iter()
    .map(|(k, v)| vec![format!("{k}:"), v])
    .collect();
    if !t.waiting_reason.is_empty() {
        rows.insert(3, vec!["waiting:".into(), t.waiting_reason.clone()]);
    }
    if !t.pull_request_url.is_empty() {
        rows.push(vec![
            "pull request:".into(),
            format!(
                "{}{}",
                t.pull_request_url,
                if t.pull_request_draft { " (draft)" } else { "" }
            ),
        ]);
    }
    if !t.pending_effects.is_empty() {
        rows.push(vec!["github owed:".into(), t.pending_effects.join("; ")]);
    }
    if !t.github_error.is_empty() {
        rows.push(vec!["github refused:".into(), t.github_error.clone()]);
    }
    if let Some(at) = t.not_before.as_ref() {
        rows.push(vec!["not before:".into(), time(Some(at))]);
    }
    if !t.cancel_requested.is_empty() {
        rows.push(vec!["cancel:".into(), t.cancel_requested.clone()]);
    }
    let mut out = render(&rows);
    if let Some(triage) = &t.triage {
        out.push_str("\ntriage\n");
        for line in crate::triage::lines(triage).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    for a in &t.attempts {
        out.push_str(&format!(
            "\nattempt {} on {}\n  placed:   {}\n  assigned: {}\n",
            a.attempt,
            a.agent_id,
            a.placement,
            time(a.assigned_at.as_ref())
        ));
        if a.finished_at.is_some() {
            out.push_str(&format!(
                "  finished: {} {}: {}\n",
                time(a.finished_at.as_ref()),
                outcome_name(a),
                a.message
            ));
        }
        if let Some(tests) = &a.tests {
            out.push_str(&tests_lines(tests));
        }
        if let Some(cli) = &a.cli {
            out.push_str(&format!(
                "  claude:   {} turns, ${:.4}, {} ms\n",
                cli.turns, cli.cost_usd, cli.duration_ms
            ));
        }
    }
    out
}

pub fn task_json(t: &TaskInfo) -> serde_json::Value {
    serde_json::json!({
        "task_id": t.task_id,
        "state": state_name(t.state),
        "state_reason": t.state_reason,
        "outcome": t.outcome,
        "waiting_reason": t.waiting_reason,
        "title": t.title,
        "repo": t.repo,
        "branch": t.branch,
        "specialty": specialty_name(t.specialty),
        "priority": t.priority,
        "test_command": t.test_command,
        "source": source_json(t),
        "pull_request": t.pull_request_url,
        "pull_request_draft": t.pull_request_draft,
        "pending_effects": t.pending_effects,
        "github_error": t.github_error,
        "technologies": t.technologies,
        "triage": t.triage.as_ref().map(crate::triage::json),
        "max_attempts": t.max_attempts,
        "attempts": t.attempts.iter().map(|a| serde_json::json!({
            "attempt": a.attempt,
            "agent_id": a.agent_id,
            "placement": a.placement,
            "outcome": outcome_name(a),
            "message": a.message,
            "finished": a.finished_at.is_some(),
            "tests": a.tests.as_ref().map(|t| serde_json::json!({
                "ran": t.ran,
                "passed": t.passed,
                "command": t.command,
                "exit_code": t.exit_code,
                "tail": t.tail,
            })),
        })).collect::<Vec<_>>(),
    })
}

/// `ccc tasks`: the newest matching tasks, and how many more there are.
pub async fn list(
    client: &mut AdminClient<Channel>,
    conn: &Connection,
    args: ListArgs,
) -> anyhow::Result<()> {
    let state = args.state.as_deref().map(parse_state).transpose()?;
    let limit = if args.all { usize::MAX } else { args.limit };
    let mut all = Vec::new();
    let mut page_token = String::new();
    let mut total;
    loop {
        let want = limit.saturating_sub(all.len()).min(1000);
        let page = client
            .list_tasks(proto::ListTasksRequest {
                state: state.map_or(0, |s| s as i32),
                specialty: args
                    .specialty
                    .map_or(0, |s| common::protocol::specialty_to_proto(s) as i32),
                agent_id: args.agent.clone().unwrap_or_default(),
                repo: args.repo.clone().unwrap_or_default(),
                page_size: u32::try_from(want.max(1)).unwrap_or(1000),
                page_token,
                outcome: args.outcome.clone().unwrap_or_default(),
                newest_first: true,
            })
            .await
            .map_err(|s| conn.diagnosis.explain(s))
            .context("ListTasks")?
            .into_inner();
        total = page.total;
        all.extend(page.tasks);
        page_token = page.next_page_token;
        if page_token.is_empty() || all.len() >= limit {
            break;
        }
    }
    all.truncate(limit);
    if args.json {
        let all: Vec<_> = all.iter().map(task_json).collect();
        return say(&format!("{}\n", serde_json::to_string_pretty(&all)?));
    }
    print_text(&tasks_table(&all))?;
    let shown = u64::try_from(all.len()).unwrap_or(u64::MAX);
    if total > shown {
        say(&format!(
            "{} more not shown ({shown} newest of {total}): --limit N or --all\n",
            total - shown
        ))?;
    }
    Ok(())
}

/// What `ccc cancel` says: the state the task is in after the call.
pub fn after_cancel(t: &TaskInfo) -> String {
    let state = TaskState::try_from(t.state).unwrap_or(TaskState::Unspecified);
    if matches!(state, TaskState::Assigned | TaskState::Running) {
        let agent = t
            .attempts
            .last()
            .map(|a| a.agent_id.as_str())
            .unwrap_or("its agent");
        format!(
            "{} is {}: cancel requested, {agent} is stopping it",
            t.task_id,
            state_name(t.state)
        )
    } else {
        format!("{} is {}", t.task_id, state_line(t))
    }
}

/// The lines for a chunk of the CLI's stream-json events (one event a line;
/// an agent sends lines that arrive together as one chunk), or `None` when
/// none is worth a line (raw mode shows everything).
pub fn render_events(data: &[u8]) -> Option<String> {
    let lines: Vec<String> = data
        .split(|&b| b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .filter_map(render_event)
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// One line for a stream-json event of the CLI, or `None` for events not
/// worth a line.
fn render_event(data: &[u8]) -> Option<String> {
    let event: serde_json::Value = serde_json::from_slice(data).ok()?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().trim().to_owned();
    match (event["type"].as_str()?, event["subtype"].as_str()) {
        ("system", Some("init")) => Some(format!(
            "[claude] session {} started (model {})",
            text(&event["session_id"]),
            text(&event["model"])
        )),
        ("system", Some("api_retry")) => Some(format!(
            "[claude] API error {}, retry {} of {}",
            event["error_status"], event["attempt"], event["max_retries"]
        )),
        ("assistant", _) => {
            let parts: Vec<String> = event["message"]["content"]
                .as_array()?
                .iter()
                .filter_map(|block| match block["type"].as_str()? {
                    "text" => Some(format!("[claude] {}", text(&block["text"]))),
                    "tool_use" => {
                        let input = &block["input"];
                        let target = ["file_path", "command", "pattern", "path"]
                            .iter()
                            .find_map(|k| input[*k].as_str())
                            .unwrap_or_default();
                        Some(format!("[tool] {} {target}", text(&block["name"])))
                    }
                    _ => None,
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        }
        ("result", subtype) => Some(format!(
            "[claude] {}: {} turns, ${:.4}, {} ms{}",
            subtype.unwrap_or("result"),
            event["num_turns"],
            event["total_cost_usd"].as_f64().unwrap_or(0.0),
            event["duration_ms"],
            if event["is_error"].as_bool() == Some(true) {
                format!(" (error: {})", text(&event["result"]))
            } else {
                String::new()
            }
        )),
        _ => None,
    }
}

/// What may reach a terminal of text that agents and their CLI wrote: no
/// control characters but newline and tab. An escape sequence in a task's
/// output (from the CLI, a test, or a hostile repository) could otherwise
/// move the cursor, rewrite earlier lines, retitle the window or worse;
/// a carriage return could hide a line behind another. Invalid UTF-8
/// becomes U+FFFD (C1 controls are only recognisable once decoded).
pub fn for_terminal(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .filter(|&c| !c.is_control() || c == '\n' || c == '\t')
        .collect()
}

/// Prints a table or a detail view, which hold text from issues and agents
/// (titles, messages, labels), cleaned with [`for_terminal`] on a terminal.
pub fn print_text(text: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        say(&for_terminal(text.as_bytes()))
    } else {
        say(text)
    }
}

/// Where followed output goes: standard output for `ccc logs`, the log
/// pane of `ccc top`.
pub trait LogSink {
    /// One chunk of output (a line, or a few), or a line about the follow.
    fn line(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Says that the coordinator was lost and the follow reconnects.
    fn lost(&mut self, why: &str);
}

/// Standard output, cleaned with [`for_terminal`] when it is a terminal
/// (unless `--raw`): a file or a pipe gets the bytes as stored.
struct Out {
    stdout: std::io::StdoutLock<'static>,
    clean: bool,
}

impl Out {
    fn new(raw: bool) -> Self {
        use std::io::IsTerminal;
        let stdout = std::io::stdout().lock();
        let clean = !raw && stdout.is_terminal();
        Self { stdout, clean }
    }
}

impl LogSink for Out {
    fn lost(&mut self, why: &str) {
        eprintln!("ccc: lost the coordinator ({why}); reconnecting");
    }

    /// Writes `data`, ending it with a newline if it has none.
    fn line(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.clean {
            self.stdout.write_all(for_terminal(data).as_bytes())?;
        } else {
            self.stdout.write_all(data)?;
        }
        if !data.ends_with(b"\n") {
            self.stdout.write_all(b"\n")?;
        }
        self.stdout.flush()
    }
}

/// Whether a failed watch is worth resuming: the coordinator went away
/// (restart, network), as opposed to a refusal that would only repeat.
fn is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

/// How far `ccc logs` got, kept across reconnects.
struct Progress {
    /// The next chunk wanted: (attempt, seq).
    next: (u32, u64),
    /// The attempt whose header was printed last.
    shown_attempt: u32,
    /// The coordinator answered the watch at least once: failures after
    /// that are a lost coordinator, not a wrong address.
    answered: bool,
    /// The latest attempt opened a watch (then backoff starts afresh).
    opened: bool,
}

/// Prints a task's output; with `follow`, live until the task ends, and
/// the exit tells how it ended. The CLI's stream-json events are shown as
/// readable lines, and control characters are dropped on a terminal,
/// unless `raw`. A follow outlives a coordinator restart: it connects
/// again with backoff and resumes after the last chunk printed.
pub async fn logs(
    conn: &Connection,
    task_id: String,
    follow: bool,
    raw: bool,
) -> anyhow::Result<Exit> {
    output_into(conn, &task_id, follow, raw, &mut Out::new(raw)).await
}

/// [`logs`] into any sink.
pub async fn output_into(
    conn: &Connection,
    task_id: &str,
    follow: bool,
    raw: bool,
    out: &mut impl LogSink,
) -> anyhow::Result<Exit> {
    let mut progress = Progress {
        next: (0, 0),
        shown_attempt: 0,
        answered: false,
        opened: false,
    };
    let mut backoff = Duration::from_millis(200);
    let mut said_lost = false;
    loop {
        progress.opened = false;
        let status = match watch_once(conn, task_id, follow, raw, out, &mut progress).await? {
            Watched::Ended(exit) => return Ok(exit),
            Watched::Lost(status) => status,
        };
        if progress.opened {
            backoff = Duration::from_millis(200);
        }
        if !said_lost {
            out.lost(status.message());
            said_lost = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

enum Watched {
    Ended(Exit),
    /// Following, the coordinator went away: worth connecting again.
    Lost(tonic::Status),
}

async fn watch_once(
    conn: &Connection,
    task_id: &str,
    follow: bool,
    raw: bool,
    out: &mut impl LogSink,
    progress: &mut Progress,
) -> anyhow::Result<Watched> {
    let resumable =
        |status: &tonic::Status, answered: bool| follow && answered && is_transient(status);
    let mut client = match conn.client().await {
        Ok(client) => client,
        Err(e) if follow && progress.answered => {
            return Ok(Watched::Lost(tonic::Status::unavailable(e.to_string())));
        }
        Err(e) => return Err(e),
    };
    let request = proto::WatchTaskRequest {
        task_id: task_id.to_owned(),
        from_attempt: progress.next.0,
        from_seq: progress.next.1,
        follow,
    };
    let mut stream = match client.watch_task(request).await {
        Ok(stream) => stream.into_inner(),
        Err(status) if resumable(&status, progress.answered) => {
            return Ok(Watched::Lost(status));
        }
        Err(status) => return Err(conn.diagnosis.explain(status)).context("WatchTask"),
    };
    progress.answered = true;
    progress.opened = true;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            // A one-off read ends with the stored output.
            Ok(None) if !follow => return Ok(Watched::Ended(Exit::Success)),
            // Following, the stream ends with the task: before, the
            // coordinator stopped.
            Ok(None) => {
                return Ok(Watched::Lost(tonic::Status::unavailable(
                    "the watch ended before the task did",
                )));
            }
            Err(status) if resumable(&status, true) => return Ok(Watched::Lost(status)),
            Err(status) => return Err(conn.diagnosis.explain(status)).context("WatchTask"),
        };
        match event.event {
            Some(task_event::Event::Output(chunk)) => {
                if (chunk.attempt, chunk.seq) < progress.next {
                    continue; // Printed before a reconnect.
                }
                progress.next = (chunk.attempt, chunk.seq + 1);
                if chunk.attempt != progress.shown_attempt {
                    progress.shown_attempt = chunk.attempt;
                    out.line(format!("--- attempt {} ---", chunk.attempt).as_bytes())?;
                }
                let is_event = chunk.kind == proto::OutputKind::Event as i32;
                if is_event && !raw {
                    if let Some(line) = render_events(&chunk.data) {
                        out.line(line.as_bytes())?;
                    }
                } else {
                    out.line(&chunk.data)?;
                }
            }
            Some(task_event::Event::Task(task)) if follow => {
                let state = TaskState::try_from(task.state).unwrap_or(TaskState::Unspecified);
                let exit = match state {
                    // Pushed, but its tests failed: not a success to a script.
                    TaskState::Succeeded if !matches!(task.outcome.as_str(), "" | "succeeded") => {
                        Exit::TaskFailed
                    }
                    TaskState::Succeeded => Exit::Success,
                    TaskState::Failed => Exit::TaskFailed,
                    TaskState::Cancelled => Exit::TaskCancelled,
                    _ => continue,
                };
                let line = format!("--- {} {}", task.task_id, state_line(&task));
                out.line(line.as_bytes())?;
                return Ok(Watched::Ended(exit));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{TaskInfo, TaskState, for_terminal, render_events, state_line};

    fn task(state: TaskState, outcome: &str, reason: &str) -> TaskInfo {
        TaskInfo {
            task_id: "t-1".into(),
            state: state as i32,
            outcome: outcome.into(),
            state_reason: reason.into(),
            ..TaskInfo::default()
        }
    }

    #[test]
    fn the_state_and_its_reason_are_said_once() {
        assert_eq!(
            state_line(&task(TaskState::Succeeded, "succeeded", "pushed b at 1a")),
            "succeeded: pushed b at 1a"
        );
        assert_eq!(
            state_line(&task(
                TaskState::Failed,
                "tests_failed",
                "tests_failed: the tests failed"
            )),
            "failed (tests_failed): the tests failed"
        );
        assert_eq!(
            state_line(&task(TaskState::Cancelled, "", "by admin root")),
            "cancelled: by admin root"
        );
        assert_eq!(state_line(&task(TaskState::Queued, "", "")), "queued");
    }

    #[test]
    fn a_chunk_of_several_events_gives_a_line_for_each_worth_one() {
        let chunk = concat!(
            r#"{"type":"system","subtype":"init","session_id":"s1","model":"m"}"#,
            "\n",
            r#"{"type":"user","message":{}}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hello"}]}}"#,
            "\n",
        );
        assert_eq!(
            render_events(chunk.as_bytes()).as_deref(),
            Some("[claude] session s1 started (model m)\n[claude] hello")
        );
        assert_eq!(render_events(b"{\"type\":\"user\"}\n"), None);
    }

    #[test]
    fn only_newlines_and_tabs_survive_for_a_terminal() {
        let hostile =
            b"ok\tfine\n\x1b]0;pwned\x07\x1b[2J\x1b[1Agone\rover\x08\x7f\xc2\x9b31m\xff!\n";
        assert_eq!(
            for_terminal(hostile),
            "ok\tfine\n]0;pwned[2J[1Agoneover31m\u{fffd}!\n"
        );
        assert_eq!(
            for_terminal("plain ünïcode\n".as_bytes()),
            "plain ünïcode\n"
        );
    }
}
