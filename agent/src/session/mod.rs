//! The agent's pure core: which tasks it holds, what it owes the coordinator
//! (output not yet acknowledged, results not yet acknowledged) and what it
//! must do (start or stop a child process). No I/O, no clock, no async: the
//! driver feeds it events and sends what `poll_outbound` returns.
//!
//! Invariants: output of an attempt carries seq 1, 2, 3... with no gap;
//! a chunk stays owed (its bytes in the driver's on-disk spool, its seq and
//! size here) until the coordinator acknowledges it, so a reconnect resends
//! exactly what the coordinator lacks, in order, before the attempt's
//! result; an attempt is forgotten only when the coordinator acknowledges
//! its result or tells the agent to cancel it. Nothing but Hello goes on a
//! new stream until the coordinator's Welcome: a result sent earlier could
//! overtake the resend of output the coordinator lacks, and an attempt is
//! closed as soon as its result is stored.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{FinishedReport, Outcome, OutputKind, Phase, PushCredential, TaskSpec};
use tracing::{debug, info, warn};

#[cfg(test)]
mod tests;

/// A message for the coordinator.
#[derive(Clone, Debug, PartialEq)]
pub enum ToCoordinator {
    Hello {
        running: Vec<Held>,
        /// Empty when the agent can work.
        unhealthy_reason: String,
    },
    Heartbeat {
        running: Vec<Held>,
        free_slots: u32,
        unhealthy_reason: String,
    },
    Accepted {
        task: TaskId,
        attempt: Attempt,
    },
    Rejected {
        task: TaskId,
        attempt: Attempt,
        reason: String,
    },
    Output(Chunk),
    /// Resend, from the spool, the attempt's chunks after `after`.
    Resend {
        task: TaskId,
        attempt: Attempt,
        after: u64,
    },
    Progress {
        task: TaskId,
        attempt: Attempt,
        phase: Phase,
    },
    Finished {
        task: TaskId,
        attempt: Attempt,
        report: Box<FinishedReport>,
    },
    Draining {
        reason: String,
    },
}

/// A task the agent holds, as listed in Hello and Heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub task: TaskId,
    pub attempt: Attempt,
    pub last_output_seq: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub task: TaskId,
    pub attempt: Attempt,
    pub seq: u64,
    pub kind: OutputKind,
    pub data: Arc<[u8]>,
}

/// Work for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Start {
        task: TaskId,
        attempt: Attempt,
        spec: Box<TaskSpec>,
        deadline: UnixMillis,
        /// Held only until the attempt's process has it; never persisted.
        credential: Option<PushCredential>,
    },
    Stop {
        task: TaskId,
        attempt: Attempt,
    },
    /// The attempt is over for good: drop its spooled output.
    Forget {
        task: TaskId,
        attempt: Attempt,
    },
}

#[derive(Debug)]
struct Work {
    attempt: Attempt,
    /// The last seq given to a chunk.
    last_seq: u64,
    /// Seq and size of each chunk not yet acknowledged.
    unacked: VecDeque<(u64, usize)>,
    unacked_bytes: usize,
    /// Set once the child process has ended.
    result: Option<FinishedReport>,
    stop_requested: bool,
}

pub struct Session {
    capacity: u32,
    work: BTreeMap<TaskId, Work>,
    /// A stream is open and the coordinator has answered its Hello.
    welcomed: bool,
    draining: bool,
    /// Why the agent is stopping, once it is: said again on each new stream.
    shutting_down: Option<String>,
    /// Why this PC cannot work (its CLI is missing, not logged in, ...):
    /// said in Hello and every Heartbeat until a check passes.
    unhealthy: Option<String>,
    outbound: VecDeque<ToCoordinator>,
    commands: VecDeque<Command>,
}

