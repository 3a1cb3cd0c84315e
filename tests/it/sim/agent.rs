//! A simulated agent: the protocol behaviour of a real agent PC, without
//! processes, git or Claude. It holds attempts, produces numbered output
//! chunks over simulated time, keeps what the coordinator has not yet
//! acknowledged and resends it after a reconnect, exactly as the protocol
//! asks. Timers and the network belong to the world; the agent only turns
//! messages into messages.

use std::collections::BTreeMap;
use std::sync::Arc;

use common::ids::{AgentId, Attempt, TaskId};
use common::types::{AgentAdvert, FinishedReport, Outcome, OutputKind, Phase};
use coordinator::core::{ConnId, FromAgent, ReportedTask};

/// How an attempt will go, drawn by the world when the agent accepts it.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkPlan {
    /// Output chunks the attempt produces before it ends.
    pub chunks: u64,
    /// What the agent reports at the end.
    pub outcome: Outcome,
}

/// An attempt the agent holds: running, or finished and not yet
/// acknowledged by the coordinator.
#[derive(Debug)]
struct HeldAttempt {
    attempt: Attempt,
    plan: WorkPlan,
    /// Chunks produced so far: seqs `1..=produced`.
    produced: u64,
    /// Highest seq the coordinator acknowledged; later chunks are kept.
    acked: u64,
    /// Set once the attempt ended; kept until `FinishedAck`.
    result: Option<FinishedReport>,
}

impl HeldAttempt {
    fn is_running(&self) -> bool {
        self.result.is_none()
    }

    fn output(&self, task: TaskId, seq: u64) -> FromAgent {
        FromAgent::Output {
            task,
            attempt: self.attempt,
            seq,
            kind: OutputKind::Stdout,
            data: chunk_data(task, self.attempt, seq),
        }
    }

    fn finished(&self, task: TaskId) -> Option<FromAgent> {
        self.result.clone().map(|report| FromAgent::Finished {
            task,
            attempt: self.attempt,
            report,
        })
    }
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

/// What one step of work did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WorkStep {
    /// Produced output; more work follows.
    Chunk,
    /// The attempt ended.
    Finished,
    /// The attempt is no longer running here (cancelled, dropped, replaced).
    Stale,
}

#[derive(Debug)]
pub(super) struct SimAgent {
    pub id: AgentId,
    pub advert: AgentAdvert,
    /// Bumped by every crash, so timers of a former life are ignored.
    pub incarnation: u32,
    /// False while crashed.
    pub up: bool,
    /// The stream the agent believes it is on.
    pub link: Option<ConnId>,
    /// `Welcome` arrived on `link`: the agent may report now.
    pub welcomed: bool,
    /// The heartbeat interval the coordinator asked for in `Welcome`.
    pub heartbeat_ms: u64,
    held: BTreeMap<TaskId, HeldAttempt>,
}

impl SimAgent {
    pub fn new(id: AgentId, advert: AgentAdvert) -> Self {
        Self {
            id,
            advert,
            incarnation: 0,
            up: true,
            link: None,
            welcomed: false,
            heartbeat_ms: 0,
            held: BTreeMap::new(),
        }
    }

    fn running(&self) -> u32 {
        let n = self.held.values().filter(|h| h.is_running()).count();
        u32::try_from(n).expect("a handful of attempts")
    }

    fn reported(&self) -> Vec<ReportedTask> {
        self.held
            .iter()
            .map(|(task, h)| ReportedTask {
                task: *task,
                attempt: h.attempt,
                last_output_seq: h.produced,
            })
            .collect()
    }

    /// Everything is lost; the world restarts the agent later.
    pub fn crash(&mut self) {
        self.incarnation += 1;
        self.up = false;
        self.link = None;
        self.welcomed = false;
        self.held.clear();
    }

    /// The stream is gone; held attempts survive for the next session.
    pub fn lose_link(&mut self) {
        self.link = None;
        self.welcomed = false;
    }

    pub fn hello(&self) -> FromAgent {
        FromAgent::Hello {
            advert: self.advert.clone(),
            running: self.reported(),
            unhealthy: None,
        }
    }

    pub fn heartbeat(&self) -> FromAgent {
        FromAgent::Heartbeat {
            free_slots: self.advert.capacity.saturating_sub(self.running()),
            running: self.reported(),
            unhealthy: None,
        }
    }

