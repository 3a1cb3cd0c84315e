//! A simulated agent process around the real [`Session`]: the world plays
//! its driver (the stream, the clock, the commands) and its children (the
//! CLI runs, which produce output chunks over simulated time and end with a
//! report); the agent keeps its spool, which outlives the process as a disk
//! does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agent::session::{Session, SessionConfig};
use common::ids::{AgentId, Attempt, TaskId};
use common::protocol::OutputChunk;
use common::types::{AgentAdvert, FinishedReport, Outcome};
use coordinator::core::ConnId;

/// The session's timings: small, like the coordinator's in the simulation.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How an attempt will go, drawn by the world when the agent starts it.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkPlan {
    /// Output chunks the CLI run produces before it ends.
    pub chunks: u64,
    /// How the run ends (unless it is stopped first).
    pub outcome: Outcome,
}

/// A simulated CLI run of one attempt.
#[derive(Debug)]
pub(super) struct Child {
    pub attempt: Attempt,
    pub plan: WorkPlan,
    /// Chunks produced so far: seqs `1..=produced`.
    pub produced: u64,
    /// The session asked for the run to stop: it ends at its next step.
    pub stopping: bool,
}

/// What the spool holds of one attempt: its output and, once it ended,
/// its result.
#[derive(Debug, Default)]
pub(super) struct Spooled {
    pub chunks: Vec<OutputChunk>,
    pub result: Option<FinishedReport>,
}

/// The bytes of one output chunk, derived from its coordinates so the store
/// can be checked without remembering what was sent. Lengths vary so the
/// output cap is reached now and then.
pub(super) fn chunk_data(task: TaskId, attempt: Attempt, seq: u64) -> Arc<[u8]> {
    let line = format!("task {task} attempt {attempt} chunk {seq}\n");
    let padding = usize::try_from((task.0 * 31 + u64::from(attempt.0) * 7 + seq * 13) % 120)
        .expect("a small number");
    let mut bytes = line.into_bytes();
    bytes.resize(bytes.len() + padding, b'.');
    Arc::from(bytes)
}

#[derive(Debug)]
pub(super) struct SimAgent {
    pub id: AgentId,
    pub advert: AgentAdvert,
    /// Bumped whenever the process ends, so its timers and children's
    /// steps are ignored afterwards.
    pub incarnation: u32,
    /// The running process's session; `None` while the process is down.
    pub session: Option<Session>,
    /// The stream the agent believes it is on.
    pub link: Option<ConnId>,
    pub children: BTreeMap<TaskId, Child>,
    /// On disk: survives the process.
    pub spool: BTreeMap<(TaskId, Attempt), Spooled>,
    /// The coordinator refused it (revoked): it stays down until an admin
    /// lets it back in and it is started again.
    pub refused: bool,
}

impl SimAgent {
    pub fn new(id: AgentId, advert: AgentAdvert) -> Self {
        Self {
            id,
            advert,
            incarnation: 0,
            session: None,
            link: None,
            children: BTreeMap::new(),
            spool: BTreeMap::new(),
            refused: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.session.is_some()
    }

    /// The process starts, as the real agent does: attempts an earlier run
    /// finished come back from the spool; the rest of the spool is removed
    /// (those processes died with the earlier run).
    pub fn start(&mut self) {
        self.spool.retain(|_, spooled| spooled.result.is_some());
        let mut session = Session::new(SessionConfig {
            advert: self.advert.clone(),
            welcome_timeout: WELCOME_TIMEOUT,
            health_check_interval: HEALTH_CHECK_INTERVAL,
            stop_grace: STOP_GRACE,
        });
        for (&(task, attempt), spooled) in &self.spool {
            let report = spooled.result.clone().expect("kept above: it has one");
            let unacked = spooled
                .chunks
                .iter()
                .map(|c| (c.seq, c.data.len()))
                .collect();
            session.restore_finished(task, attempt, report, unacked);
        }
        self.session = Some(session);
    }

    /// The process ends (a crash, a refusal, the end of a stop): its
    /// children die with it; the spool stays.
    pub fn end(&mut self) {
        self.incarnation += 1;
        self.session = None;
        self.link = None;
        self.children.clear();
    }

    /// Nothing running, nothing owed, nothing spooled.
    pub fn is_idle(&self) -> bool {
        self.session.as_ref().is_some_and(Session::is_idle) && self.children.is_empty()
    }
}

/// What a simulated run reports at its end.
pub(super) fn report(outcome: Outcome, message: &str, last_output_seq: u64) -> FinishedReport {
    FinishedReport {
        last_output_seq,
        ..FinishedReport::new(outcome, message)
    }
}
