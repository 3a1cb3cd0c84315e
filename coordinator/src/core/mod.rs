//! The coordinator's pure core: every decision about agent streams, made
//! without I/O, clocks or async.
//!
//! Vocabulary (after quinn-proto): `handle_*` feed inputs (time is always an
//! argument), admin mutators return their result at once, `poll_action` and
//! `take_writes` drain outputs, `poll_timeout` says when to call
//! `handle_timeout` next. The driver commits `take_writes()` to the store
//! *before* it performs any action or answers anyone (effects after commit).
//!
//! Architecture invariant: nothing here touches tokio, tonic, sled or the
//! system clock. An illegal or stale input is dropped with a `warn!`, never an
//! `Err`: the core cannot fail.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use common::ids::{AgentId, Attempt, TaskId};
pub use common::protocol::{FromAgent, OutputChunk, ReportedTask, ToAgent};
use common::time::UnixMillis;
use common::types::{AgentAdvert, Outcome, Specialty};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub mod admin;
pub mod github;
pub mod outbox;
mod queue;
pub mod schedule;
pub mod task;
mod timers;

pub use admin::AdminRecord;
use queue::{Queue, Queued};
pub use task::{
    AttemptRecord, NewTask, OutputPosition, Task, TaskError, TaskSource, TaskState, TaskTriage,
};
use task::{LiveAttempt, OutputBudget};
use timers::Timers;

/// How often an agent's `last_seen` is written while only heartbeats come:
/// a heartbeat itself writes nothing durable.
pub const LAST_SEEN_PERSIST_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod github_tests;
#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod task_tests;
#[cfg(test)]
pub(crate) mod tests;

/// One accepted gRPC stream. A new stream of the same agent gets a new id, so
/// late messages of a replaced stream are recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Timings the core enforces; all configurable so tests can shrink them.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub heartbeat_interval: Duration,
    /// A stream silent this long is closed.
    pub heartbeat_timeout: Duration,
    /// A stream must send `Hello` within this time.
    pub hello_timeout: Duration,
    /// A live attempt whose agent is silent this long is requeued.
    pub lease_timeout: Duration,
    /// An assignment not accepted within this time is requeued.
    pub accept_timeout: Duration,
    /// How long an agent may work on one attempt (sent as its deadline).
    pub task_deadline: Duration,
    /// Attempts a task may spend before it fails for good.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per failure up to the max.
    pub retry_backoff_initial: Duration,
    pub retry_backoff_max: Duration,
    /// After this long in the queue, `general` agents may take any task.
    pub general_fallback_after: Duration,
    /// Output stored per task, all attempts; past it a marker is stored.
    pub output_cap_bytes: u64,
    /// An agent that hit the API's usage limit gets no work for this long,
    /// or until the reset time its CLI gave.
    pub rate_limit_cooldown: Duration,
    /// The furthest ahead an agent's reported reset is believed: a task
    /// waits, and its agent cools down, at most this long after a rate
    /// limit (never less than `rate_limit_cooldown`).
    pub rate_limit_cooldown_max: Duration,
    /// A webhook delivery id seen within this window is not handled again.
    pub delivery_window: Duration,
}

/// The persisted state of an agent, as listed by `ccc agents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Connected,
    Disconnected,
    /// Connected, but takes no new work (asked by an admin or by the agent).
    Draining,
    /// May never connect again.
    Revoked,
}

/// What the coordinator remembers of an agent across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub state: AgentState,
    /// What the agent advertised in its latest `Hello`.
    pub advert: Option<AgentAdvert>,
    pub first_seen: UnixMillis,
    pub last_seen: UnixMillis,
    /// Streams opened over the coordinator's whole history.
    pub connections: u64,
    pub peer_address: String,
    pub last_disconnect_reason: Option<String>,
    pub revoked_reason: Option<String>,
    /// Why the agent cannot work (its CLI is missing, not logged in, ...):
    /// it gets no work until it reports healthy again.
    #[serde(default)]
    pub unhealthy: Option<String>,
    /// Why an admin drained the agent; cleared by an undrain or when the
    /// agent reconnects (a drain lasts for the stream it was sent on).
    #[serde(default)]
    pub drain_reason: Option<String>,
}

/// What watchers of a task (`WatchTask`, `ccc logs -f`) are told.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    Output(OutputChunk),
    Changed(Box<Task>),
}

impl TaskEvent {
    pub fn task(&self) -> TaskId {
        match self {
            Self::Output(chunk) => chunk.task,
            Self::Changed(t) => t.id,
        }
    }
}

