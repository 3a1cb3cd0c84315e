//! The task lifecycle: submission, assignment, acceptance, output, leases,
//! the end of an attempt and what follows it (retry with backoff, or a
//! terminal state), cancellation and manual retry.
//!
//! `Queued → Assigned → Running → (Finishing) → Succeeded | Failed | Cancelled`,
//! with `Failed → Queued` while attempts remain. Every report names its
//! `(task, attempt)`; a report of anything but the task's live attempt, from
//! anyone but that attempt's agent, is dropped and its sender told to cancel
//! (fencing).

use common::protocol::OutputChunk;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ids::{AgentId, Attempt, TaskId};
use common::protocol::PushAuth;
use common::time::UnixMillis;
use common::types::{FinishedReport, Outcome, OutputKind, Phase, TaskSpec};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::queue::Queued;
use super::{Action, Core, TaskEvent, ToAgent, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Triage found nothing to act on: the task waits for its issue to say
    /// more (a `/claude` comment runs it anyway).
    NeedsInfo,
    Queued,
    Assigned,
    Running,
    /// The agent is done; the coordinator's follow-up effects are pending.
    Finishing,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// An attempt is live: an agent holds it and its slot is taken.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NeedsInfo => "needs_info",
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Finishing => "finishing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where a task came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TaskSource {
    Manual {
        submitted_by: String,
    },
    /// An issue: a webhook delivery, a `/claude` comment, or the reconciler.
    Github {
        /// `owner/name` as GitHub spells it.
        repo: String,
        #[serde(default)]
        issue: u64,
        #[serde(default)]
        url: String,
        #[serde(default)]
        author: String,
        #[serde(default)]
        labels: Vec<String>,
        /// The `X-GitHub-Delivery` that created it; empty when the
        /// reconciler found the issue.
        #[serde(default)]
        delivery: String,
    },
}

impl TaskSource {
    /// The issue a task comes from, as (repository, number).
    pub fn issue(&self) -> Option<(&str, u64)> {
        match self {
            Self::Github { repo, issue, .. } if *issue > 0 => Some((repo.as_str(), *issue)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: Attempt,
    pub agent: AgentId,
    pub assigned_at: UnixMillis,
    pub accepted_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub outcome: Option<Outcome>,
    /// A sentence a person understands: why it ended like this.
    pub message: String,
    /// Why the scheduler chose this agent.
    pub placement: String,
    pub phase: Option<Phase>,
    pub report: Option<FinishedReport>,
}

/// A task as persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub source: TaskSource,
    pub spec: TaskSpec,
    /// Higher runs first.
    pub priority: i32,
    pub state: TaskState,
    /// Why the task is in its state, for people.
    pub state_reason: String,
    pub attempts: Vec<AttemptRecord>,
    /// Attempts that may count against the task before it fails for good.
    pub max_attempts: u32,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// When the task entered the queue last.
    pub queued_at: UnixMillis,
    /// A queued task waits until then (retry backoff, rate limit).
    pub not_before: Option<UnixMillis>,
    pub cancel_requested: Option<String>,
    /// The first attempt whose output counts against the task's output cap:
    /// an admin's retry starts a fresh budget, as it starts a fresh count of
    /// attempts. Kept so that a restart restores the same budget.
    #[serde(default = "every_attempt")]
    pub output_since: Attempt,
    /// Why a queued task is not placed yet, filled by the driver in answers
    /// to admins from `Core::waiting_reason`; never set in the core's own
    /// copy and never persisted (it changes as agents come and go).
    #[serde(skip)]
    pub waiting_reason: Option<String>,
    /// The GitHub writes still owed, in words; filled like
    /// `waiting_reason`, never persisted.
    #[serde(skip)]
    pub pending_effects: Vec<String>,
    /// What triage read in the issue (tasks from before triage have none).
    #[serde(default)]
    pub triage: Option<TaskTriage>,
    /// What GitHub knows of the task (its status comment, its pull
    /// request); none for manual tasks.
    #[serde(default)]
    pub github: Option<super::outbox::GithubState>,
}

/// A task's triage, and whether its specialty came from the submitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskTriage {
    pub result: crate::triage::Triage,
    /// The submitter named the specialty; triage only informed.
    pub specialty_given: bool,
}

/// Records written before `output_since` existed: every attempt counts.
fn every_attempt() -> Attempt {
    Attempt(0)
}

impl Task {
    pub fn current(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }

    fn current_mut(&mut self) -> Option<&mut AttemptRecord> {
        self.attempts.last_mut()
    }

