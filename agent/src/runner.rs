//! Child processes. Architecture invariant: the agent spawns processes only
//! through this module, always with an argument vector (never a shell), a
//! deadline, and stdin either closed or fed from memory (the CLI's prompt:
//! an issue body can exceed what one argument may hold).
//!
//! No child outlives the agent: each gets a parent-death signal (SIGTERM
//! once the agent is gone), and the process group of each streaming run
//! (the CLI, the tests) is recorded in the data dir with what identifies it
//! (its leader's start time and a random token in its environment), so
//! that an agent killed with SIGKILL ends, at its next start, what the
//! earlier run left behind, and never a process that merely reuses a pid.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{Attempt, TaskId};
use common::types::{FinishedReport, OutputKind};
use rustix::process::{Pid, Signal};
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
    env: &[(String, String)],
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Captured, Error> {
    let mut cmd = Command::new(program);
    die_with_the_agent(&mut cmd);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
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
    /// Written to the process's stdin, which is then closed; without it
    /// stdin is closed from the start.
    pub input: Option<Vec<u8>>,
    /// The run is stopped (TERM, then KILL) when it lasts longer.
    pub deadline: Duration,
    /// Time between TERM and KILL.
    pub grace: Duration,
    /// Where the run's process group is recorded while it lives.
    pub record: Option<Registry>,
    /// What the program's stdout lines mean, for a program that prints
    /// events (the CLI's stream-json); without it stdout is plain output.
    pub events: Option<Arc<dyn LineEvents>>,
}

/// Reads the stdout lines of a program that prints events.
pub trait LineEvents: Send + Sync {
    /// Sees a whole stdout line (one cut into several chunks is put back
    /// together first, up to `MAX_EVENT_LINE`); whether it is an event.
    fn observe(&self, line: &[u8]) -> bool;
}

impl std::fmt::Debug for dyn LineEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineEvents")
    }
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
pub const MAX_CHUNK: usize = common::protocol::MAX_OUTPUT_CHUNK;
/// How long pipes may stay open, with nothing read, once the process group
/// is gone.
const PIPE_GIVE_UP: Duration = Duration::from_secs(5);
/// What may still be read from the pipes once the process group is gone:
/// their buffers and ours, with room to spare. More means a process outside
/// the group writes to them.
const MAX_AFTER_GROUP: usize = 1 << 20;
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
    /// The last lines of output, lossily decoded.
    pub tail: String,
}