/// Why the coordinator closes a stream; the gRPC layer maps it to a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer stream of the same agent took over.
    Replaced,
    HeartbeatTimeout,
    HelloTimeout,
    Revoked(String),
    Protocol(String),
    /// Another process with the same certificate is connected.
    Duplicate(String),
    /// An admin lifted the agent's drain: it reconnects and takes work.
    Undrained,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: ToAgent,
    },
    Close {
        conn: ConnId,
        reason: CloseReason,
    },
    /// For watchers; dropped when nobody watches.
    Publish(TaskEvent),
}

/// A state change to persist atomically before any action of the same step.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// A webhook delivery was handled (kept for de-duplication).
    Delivery {
        id: String,
        at: UnixMillis,
    },
    /// A delivery older than the dedupe window is forgotten.
    ForgetDelivery(String),
    /// A GitHub write owed (created or replaced).
    Outbox(Box<outbox::OutboxEntry>),
    /// A GitHub write done (or given up).
    OutboxDone(TaskId, outbox::Effect),
    Agent(Box<AgentRecord>),
    Task(Box<Task>),
    /// One chunk of a task's output.
    Output(OutputChunk),
    /// The agent's record is deleted.
    ForgetAgent(AgentId),
    /// An admin certificate's revocation record.
    Admin(Box<AdminRecord>),
}

impl Write {
    /// The task a write is about, if any: its record, its output, or a
    /// GitHub write it owes.
    pub fn task(&self) -> Option<TaskId> {
        match self {
            Self::Task(task) => Some(task.id),
            Self::Output(OutputChunk { task, .. }) | Self::OutboxDone(task, _) => Some(*task),
            Self::Outbox(entry) => Some(entry.task),
            Self::Delivery { .. }
            | Self::ForgetDelivery(_)
            | Self::Agent(_)
            | Self::ForgetAgent(_)
            | Self::Admin(_) => None,
        }
    }
}

/// Why a new stream is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenRejected {
    Revoked { agent: AgentId, reason: String },
}

/// Why an admin request on an agent could not be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminError {
    UnknownAgent(AgentId),
    NotConnected(AgentId),
    Revoked(AgentId),
    /// Undrain of an agent that is not drained by an admin.
    NotDrained(AgentId),
    /// Unrevoke of an agent that is not revoked.
    NotRevoked(AgentId),
    /// Forget of an agent that is connected.
    Connected(AgentId),
    /// Forget of an agent that still holds live attempts.
    HoldsTasks(AgentId, Vec<TaskId>),
    /// An admin name no revocation was ever recorded for.
    UnknownAdmin(String),
    /// An admin may not revoke the certificate it is calling with.
    OwnName(String),
    /// Not a valid admin certificate name (the reason says why).
    InvalidName(String),
}

/// An agent as the Admin API shows it: the record plus its live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    pub record: AgentRecord,
    /// Slots the scheduler may still fill.
    pub free_slots: u32,
    /// What the agent last reported holding.
    pub running: Vec<ReportedTask>,
    /// Tasks whose live attempt is on this agent, in the coordinator's view.
    pub assigned: Vec<TaskId>,
    /// A usage limit: no new work before then.
    pub cooldown_until: Option<UnixMillis>,
}

#[derive(Debug)]
struct Live {
    conn: ConnId,
    /// The agent process's instance id (from Hello).
    instance: String,
    /// When the stream said Hello.
    since: UnixMillis,
    last_heard: Instant,
    next_heartbeat: Instant,
    running: Vec<ReportedTask>,
    /// No new work before then (the API's usage limit).
    cooldown_until: Option<Instant>,
}

#[derive(Debug)]
struct Pending {
    agent: AgentId,
    peer: String,
    hello_deadline: Instant,
}

#[derive(Debug)]
struct AgentEntry {
    record: AgentRecord,
    live: Option<Live>,
    /// Tasks whose live attempt is on this agent: its taken slots.
    load: BTreeSet<TaskId>,
    /// When its last task ended (or it connected): ties go to the longest idle.
    idle_since: Instant,
    /// Repositories it has worked on: its mirror cache is warm for them.
    repos: BTreeSet<String>,
    /// The `last_seen` last written to the store.
    seen_persisted: UnixMillis,
}

impl AgentEntry {
    /// The write that persists the record as it is now.
    fn record_write(&mut self) -> Write {
        self.seen_persisted = self.record.last_seen;
        Write::Agent(Box::new(self.record.clone()))
    }