    /// The latest attempt's number, 0 before the first: what every log line
    /// about the task carries as `attempt`.
    pub fn attempt_number(&self) -> u32 {
        self.current().map_or(0, |a| a.attempt.0)
    }

    pub fn next_attempt(&self) -> Attempt {
        Attempt(self.current().map_or(1, |a| a.attempt.0 + 1))
    }

    /// Attempts that count against `max_attempts`: a rate limit, a
    /// cancelled attempt that nobody asked to cancel (agent shutting down)
    /// or a PC that could not work is not the task's fault.
    pub fn counted_attempts(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|a| {
                !matches!(
                    a.outcome,
                    Some(Outcome::RateLimited | Outcome::Cancelled | Outcome::AgentFault)
                )
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The live attempt on `agent`, if `(attempt, agent)` names it.
    fn is_live_attempt(&self, attempt: Attempt, agent: &AgentId) -> bool {
        self.state.is_live()
            && self
                .current()
                .is_some_and(|a| a.attempt == attempt && &a.agent == agent)
    }
}

/// What an admin (or, later, a webhook) submits.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub source: TaskSource,
    pub spec: TaskSpec,
    pub priority: i32,
    pub triage: Option<TaskTriage>,
    /// Start in `NeedsInfo` instead of the queue (an unclear issue).
    pub needs_info: bool,
}

/// What the coordinator tracks of a live attempt, in memory only.
#[derive(Clone, Debug)]
pub(super) struct LiveAttempt {
    pub(super) lease_deadline: Instant,
    /// Set while `Assigned`: the agent must accept before then.
    pub(super) accept_deadline: Option<Instant>,
    /// Highest contiguous output seq persisted.
    pub(super) acked: u64,
}

/// How much output a task has stored, all attempts together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct OutputBudget {
    pub(super) stored_bytes: u64,
    pub(super) truncated: bool,
}

/// Where the store says a task's output stands (for restarts): the last
/// seq of its current attempt, and the bytes of the attempts from
/// `Task::output_since` on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputPosition {
    pub last_seq: u64,
    pub stored_bytes: u64,
    pub truncated: bool,
}

/// Why an admin request on a task could not be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    Unknown(TaskId),
    AlreadyFinished(TaskId, TaskState),
    NotFinished(TaskId, TaskState),
}

/// What a finished attempt means for its task.
enum Disposition {
    Terminal(TaskState),
    /// Queue again; the attempt counts against the task.
    Retry,
    /// Queue again after `not_before`, without counting the attempt.
    RequeueFree(Option<UnixMillis>),
}

/// `rate_limit_until`: when a rate limit lifts, already bounded by
/// [`Core::rate_limit_reset`].
fn disposition(
    outcome: Outcome,
    rate_limit_until: Option<UnixMillis>,
    permanent: bool,
) -> Disposition {
    match outcome {
        // The agent says another attempt would fail the same way.
        _ if permanent && matches!(disposition(outcome, None, false), Disposition::Retry) => {
            Disposition::Terminal(TaskState::Failed)
        }
        Outcome::Succeeded | Outcome::TestsFailed => Disposition::Terminal(TaskState::Succeeded),
        Outcome::NoChanges
        | Outcome::TurnLimit
        | Outcome::BudgetExceeded
        | Outcome::PushRejected => Disposition::Terminal(TaskState::Failed),
        Outcome::RateLimited => Disposition::RequeueFree(rate_limit_until),
        // The agent stopped it on its own (shutdown), or the PC could not
        // work at all: not the task's fault.
        Outcome::Cancelled | Outcome::AgentFault => Disposition::RequeueFree(None),
        Outcome::CliFailed
        | Outcome::TimedOut
        | Outcome::WorkspaceError
        | Outcome::LeaseExpired
        | Outcome::NotAccepted
        | Outcome::Rejected
        | Outcome::LostByAgent => Disposition::Retry,
    }
}

/// How every truncation marker starts; the store recognises it on restart.
pub const TRUNCATION_MARKER: &[u8] = b"[ccc] output truncated";

impl Core {
    // ---- getters ----

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    /// Brings an ended task that left memory back from the store, for a
    /// command about it (a retry, a cancel, a `/claude` rerun, a follow-up
    /// on its pull request). Unchanged, it leaves again after the batch.
    pub fn bring_back(&mut self, task: Task) {
        if self.tasks.contains_key(&task.id) || !task.state.is_terminal() {
            return;
        }
        self.finished.remove(&task);
        self.maybe_finished.insert(task.id);
        self.tasks.insert(task.id, task);
    }