/// Runs `inv` in its own process group, streaming its output to `sink`
/// (stdout lines its `events` recognise are sent as events), until it exits, `stop` is cancelled or its deadline passes; in
/// the last two cases the whole group gets TERM, then KILL after the grace.
pub async fn run_streaming(
    inv: &Invocation,
    sink: &Sink,
    stop: &CancellationToken,
) -> Result<RunResult, Error> {
    let mut cmd = Command::new(&inv.program);
    die_with_the_agent(&mut cmd);
    let token = {
        use rand::{Rng, SeedableRng};
        format!(
            "{:016x}",
            rand::rngs::SmallRng::from_os_rng().random::<u64>()
        )
    };
    cmd.args(&inv.args)
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .env(RUN_TOKEN_VAR, &token)
        .current_dir(&inv.cwd)
        .stdin(if inv.input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
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
    let recorded = match (&inv.record, pgid) {
        (Some(registry), Some(pgid)) => registry.record(pgid, &token),
        _ => None,
    };
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), inv.input.clone()) {
        // A process that exits without reading all of it ends the write
        // with a broken pipe; that is its business, not an error here.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&input).await;
        });
    }
    let collected = Arc::new(std::sync::Mutex::new(Collected::default()));
    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(forward(
            out,
            OutputKind::Stdout,
            inv.events.clone(),
            sink.clone(),
            Arc::clone(&collected),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(forward(
            err,
            OutputKind::Stderr,
            None,
            sink.clone(),
            Arc::clone(&collected),
        ));
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
    signal_group(pgid, Signal::KILL);
    if let Some(file) = recorded {
        let _ = std::fs::remove_file(file);
    }
    if let Ok(mut c) = collected.lock() {
        c.group_gone = true;
    }
    // What is still in the pipes is read to the end, however long the
    // driver takes to accept it (backpressure, never loss): once the group
    // is gone that is at most a few pipe buffers. The readers are given up
    // when a pipe stays open with nothing to read (a process that left the
    // group holds it), when more than that arrives (such a process writes
    // to it), or on a cancel that comes now.
    let cancelled_before = stop.is_cancelled();
    loop {
        let give_up = tokio::select! {
            joined = readers.join_next() => match joined {
                Some(_) => continue,
                None => break,
            },
            () = stop.cancelled(), if !cancelled_before => true,
            () = tokio::time::sleep(PIPE_GIVE_UP) => collected
                .lock()
                .map_or(true, |c| c.sending == 0 || c.after_group > MAX_AFTER_GROUP),
        };
        if give_up {
            readers.abort_all();
            break;
        }
    }
    let collected = collected
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default();
    Ok(RunResult {
        end,
        tail: collected.tail.into_iter().collect::<Vec<_>>().join(""),
    })
}

#[derive(Default)]
struct Collected {
    tail: std::collections::VecDeque<String>,
    /// Readers waiting for the driver to take a chunk.
    sending: usize,
    /// Set once the process group is killed.
    group_gone: bool,
    /// Bytes read since then.
    after_group: usize,
}

/// The longest stdout line still shown to `LineEvents` when it is cut into
/// several chunks (a CLI's `result` event with large fields can exceed a
/// chunk).
const MAX_EVENT_LINE: usize = 8 * 1024 * 1024;

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

/// Reads a pipe in chunks of whole lines, as raw bytes: output need not be
/// UTF-8. Lines of one kind that are already read when one ends (a program
/// printing in bulk) go out together, up to `MAX_CHUNK`; a line is never
/// held back waiting for more output, so a slow program's lines still go
/// out one by one as they come. Long lines are cut at `MAX_CHUNK`. A stdout
/// line cut into pieces goes out as plain pieces, and is also put back
/// together (up to `MAX_EVENT_LINE`) for `events`, so that a long event is
/// still seen; every whole line is shown to `events` on its own.
async fn forward(
    pipe: impl tokio::io::AsyncRead + Unpin,
    plain: OutputKind,
    events: Option<Arc<dyn LineEvents>>,
    sink: Sink,
    collected: Arc<std::sync::Mutex<Collected>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::with_capacity(MAX_CHUNK, pipe);
    let mut line: Vec<u8> = Vec::new();
    // The pieces so far of a stdout line longer than a chunk.
    let mut long_line: Vec<u8> = Vec::new();
    let mut long_line_too_long = false;
    // Whole lines of `gathered_kind` not sent yet: empty whenever the loop
    // may wait for the pipe.
    let mut gathered: Vec<u8> = Vec::new();
    let mut gathered_kind = plain;
    loop {
        let (chunk, ends_line) = match reader.fill_buf().await {
            Ok([]) | Err(_) if line.is_empty() => return,
            Ok([]) | Err(_) => (std::mem::take(&mut line), true),
            Ok(buf) => {
                let room = MAX_CHUNK - line.len();
                let newline = buf.iter().take(room).position(|&b| b == b'\n');
                let take = newline.map_or(buf.len().min(room), |i| i + 1);
                line.extend_from_slice(&buf[..take]);
                reader.consume(take);
                if newline.is_none() && line.len() < MAX_CHUNK {
                    continue;
                }
                (std::mem::take(&mut line), newline.is_some())
            }
        };
        let whole = ends_line && long_line.is_empty() && !long_line_too_long;
        if let Some(events) = events.as_deref().filter(|_| !whole) {
            if long_line.len() + chunk.len() <= MAX_EVENT_LINE {
                long_line.extend_from_slice(&chunk);
            } else {
                long_line.clear();
                long_line_too_long = true;
            }
            if ends_line {
                if !long_line_too_long {
                    events.observe(&long_line);
                }
                long_line.clear();
                long_line_too_long = false;
            }
        }
        let kind = match events.as_deref() {
            Some(events) if whole && events.observe(&chunk) => OutputKind::Event,
            _ => plain,
        };
        let joins = whole && kind == gathered_kind && gathered.len() + chunk.len() <= MAX_CHUNK;
        if joins {
            gathered.extend_from_slice(&chunk);
        } else {
            if !send_gathered(&mut gathered, gathered_kind, &sink, &collected).await {
                return;
            }
            if whole {
                (gathered, gathered_kind) = (chunk, kind);
            } else if !send_chunk(chunk, kind, &sink, &collected).await {
                return;
            }
        }
        // Send what is gathered unless the next line is already read.
        if !reader.buffer().contains(&b'\n')
            && !send_gathered(&mut gathered, gathered_kind, &sink, &collected).await
        {
            return;
        }
    }
}

/// Sends the lines gathered, if any, leaving `gathered` empty. Returns
/// false once the receiver is gone.
async fn send_gathered(
    gathered: &mut Vec<u8>,
    kind: OutputKind,
    sink: &Sink,
    collected: &std::sync::Mutex<Collected>,
) -> bool {
    gathered.is_empty() || send_chunk(std::mem::take(gathered), kind, sink, collected).await
}

/// Sends one chunk of `kind`. Returns false once the receiver is gone.
async fn send_chunk(
    chunk: Vec<u8>,
    kind: OutputKind,
    sink: &Sink,
    collected: &std::sync::Mutex<Collected>,
) -> bool {
    // One lock per chunk for the bookkeeping before the send.
    if let Ok(mut c) = collected.lock() {
        if kind != OutputKind::Event {
            // The chunk's last lines are enough for the tail.
            let lines: Vec<&[u8]> = chunk.split_inclusive(|&b| b == b'\n').collect();
            for line in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
                c.tail.push_back(String::from_utf8_lossy(line).into_owned());
            }
            let excess = c.tail.len().saturating_sub(TAIL_LINES);
            c.tail.drain(..excess);
        }
        if c.group_gone {
            c.after_group += chunk.len();
        }
        c.sending += 1;
    }
    let sent = sink
        .events
        .send(ChildEvent::Output {
            task: sink.task,
            attempt: sink.attempt,
            kind,
            data: Arc::from(chunk),
        })
        .await
        .is_ok();
    if let Ok(mut c) = collected.lock() {
        c.sending = c.sending.saturating_sub(1);
    }
    sent
}

