//! Child processes. Architecture invariant: the agent spawns processes only
//! through this module, always with an argument vector (never a shell),
//! stdin closed, and a deadline.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{Attempt, TaskId};
use common::types::{CliResult, FinishedReport, Outcome, OutputKind};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} not found")]
    NotFound { program: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}")]
    TimedOut { program: String, timeout: Duration },
}

/// What a short-lived command printed.
#[derive(Debug)]
pub struct Captured {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args...` to completion, capturing its output, killing it
/// if it outlives `timeout`.
pub async fn run_captured(
    program: &str,
    args: &[String],
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Captured, Error> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                program: program.to_owned(),
            }
        } else {
            Error::Spawn {
                program: program.to_owned(),
                source,
            }
        }
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Captured {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(Error::Spawn {
            program: program.to_owned(),
            source,
        }),
        // Dropping the future drops the child, which kills it.
        Err(_) => Err(Error::TimedOut {
            program: program.to_owned(),
            timeout,
        }),
    }
}

/// How to run one attempt's CLI process.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub program: String,
    /// Passed as an argument vector: the prompt is one element, never
    /// interpreted by a shell.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: std::path::PathBuf,
    /// The run is stopped (TERM, then KILL) when it lasts longer.
    pub deadline: Duration,
    /// Time between TERM and KILL.
    pub grace: Duration,
}

/// What a running attempt's process reports to the driver.
#[derive(Debug)]
pub enum ChildEvent {
    Output {
        task: TaskId,
        attempt: Attempt,
        kind: OutputKind,
        data: Arc<[u8]>,
    },
    Exited {
        task: TaskId,
        attempt: Attempt,
        report: Box<FinishedReport>,
    },
}

/// The largest chunk one output line is cut into.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Starts the attempt's process in its own process group and reports its
/// output and end on `events`. Cancelling `stop` stops the whole group.
pub fn spawn_attempt(
    task: TaskId,
    attempt: Attempt,
    inv: Invocation,
    events: mpsc::Sender<ChildEvent>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut cmd = Command::new(&inv.program);
    cmd.args(&inv.args)
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&inv.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                program: inv.program.clone(),
            }
        } else {
            Error::Spawn {
                program: inv.program.clone(),
                source,
            }
        }
    })?;
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let result_event = Arc::new(std::sync::Mutex::new(None::<serde_json::Value>));
        let mut readers = tokio::task::JoinSet::new();
        if let Some(out) = stdout {
            readers.spawn(forward(
                task,
                attempt,
                out,
                true,
                events.clone(),
                Arc::clone(&result_event),
            ));
        }
        if let Some(err) = stderr {
            readers.spawn(forward(
                task,
                attempt,
                err,
                false,
                events.clone(),
                Arc::clone(&result_event),
            ));
        }
        let ended = tokio::select! {
            status = child.wait() => End::Exited(status),
            () = stop.cancelled() => End::Stopped,
            () = tokio::time::sleep(inv.deadline) => End::Deadline,
        };
        let status = match &ended {
            End::Exited(status) => status.as_ref().ok().copied(),
            End::Stopped | End::Deadline => {
                terminate_group(pgid, &mut child, inv.grace).await;
                None
            }
        };
        // The CLI may leave children behind holding the pipes open: stop the
        // whole group, then give the readers a moment to drain.
        signal_group(pgid, libc::SIGKILL);
        let drain = async { while readers.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            readers.abort_all();
        }
        let result = result_event.lock().ok().and_then(|mut r| r.take());
        let report = report_for(&ended, status, result.as_ref(), inv.deadline);
        let _ = events
            .send(ChildEvent::Exited {
                task,
                attempt,
                report: Box::new(report),
            })
            .await;
    });
    Ok(())
}

enum End {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stopped,
    Deadline,
}

/// Reads a pipe in chunks of at most one line (long lines are cut at
/// `MAX_CHUNK`), as raw bytes: output need not be UTF-8. Stdout lines that
/// are JSON objects with a `type` are the CLI's stream-json events.
async fn forward(
    task: TaskId,
    attempt: Attempt,
    pipe: impl tokio::io::AsyncRead + Unpin,
    is_stdout: bool,
    events: mpsc::Sender<ChildEvent>,
    result_event: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::with_capacity(MAX_CHUNK, pipe);
    let mut line: Vec<u8> = Vec::new();
    while let Ok(buf) = reader.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let room = MAX_CHUNK - line.len();
        let (take, complete) = match buf.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (
                buf.len().min(room),
                line.len() + buf.len().min(room) >= MAX_CHUNK,
            ),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if complete {
            let chunk = std::mem::take(&mut line);
            if !send_chunk(task, attempt, chunk, is_stdout, &events, &result_event).await {
                return;
            }
        }
    }
    if !line.is_empty() {
        send_chunk(task, attempt, line, is_stdout, &events, &result_event).await;
    }
}

async fn send_chunk(
    task: TaskId,
    attempt: Attempt,
    chunk: Vec<u8>,
    is_stdout: bool,
    events: &mpsc::Sender<ChildEvent>,
    result_event: &std::sync::Mutex<Option<serde_json::Value>>,
) -> bool {
    let kind = if !is_stdout {
        OutputKind::Stderr
    } else {
        match serde_json::from_slice::<serde_json::Value>(&chunk) {
            Ok(event) if event.get("type").is_some_and(serde_json::Value::is_string) => {
                if event["type"] == "result"
                    && let Ok(mut slot) = result_event.lock()
                {
                    *slot = Some(event);
                }
                OutputKind::Event
            }
            _ => OutputKind::Stdout,
        }
    };
    events
        .send(ChildEvent::Output {
            task,
            attempt,
            kind,
            data: Arc::from(chunk),
        })
        .await
        .is_ok()
}

/// What the CLI's run amounts to: the exit status and the stream-json
/// `result` event together (a failed API call exits 1 with `is_error`).
fn report_for(
    ended: &End,
    status: Option<std::process::ExitStatus>,
    result: Option<&serde_json::Value>,
    deadline: Duration,
) -> FinishedReport {
    let cli = result.map(|r| CliResult {
        cost_usd: r["total_cost_usd"].as_f64().unwrap_or(0.0),
        turns: u32::try_from(r["num_turns"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        duration_ms: r["duration_ms"].as_u64().unwrap_or(0),
        session_id: r["session_id"].as_str().unwrap_or_default().to_owned(),
        is_error: r["is_error"].as_bool().unwrap_or(false),
        subtype: r["subtype"].as_str().unwrap_or_default().to_owned(),
        result: r["result"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(4096)
            .collect(),
    });
    let (outcome, message) = match ended {
        End::Stopped => (Outcome::Cancelled, "stopped on request".to_owned()),
        End::Deadline => (
            Outcome::TimedOut,
            format!("the CLI did not finish within {}s", deadline.as_secs()),
        ),
        End::Exited(_) => match (status, cli.as_ref()) {
            (Some(s), Some(c)) if s.success() && !c.is_error => {
                (Outcome::Succeeded, "the CLI finished".to_owned())
            }
            (Some(s), None) if s.success() => (
                Outcome::Succeeded,
                "the CLI exited 0 without a result event".to_owned(),
            ),
            (_, Some(c)) if c.subtype == "error_max_turns" => (
                Outcome::TurnLimit,
                format!("the CLI stopped at its turn limit after {} turns", c.turns),
            ),
            (s, Some(c)) => (
                Outcome::CliFailed,
                format!(
                    "the CLI failed (exit {}): {}",
                    exit_text(s),
                    if c.result.is_empty() {
                        &c.subtype
                    } else {
                        &c.result
                    }
                ),
            ),
            (s, None) => (
                Outcome::CliFailed,
                format!("the CLI crashed (exit {}) without a result", exit_text(s)),
            ),
        },
    };
    FinishedReport {
        outcome,
        message,
        branch: String::new(),
        commit: String::new(),
        tests: None,
        cli,
        rate_limit_reset_unix_ms: 0,
        last_output_seq: 0,
    }
}

fn exit_text(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code.to_string(),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "unknown".into(),
        },
        None => "unknown".into(),
    }
}

/// TERM to the group, then KILL after `grace` if the leader still runs.
async fn terminate_group(pgid: Option<i32>, child: &mut tokio::process::Child, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, libc::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Signals every process of the group the CLI leads (its grandchildren too).
#[allow(unsafe_code)]
fn signal_group(pgid: Option<i32>, signal: libc::c_int) {
    if let Some(pgid) = pgid.filter(|&p| p > 1) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours;
        // a negative pid addresses the process group we created for the child.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}