impl Session {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            work: BTreeMap::new(),
            welcomed: false,
            draining: false,
            shutting_down: None,
            unhealthy: None,
            outbound: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }

    // ---- getters ----

    pub fn held(&self) -> Vec<Held> {
        self.work
            .iter()
            .map(|(task, w)| Held {
                task: *task,
                attempt: w.attempt,
                last_output_seq: w.last_seq,
            })
            .collect()
    }

    /// Slots not taken by a running attempt; an attempt whose result waits
    /// for its acknowledgement no longer takes one.
    pub fn free_slots(&self) -> u32 {
        let running = self.work.values().filter(|w| w.result.is_none()).count();
        self.capacity
            .saturating_sub(u32::try_from(running).unwrap_or(u32::MAX))
    }

    /// Output bytes waiting for acknowledgement, all tasks.
    pub fn unacked_bytes(&self) -> usize {
        self.work.values().map(|w| w.unacked_bytes).sum()
    }

    pub fn is_idle(&self) -> bool {
        self.work.is_empty()
    }

    /// Why this PC cannot work, while it cannot.
    pub fn unhealthy_reason(&self) -> Option<&str> {
        self.unhealthy.as_deref()
    }

    /// Takes back an attempt an earlier run of the agent finished but had
    /// not handed over: Hello lists it, and after Welcome its missing output
    /// and its result are sent again.
    pub fn restore_finished(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        report: FinishedReport,
        unacked: Vec<(u64, usize)>,
    ) {
        info!(task_id = %task, attempt = attempt.0, outcome = %report.outcome, "result of an earlier run to hand over");
        self.work.insert(
            task,
            Work {
                attempt,
                last_seq: report.last_output_seq,
                unacked_bytes: unacked.iter().map(|(_, size)| size).sum(),
                unacked: unacked.into(),
                result: Some(report),
                stop_requested: false,
            },
        );
    }

    // ---- the link ----

    /// A new stream is open: Hello goes first, and alone until Welcome.
    pub fn handle_connected(&mut self) {
        self.welcomed = false;
        // A coordinator's drain lasts for the stream it was sent on.
        self.draining = self.shutting_down.is_some();
        self.outbound.clear();
        self.outbound.push_back(ToCoordinator::Hello {
            running: self.held(),
            unhealthy_reason: self.unhealthy.clone().unwrap_or_default(),
        });
    }

    /// The coordinator answered Hello: `held` lists the tasks it still
    /// considers ours with the highest seq it persisted. Everything after is
    /// resent, then any result; tasks it does not list are dropped (it sends
    /// a Cancel for them too).
    pub fn handle_welcome(&mut self, held: &[(TaskId, Attempt, u64)]) {
        self.welcomed = true;
        if let Some(reason) = self.shutting_down.clone() {
            self.outbound.push_back(ToCoordinator::Draining { reason });
        }
        let mine: Vec<TaskId> = self.work.keys().copied().collect();
        for task in mine {
            let Some(&(_, attempt, acked)) = held.iter().find(|(t, _, _)| *t == task) else {
                continue; // The Cancel that follows drops it.
            };
            let Some(work) = self.work.get_mut(&task) else {
                continue;
            };
            if work.attempt != attempt {
                continue;
            }
            trim(work, acked);
            if !work.unacked.is_empty() {
                self.outbound.push_back(ToCoordinator::Resend {
                    task,
                    attempt,
                    after: acked,
                });
            }
            if let Some(report) = &work.result {
                self.outbound.push_back(ToCoordinator::Finished {
                    task,
                    attempt,
                    report: Box::new(report.clone()),
                });
            }
        }
    }

    pub fn handle_disconnected(&mut self) {
        self.welcomed = false;
        self.outbound.clear();
    }

    pub fn heartbeat(&mut self) {
        if self.welcomed {
            self.outbound.push_back(ToCoordinator::Heartbeat {
                running: self.held(),
                free_slots: self.free_slots(),
                unhealthy_reason: self.unhealthy.clone().unwrap_or_default(),
            });
        }
    }

    // ---- health ----

    /// The result of a check of this PC (at start, or again while
    /// unhealthy), or a failure that was the PC's fault: `Some(reason)`
    /// while it cannot work, `None` once it can. A change is told to the
    /// coordinator at once, in a heartbeat.
    pub fn handle_health(&mut self, reason: Option<String>) {
        let reason = reason.map(|r| one_short_line(&r));
        if self.unhealthy == reason {
            return;
        }
        match &reason {
            Some(why) => {
                warn!(reason = %why, "this PC cannot work: unhealthy until a check passes")
            }
            None => info!("the health check passed: this PC can work again"),
        }
        self.unhealthy = reason;
        self.heartbeat();
    }

    // ---- the coordinator ----

    pub fn handle_assign(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        spec: TaskSpec,
        deadline: UnixMillis,
        credential: Option<PushCredential>,
    ) {
        let refuse = if self.draining {
            Some("the agent is draining".to_owned())
        } else if let Some(work) = self.work.get(&task) {
            Some(format!(
                "already holds attempt {} of this task",
                work.attempt
            ))
        } else if self.free_slots() == 0 {
            Some(format!("all {} slots are busy", self.capacity))
        } else {
            None
        };
        if let Some(reason) = refuse {
            warn!(task_id = %task, attempt = attempt.0, %reason, "refusing assignment");
            self.send(ToCoordinator::Rejected {
                task,
                attempt,
                reason,
            });
            return;
        }
        info!(task_id = %task, attempt = attempt.0, "task accepted");
        self.work.insert(
            task,
            Work {
                attempt,
                last_seq: 0,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                result: None,
                stop_requested: false,
            },
        );
        self.send(ToCoordinator::Accepted { task, attempt });
        self.commands.push_back(Command::Start {
            task,
            attempt,
            spec: Box::new(spec),
            deadline,
            credential,
        });
    }

    pub fn handle_cancel(&mut self, task: TaskId, attempt: Attempt, reason: &str) {
        let Some(work) = self.work.get_mut(&task) else {
            return;
        };
        if work.attempt != attempt {
            return;
        }
        info!(task_id = %task, attempt = attempt.0, %reason, "cancel received");
        // The coordinator has closed the attempt: it acknowledges none of its
        // output any more, which must not count against the unacked bound.
        trim(work, u64::MAX);
        if work.result.is_some() {
            // Already over: nothing to stop, nothing more to report.
            self.forget(task, attempt);
        } else if !work.stop_requested {
            work.stop_requested = true;
            self.commands.push_back(Command::Stop { task, attempt });
        }
    }

    pub fn handle_output_ack(&mut self, task: TaskId, attempt: Attempt, seq: u64) {
        if let Some(work) = self.work.get_mut(&task)
            && work.attempt == attempt
        {
            trim(work, seq);
        }
    }

    pub fn handle_finished_ack(&mut self, task: TaskId, attempt: Attempt) {
        if self
            .work
            .get(&task)
            .is_some_and(|w| w.attempt == attempt && w.result.is_some())
        {
            debug!(task_id = %task, attempt = attempt.0, "result acknowledged; attempt forgotten");
            self.forget(task, attempt);
        }
    }

    pub fn handle_drain(&mut self) {
        self.draining = true;
    }

    /// The agent is stopping: tell the coordinator and take no more work.
    pub fn begin_shutdown(&mut self, reason: &str) {
        self.draining = true;
        self.shutting_down = Some(reason.to_owned());
        self.send(ToCoordinator::Draining {
            reason: reason.to_owned(),
        });
    }

    // ---- the child processes ----

    /// A chunk of the child's output (a line, or part of a long one). It
    /// gets the next seq; the driver must spool the returned chunk before it
    /// sends anything.
    pub fn handle_child_output(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        kind: OutputKind,
        data: Arc<[u8]>,
    ) -> Option<Chunk> {
        let work = self.work.get_mut(&task)?;
        if work.attempt != attempt || work.result.is_some() || work.stop_requested {
            return None;
        }
        work.last_seq += 1;
        let chunk = Chunk {
            task,
            attempt,
            seq: work.last_seq,
            kind,
            data,
        };
        work.unacked_bytes += chunk.data.len();
        work.unacked.push_back((chunk.seq, chunk.data.len()));
        self.send(ToCoordinator::Output(chunk.clone()));
        Some(chunk)
    }

    fn forget(&mut self, task: TaskId, attempt: Attempt) {
        self.work.remove(&task);
        self.commands.push_back(Command::Forget { task, attempt });
    }

    pub fn handle_progress(&mut self, task: TaskId, attempt: Attempt, phase: Phase) {
        if self.work.get(&task).is_some_and(|w| w.attempt == attempt) {
            self.send(ToCoordinator::Progress {
                task,
                attempt,
                phase,
            });
        }
    }

    /// The attempt's work ended with `report`. A stop the coordinator asked
    /// for is reported as cancelled, whatever the process said. Returns the
    /// result as it will be reported, for the driver to keep on disk until
    /// the coordinator acknowledges it.
    pub fn handle_child_exit(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        mut report: FinishedReport,
    ) -> Option<FinishedReport> {
        let shutting_down = self.shutting_down.clone();
        let work = self.work.get_mut(&task)?;
        if work.attempt != attempt || work.result.is_some() {
            return None;
        }
        if work.stop_requested {
            report.outcome = Outcome::Cancelled;
            report.message = "cancelled on the coordinator's request".into();
        } else if let Some(reason) = &shutting_down
            && report.outcome == Outcome::Cancelled
        {
            // Not the task's fault: the coordinator queues it again without
            // spending the attempt.
            report.message = format!("handed back: {reason}");
        }
        report.last_output_seq = work.last_seq;
        let fault = (report.outcome == Outcome::AgentFault).then(|| report.message.clone());
        info!(task_id = %task, attempt = attempt.0, outcome = %report.outcome, "attempt over");
        work.result = Some(report.clone());
        self.send(ToCoordinator::Finished {
            task,
            attempt,
            report: Box::new(report.clone()),
        });
        if fault.is_some() {
            self.handle_health(fault);
        }
        Some(report)
    }

    // ---- outputs ----

    pub fn poll_outbound(&mut self) -> Option<ToCoordinator> {
        self.outbound.pop_front()
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    fn send(&mut self, msg: ToCoordinator) {
        // Until Welcome everything stays in the per-task buffers and is
        // resent after it; nothing is queued for a stream that is gone.
        if self.welcomed {
            self.outbound.push_back(msg);
        }
    }
}

/// A reason as the coordinator accepts it: one line (control characters
/// become spaces), at most `wire::MAX_SHORT_STRING` bytes, cut on a char
/// boundary with an ellipsis.
fn one_short_line(text: &str) -> String {
    let max = common::wire::MAX_SHORT_STRING;
    let line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() <= max {
        return line;
    }
    let mut end = max - '…'.len_utf8();
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Drops chunks the coordinator has persisted.
fn trim(work: &mut Work, acked: u64) {
    while work.unacked.front().is_some_and(|(seq, _)| *seq <= acked) {
        if let Some((_, len)) = work.unacked.pop_front() {
            work.unacked_bytes -= len;
        }
    }
}