    /// An agent the coordinator has not heard of before.
    fn new(id: AgentId, now: Instant, wall: UnixMillis) -> Self {
        Self {
            record: AgentRecord {
                id,
                state: AgentState::Disconnected,
                advert: None,
                first_seen: wall,
                last_seen: wall,
                connections: 0,
                peer_address: String::new(),
                last_disconnect_reason: None,
                revoked_reason: None,
                unhealthy: None,
                drain_reason: None,
            },
            live: None,
            load: BTreeSet::new(),
            idle_since: now,
            repos: BTreeSet::new(),
            seen_persisted: wall,
        }
    }
}

pub struct Core {
    config: CoreConfig,
    agents: BTreeMap<AgentId, AgentEntry>,
    /// Streams accepted but not yet introduced by `Hello`.
    pending: BTreeMap<ConnId, Pending>,
    /// Which agent a live stream belongs to.
    conn_agent: BTreeMap<ConnId, AgentId>,
    /// The tasks in memory: those not ended, and ended ones the outbox still
    /// owes a GitHub write or a command just brought back. An ended task
    /// leaves memory once its last state is committed (`evict_finished`,
    /// called by the driver after the commit); the driver reads it from the
    /// store.
    tasks: BTreeMap<TaskId, Task>,
    /// What is kept in memory of ended tasks out of it.
    finished: Finished,
    /// Tasks that may have ended or lost their last outbox entry in this
    /// batch: checked by `evict_finished`.
    maybe_finished: BTreeSet<TaskId>,
    /// The live attempts (tasks `Assigned` or `Running`).
    live: BTreeMap<TaskId, LiveAttempt>,
    output: BTreeMap<TaskId, OutputBudget>,
    /// The queued tasks, indexed for placement.
    queue: Queue,
    /// The agents that may take work, indexed for placement.
    free: schedule::FreeIndex,
    /// Agents looked at by scheduling so far (`Core::placement_work`).
    agents_examined: std::cell::Cell<u64>,
    /// The deadlines of the streams and of the live attempts, in order.
    timers: Timers,
    /// Live attempts per repository (fairness between repositories).
    repo_live: BTreeMap<String, usize>,
    /// Tasks by the issue they come from (`owner/name` lowercased, number),
    /// oldest first.
    issues: BTreeMap<(String, u64), Vec<TaskId>>,
    /// Webhook deliveries seen within the dedupe window, by id and by age.
    deliveries: github::Deliveries,
    /// GitHub writes owed, by task and effect.
    outbox: BTreeMap<(TaskId, outbox::Effect), outbox::OutboxEntry>,
    /// GitHub asked to wait until then (a rate limit): no effect before.
    github_paused_until: Option<UnixMillis>,
    /// The cluster's pull requests (`owner/name` lowercased, number) and
    /// the task that opened (or last updated) each.
    pulls: BTreeMap<(String, u64), TaskId>,
    next_task_id: u64,
    /// Output acknowledgements, coalesced per attempt until actions are polled.
    pending_acks: BTreeMap<(ConnId, TaskId, Attempt), u64>,
    /// Admin certificate names with a revocation record.
    admins: BTreeMap<String, AdminRecord>,
    /// The latest time given to the core.
    last_now: Instant,
    last_wall: UnixMillis,
    actions: VecDeque<Action>,
    writes: Vec<Write>,
}

/// What the core keeps of the ended tasks that left memory: how many by
/// state and specialty (for the metrics), and the ids of the most recent.
#[derive(Debug, Default)]
struct Finished {
    counts: BTreeMap<(TaskState, Specialty), u64>,
    recent: VecDeque<TaskId>,
}

impl Finished {
    /// The most recent ended tasks kept by id (`WatchCluster` shows at most
    /// this many).
    const RECENT: usize = 200;

    fn add(&mut self, id: TaskId, state: TaskState, specialty: Specialty) {
        *self.counts.entry((state, specialty)).or_default() += 1;
        self.recent.retain(|r| *r != id);
        self.recent.push_back(id);
        while self.recent.len() > Self::RECENT {
            self.recent.pop_front();
        }
    }

    fn remove(&mut self, task: &Task) {
        if let Some(count) = self.counts.get_mut(&(task.state, task.spec.specialty)) {
            *count = count.saturating_sub(1);
        }
        self.recent.retain(|id| *id != task.id);
    }
}

/// What the core keeps of an ended task it restores without its record:
/// what its indexes and counts need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedTask {
    pub id: TaskId,
    pub state: TaskState,
    pub specialty: Specialty,
    pub repo_url: String,
    /// The GitHub issue (`owner/name`, number) it came from.
    pub issue: Option<(String, u64)>,
    /// The pull request it opened (or last updated).
    pub pull: Option<u64>,
    /// Agents whose mirror of the repository its attempts warmed.
    pub warmed: Vec<AgentId>,
}

