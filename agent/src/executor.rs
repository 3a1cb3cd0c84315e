//! One attempt, start to end: prepare the workspace, run the CLI on the
//! issue, run the tests, commit, push, and say how it went.
//!
//! Finished work is never thrown away: when the CLI stops at its turn limit,
//! its budget or the deadline, what it changed is still committed and pushed
//! (marked incomplete in the commit message and the outcome). A cancelled
//! attempt pushes nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{Attempt, TaskId};
use common::types::{
    CliResult, FinishedReport, Outcome, Phase, PushCredential, TaskSpec, TestSummary,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::claude;
use crate::config::{ClaudeConfig, TestsConfig};
use crate::runner::{self, End, Invocation, RunResult, Sink};
use crate::workspace::{self, Author, Workspaces};

/// Everything an attempt needs besides the task.
pub struct Executor {
    pub workspaces: Workspaces,
    /// Where the process groups of running children are recorded.
    pub children: runner::Registry,
    pub claude: ClaudeConfig,
    pub tests: TestsConfig,
    pub author: Author,
    /// Push what the CLI changed when it stopped at a limit.
    pub push_incomplete: bool,
    pub keep_failed_for: Duration,
    /// The agent's id, for commit messages.
    pub agent: String,
}

/// One assignment.
pub struct Job {
    pub task: TaskId,
    pub attempt: Attempt,
    pub spec: TaskSpec,
    /// When the driver started it (its clock, passed in).
    pub started: std::time::Instant,
    /// How long the attempt may take in all, from `started`.
    pub budget: Duration,
    pub credential: Option<PushCredential>,
}

impl Executor {
    /// Runs the job to its end; the report is what the coordinator gets.
    pub async fn run(
        self: Arc<Self>,
        job: Job,
        sink: Sink,
        stop: CancellationToken,
    ) -> FinishedReport {
        let span = info_span!("task", task_id = %job.task, attempt = job.attempt.0);
        let in_use = self.workspaces.claim(job.task, job.attempt);
        let mut report = self.attempt(&job, &sink, &stop).instrument(span).await;
        report.branch = if report.commit.is_empty() {
            String::new()
        } else {
            job.spec.branch.clone()
        };
        let succeeded = matches!(report.outcome, Outcome::Succeeded | Outcome::NoChanges);
        let (ws, keep_for) = (self.workspaces.clone(), self.keep_failed_for);
        // Removing a large workspace blocks; it runs on the blocking pool.
        let _ = workspace::blocking(move || {
            ws.finish(in_use, succeeded, keep_for);
            Ok(())
        })
        .await;
        report
    }

    async fn attempt(&self, job: &Job, sink: &Sink, stop: &CancellationToken) -> FinishedReport {
        // The task's deadline bounds preparing and the CLI together; the
        // tests have their own timeout, and commit and push always run so
        // that finished work is not lost.
        let started = tokio::time::Instant::from_std(job.started);
        // Preparing: mirror and clone.
        sink.progress(Phase::Preparing).await;
        sink.system(format!(
            "[ccc] preparing a workspace of {}",
            job.spec.repo_url
        ))
        .await;
        let prepared = {
            let (task, attempt, spec, cred) = (
                job.task,
                job.attempt,
                job.spec.clone(),
                job.credential.clone(),
            );
            let (ws, stop) = (self.workspaces.clone(), stop.clone());
            workspace::blocking(move || ws.prepare(task, attempt, &spec, cred.as_ref(), &stop))
                .await
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(_) if stop.is_cancelled() => {
                return FinishedReport::new(Outcome::Cancelled, "cancelled while preparing");
            }
            Err(e) => {
                let mut r = FinishedReport::new(
                    Outcome::WorkspaceError,
                    format!("cannot prepare the workspace: {e}"),
                );
                r.permanent = e.is_permanent();
                return r;
            }
        };
        sink.system(format!(
            "[ccc] on branch {} from {}{}",
            prepared.branch,
            prepared.base_branch,
            if prepared.mirror_reused {
                " (mirror reused)"
            } else {
                ""
            }
        ))
        .await;
        if stop.is_cancelled() {
            return FinishedReport::new(Outcome::Cancelled, "cancelled before the CLI started");
        }

        // Chosen before the CLI runs: what the repository configures is read
        // as it was at the base, not as the CLI (steered by issue text) left it.
        let test_command = self.test_command(&job.spec, &prepared.dir);

        // The CLI.
        sink.progress(Phase::RunningClaude).await;
        let prompt = self.claude.prompt(job.task, &job.spec);
        let watch = Arc::new(claude::EventWatch::default());
        let inv = Invocation {
            program: self.claude.program.clone(),
            args: claude::run_args(&self.claude),
            env: self.claude.env.clone(),
            cwd: prepared.dir.clone(),
            input: Some(prompt.into_bytes()),
            deadline: job
                .budget
                .saturating_sub(started.elapsed())
                .min(self.claude.timeout),
            grace: self.claude.kill_grace,
            record: Some(self.children.clone()),
            events: Some(watch.clone()),
        };
        sink.system(format!("[ccc] running {}", self.claude.program))
            .await;
        let run = match runner::run_streaming(&inv, sink, stop).await {
            Ok(run) => run,
            // The PC's fault, not the task's: the CLI was checked at start
            // and is gone or broken now.
            Err(e) => {
                return FinishedReport::new(
                    Outcome::AgentFault,
                    format!("cannot start the CLI: {e}"),
                );
            }
        };
        let result = watch.take_result();
        let (cli_outcome, cli_message, cli) =
            claude::outcome(&run.end, result.as_ref(), inv.deadline);
        let partial = matches!(
            cli_outcome,
            Outcome::TurnLimit | Outcome::BudgetExceeded | Outcome::TimedOut
        );
        if !(cli_outcome == Outcome::Succeeded || (partial && self.push_incomplete)) {
            let mut r = FinishedReport::new(cli_outcome, cli_message);
            r.cli = cli;
            r.rate_limit_reset_unix_ms = result
                .as_ref()
                .map_or(0, claude::ResultEvent::rate_limit_reset_unix_ms);
            return r;
        }

        // Tests, on finished work only.
        let tests = if partial {
            None
        } else {
            sink.progress(Phase::Testing).await;
            match test_command {
                Some(command) => Some(self.run_tests(command, &prepared.dir, sink, stop).await),
                None => None,
            }
        };
        if stop.is_cancelled() {
            return FinishedReport::new(Outcome::Cancelled, "cancelled during the tests");
        }

        // Commit.
        sink.progress(Phase::Committing).await;
        let message = commit_message(
            job,
            &self.agent,
            cli.as_ref(),
            partial.then_some(&cli_message),
        );
        let commit = {
            let (dir, author) = (prepared.dir.clone(), self.author.clone());
            workspace::blocking(move || Workspaces::commit_all(&dir, &message, &author)).await
        };
        let commit = match commit {
            Ok(Some(id)) => id,
            Ok(None) => {
                let mut r = FinishedReport::new(
                    Outcome::NoChanges,
                    if partial {
                        format!("{cli_message}; it changed nothing")
                    } else {
                        "the CLI finished without changing anything".to_owned()
                    },
                );
                r.cli = cli;
                r.tests = tests;
                return r;
            }
            Err(e) => {
                return FinishedReport::new(Outcome::WorkspaceError, format!("cannot commit: {e}"));
            }
        };
        sink.system(format!("[ccc] committed {commit}")).await;

        // Push.
        sink.progress(Phase::Pushing).await;
        let pushed = {
            let (ws, dir, url, branch, force, cred, stop) = (
                self.workspaces.clone(),
                prepared.dir.clone(),
                job.spec.repo_url.clone(),
                prepared.branch.clone(),
                !job.spec.follow_up,
                job.credential.clone(),
                stop.clone(),
            );
            workspace::blocking(move || ws.push(&dir, &url, &branch, force, cred.as_ref(), &stop))
                .await
        };
        let mut r = match pushed {
            Err(e) if e.is_push_rejected() => {
                FinishedReport::new(Outcome::PushRejected, e.to_string())
            }
            Err(_) if stop.is_cancelled() => {
                FinishedReport::new(Outcome::Cancelled, "cancelled before the push")
            }
            Err(e) => {
                let mut r =
                    FinishedReport::new(Outcome::WorkspaceError, format!("cannot push: {e}"));
                r.permanent = e.is_permanent();
                r
            }
            Ok(()) => {
                sink.system(format!(
                    "[ccc] pushed {} to {}",
                    prepared.branch, job.spec.repo_url
                ))
                .await;
                let tests_failed = tests.as_ref().is_some_and(|t| t.ran && !t.passed);
                if partial {
                    FinishedReport::new(
                        cli_outcome,
                        format!(
                            "{cli_message}; the partial work is pushed to {} at {commit}",
                            prepared.branch
                        ),
                    )
                } else if tests_failed {
                    FinishedReport::new(
                        Outcome::TestsFailed,
                        format!(
                            "the tests failed; the work is pushed to {} at {commit}",
                            prepared.branch
                        ),
                    )
                } else {
                    FinishedReport::new(
                        Outcome::Succeeded,
                        format!("pushed {} at {commit}", prepared.branch),
                    )
                }
            }
        };
        r.commit = commit;
        r.cli = cli;
        r.tests = tests;
        r
    }

    /// The test command: the task's, else the repository's (`.ccc/test`),
    /// else the agent's for the specialty, else one guessed from the
    /// repository's files. `None` when there is nothing to run.
    fn test_command(&self, spec: &TaskSpec, dir: &Path) -> Option<String> {
        if !spec.test_command.trim().is_empty() {
            return Some(spec.test_command.clone());
        }
        if let Ok(cmd) = std::fs::read_to_string(dir.join(".ccc").join("test")) {
            let cmd = cmd.trim();
            if !cmd.is_empty() {
                return Some(cmd.to_owned());
            }
        }
        if let Some(cmd) = self.tests.for_specialty(spec.specialty) {
            return Some(cmd);
        }
        detect_test_command(dir)
    }

    async fn run_tests(
        &self,
        command: String,
        dir: &Path,
        sink: &Sink,
        stop: &CancellationToken,
    ) -> TestSummary {
        sink.system(format!("[ccc] running the tests: {command}"))
            .await;
        // Test commands come from the operator or the repository, never
        // from issue text; they are shell command lines.
        let inv = Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), command.clone()],
            env: Vec::new(),
            cwd: dir.to_owned(),
            input: None,
            deadline: self.tests.timeout,
            grace: self.claude.kill_grace,
            record: Some(self.children.clone()),
            events: None,
        };
        let summary = match runner::run_streaming(&inv, sink, stop).await {
            Ok(RunResult { end, tail, .. }) => {
                let (passed, exit_code) = match end {
                    End::Exited(Some(status)) => {
                        let code = status.code().unwrap_or(-1);
                        // pytest: 5 means no tests were collected.
                        (
                            status.success() || (code == 5 && command.contains("pytest")),
                            code,
                        )
                    }
                    End::Exited(None) => (false, -1),
                    End::TimedOut => (false, -1),
                    End::Stopped => (false, -1),
                };
                TestSummary {
                    ran: true,
                    passed,
                    command,
                    exit_code,
                    tail,
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot run the tests");
                TestSummary {
                    ran: false,
                    passed: false,
                    command,
                    exit_code: -1,
                    tail: e.to_string(),
                }
            }
        };
        sink.system(format!(
            "[ccc] tests {} (exit {})",
            if summary.passed { "passed" } else { "failed" },
            summary.exit_code
        ))
        .await;
        summary
    }
}