/// TERM to the group, then KILL after `grace` if the leader still runs.
async fn terminate_group(pgid: Option<i32>, child: &mut tokio::process::Child, grace: Duration) {
    signal_group(pgid, Signal::TERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, Signal::KILL);
        let _ = child.wait().await;
    }
}

/// Signals every process of the group a child leads (its grandchildren too).
fn signal_group(pgid: Option<i32>, signal: Signal) {
    if let Some(pid) = pgid.filter(|&p| p > 1).and_then(Pid::from_raw) {
        // The group may be gone already: nothing to do then.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// The parent-death signal: the kernel sends SIGTERM to the child when the
/// agent's thread that spawned it ends (tokio's worker threads live as long
/// as the runtime, so in practice: when the agent dies, even by SIGKILL).
/// It reaches the group's leader only; the grandchildren of a killed agent
/// are ended at its next start (see [`end_orphans`]).
#[allow(unsafe_code)]
fn die_with_the_agent(cmd: &mut Command) {
    let agent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two raw system calls
    // (prctl(PR_SET_PDEATHSIG), getppid) through rustix, which allocate
    // nothing and take no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
            // The agent died between fork and prctl: the signal never comes.
            if rustix::process::getppid() != Some(agent) {
                return Err(std::io::Error::other("the agent is gone"));
            }
            Ok(())
        });
    }
}

/// The environment variable holding a run's token: inherited by the whole
/// process tree, it tells the agent's own children from strangers.
const RUN_TOKEN_VAR: &str = "CCC_AGENT_RUN";

