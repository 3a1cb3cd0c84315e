//! Task commands: submit, list, show, logs (with follow), cancel, retry.

use std::io::Write;

use anyhow::Context;
use common::proto::{self, TaskInfo, TaskState, admin_client::AdminClient, task_event};
use common::time::UnixMillis;
use tonic::transport::Channel;

use crate::admin::Diagnosis;
use crate::table::{render, specialty_name};

pub fn state_name(value: i32) -> &'static str {
    match TaskState::try_from(value) {
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
        "queued" => TaskState::Queued,
        "assigned" => TaskState::Assigned,
        "running" => TaskState::Running,
        "finishing" => TaskState::Finishing,
        "succeeded" => TaskState::Succeeded,
        "failed" => TaskState::Failed,
        "cancelled" => TaskState::Cancelled,
        other => anyhow::bail!(
            "unknown state {other:?} (queued, assigned, running, finishing, succeeded, failed, cancelled)"
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

pub fn tasks_table(tasks: &[TaskInfo]) -> String {
    if tasks.is_empty() {
        return "no tasks\n".into();
    }
    let mut rows = vec![
        [
            "TASK",
            "STATE",
            "SPECIALTY",
            "PRIO",
            "TRY",
            "AGENT",
            "REPO",
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
            specialty_name(t.specialty).into(),
            t.priority.to_string(),
            format!("{}/{}", t.attempts.len(), t.max_attempts),
            last.map(|a| a.agent_id.clone()).unwrap_or_default(),
            t.repo.clone(),
            t.title.chars().take(60).collect(),
        ]);
    }
    render(&rows)
}

pub fn task_detail(t: &TaskInfo) -> String {
    let mut rows: Vec<Vec<String>> = [
        ("task", t.task_id.clone()),
        ("title", t.title.clone()),
        (
            "state",
            format!("{} ({})", state_name(t.state), t.state_reason),
        ),
        ("repo", t.repo.clone()),
        ("base", t.base_branch.clone()),
        ("branch", t.branch.clone()),
        ("specialty", specialty_name(t.specialty).into()),
        ("technologies", t.technologies.join(", ")),
        ("priority", t.priority.to_string()),
        ("source", t.source.clone()),
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
    if !t.cancel_requested.is_empty() {
        rows.push(vec!["cancel:".into(), t.cancel_requested.clone()]);
    }
    let mut out = render(&rows);
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
                "  finished: {} {} {}\n",
                time(a.finished_at.as_ref()),
                outcome_name(a),
                a.message
            ));
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
        "title": t.title,
        "repo": t.repo,
        "branch": t.branch,
        "specialty": specialty_name(t.specialty),
        "priority": t.priority,
        "max_attempts": t.max_attempts,
        "attempts": t.attempts.iter().map(|a| serde_json::json!({
            "attempt": a.attempt,
            "agent_id": a.agent_id,
            "placement": a.placement,
            "outcome": outcome_name(a),
            "message": a.message,
            "finished": a.finished_at.is_some(),
        })).collect::<Vec<_>>(),
    })
}

/// One line for a stream-json event of the CLI, or `None` for events not
/// worth a line (raw mode shows everything).
pub fn render_event(data: &[u8]) -> Option<String> {
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
pub fn print_text(text: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        print!("{}", for_terminal(text.as_bytes()));
    } else {
        print!("{text}");
    }
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

/// Prints a task's output; with `follow`, live until the task ends. The
/// CLI's stream-json events are shown as readable lines, and control
/// characters are dropped on a terminal, unless `raw`.
pub async fn logs(
    client: &mut AdminClient<Channel>,
    diagnosis: &Diagnosis,
    task_id: String,
    follow: bool,
    raw: bool,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_task(proto::WatchTaskRequest {
            task_id,
            from_attempt: 0,
            from_seq: 0,
            follow,
        })
        .await
        .map_err(|s| diagnosis.explain(s))
        .context("WatchTask")?
        .into_inner();
    let mut out = Out::new(raw);
    let mut attempt = 0;
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| diagnosis.explain(s))
        .context("WatchTask")?
    {
        match event.event {
            Some(task_event::Event::Output(chunk)) => {
                if chunk.attempt != attempt {
                    attempt = chunk.attempt;
                    out.line(format!("--- attempt {attempt} ---").as_bytes())?;
                }
                let is_event = chunk.kind == proto::OutputKind::Event as i32;
                if is_event && !raw {
                    if let Some(line) = render_event(&chunk.data) {
                        out.line(line.as_bytes())?;
                    }
                } else {
                    out.line(&chunk.data)?;
                }
            }
            Some(task_event::Event::Task(task)) if follow => {
                let state = TaskState::try_from(task.state).unwrap_or(TaskState::Unspecified);
                if matches!(
                    state,
                    TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
                ) {
                    let line = format!(
                        "--- {} {}: {}",
                        task.task_id,
                        state_name(task.state),
                        task.state_reason
                    );
                    out.line(line.as_bytes())?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::for_terminal;

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
