//! Child processes. Architecture invariant: the agent spawns processes only
//! through this module, always with an argument vector (never a shell),
//! stdin closed, and a deadline.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{Attempt, TaskId};
use common::types::{FinishedReport, OutputKind};
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

/// How to run one streaming process (the CLI, or a test command).
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

/// What an attempt reports to the driver while it works.
#[derive(Debug)]
pub enum ChildEvent {
    Output {
        task: TaskId,
        attempt: Attempt,
        kind: OutputKind,
        data: Arc<[u8]>,
    },
    Progress {
        task: TaskId,
        attempt: Attempt,
        phase: common::types::Phase,
    },
    Exited {
        task: TaskId,
        attempt: Attempt,
        report: Box<FinishedReport>,
    },
}

/// Where a run's output goes: chunks of the attempt's output stream.
#[derive(Clone)]
pub struct Sink {
    pub task: TaskId,
    pub attempt: Attempt,
    pub events: mpsc::Sender<ChildEvent>,
}

impl Sink {
    /// A line the agent itself writes into the task's output, cut to fit
    /// one chunk (it may quote an error of any length).
    pub async fn system(&self, line: impl Into<String>) {
        let line = system_line(line.into());
        let _ = self
            .events
            .send(ChildEvent::Output {
                task: self.task,
                attempt: self.attempt,
                kind: OutputKind::System,
                data: Arc::from(line.into_bytes()),
            })
            .await;
    }

    pub async fn progress(&self, phase: common::types::Phase) {
        let _ = self
            .events
            .send(ChildEvent::Progress {
                task: self.task,
                attempt: self.attempt,
                phase,
            })
            .await;
    }
}

/// The largest chunk one output line is cut into: what the coordinator
/// accepts.
pub const MAX_CHUNK: usize = common::wire::MAX_OUTPUT_CHUNK;
/// Lines of output kept for a summary (e.g. the tests' tail).
const TAIL_LINES: usize = 40;

/// How a run ended.
#[derive(Debug)]
pub enum End {
    Exited(Option<std::process::ExitStatus>),
    /// Stopped because `stop` was cancelled.
    Stopped,
    /// Stopped at its deadline.
    TimedOut,
}

#[derive(Debug)]
pub struct RunResult {
    pub end: End,
    /// The CLI's stream-json `result` event, when the run printed one.
    pub result_event: Option<serde_json::Value>,
    /// The last lines of output, lossily decoded.
    pub tail: String,
}

/// Runs `inv` in its own process group, streaming its output to `sink`
/// (stdout lines that are JSON objects with a `type` are stream-json
/// events), until it exits, `stop` is cancelled or its deadline passes; in
/// the last two cases the whole group gets TERM, then KILL after the grace.
pub async fn run_streaming(
    inv: &Invocation,
    sink: &Sink,
    stop: &CancellationToken,
) -> Result<RunResult, Error> {
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
    let collected = Arc::new(std::sync::Mutex::new(Collected::default()));
    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(forward(out, true, sink.clone(), Arc::clone(&collected)));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(forward(err, false, sink.clone(), Arc::clone(&collected)));
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status.ok()),
        () = stop.cancelled() => End::Stopped,
        () = tokio::time::sleep(inv.deadline) => End::TimedOut,
    };
    if !matches!(end, End::Exited(_)) {
        terminate_group(pgid, &mut child, inv.grace).await;
    }
    // Whatever the leader did, its group goes with it: grandchildren would
    // otherwise hold the pipes open (and keep working) after it ended.
    signal_group(pgid, libc::SIGKILL);
    let drain = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        readers.abort_all();
    }
    let collected = collected
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default();
    Ok(RunResult {
        end,
        result_event: collected.result_event,
        tail: collected.tail.into_iter().collect::<Vec<_>>().join(""),
    })
}

#[derive(Default)]
struct Collected {
    result_event: Option<serde_json::Value>,
    tail: std::collections::VecDeque<String>,
}

/// `line` and a newline, within `MAX_CHUNK` bytes (cut on a char boundary).
fn system_line(mut line: String) -> String {
    let mut end = line.len().min(MAX_CHUNK - 1);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line.push('\n');
    line
}

/// Reads a pipe in chunks of at most one line (long lines are cut at
/// `MAX_CHUNK`), as raw bytes: output need not be UTF-8.
async fn forward(
    pipe: impl tokio::io::AsyncRead + Unpin,
    is_stdout: bool,
    sink: Sink,
    collected: Arc<std::sync::Mutex<Collected>>,
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
            if !send_chunk(chunk, is_stdout, &sink, &collected).await {
                return;
            }
        }
    }
    if !line.is_empty() {
        send_chunk(line, is_stdout, &sink, &collected).await;
    }
}

async fn send_chunk(
    chunk: Vec<u8>,
    is_stdout: bool,
    sink: &Sink,
    collected: &std::sync::Mutex<Collected>,
) -> bool {
    let event = if is_stdout {
        serde_json::from_slice::<serde_json::Value>(&chunk)
            .ok()
            .filter(|e| e.get("type").is_some_and(serde_json::Value::is_string))
    } else {
        None
    };
    let kind = match (&event, is_stdout) {
        (Some(_), _) => OutputKind::Event,
        (None, true) => OutputKind::Stdout,
        (None, false) => OutputKind::Stderr,
    };
    if let Ok(mut c) = collected.lock() {
        match event {
            Some(e) if e["type"] == "result" => c.result_event = Some(e),
            Some(_) => {}
            None => {
                c.tail
                    .push_back(String::from_utf8_lossy(&chunk).into_owned());
                if c.tail.len() > TAIL_LINES {
                    c.tail.pop_front();
                }
            }
        }
    }
    sink.events
        .send(ChildEvent::Output {
            task: sink.task,
            attempt: sink.attempt,
            kind,
            data: Arc::from(chunk),
        })
        .await
        .is_ok()
}

/// TERM to the group, then KILL after `grace` if the leader still runs.
async fn terminate_group(pgid: Option<i32>, child: &mut tokio::process::Child, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, libc::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Signals every process of the group a child leads (its grandchildren too).
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

/// Describes an exit status: `0`, `1`, `signal 9`.
pub fn exit_text(status: Option<std::process::ExitStatus>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_line_fits_one_chunk_on_a_char_boundary() {
        assert_eq!(system_line("[ccc] short".into()), "[ccc] short\n");
        let long = format!("[ccc] {}", "é".repeat(MAX_CHUNK));
        let line = system_line(long);
        assert!(line.len() <= MAX_CHUNK, "{}", line.len());
        assert!(line.len() >= MAX_CHUNK - 2, "cut no more than needed");
        assert!(line.ends_with("é\n"));
    }
}