/// The process groups of running children, one file each in a directory of
/// the data dir: `<pgid>` holding the leader's start time and the run's
/// token. A file is removed once its group is gone.
#[derive(Clone, Debug)]
pub struct Registry {
    dir: std::path::PathBuf,
}

impl Registry {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("children"),
        }
    }

    /// Records a group just started; the file, or `None` if it could not be
    /// written (the parent-death signal still ends the leader).
    fn record(&self, pgid: i32, token: &str) -> Option<std::path::PathBuf> {
        let start = ProcStat::read(pgid)?.start_time;
        let file = self.dir.join(pgid.to_string());
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&file, format!("{start} {token}\n")));
        match written {
            Ok(()) => Some(file),
            Err(e) => {
                tracing::warn!(pgid, error = %e, file = %file.display(), "cannot record a child process group");
                None
            }
        }
    }
}

/// What /proc/<pid>/stat says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcStat {
    pgrp: i32,
    /// Clock ticks after boot: with the pid, it names one process for good.
    start_time: u64,
}

impl ProcStat {
    fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold anything.
        let after = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // After the name: state (3), ppid (4), pgrp (5) ... starttime (22).
        if fields.first() == Some(&"Z") {
            return None;
        }
        Some(Self {
            pgrp: fields.get(2)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }
}

/// Whether `pid` runs with our run token in its environment.
fn has_token(pid: i32, token: &str) -> bool {
    let want = format!("{RUN_TOKEN_VAR}={token}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == want.as_bytes()))
}

/// Ends what an earlier run of the agent left running: for each recorded
/// group, its leader if it is the same process (same start time), and every
/// process of the group carrying the run's token (the leader may be gone,
/// its grandchildren not). TERM, then KILL after `grace` to those still
/// there and still the same. Returns how many processes were ended.
pub async fn end_orphans(registry: &Registry, grace: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(&registry.dir) else {
        return 0;
    };
    let records: Vec<(std::path::PathBuf, i32, u64, String)> = entries
        .flatten()
        .filter_map(|e| {
            let pgid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            let (start, token) = text.trim().split_once(' ')?;
            Some((e.path(), pgid, start.parse().ok()?, token.to_owned()))
        })
        .collect();
    if records.is_empty() {
        return 0;
    }
    let running: Vec<(i32, ProcStat)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| Some((pid, ProcStat::read(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut ours: Vec<(i32, ProcStat)> = Vec::new();
    for (_, pgid, start, token) in &records {
        for &(pid, stat) in &running {
            let leader = pid == *pgid && stat.start_time == *start;
            if stat.pgrp == *pgid && (leader || has_token(pid, token)) {
                ours.push((pid, stat));
            }
        }
    }
    for &(pid, stat) in &ours {
        tracing::warn!(
            pid,
            pgid = stat.pgrp,
            "ending a process an earlier run of the agent left running"
        );
        signal_same(pid, stat, Signal::TERM);
    }
    let still_there = |list: &[(i32, ProcStat)]| {
        list.iter()
            .filter(|(pid, stat)| {
                ProcStat::read(*pid).is_some_and(|now| now.start_time == stat.start_time)
            })
            .copied()
            .collect::<Vec<_>>()
    };
    // The grace in steps of 50 ms: a count, not a clock read.
    const STEP: Duration = Duration::from_millis(50);
    let mut steps = grace.as_millis() / STEP.as_millis();
    while steps > 0 && !still_there(&ours).is_empty() {
        tokio::time::sleep(STEP).await;
        steps -= 1;
    }
    for (pid, stat) in still_there(&ours) {
        signal_same(pid, stat, Signal::KILL);
    }
    for (file, ..) in &records {
        let _ = std::fs::remove_file(file);
    }
    ours.len()
}

/// Signals `pid` if it is still the process seen (same start time).
fn signal_same(pid: i32, seen: ProcStat, signal: Signal) {
    if let (Some(now), Some(target)) = (ProcStat::read(pid), Pid::from_raw(pid))
        && now.start_time == seen.start_time
    {
        let _ = rustix::process::kill_process(target, signal);
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

    /// A sink for task t-1, attempt 1, and what it receives.
    fn sink(capacity: usize) -> (Sink, mpsc::Receiver<ChildEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        let sink = Sink {
            task: TaskId(1),
            attempt: Attempt(1),
            events: tx,
        };
        (sink, rx)
    }

    /// `sh -c script`, with a minute to run.
    fn sh(script: &str) -> Invocation {
        Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Vec::new(),
            cwd: std::env::temp_dir(),
            input: None,
            deadline: Duration::from_secs(60),
            grace: Duration::from_secs(1),
            record: None,
            events: None,
        }
    }

    /// Runs `forward` over `input` as the CLI's stdout; the chunks sent
    /// and the CLI's events it saw.
    async fn read_stdout(
        input: &[u8],
    ) -> (Vec<(OutputKind, Vec<u8>)>, Arc<crate::claude::EventWatch>) {
        let (sink, mut rx) = sink(1024);
        let collected = Arc::new(std::sync::Mutex::new(Collected::default()));
        let watch = Arc::new(crate::claude::EventWatch::default());
        let events: Arc<dyn LineEvents> = watch.clone();
        forward(
            input,
            OutputKind::Stdout,
            Some(events),
            sink,
            Arc::clone(&collected),
        )
        .await;
        let mut chunks = Vec::new();
        while let Ok(ChildEvent::Output { kind, data, .. }) = rx.try_recv() {
            chunks.push((kind, data.to_vec()));
        }
        (chunks, watch)
    }

    #[tokio::test]
    async fn output_waits_for_a_slow_driver_instead_of_being_dropped() {
        let (sink, mut rx) = sink(1);
        let inv = sh("seq 1 500");
        let run = tokio::spawn(async move {
            run_streaming(&inv, &sink, &CancellationToken::new())
                .await
                .map(|r| matches!(r.end, End::Exited(Some(s)) if s.success()))
        });
        // The driver is busy for longer than the pipes are given once the
        // process is gone.
        tokio::time::sleep(PIPE_GIVE_UP + Duration::from_secs(1)).await;
        let mut output = Vec::new();
        while let Some(event) = rx.recv().await {
            if let ChildEvent::Output { data, .. } = event {
                output.extend_from_slice(&data);
            }
        }
        assert!(matches!(run.await, Ok(Ok(true))));
        let expected: String = (1..=500).map(|i| format!("{i}\n")).collect();
        assert_eq!(
            String::from_utf8_lossy(&output),
            expected,
            "every line arrives"
        );
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_cannot_hold_the_run_open() {
        let (sink, mut rx) = sink(64);
        // `yes` in a session of its own keeps writing to the stdout it
        // inherited after the CLI and its group are gone.
        let inv = sh("setsid yes & sleep 0.2");
        let consumer = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let run = tokio::time::timeout(
            Duration::from_secs(60),
            run_streaming(&inv, &sink, &CancellationToken::new()),
        )
        .await;
        assert!(matches!(run, Ok(Ok(_))), "the run ends: {run:?}");
        drop(sink);
        let _ = consumer.await;
    }

    #[tokio::test]
    async fn lines_become_chunks_and_events_and_a_long_result_is_still_read() {
        let long_result = serde_json::json!({
            "type": "result", "subtype": "success", "is_error": false,
            "result": "x".repeat(3 * MAX_CHUNK),
        });
        let input = format!("plain\n{{\"type\":\"system\"}}\n{long_result}\ntail without newline");
        let (chunks, watch) = read_stdout(input.as_bytes()).await;

        assert_eq!(chunks[0], (OutputKind::Stdout, b"plain\n".to_vec()));
        assert_eq!(chunks[1].0, OutputKind::Event);
        let pieces: Vec<&(OutputKind, Vec<u8>)> = chunks[2..chunks.len() - 1].iter().collect();
        assert!(pieces.len() >= 3, "a long line is cut into chunks");
        assert!(
            pieces
                .iter()
                .all(|(kind, data)| *kind == OutputKind::Stdout && data.len() <= MAX_CHUNK)
        );
        let rejoined: Vec<u8> = pieces.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(
            rejoined,
            format!("{long_result}\n").into_bytes(),
            "nothing lost or added"
        );
        assert_eq!(
            chunks.last(),
            Some(&(OutputKind::Stdout, b"tail without newline".to_vec()))
        );
        assert_eq!(
            watch.take_result().map(|r| r.subtype),
            Some("success".to_owned()),
            "the result event is understood although it spans chunks"
        );
    }

    #[tokio::test]
    async fn lines_read_together_go_out_together_in_chunks_of_one_kind() {
        // 200 lines of 1 KiB, an event among them, then more plain lines.
        let plain: String = (0..200)
            .map(|i| format!("{i:04}{}\n", "x".repeat(1019)))
            .collect();
        let event = "{\"type\":\"system\",\"subtype\":\"init\"}\n";
        let input = format!("{plain}{event}{plain}");
        let (chunks, _) = read_stdout(input.as_bytes()).await;

        let rejoined: Vec<u8> = chunks.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(
            rejoined,
            input.as_bytes(),
            "nothing lost, added or reordered"
        );
        assert!(
            chunks.len() < 20,
            "400 lines read at once go out in a few chunks, not {}",
            chunks.len()
        );
        for (kind, data) in &chunks {
            assert!(data.len() <= MAX_CHUNK, "a chunk of {} bytes", data.len());
            assert!(data.ends_with(b"\n"), "chunks end at a line's end");
            assert_eq!(
                *kind == OutputKind::Event,
                data == event.as_bytes(),
                "the event is a chunk of its own kind"
            );
        }
    }

    #[tokio::test]
    async fn a_line_is_not_held_back_waiting_for_the_next() {
        let (sink, mut rx) = sink(64);
        let inv = sh("echo first; sleep 30; echo second");
        let cancel = CancellationToken::new();
        let run = {
            let cancel = cancel.clone();
            tokio::spawn(async move { run_streaming(&inv, &sink, &cancel).await })
        };
        let first = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
        assert!(
            matches!(&first, Ok(Some(ChildEvent::Output { data, .. })) if &data[..] == b"first\n"),
            "the first line arrives while the program still runs: {first:?}"
        );
        cancel.cancel();
        let _ = run.await;
    }

    #[tokio::test]
    async fn only_the_earlier_runs_own_processes_are_ended_never_a_reused_pid() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("ccc-orphans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let registry = Registry::new(&dir);
        std::fs::create_dir_all(&registry.dir).expect("dir");
        let spawn = |token: Option<&str>| {
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("60").process_group(0);
            if let Some(token) = token {
                cmd.env(RUN_TOKEN_VAR, token);
            }
            cmd.spawn().expect("sleep")
        };
        let mut stranger = spawn(None);
        let mut ours = spawn(Some("0123abcd"));
        let pid = |c: &std::process::Child| i32::try_from(c.id()).expect("pid");
        let stat = ProcStat::read(pid(&stranger)).expect("stat");
        assert_eq!(stat.pgrp, pid(&stranger), "its own group");
        // The stranger has the recorded pid but not the start time (a
        // reused pid) and not the token: it is left alone.
        std::fs::write(
            registry.dir.join(pid(&stranger).to_string()),
            format!("{} feedface\n", stat.start_time + 1),
        )
        .expect("record");
        // Ours is recognised by its start time.
        let start = ProcStat::read(pid(&ours)).expect("stat").start_time;
        std::fs::write(
            registry.dir.join(pid(&ours).to_string()),
            format!("{start} 0123abcd\n"),
        )
        .expect("record");
        let ended = end_orphans(&registry, Duration::from_secs(5)).await;
        assert_eq!(ended, 1);
        assert!(ours.wait().is_ok_and(|s| !s.success()), "ended by a signal");
        assert!(
            matches!(stranger.try_wait(), Ok(None)),
            "a reused pid is spared"
        );
        assert_eq!(
            std::fs::read_dir(&registry.dir).map(|d| d.count()).ok(),
            Some(0),
            "the records are gone"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
        let _ = std::fs::remove_dir_all(dir);
    }

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
