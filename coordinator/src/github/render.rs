//! What the cluster writes on GitHub, in words: the issue's status comment
//! and the pull request's title and body. Pure: from the task as it is.

use common::types::Outcome;

use crate::core::Task;
use crate::core::task::TaskState;

/// Finds the cluster's status comment among an issue's comments.
pub const STATUS_MARKER: &str = "<!-- claude-code-cluster:status -->";

/// The longest output tail quoted.
const TAIL: usize = 3000;

/// The status comment: where the task is, why, what triage read, and what
/// to do next. One comment per issue, edited in place.
pub fn status_comment(task: &Task) -> String {
    let mut out = format!(
        "{STATUS_MARKER}\n**Claude Code Cluster** · task `{}`\n\n",
        task.id
    );
    let attempt = task.current();
    let agent = attempt.map(|a| a.agent.to_string()).unwrap_or_default();
    let status = match task.state {
        TaskState::NeedsInfo => {
            let mut s = "⏸️ **Waiting for more information.** The issue does not say enough to act on; please add:\n".to_owned();
            for m in task
                .triage
                .as_ref()
                .map(|t| t.result.missing.clone())
                .unwrap_or_default()
            {
                s.push_str(&format!("- {m}\n"));
            }
            s.push_str("\nThen comment `/claude` to run it (or `/claude` now, with instructions, to run it anyway).");
            s
        }
        TaskState::Queued => {
            if task.not_before.is_some() {
                format!("🔁 **Queued for another attempt.** {}", task.state_reason)
            } else {
                "🕐 **Queued**: waiting for a free agent.".to_owned()
            }
        }
        TaskState::Assigned => format!(
            "📋 **Assigned** to `{agent}` ({}).",
            attempt.map(|a| a.placement.as_str()).unwrap_or_default()
        ),
        TaskState::Running => {
            let phase = attempt
                .and_then(|a| a.phase)
                .map_or("starting", |p| match p {
                    common::types::Phase::Preparing => "preparing the workspace",
                    common::types::Phase::RunningClaude => "Claude Code is working",
                    common::types::Phase::Testing => "running the tests",
                    common::types::Phase::Committing => "committing",
                    common::types::Phase::Pushing => "pushing the branch",
                });
            format!("⚙️ **Running** on `{agent}`: {phase}.")
        }
        TaskState::Finishing | TaskState::Succeeded => {
            let report = attempt.and_then(|a| a.report.as_ref());
            let pushed = report
                .map(|r| format!(" Pushed `{}` at `{}`.", r.branch, short(&r.commit)))
                .unwrap_or_default();
            let pull = task
                .github
                .as_ref()
                .and_then(|g| g.pull.as_ref())
                .map(|p| {
                    format!(
                        " Pull request: {}{}.",
                        p.url,
                        if p.draft { " (draft)" } else { "" }
                    )
                })
                .unwrap_or_else(|| " The pull request is being opened.".to_owned());
            if attempt.and_then(|a| a.outcome) == Some(Outcome::TestsFailed) {
                format!("⚠️ **Done, but the tests failed.**{pushed}{pull}")
            } else {
                format!("✅ **Done.**{pushed}{pull}")
            }
        }
        TaskState::Failed => {
            let mut s = format!("❌ **Failed**: {}", task.state_reason);
            if let Some(p) = task.github.as_ref().and_then(|g| g.pull.as_ref()) {
                s.push_str(&format!(
                    "\n\nThe partial work is in the draft pull request {}.",
                    p.url
                ));
            }
            let said = attempt
                .and_then(|a| a.report.as_ref())
                .and_then(|r| r.cli.as_ref())
                .map(|c| c.result.trim())
                .filter(|r| !r.is_empty());
            if let Some(said) = said {
                s.push_str(&format!("\n\nThe CLI said:\n\n> {}", quote(said)));
            }
            s.push_str("\n\nComment `/claude retry` to try again, or `/claude <instructions>` to run it again with more to go on.");
            s
        }
        TaskState::Cancelled => format!("⏹️ **Cancelled**: {}", task.state_reason),
    };
    out.push_str(&status);
    out.push_str("\n\n");
    if let Some(t) = &task.triage {
        let r = &t.result;
        out.push_str(&format!(
            "Triage: **{}** (confidence {:.2}{}), complexity {}",
            task.spec.specialty,
            r.confidence,
            if t.specialty_given { ", given" } else { "" },
            r.complexity.as_str()
        ));
        if !r.technologies.is_empty() {
            out.push_str(&format!(", technologies {}", r.technologies.join(", ")));
        }
        out.push_str(".\n");
    }
    if let Some(note) = task.github.as_ref().and_then(|g| g.note.as_ref()) {
        out.push_str(&format!("\n{note}\n"));
    }
    if let Some(error) = task.github.as_ref().and_then(|g| g.error.as_ref()) {
        out.push_str(&format!("\nGitHub refused a write: {error}\n"));
    }
    out
}