/// Guesses the test command from the repository's files.
pub fn detect_test_command(dir: &Path) -> Option<String> {
    let has = |f: &str| dir.join(f).exists();
    if has("package.json")
        && std::fs::read_to_string(dir.join("package.json")).is_ok_and(|p| p.contains("\"test\""))
    {
        return Some("npm test".into());
    }
    if has("Cargo.toml") {
        return Some("cargo test".into());
    }
    if has("go.mod") {
        return Some("go test ./...".into());
    }
    if has("pytest.ini")
        || has("pyproject.toml")
        || has("setup.cfg")
        || has("tests") && has("requirements.txt")
    {
        return Some("pytest -q".into());
    }
    if has("Makefile")
        && std::fs::read_to_string(dir.join("Makefile"))
            .is_ok_and(|m| m.lines().any(|l| l.starts_with("test:")))
    {
        return Some("make test".into());
    }
    None
}

fn commit_message(
    job: &Job,
    agent: &str,
    cli: Option<&CliResult>,
    incomplete: Option<&String>,
) -> String {
    let reference = if job.spec.issue_number > 0 {
        format!("#{}", job.spec.issue_number)
    } else {
        job.task.to_string()
    };
    let mut message = format!(
        "{} ({reference})\n\n",
        job.spec.title.lines().next().unwrap_or("change")
    );
    if let Some(why) = incomplete {
        message.push_str(&format!("INCOMPLETE: {why}.\n\n"));
    }
    message.push_str(&format!(
        "Made by Claude Code on agent {agent} (task {}, attempt {}).\n",
        job.task, job.attempt
    ));
    if let Some(c) = cli {
        message.push_str(&format!(
            "Claude Code: {} turns, ${:.4}.\n",
            c.turns, c.cost_usd
        ));
        let summary: String = c.result.chars().take(2000).collect();
        if !summary.trim().is_empty() {
            message.push_str(&format!("\n{}\n", summary.trim()));
        }
    }
    message
}