    /// `Welcome.held` says what the coordinator still wants from each held
    /// attempt: the output after a seq, then the result. Anything else is
    /// dropped (a `Cancel` for it follows).
    pub fn on_welcome(&mut self, wanted: &[(TaskId, Attempt, u64)], out: &mut Vec<FromAgent>) {
        self.welcomed = true;
        self.held
            .retain(|task, h| wanted.iter().any(|(t, a, _)| t == task && *a == h.attempt));
        for (task, attempt, persisted) in wanted {
            let Some(h) = self.held.get(task).filter(|h| h.attempt == *attempt) else {
                continue;
            };
            if *persisted != u64::MAX {
                // Acknowledged chunks are gone: they cannot be resent.
                let from = persisted.max(&h.acked) + 1;
                out.extend((from..=h.produced).map(|seq| h.output(*task, seq)));
            }
            out.extend(h.finished(*task));
        }
    }

    /// Takes an assignment if a slot is free (accepts it and says it
    /// started), else rejects it. A newer attempt of a task replaces an
    /// older one still held. Returns whether it was taken.
    pub fn on_assign(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        plan: WorkPlan,
        out: &mut Vec<FromAgent>,
    ) -> bool {
        let replaces_running = self.held.get(&task).is_some_and(HeldAttempt::is_running);
        let taken = self.running() - u32::from(replaces_running);
        let refusal = if self.held.get(&task).is_some_and(|h| h.attempt >= attempt) {
            Some("already holds this attempt or a newer one")
        } else if taken >= self.advert.capacity {
            Some("no free slot")
        } else {
            None
        };
        if let Some(reason) = refusal {
            out.push(FromAgent::Rejected {
                task,
                attempt,
                reason: reason.into(),
            });
            return false;
        }
        self.held.insert(
            task,
            HeldAttempt {
                attempt,
                plan,
                produced: 0,
                acked: 0,
                result: None,
            },
        );
        out.push(FromAgent::Accepted { task, attempt });
        out.push(FromAgent::Progress {
            task,
            attempt,
            phase: Phase::RunningClaude,
        });
        true
    }

    /// Stops a running attempt and reports it cancelled; a finished one
    /// whose result the coordinator no longer wants is dropped.
    pub fn on_cancel(&mut self, task: TaskId, attempt: Attempt, out: &mut Vec<FromAgent>) {
        let Some(h) = self.held.get_mut(&task).filter(|h| h.attempt == attempt) else {
            return;
        };
        if h.is_running() {
            h.result = Some(report(Outcome::Cancelled, h.produced));
            out.extend(h.finished(task));
        } else {
            self.held.remove(&task);
        }
    }

    pub fn on_output_ack(&mut self, task: TaskId, attempt: Attempt, seq: u64) {
        if let Some(h) = self.held.get_mut(&task).filter(|h| h.attempt == attempt) {
            h.acked = h.acked.max(seq.min(h.produced));
        }
    }

    pub fn on_finished_ack(&mut self, task: TaskId, attempt: Attempt) {
        if self
            .held
            .get(&task)
            .is_some_and(|h| h.attempt == attempt && !h.is_running())
        {
            self.held.remove(&task);
        }
    }

    /// One step of work on a running attempt: up to `burst` more chunks,
    /// and the end once all are out.
    pub fn work(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        burst: u64,
        out: &mut Vec<FromAgent>,
    ) -> WorkStep {
        let Some(h) = self
            .held
            .get_mut(&task)
            .filter(|h| h.attempt == attempt && h.is_running())
        else {
            return WorkStep::Stale;
        };
        let until = (h.produced + burst).min(h.plan.chunks);
        out.extend((h.produced + 1..=until).map(|seq| h.output(task, seq)));
        h.produced = until;
        if h.produced < h.plan.chunks {
            return WorkStep::Chunk;
        }
        h.result = Some(report(h.plan.outcome, h.produced));
        out.extend(h.finished(task));
        WorkStep::Finished
    }
}

fn report(outcome: Outcome, last_output_seq: u64) -> FinishedReport {
    FinishedReport {
        last_output_seq,
        ..FinishedReport::new(outcome, format!("simulated {outcome}"))
    }
}