impl EndedTask {
    pub fn of(task: &Task) -> Self {
        Self {
            id: task.id,
            state: task.state,
            specialty: task.spec.specialty,
            repo_url: task.spec.repo_url.clone(),
            issue: task.source.issue().map(|(repo, n)| (repo.to_owned(), n)),
            pull: task
                .github
                .as_ref()
                .and_then(|g| g.pull.as_ref())
                .map(|p| p.number),
            warmed: task
                .attempts
                .iter()
                .filter(|a| warms_mirror(a.outcome))
                .map(|a| a.agent.clone())
                .collect(),
        }
    }
}

/// Everything the core is rebuilt from after a restart.
#[derive(Debug, Default)]
pub struct Restored {
    pub agents: Vec<AgentRecord>,
    /// Tasks in full (an ended one that owes GitHub nothing is kept only as
    /// an `EndedTask`).
    pub tasks: Vec<Task>,
    /// Ended tasks that owe GitHub nothing, without their records.
    pub ended: Vec<EndedTask>,
    /// Output already stored, for tasks that are not terminal.
    pub output: BTreeMap<TaskId, OutputPosition>,
    /// Webhook deliveries seen, with when.
    pub deliveries: Vec<(String, UnixMillis)>,
    /// GitHub writes still owed.
    pub outbox: Vec<outbox::OutboxEntry>,
}

impl Core {
    /// Rebuilds the core from the store at `now`. Nobody is connected to a
    /// coordinator that just started: agents recorded as connected become
    /// disconnected (written back). Queued tasks are scheduled as agents
    /// come; live attempts wait for their agents for a whole lease.
    pub fn new(config: CoreConfig, restored: Restored, now: Instant, wall: UnixMillis) -> Self {
        let mut core = Self {
            config,
            agents: BTreeMap::new(),
            pending: BTreeMap::new(),
            conn_agent: BTreeMap::new(),
            tasks: BTreeMap::new(),
            finished: Finished::default(),
            maybe_finished: BTreeSet::new(),
            live: BTreeMap::new(),
            output: BTreeMap::new(),
            queue: Queue::default(),
            free: schedule::FreeIndex::default(),
            agents_examined: std::cell::Cell::new(0),
            timers: Timers::default(),
            repo_live: BTreeMap::new(),
            issues: BTreeMap::new(),
            deliveries: github::Deliveries::new(restored.deliveries),
            outbox: BTreeMap::new(),
            github_paused_until: None,
            pulls: BTreeMap::new(),
            next_task_id: 0,
            pending_acks: BTreeMap::new(),
            admins: BTreeMap::new(),
            last_now: now,
            last_wall: wall,
            actions: VecDeque::new(),
            writes: Vec::new(),
        };
        for mut record in restored.agents {
            if matches!(record.state, AgentState::Connected | AgentState::Draining) {
                record.state = AgentState::Disconnected;
                record.last_disconnect_reason = Some("coordinator restarted".into());
                core.writes.push(Write::Agent(Box::new(record.clone())));
            }
            core.agents.insert(
                record.id.clone(),
                AgentEntry {
                    seen_persisted: record.last_seen,
                    record,
                    live: None,
                    load: BTreeSet::new(),
                    idle_since: now,
                    repos: BTreeSet::new(),
                },
            );
        }
        let outbox_entries = restored.outbox;
        let owed: BTreeSet<TaskId> = outbox_entries.iter().map(|e| e.task).collect();
        for task in restored.tasks {
            core.next_task_id = core.next_task_id.max(task.id.0);
            for attempt in task.attempts.iter().filter(|a| warms_mirror(a.outcome)) {
                if let Some(entry) = core.agents.get_mut(&attempt.agent) {
                    entry.repos.insert(task.spec.repo_url.clone());
                }
            }
            if task.state.is_terminal() && !owed.contains(&task.id) {
                // Ended: its indexes only; the task stays in the store.
                core.restore_ended(EndedTask::of(&task));
                continue;
            }
            if let Some(position) = restored.output.get(&task.id) {
                core.output.insert(
                    task.id,
                    OutputBudget {
                        stored_bytes: position.stored_bytes,
                        truncated: position.truncated,
                    },
                );
            }
            if task.state == TaskState::Queued {
                let since = core.instant_of(task.queued_at);
                core.queue
                    .insert(Queued::of(&task, since), core.config.general_fallback_after);
            }
            if task.state.is_live()
                && let Some(current) = task.current()
            {
                let acked = restored.output.get(&task.id).map_or(0, |p| p.last_seq);
                core.insert_live(
                    task.id,
                    LiveAttempt {
                        lease_deadline: now + core.config.lease_timeout,
                        accept_deadline: None,
                        acked,
                    },
                );
                if let Some(entry) = core.agents.get_mut(&current.agent) {
                    entry.load.insert(task.id);
                }
                *core
                    .repo_live
                    .entry(task.spec.repo_url.clone())
                    .or_default() += 1;
            }
            core.index_issue(&task);
            core.index_pull(&task);
            core.tasks.insert(task.id, task);
        }
        for ended in restored.ended {
            core.restore_ended(ended);
        }
        // Oldest first, whichever list a task came in.
        for tasks in core.issues.values_mut() {
            tasks.sort_unstable();
            tasks.dedup();
        }
        core.restore_outbox(outbox_entries);
        core
    }