/// A pull request's title: the issue's.
pub fn pull_title(task: &Task) -> String {
    task.spec.title.clone()
}

/// A pull request's body: what changed, how the tests went, what closes,
/// and where it came from. `cli_version` is the agent's CLI, if known.
pub fn pull_body(task: &Task, draft: bool, cli_version: Option<&str>) -> String {
    let attempt = task.current();
    let report = attempt.and_then(|a| a.report.as_ref());
    let cli = report.and_then(|r| r.cli.as_ref());
    let mut out = String::new();
    if draft {
        let why = match attempt.and_then(|a| a.outcome) {
            Some(Outcome::TestsFailed) => "the tests failed".to_owned(),
            Some(Outcome::TurnLimit) => format!(
                "the CLI stopped at its turn limit after {} turns",
                cli.map_or(0, |c| c.turns)
            ),
            Some(Outcome::BudgetExceeded) => "the CLI stopped at its cost budget".to_owned(),
            Some(Outcome::TimedOut) => "the attempt reached its deadline".to_owned(),
            _ => "the work is incomplete".to_owned(),
        };
        out.push_str(&format!(
            "> [!WARNING]\n> **Draft**: {why}. The work so far is here so that it is not lost; review it before use.\n\n"
        ));
    }
    out.push_str("## What changed\n\n");
    match cli.map(|c| c.result.trim()).filter(|r| !r.is_empty()) {
        Some(summary) => out.push_str(&format!("{summary}\n\n")),
        None => out.push_str("(the CLI gave no summary)\n\n"),
    }
    out.push_str("## Tests\n\n");
    match report.and_then(|r| r.tests.as_ref()) {
        Some(t) if t.ran => {
            out.push_str(&format!(
                "`{}` exited {}: {}.\n\n",
                t.command,
                t.exit_code,
                if t.passed { "passed" } else { "**failed**" }
            ));
            if !t.tail.trim().is_empty() {
                let tail: String = t
                    .tail
                    .chars()
                    .rev()
                    .take(TAIL)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                out.push_str(&format!(
                    "<details><summary>The end of the output</summary>\n\n```\n{}\n```\n</details>\n\n",
                    tail.replace("```", "'''")
                ));
            }
        }
        _ => out.push_str("No test command ran.\n\n"),
    }
    if task.spec.issue_number > 0 {
        out.push_str(&format!("Closes #{}\n\n", task.spec.issue_number));
    }
    out.push_str("<details><summary>Provenance</summary>\n\n");
    out.push_str(&format!("- Task `{}`", task.id));
    if let Some(a) = attempt {
        out.push_str(&format!(
            ", attempt {}, on agent `{}` (its certificate's name)\n",
            a.attempt.0, a.agent
        ));
    } else {
        out.push('\n');
    }
    let model = cli.map(|c| c.model.as_str()).filter(|m| !m.is_empty());
    match (cli_version, model) {
        (Some(v), Some(m)) => out.push_str(&format!("- Claude Code CLI {v}, model `{m}`\n")),
        (Some(v), None) => out.push_str(&format!("- Claude Code CLI {v}\n")),
        (None, Some(m)) => out.push_str(&format!("- Model `{m}`\n")),
        (None, None) => {}
    }
    if let Some(c) = cli {
        out.push_str(&format!(
            "- Session `{}`: {} turns, ${:.4}, {:.1} s\n",
            c.session_id,
            c.turns,
            c.cost_usd,
            c.duration_ms as f64 / 1000.0
        ));
    }
    if let Some(r) = report {
        out.push_str(&format!("- Branch `{}` at `{}`\n", r.branch, r.commit));
    }
    out.push_str("\n</details>\n");
    out
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn quote(text: &str) -> String {
    let text: String = text.chars().take(1500).collect();
    text.replace('\n', "\n> ")
}