    /// An ended task restored without its record: its indexes and count.
    pub(super) fn restore_ended(&mut self, ended: super::EndedTask) {
        self.next_task_id = self.next_task_id.max(ended.id.0);
        for agent in &ended.warmed {
            if let Some(entry) = self.agents.get_mut(agent) {
                entry.repos.insert(ended.repo_url.clone());
            }
        }
        if let Some((repo, issue)) = &ended.issue {
            let key = (repo.to_lowercase(), *issue);
            if let Some(pull) = ended.pull {
                self.pulls.insert((key.0.clone(), pull), ended.id);
            }
            self.issues.entry(key).or_default().push(ended.id);
        }
        self.finished.add(ended.id, ended.state, ended.specialty);
    }

    /// Whether `id` names a task that ended and left memory (the store has
    /// it).
    pub fn left_memory(&self, id: TaskId) -> bool {
        id.0 >= 1 && id.0 <= self.next_task_id && !self.tasks.contains_key(&id)
    }

    /// Ended tasks out of memory, by state and specialty.
    pub fn finished_counts(
        &self,
    ) -> impl Iterator<Item = (TaskState, common::types::Specialty, u64)> + '_ {
        self.finished
            .counts
            .iter()
            .map(|((state, specialty), n)| (*state, *specialty, *n))
    }

    /// The most recently ended tasks out of memory, oldest first.
    pub fn recently_finished(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.finished.recent.iter().copied()
    }

    /// Ended tasks that owe GitHub nothing leave memory (see `tasks`); the
    /// driver calls this once their last state is committed.
    pub fn evict_finished(&mut self) {
        for id in std::mem::take(&mut self.maybe_finished) {
            let done = self.tasks.get(&id).is_some_and(|t| t.state.is_terminal())
                && !self.live.contains_key(&id)
                && self.pending_effects(id).is_empty();
            if done && let Some(task) = self.tasks.remove(&id) {
                self.output.remove(&id);
                self.finished.add(task.id, task.state, task.spec.specialty);
            }
        }
    }

    /// A task's latest attempt number (0 before the first or for an unknown
    /// task), for log lines.
    pub(super) fn attempt_of(&self, id: TaskId) -> u32 {
        self.tasks.get(&id).map_or(0, Task::attempt_number)
    }

    /// Output position of a live attempt, for `WatchTask`.
    pub fn acked_seq(&self, id: TaskId) -> Option<u64> {
        self.live.get(&id).map(|l| l.acked)
    }

    // ---- admin mutators ----

    pub fn submit(&mut self, new: NewTask, now: Instant, wall: UnixMillis) -> TaskId {
        self.next_task_id += 1;
        let id = TaskId(self.next_task_id);
        let mut spec = new.spec;
        if spec.branch.is_empty() {
            spec.branch = common::types::branch_name(spec.issue_number, id, &spec.title);
        }
        let task = Task {
            id,
            source: new.source,
            spec,
            priority: new.priority,
            state: if new.needs_info {
                TaskState::NeedsInfo
            } else {
                TaskState::Queued
            },
            state_reason: if new.needs_info {
                "waiting for the issue to say more: triage found nothing to act on".into()
            } else {
                "submitted".into()
            },
            attempts: Vec::new(),
            max_attempts: self.config.max_attempts,
            created_at: wall,
            updated_at: wall,
            queued_at: wall,
            not_before: None,
            cancel_requested: None,
            output_since: every_attempt(),
            waiting_reason: None,
            pending_effects: Vec::new(),
            triage: new.triage,
            github: None,
        };
        let by = match &task.source {
            TaskSource::Manual { submitted_by } => Some(submitted_by.as_str()),
            TaskSource::Github { .. } => None,
        };
        let issue = task.source.issue().map(|(_, number)| number);
        info!(task_id = %id, attempt = 0, repo = %task.spec.repo_url, specialty = %task.spec.specialty, state = task.state.as_str(), by, issue, "task submitted");
        if task.state == TaskState::Queued {
            self.queue
                .insert(Queued::of(&task, now), self.config.general_fallback_after);
        }
        self.index_issue(&task);
        self.tasks.insert(id, task);
        self.persist_task(id);
        self.schedule(now, wall);
        id
    }

    pub fn cancel(
        &mut self,
        id: TaskId,
        reason: String,
        now: Instant,
        wall: UnixMillis,
    ) -> Result<(), TaskError> {
        let task = self.tasks.get_mut(&id).ok_or(TaskError::Unknown(id))?;
        if task.state.is_terminal() {
            return Err(TaskError::AlreadyFinished(id, task.state));
        }
        info!(task_id = %id, attempt = task.attempt_number(), %reason, "cancel requested");
        if !task.state.is_live() {
            task.state = TaskState::Cancelled;
            task.state_reason = reason;
            task.updated_at = wall;
            self.queue.remove(id);
            self.persist_task(id);
            self.publish_state(id);
            return Ok(());
        }
        task.cancel_requested = Some(reason.clone());
        let Some(current) = task.current() else {
            return Ok(());
        };
        let (attempt, agent) = (current.attempt, current.agent.clone());
        let conn = self.agent_conn(&agent);
        match conn {
            Some(conn) => {
                self.persist_task(id);
                self.publish_state(id);
                self.send_cancel(conn, id, attempt, reason);
            }
            // Nobody to tell now: end it here; if the agent comes back with
            // this attempt, fencing tells it to cancel.
            None => self.end_attempt(
                id,
                Outcome::Cancelled,
                "cancelled while its agent was disconnected".into(),
                None,
                now,
                wall,
            ),
        }
        Ok(())
    }

    /// Queues a failed or cancelled task again with a fresh attempt budget.
    pub fn retry(
        &mut self,
        id: TaskId,
        reason: String,
        now: Instant,
        wall: UnixMillis,
    ) -> Result<(), TaskError> {
        let task = self.tasks.get_mut(&id).ok_or(TaskError::Unknown(id))?;
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(TaskError::NotFinished(id, task.state));
        }
        self.run_again(id, reason, now, wall);
        Ok(())
    }

    /// Queues an ended task again with a fresh attempt budget (an admin's
    /// retry, a `/claude` on the issue).
    pub(super) fn run_again(&mut self, id: TaskId, reason: String, now: Instant, wall: UnixMillis) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.max_attempts = task.counted_attempts() + self.config.max_attempts;
        task.cancel_requested = None;
        task.not_before = None;
        // A fresh output budget too: a task that hit the cap would otherwise
        // store nothing of its retry (and a restart would restore the same).
        task.output_since = task.next_attempt();
        self.output.remove(&id);
        self.requeue(id, reason, None, now, wall);
        self.schedule(now, wall);
    }

    // ---- agent reports ----

    /// Reconciles what a (re)connecting agent says it holds with what the
    /// coordinator thinks it holds. Returns the output positions for
    /// `Welcome.held`.
    pub(super) fn reconcile_hello(
        &mut self,
        agent: &AgentId,
        conn: super::ConnId,
        running: &[super::ReportedTask],
        now: Instant,
        wall: UnixMillis,
    ) -> Vec<(TaskId, Attempt, u64)> {
        let mut held = Vec::new();
        for reported in running {
            let (id, attempt) = (reported.task, reported.attempt);
            let live = self
                .tasks
                .get(&id)
                .is_some_and(|t| t.is_live_attempt(attempt, agent));
            if live {
                let lease = now + self.config.lease_timeout;
                if let Some(acked) = self.set_lease(id, |_| lease) {
                    held.push((id, attempt, acked));
                }
                // Holding it means it was accepted, even if that message was lost.
                self.handle_accepted(conn, agent, id, attempt, wall);
                // A cancel sent on a stream that then dropped is sent again.
                if let Some(reason) = self.tasks.get(&id).and_then(|t| t.cancel_requested.clone()) {
                    self.send_cancel(conn, id, attempt, reason);
                }
            } else if self.is_reported_attempt(id, attempt) {
                // We hold its result but our acknowledgement was lost: the
                // agent resends TaskFinished, which is acknowledged then.
                held.push((id, attempt, u64::MAX));
            } else {
                debug!(task_id = %id, attempt = attempt.0, agent_id = %agent, "agent holds a stale attempt");
                self.send_cancel(conn, id, attempt, "this attempt is no longer current");
            }
        }
        // Live attempts the agent no longer knows about: lost (an agent
        // restart, or an Assign that never arrived). Its load is exactly
        // the tasks whose live attempt is on it.
        let lost: Vec<TaskId> = self
            .agents
            .get(agent)
            .map(|e| e.load.iter().copied().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                let current = self
                    .tasks
                    .get(id)
                    .and_then(|t| t.current())
                    .map(|a| a.attempt);
                !running
                    .iter()
                    .any(|r| r.task == *id && Some(r.attempt) == current)
            })
            .collect();
        for id in lost {
            self.end_attempt(
                id,
                Outcome::LostByAgent,
                format!("agent {agent} reconnected without this task"),
                None,
                now,
                wall,
            );
        }
        held
    }

    /// The attempt ended with a result its agent reported.
    fn is_reported_attempt(&self, id: TaskId, attempt: Attempt) -> bool {
        self.tasks.get(&id).is_some_and(|t| {
            t.attempts
                .iter()
                .any(|a| a.attempt == attempt && a.report.is_some())
        })
    }

    /// Renews the leases of the attempts an agent says it is running.
    pub(super) fn renew_leases(
        &mut self,
        agent: &AgentId,
        running: &[super::ReportedTask],
        now: Instant,
    ) {
        for r in running {
            if self
                .tasks
                .get(&r.task)
                .is_some_and(|t| t.is_live_attempt(r.attempt, agent))
            {
                let lease = now + self.config.lease_timeout;
                self.set_lease(r.task, |_| lease);
            }
        }
    }

    /// Drops a report that is not about the sender's live attempt and tells
    /// the sender to cancel it. Returns whether the report may be applied.
    fn fence(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        what: &str,
    ) -> bool {
        if self
            .tasks
            .get(&id)
            .is_some_and(|t| t.is_live_attempt(attempt, agent))
        {
            let renewed = self.last_now + self.config.lease_timeout;
            self.set_lease(id, |lease| lease.max(renewed));
            return true;
        }
        warn!(task_id = %id, attempt = attempt.0, agent_id = %agent, "dropped {what} of a stale attempt");
        self.send_cancel(conn, id, attempt, "this attempt is no longer current");
        false
    }

    pub(super) fn handle_accepted(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        wall: UnixMillis,
    ) {
        if !self.fence(conn, agent, id, attempt, "acceptance") {
            return;
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        if task.state != TaskState::Assigned {
            return; // A duplicate.
        }
        task.state = TaskState::Running;
        task.state_reason = format!("running on {agent}");
        task.updated_at = wall;
        if let Some(a) = task.current_mut() {
            a.accepted_at = Some(wall);
        }
        if let Some(l) = self.live.get_mut(&id) {
            self.timers.accepts.set(id, l.accept_deadline.take(), None);
        }
        info!(task_id = %id, attempt = attempt.0, agent_id = %agent, "task running");
        self.persist_task(id);
        self.publish_state(id);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_rejected(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        reason: String,
        now: Instant,
        wall: UnixMillis,
    ) {
        if !self.fence(conn, agent, id, attempt, "rejection") {
            return;
        }
        self.end_attempt(
            id,
            Outcome::Rejected,
            format!("agent {agent} refused it: {reason}"),
            None,
            now,
            wall,
        );
    }

    pub(super) fn handle_progress(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        phase: Phase,
        wall: UnixMillis,
    ) {
        if !self.fence(conn, agent, id, attempt, "progress") {
            return;
        }
        if let Some(task) = self.tasks.get_mut(&id)
            && let Some(a) = task.current_mut()
            && a.phase != Some(phase)
        {
            a.phase = Some(phase);
            task.updated_at = wall;
            self.persist_task(id);
            self.publish_state(id);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_output(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        seq: u64,
        kind: OutputKind,
        data: Arc<[u8]>,
    ) {
        if !self.fence(conn, agent, id, attempt, "output") {
            return;
        }
        let cap = self.config.output_cap_bytes;
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let budget = self.output.entry(id).or_default();
        // The wire refuses u64::MAX, but the core cannot fail: never overflow.
        let next = live.acked.saturating_add(1);
        if seq < next {
            // A duplicate (resent after a reconnect): acknowledge again.
        } else if budget.truncated {
            // Past the cap nothing is stored; acknowledge so the agent frees
            // it. The position only moves forward.
            live.acked = live.acked.max(seq);
        } else if seq > next {
            // A gap: the agent resends in order from our ack after reconnecting.
            debug!(task_id = %id, attempt = attempt.0, seq, expected = next, "output gap; waiting for the missing chunks");
        } else {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            let (kind, data) = if budget.stored_bytes.saturating_add(len) > cap {
                budget.truncated = true;
                let marker = format!(
                    "{} at the task's cap of {cap} bytes; later output is not stored\n",
                    String::from_utf8_lossy(TRUNCATION_MARKER)
                );
                (OutputKind::System, Arc::<[u8]>::from(marker.into_bytes()))
            } else {
                (kind, data)
            };
            budget.stored_bytes += u64::try_from(data.len()).unwrap_or(u64::MAX);
            live.acked = seq;
            let chunk = OutputChunk {
                task: id,
                attempt,
                seq,
                kind,
                data,
            };
            self.writes.push(Write::Output(chunk.clone()));
            self.actions
                .push_back(Action::Publish(TaskEvent::Output(chunk)));
        }
        let acked = self.live.get(&id).map_or(0, |l| l.acked);
        self.pending_acks.insert((conn, id, attempt), acked);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_finished(
        &mut self,
        conn: super::ConnId,
        agent: &AgentId,
        id: TaskId,
        attempt: Attempt,
        report: FinishedReport,
        now: Instant,
        wall: UnixMillis,
    ) {
        if self.is_reported_attempt(id, attempt) || self.left_memory(id) {
            // A duplicate, e.g. resent after a reconnect, or the result of
            // an attempt of a task that has ended: harmless.
            self.send(conn, ToAgent::FinishedAck { task: id, attempt });
            return;
        }
        if !self.fence(conn, agent, id, attempt, "result") {
            return;
        }
        info!(task_id = %id, attempt = attempt.0, agent_id = %agent, outcome = %report.outcome, "attempt finished");
        let outcome = report.outcome;
        if outcome == Outcome::RateLimited {
            self.cool_down(agent, &report, now, wall);
        }
        if outcome == Outcome::AgentFault {
            // At once, not at its next heartbeat: the scheduler runs right
            // after this report. The agent's own heartbeats say when it
            // has recovered.
            self.mark_unhealthy(agent, report.message.clone());
        }
        let message = report.message.clone();
        self.end_attempt(id, outcome, message, Some(report), now, wall);
        self.send(conn, ToAgent::FinishedAck { task: id, attempt });
    }

    fn mark_unhealthy(&mut self, agent: &AgentId, reason: String) {
        if let Some(entry) = self.agents.get_mut(agent)
            && super::set_health(agent, &mut entry.record, Some(reason))
        {
            let write = entry.record_write();
            self.writes.push(write);
            self.refile(agent);
        }
    }

    /// Gives an agent that hit the API's usage limit no work until the
    /// limit resets (or the configured cool-down, whichever is later).
    fn cool_down(
        &mut self,
        agent: &AgentId,
        report: &FinishedReport,
        now: Instant,
        wall: UnixMillis,
    ) {
        let until_reset = self
            .rate_limit_reset(Some(report), wall)
            .map_or(Duration::ZERO, |at| {
                Duration::from_millis(at.0.saturating_sub(wall.0))
            });
        if report.rate_limit_reset_unix_ms > wall.saturating_add(until_reset).0 {
            warn!(
                agent_id = %agent,
                reset_unix_ms = report.rate_limit_reset_unix_ms,
                "the reported usage-limit reset is too far ahead; the maximum cool-down applies instead"
            );
        }
        let wait = until_reset.max(self.config.rate_limit_cooldown);
        if let Some(live) = self.agents.get_mut(agent).and_then(|e| e.live.as_mut()) {
            let until = now + wait;
            self.timers
                .cooldowns
                .set(live.conn, live.cooldown_until, Some(until));
            live.cooldown_until = Some(until);
            warn!(agent_id = %agent, wait_s = wait.as_secs(), "usage limit reached; no new work for this agent until it resets");
        }
    }

    /// When the usage limit an agent reported at `wall` lifts, if it said.
    /// The reset comes from the agent (from the CLI's output): it is
    /// believed at most `rate_limit_cooldown_max` ahead, so that a bad clock
    /// or a bogus value cannot park a task and its agent forever.
    fn rate_limit_reset(
        &self,
        report: Option<&FinishedReport>,
        wall: UnixMillis,
    ) -> Option<UnixMillis> {
        let reset = report
            .map(|r| r.rate_limit_reset_unix_ms)
            .filter(|&ms| ms > 0)?;
        let latest = wall.saturating_add(self.config.rate_limit_cooldown_max);
        Some(UnixMillis(reset.min(latest.0)))
    }

    // ---- time ----

    /// Ends the attempts not accepted in time and those whose lease ran
    /// out. Looks only at those due (see `timers`), in task order.
    pub(super) fn expire_tasks(&mut self, now: Instant, wall: UnixMillis) {
        let due: BTreeSet<TaskId> = self
            .timers
            .accepts
            .pop_due(now)
            .into_iter()
            .chain(self.timers.leases.pop_due(now))
            .collect();
        let mut expired = Vec::new();
        for (id, live) in due.iter().filter_map(|id| Some((id, self.live.get(id)?))) {
            if live.accept_deadline.is_some_and(|d| now >= d) {
                expired.push((
                    *id,
                    Outcome::NotAccepted,
                    "the agent did not accept it in time",
                ));
            } else if now >= live.lease_deadline {
                expired.push((
                    *id,
                    Outcome::LeaseExpired,
                    "its agent was silent for the whole lease",
                ));
            }
        }
        for (id, outcome, why) in expired {
            if let Some((attempt, agent)) = self
                .tasks
                .get(&id)
                .and_then(|t| t.current())
                .map(|a| (a.attempt, a.agent.clone()))
                && let Some(conn) = self.agent_conn(&agent)
            {
                self.send_cancel(conn, id, attempt, why);
            }
            warn!(task_id = %id, attempt = self.attempt_of(id), outcome = %outcome, "{why}");
            self.end_attempt(id, outcome, why.into(), None, now, wall);
        }
    }

    /// When the queue has something to do next (the attempts' deadlines
    /// are in the timers).
    pub(super) fn queue_timeout(&self) -> Option<Instant> {
        // A passed backoff or fallback is still returned until the queue
        // has advanced past it (at the next `handle_timeout`), and then it
        // is gone: the driver cannot spin on it.
        let (backoff, fallback) = self.queue.next_due();
        backoff
            .map(|nb| self.instant_of(nb))
            .into_iter()
            .chain(fallback)
            .min()
    }

    /// Tracks a live attempt, its deadlines filed in the timers.
    pub(super) fn insert_live(&mut self, id: TaskId, live: LiveAttempt) {
        self.remove_live(id);
        self.timers.leases.set(id, None, Some(live.lease_deadline));
        self.timers.accepts.set(id, None, live.accept_deadline);
        self.live.insert(id, live);
    }

    /// Stops tracking a live attempt, its deadlines with it.
    fn remove_live(&mut self, id: TaskId) {
        if let Some(live) = self.live.remove(&id) {
            self.timers.leases.set(id, Some(live.lease_deadline), None);
            self.timers.accepts.set(id, live.accept_deadline, None);
        }
    }

    /// Moves the lease of a live attempt to `renew(its lease)`; returns
    /// its acknowledged output position (`None`: not live).
    fn set_lease(&mut self, id: TaskId, renew: impl FnOnce(Instant) -> Instant) -> Option<u64> {
        let live = self.live.get_mut(&id)?;
        let lease = renew(live.lease_deadline);
        self.timers
            .leases
            .set(id, Some(live.lease_deadline), Some(lease));
        live.lease_deadline = lease;
        Some(live.acked)
    }

    // ---- transitions ----

    /// Ends the live attempt of `id` with `outcome` and moves the task on:
    /// to a terminal state, or back to the queue.
    pub(super) fn end_attempt(
        &mut self,
        id: TaskId,
        outcome: Outcome,
        message: String,
        report: Option<FinishedReport>,
        now: Instant,
        wall: UnixMillis,
    ) {
        self.remove_live(id);
        let rate_limit_until = if outcome == Outcome::RateLimited {
            self.rate_limit_reset(report.as_ref(), wall)
        } else {
            None
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let permanent = report.as_ref().is_some_and(|r| r.permanent);
        let disposition = disposition(outcome, rate_limit_until, permanent);
        let Some(current) = task.current_mut() else {
            return;
        };
        current.finished_at = Some(wall);
        current.outcome = Some(outcome);
        current.message = message.clone();
        current.report = report;
        let agent = current.agent.clone();
        let repo = task.spec.repo_url.clone();
        self.release_slot(&agent, id, &repo, now);
        if super::warms_mirror(Some(outcome))
            && let Some(entry) = self.agents.get_mut(&agent)
        {
            entry.repos.insert(repo);
        }
        let task = self.tasks.get_mut(&id).expect("invariant: task exists");
        task.updated_at = wall;
        if let Some(reason) = task.cancel_requested.clone() {
            let finished_anyway =
                matches!(disposition, Disposition::Terminal(TaskState::Succeeded));
            if !finished_anyway {
                task.state = TaskState::Cancelled;
                task.state_reason = reason;
                self.persist_task(id);
                self.publish_state(id);
                return;
            }
        }
        match disposition {
            Disposition::Terminal(state) => {
                task.state = state;
                // The state names the outcome when they are the same word.
                task.state_reason = if permanent && state == TaskState::Failed {
                    format!("{outcome}: {message} (permanent: not retried)")
                } else if outcome.as_str() == state.as_str() {
                    message
                } else {
                    format!("{outcome}: {message}")
                };
                info!(task_id = %id, attempt = task.attempt_number(), state = state.as_str(), "task finished");
                self.persist_task(id);
                self.publish_state(id);
            }
            Disposition::Retry if task.counted_attempts() >= task.max_attempts => {
                task.state = TaskState::Failed;
                task.state_reason = format!(
                    "{outcome}: {message} (no attempts left of {})",
                    task.max_attempts
                );
                warn!(task_id = %id, attempt = task.attempt_number(), "task failed: no attempts left");
                self.persist_task(id);
                self.publish_state(id);
            }
            Disposition::Retry => {
                let failures = task.counted_attempts();
                let delay = self.retry_delay(failures);
                let not_before = wall.saturating_add(delay);
                self.requeue(
                    id,
                    format!("{outcome}: {message}; retry after {}s", delay.as_secs()),
                    Some(not_before),
                    now,
                    wall,
                );
            }
            Disposition::RequeueFree(not_before) => {
                self.requeue(
                    id,
                    format!("{outcome}: {message} (not counted as an attempt)"),
                    not_before,
                    now,
                    wall,
                );
            }
        }
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        common::backoff::exponential(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
            failures,
        )
    }

    pub(super) fn requeue(
        &mut self,
        id: TaskId,
        reason: String,
        not_before: Option<UnixMillis>,
        now: Instant,
        wall: UnixMillis,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.state = TaskState::Queued;
        task.state_reason = reason;
        task.not_before = not_before;
        task.queued_at = wall;
        task.updated_at = wall;
        self.queue
            .insert(Queued::of(task, now), self.config.general_fallback_after);
        self.persist_task(id);
        self.publish_state(id);
    }

    /// Puts `id` on `agent` as a new attempt.
    pub(super) fn assign(
        &mut self,
        id: TaskId,
        agent: AgentId,
        placement: String,
        now: Instant,
        wall: UnixMillis,
    ) {
        let Some(conn) = self.agent_conn(&agent) else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let attempt = task.next_attempt();
        info!(task_id = %id, attempt = attempt.0, agent_id = %agent, %placement, "task assigned");
        task.attempts.push(AttemptRecord {
            attempt,
            agent: agent.clone(),
            assigned_at: wall,
            accepted_at: None,
            finished_at: None,
            outcome: None,
            message: String::new(),
            placement,
            phase: None,
            report: None,
        });
        task.state = TaskState::Assigned;
        task.state_reason = format!("assigned to {agent}");
        task.not_before = None;
        task.updated_at = wall;
        let spec = task.spec.clone();
        self.queue.remove(id);
        self.insert_live(
            id,
            LiveAttempt {
                lease_deadline: now + self.config.lease_timeout,
                accept_deadline: Some(now + self.config.accept_timeout),
                acked: 0,
            },
        );
        self.take_slot(&agent, id, &spec.repo_url);
        self.persist_task(id);
        self.publish_state(id);
        let push_as = self.tasks.get(&id).and_then(|t| match &t.source {
            TaskSource::Github { repo, .. }
                if spec.repo_url.starts_with("https://")
                    || spec.repo_url.starts_with("http://") =>
            {
                Some(repo.clone())
            }
            _ => None,
        });
        self.send(
            conn,
            ToAgent::Assign {
                task: id,
                attempt,
                spec: Box::new(spec),
                deadline: wall.saturating_add(self.config.task_deadline),
                push: push_as.map(PushAuth::GithubRepository),
            },
        );
    }

    /// Writes the task as it is now, with the GitHub writes the change
    /// owes (in the same commit).
    pub(super) fn persist_task(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.get(&id) {
            if task.state.is_terminal() {
                self.maybe_finished.insert(id);
            }
            self.writes.push(Write::Task(Box::new(task.clone())));
            self.effects_of_change(id);
        }
    }

    pub(super) fn publish_state(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.get(&id) {
            self.actions
                .push_back(Action::Publish(TaskEvent::Changed(Box::new(task.clone()))));
        }
    }

    /// The monotonic instant of a wall-clock stamp, relative to the last
    /// time the core was given.
    pub(super) fn instant_of(&self, at: UnixMillis) -> Instant {
        if at.0 >= self.last_wall.0 {
            self.last_now + Duration::from_millis(at.0 - self.last_wall.0)
        } else {
            self.last_now
                .checked_sub(Duration::from_millis(self.last_wall.0 - at.0))
                .unwrap_or(self.last_now)
        }
    }
}