    // ---- getters ----

    pub fn agents(&self) -> Vec<AgentView> {
        self.agents.values().map(|e| self.view(e)).collect()
    }

    pub fn agent(&self, id: &AgentId) -> Option<AgentView> {
        self.agents.get(id).map(|e| self.view(e))
    }

    fn view(&self, entry: &AgentEntry) -> AgentView {
        AgentView {
            record: entry.record.clone(),
            free_slots: self.free_slots(entry),
            running: entry
                .live
                .as_ref()
                .map(|l| l.running.clone())
                .unwrap_or_default(),
            assigned: entry.load.iter().copied().collect(),
            cooldown_until: entry
                .live
                .as_ref()
                .and_then(|l| l.cooldown_until)
                .filter(|until| *until > self.last_now)
                .map(|until| self.last_wall.saturating_add(until - self.last_now)),
        }
    }

    /// The live stream of a connected agent.
    fn agent_conn(&self, agent: &AgentId) -> Option<ConnId> {
        self.agents.get(agent)?.live.as_ref().map(|l| l.conn)
    }

    fn send(&mut self, conn: ConnId, msg: ToAgent) {
        self.actions.push_back(Action::Send { conn, msg });
    }

    /// Tells an agent to stop (and forget) an attempt.
    fn send_cancel(
        &mut self,
        conn: ConnId,
        task: TaskId,
        attempt: Attempt,
        reason: impl Into<String>,
    ) {
        self.send(
            conn,
            ToAgent::Cancel {
                task,
                attempt,
                reason: reason.into(),
            },
        );
    }

    /// Records the time of an input.
    fn tick(&mut self, now: Instant, wall: UnixMillis) {
        self.last_now = self.last_now.max(now);
        self.last_wall = self.last_wall.max(wall);
    }

    /// The agent a live stream belongs to, if the stream is still current.
    pub fn conn_agent(&self, conn: ConnId) -> Option<&AgentId> {
        self.conn_agent
            .get(&conn)
            .or_else(|| self.pending.get(&conn).map(|p| &p.agent))
    }

    // ---- inputs ----

    /// A stream authenticated as `agent` was opened. A revoked agent is
    /// refused; an older stream of the same agent is closed.
    pub fn handle_open(
        &mut self,
        conn: ConnId,
        agent: AgentId,
        peer: String,
        now: Instant,
    ) -> Result<(), OpenRejected> {
        self.last_now = self.last_now.max(now);
        if let Some(entry) = self.agents.get(&agent)
            && entry.record.state == AgentState::Revoked
        {
            return Err(OpenRejected::Revoked {
                reason: entry.record.revoked_reason.clone().unwrap_or_default(),
                agent,
            });
        }
        let older: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.agent == agent)
            .map(|(c, _)| *c)
            .collect();
        for old in older {
            self.remove_pending(old);
            self.close(old, CloseReason::Replaced);
        }
        // A connection id is never reused; were it, its old deadline goes
        // before the new one is filed.
        self.remove_pending(conn);
        let hello_deadline = now + self.config.hello_timeout;
        self.timers.hellos.set(conn, None, Some(hello_deadline));
        self.pending.insert(
            conn,
            Pending {
                agent,
                peer,
                hello_deadline,
            },
        );
        Ok(())
    }

    pub fn handle_message(&mut self, conn: ConnId, msg: FromAgent, now: Instant, wall: UnixMillis) {
        self.tick(now, wall);
        if let FromAgent::Hello {
            advert,
            running,
            unhealthy,
        } = msg
        {
            self.handle_hello(conn, advert, running, unhealthy, now, wall);
            return;
        }
        let Some(agent) = self.conn_agent.get(&conn).cloned() else {
            if self.pending.contains_key(&conn) {
                self.protocol_error(conn, "the first message must be Hello".into(), now, wall);
            }
            // Otherwise a message of a stream already closed: drop it.
            return;
        };
        let Some(entry) = self.agents.get_mut(&agent) else {
            return;
        };
        let Some(live) = entry.live.as_mut() else {
            return;
        };
        let timeout = self.config.heartbeat_timeout;
        self.timers
            .silences
            .set(conn, Some(live.last_heard + timeout), Some(now + timeout));
        live.last_heard = now;
        match msg {
            FromAgent::Hello { .. } => {}
            FromAgent::Heartbeat {
                running, unhealthy, ..
            } => {
                live.running = running.clone();
                entry.record.last_seen = wall;
                let recovered = entry.record.unhealthy.is_some() && unhealthy.is_none();
                let health_changed = set_health(&agent, &mut entry.record, unhealthy);
                // A heartbeat writes nothing durable by itself: `last_seen`
                // lives in memory and goes to the store with the agent's
                // other changes, or at most once a minute.
                let stale = Duration::from_millis(wall.0.saturating_sub(entry.seen_persisted.0))
                    >= LAST_SEEN_PERSIST_EVERY;
                if health_changed || stale {
                    self.writes.push(entry.record_write());
                }
                if health_changed {
                    self.refile(&agent);
                }
                self.renew_leases(&agent, &running, now);
                if recovered {
                    self.schedule(now, wall);
                }
            }
            FromAgent::Draining { reason } => {
                info!(agent_id = %agent, %reason, "agent is draining");
                entry.record.state = AgentState::Draining;
                entry.record.last_seen = wall;
                self.writes.push(entry.record_write());
                self.refile(&agent);
            }
            FromAgent::Accepted { task, attempt } => {
                self.handle_accepted(conn, &agent, task, attempt, wall);
            }
            FromAgent::Rejected {
                task,
                attempt,
                reason,
            } => {
                self.handle_rejected(conn, &agent, task, attempt, reason, now, wall);
                self.schedule(now, wall);
            }
            FromAgent::Output(OutputChunk {
                task,
                attempt,
                seq,
                kind,
                data,
            }) => self.handle_output(conn, &agent, task, attempt, seq, kind, data),
            FromAgent::Progress {
                task,
                attempt,
                phase,
            } => self.handle_progress(conn, &agent, task, attempt, phase, wall),
            FromAgent::Finished {
                task,
                attempt,
                report,
            } => {
                self.handle_finished(conn, &agent, task, attempt, report, now, wall);
                self.schedule(now, wall);
            }
        }
    }

    fn handle_hello(
        &mut self,
        conn: ConnId,
        advert: AgentAdvert,
        running: Vec<ReportedTask>,
        unhealthy: Option<String>,
        now: Instant,
        wall: UnixMillis,
    ) {
        let Some(pending) = self.remove_pending(conn) else {
            if self.conn_agent.contains_key(&conn) {
                self.protocol_error(conn, "Hello sent twice".into(), now, wall);
            }
            return;
        };
        let agent = pending.agent;
        let entry = self
            .agents
            .entry(agent.clone())
            .or_insert_with(|| AgentEntry::new(agent.clone(), now, wall));
        if entry.record.state == AgentState::Revoked {
            // Revoked between open and Hello.
            let reason = entry.record.revoked_reason.clone().unwrap_or_default();
            self.close(conn, CloseReason::Revoked(reason));
            return;
        }
        // A second process with the same certificate is refused while the
        // first one's stream is live (heard within the heartbeat timeout);
        // the same process reconnecting replaces its old stream.
        if let Some(old) = entry.live.as_ref()
            && old.instance != advert.instance_id
        {
            let why = format!(
                "agent {agent} is already connected from {} since {} (another process with the same certificate)",
                entry.record.peer_address,
                old.since.to_rfc3339(),
            );
            warn!(agent_id = %agent, peer = %pending.peer, %why, "second agent process refused");
            self.close(conn, CloseReason::Duplicate(why));
            return;
        }
        let replaced = self
            .timers
            .take_stream(&mut entry.live, self.config.heartbeat_timeout);
        entry.record.state = AgentState::Connected;
        let instance = advert.instance_id.clone();
        // A drain lasts for the stream it was sent on.
        entry.record.drain_reason = None;
        entry.record.advert = Some(advert);
        set_health(&agent, &mut entry.record, unhealthy);
        entry.record.last_seen = wall;
        entry.record.connections += 1;
        entry.record.peer_address = pending.peer;
        let live = entry.live.insert(Live {
            conn,
            instance,
            since: wall,
            last_heard: now,
            next_heartbeat: now + self.config.heartbeat_interval,
            running: running.clone(),
            cooldown_until: None,
        });
        self.timers.file_stream(live, self.config.heartbeat_timeout);
        info!(
            agent_id = %agent,
            peer = %entry.record.peer_address,
            connections = entry.record.connections,
            "agent connected"
        );
        let write = entry.record_write();
        self.writes.push(write);
        self.refile(&agent);
        if let Some(old) = replaced {
            self.conn_agent.remove(&old);
            self.close(old, CloseReason::Replaced);
        }
        self.conn_agent.insert(conn, agent.clone());
        // Welcome goes first; reconciling may queue Cancels behind it.
        let welcome_at = self.actions.len();
        let held = self.reconcile_hello(&agent, conn, &running, now, wall);
        self.actions.insert(
            welcome_at,
            Action::Send {
                conn,
                msg: ToAgent::Welcome {
                    agent_id: agent,
                    heartbeat_interval: self.config.heartbeat_interval,
                    heartbeat_timeout: self.config.heartbeat_timeout,
                    lease_timeout: self.config.lease_timeout,
                    held,
                },
            },
        );
        self.schedule(now, wall);
    }

    /// A message that did not validate; the stream is closed.
    pub fn protocol_error(&mut self, conn: ConnId, why: String, now: Instant, wall: UnixMillis) {
        warn!(conn = conn.0, %why, "protocol error on agent stream");
        self.close(conn, CloseReason::Protocol(why.clone()));
        self.handle_closed(conn, format!("protocol error: {why}"), now, wall);
    }

    /// The stream ended (agent gone, network, or closed by us).
    pub fn handle_closed(&mut self, conn: ConnId, reason: String, now: Instant, wall: UnixMillis) {
        self.tick(now, wall);
        self.remove_pending(conn);
        self.pending_acks.retain(|(c, _, _), _| *c != conn);
        let Some(agent) = self.conn_agent.remove(&conn) else {
            return;
        };
        let Some(entry) = self.agents.get_mut(&agent) else {
            return;
        };
        if entry.live.as_ref().map(|l| l.conn) != Some(conn) {
            return;
        }
        self.timers
            .take_stream(&mut entry.live, self.config.heartbeat_timeout);
        if entry.record.state != AgentState::Revoked {
            entry.record.state = AgentState::Disconnected;
        }
        entry.record.last_seen = wall;
        entry.record.last_disconnect_reason = Some(reason.clone());
        info!(agent_id = %agent, %reason, "agent disconnected");
        self.writes.push(entry.record_write());
        self.refile(&agent);
    }

    /// Time passed: close silent streams, send due heartbeats, end
    /// cool-downs and expire attempts. Looks only at what is due (see
    /// `timers`).
    pub fn handle_timeout(&mut self, now: Instant, wall: UnixMillis) {
        self.tick(now, wall);
        for conn in self.timers.hellos.pop_due(now) {
            self.pending.remove(&conn);
            warn!(conn = conn.0, "stream sent no Hello in time");
            self.close(conn, CloseReason::HelloTimeout);
        }
        // Silent streams are closed first: they are owed no heartbeat.
        for conn in self.timers.silences.pop_due(now) {
            self.close(conn, CloseReason::HeartbeatTimeout);
            self.handle_closed(conn, "heartbeat timeout".into(), now, wall);
        }
        // Heartbeats due within a quarter of the interval go out with the
        // due ones (early, never late): the streams' heartbeats fall into a
        // few batches per interval, and the driver wakes once per batch
        // rather than once per stream.
        let interval = self.config.heartbeat_interval;
        let next = now + interval;
        for conn in self.timers.heartbeats.pop_due(now + interval / 4) {
            let Some(live) = self.live_stream(conn) else {
                continue;
            };
            live.next_heartbeat = next;
            self.timers.heartbeats.set(conn, None, Some(next));
            self.send(conn, ToAgent::Heartbeat { now: wall });
        }
        for conn in self.timers.cooldowns.pop_due(now) {
            if let Some(live) = self.live_stream(conn) {
                live.cooldown_until = None;
            }
        }
        self.expire_tasks(now, wall);
        self.schedule(now, wall);
    }

    /// The live state of a stream that is its agent's current one.
    fn live_stream(&mut self, conn: ConnId) -> Option<&mut Live> {
        let agent = self.conn_agent.get(&conn)?;
        self.agents
            .get_mut(agent)?
            .live
            .as_mut()
            .filter(|l| l.conn == conn)
    }

    /// Forgets a stream that has not said Hello, with its deadline.
    fn remove_pending(&mut self, conn: ConnId) -> Option<Pending> {
        let pending = self.pending.remove(&conn)?;
        self.timers
            .hellos
            .set(conn, Some(pending.hello_deadline), None);
        Some(pending)
    }

    // ---- admin mutators ----

    /// Revokes an agent for good: its stream is closed at once and it cannot
    /// connect again. A name never seen is revoked too (a record is made for
    /// it), so that a certificate known to have leaked can be blocked before
    /// anyone uses it.
    pub fn revoke(
        &mut self,
        agent: &AgentId,
        reason: String,
        now: Instant,
        wall: UnixMillis,
    ) -> Result<AgentView, AdminError> {
        self.tick(now, wall);
        let entry = self.agents.entry(agent.clone()).or_insert_with(|| {
            info!(agent_id = %agent, "revoking an agent that never connected");
            AgentEntry::new(agent.clone(), now, wall)
        });
        entry.record.state = AgentState::Revoked;
        entry.record.revoked_reason = Some(reason.clone());
        entry.record.last_seen = entry.record.last_seen.max(wall);
        let live_conn = self
            .timers
            .take_stream(&mut entry.live, self.config.heartbeat_timeout);
        if live_conn.is_some() {
            entry.record.last_disconnect_reason = Some(format!("revoked: {reason}"));
        }
        self.writes.push(entry.record_write());
        self.refile(agent);
        warn!(agent_id = %agent, %reason, "agent revoked");
        let pending: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| &p.agent == agent)
            .map(|(c, _)| *c)
            .collect();
        for conn in pending.into_iter().chain(live_conn) {
            self.remove_pending(conn);
            self.conn_agent.remove(&conn);
            self.close(conn, CloseReason::Revoked(reason.clone()));
        }
        // Its reports will never be accepted again: its work goes elsewhere now.
        let held: Vec<TaskId> = self
            .agents
            .get(agent)
            .map(|e| e.load.iter().copied().collect())
            .unwrap_or_default();
        for task in held {
            self.end_attempt(
                task,
                common::types::Outcome::LostByAgent,
                format!("agent {agent} was revoked"),
                None,
                now,
                wall,
            );
        }
        self.schedule(now, wall);
        Ok(self.agent(agent).expect("invariant: revoked agent exists"))
    }

    /// Asks a connected agent to take no new work for the rest of its session.
    pub fn drain(
        &mut self,
        agent: &AgentId,
        reason: String,
        wall: UnixMillis,
    ) -> Result<AgentView, AdminError> {
        let entry = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        if entry.record.state == AgentState::Revoked {
            return Err(AdminError::Revoked(agent.clone()));
        }
        let Some(live) = entry.live.as_ref() else {
            return Err(AdminError::NotConnected(agent.clone()));
        };
        let conn = live.conn;
        entry.record.state = AgentState::Draining;
        entry.record.drain_reason = Some(reason.clone());
        entry.record.last_seen = entry.record.last_seen.max(wall);
        self.writes.push(entry.record_write());
        self.refile(agent);
        info!(agent_id = %agent, %reason, "agent asked to drain");
        self.send(conn, ToAgent::Drain { reason });
        Ok(self.agent(agent).expect("invariant: drained agent exists"))
    }

    // ---- outputs ----

    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() && !self.pending_acks.is_empty() {
            for ((conn, task, attempt), seq) in std::mem::take(&mut self.pending_acks) {
                self.send(conn, ToAgent::OutputAck { task, attempt, seq });
            }
        }
        self.actions.pop_front()
    }

    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// When `handle_timeout` must be called next: the first of the
    /// timers and of the queue's deadlines.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers
            .next()
            .into_iter()
            .chain(self.queue_timeout())
            .min()
    }

    fn close(&mut self, conn: ConnId, reason: CloseReason) {
        // Nothing more goes to a closed stream, acknowledgements included.
        self.pending_acks.retain(|(c, _, _), _| *c != conn);
        self.actions.push_back(Action::Close { conn, reason });
    }
}

/// Records what an agent says of its health; returns whether it changed.
fn set_health(agent: &AgentId, record: &mut AgentRecord, unhealthy: Option<String>) -> bool {
    if record.unhealthy == unhealthy {
        return false;
    }
    match &unhealthy {
        Some(reason) => {
            warn!(agent_id = %agent, %reason, "agent cannot work; it gets no work until it recovers")
        }
        None => info!(agent_id = %agent, "agent healthy again"),
    }
    record.unhealthy = unhealthy;
    true
}

/// Whether an attempt that ended with `outcome` left the agent's mirror of
/// the repository warm: one that failed by the agent's own fault, or never
/// started, did not.
fn warms_mirror(outcome: Option<Outcome>) -> bool {
    !matches!(
        outcome,
        Some(Outcome::AgentFault | Outcome::NotAccepted | Outcome::Rejected)
    )
}
