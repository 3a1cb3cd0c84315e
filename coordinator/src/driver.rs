//! The coordinator's one event loop. It owns the [`Core`] and the store by
//! value (no `Arc<Mutex<Core>>`), takes [`Command`]s from the gRPC layer,
//! and runs each batch as: apply every ready command, commit the core's
//! writes in one transaction with one flush (group commit), and only then
//! answer callers and perform the core's actions.
//!
//! The loop runs on a thread of its own ([`Driver::spawn`]) and commits on
//! it: the commit blocks nothing but the loop, which waits for it anyway,
//! and no hand-off to a blocking pool and back sits on every
//! acknowledgement's path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ids::AgentId;
use common::time::UnixMillis;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use common::ids::TaskId;

use crate::core::github::{IssueCommand, IssueOutcome};
use crate::core::outbox::{Effect, EffectJob, EffectResult};
use crate::core::{
    Action, AdminError, AdminRecord, AgentView, CloseReason, ConnId, Core, FromAgent, NewTask,
    OpenRejected, Task, TaskError, TaskEvent, ToAgent, Write,
};
use crate::feed::{self, FeedEvent};
use crate::store::{self, Store};

/// How many commands one batch takes before committing; bounds latency.
const MAX_BATCH: usize = 512;
/// Messages queued for one agent stream before it counts as stuck.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Events queued for one watcher before it is dropped (it can resume).
pub const WATCH_QUEUE: usize = 1024;

/// A filter and page of `ListTasks`.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    pub state: Option<crate::core::TaskState>,
    pub specialty: Option<common::types::Specialty>,
    pub agent: Option<AgentId>,
    pub repo: Option<String>,
    /// The latest ended attempt's outcome.
    pub outcome: Option<common::types::Outcome>,
    /// Newest (highest id) first instead of oldest first.
    pub newest_first: bool,
    /// Tasks past this id in the listing's order (the previous page's last).
    pub after: Option<TaskId>,
    pub limit: usize,
}

/// One page of `ListTasks`.
#[derive(Clone, Debug)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// More tasks follow this page.
    pub more: bool,
    /// How many tasks match the filters, over all pages.
    pub total: usize,
}

/// The revoked admin names with their reasons, as last committed.
pub type RevokedAdmins = Arc<BTreeMap<String, String>>;

/// What the driver sends down an agent's stream.
#[derive(Debug)]
pub enum Outbound {
    Msg(ToAgent),
    /// The last item: the stream ends with this reason.
    Close(CloseReason),
}

pub type Reply<T> = oneshot::Sender<T>;

/// Inputs to the driver, from the gRPC layer.
#[derive(Debug)]
pub enum Command {
    /// A verified webhook delivery triggered an issue.
    IssueTriggered {
        delivery: String,
        task: NewTask,
        reply: Reply<IssueOutcome>,
    },
    /// A verified `/claude` comment on an issue.
    IssueCommand {
        delivery: String,
        command: IssueCommand,
        task: NewTask,
        reply: Reply<IssueOutcome>,
    },
    /// The reconciler found an open, triggered issue.
    IssueFound {
        task: NewTask,
        reply: Reply<IssueOutcome>,
    },
    /// A follow-up on the cluster's pull request.
    PullFollowUp {
        delivery: String,
        repo: String,
        number: u64,
        by: String,
        instructions: String,
        reply: Reply<IssueOutcome>,
    },
    /// The GitHub writes due now (at most `limit`), and when the next is.
    DueEffects {
        limit: usize,
        reply: Reply<(Vec<EffectJob>, Option<UnixMillis>)>,
    },
    /// The GitHub worker performed an effect.
    EffectDone {
        task: TaskId,
        effect: Effect,
        version: u64,
        result: EffectResult,
        reply: Reply<()>,
    },
    Open {
        agent: AgentId,
        peer: String,
        outbound: mpsc::Sender<Outbound>,
        reply: Reply<Result<ConnId, OpenRejected>>,
    },
    Message {
        conn: ConnId,
        msg: FromAgent,
    },
    Malformed {
        conn: ConnId,
        why: String,
    },
    Closed {
        conn: ConnId,
        reason: String,
    },
    ListAgents {
        reply: Reply<Vec<AgentView>>,
    },
    GetAgent {
        agent: AgentId,
        reply: Reply<Option<AgentView>>,
    },
    Revoke {
        agent: AgentId,
        reason: String,
        reply: Reply<Result<AgentView, AdminError>>,
    },
    Drain {
        agent: AgentId,
        reason: String,
        reply: Reply<Result<AgentView, AdminError>>,
    },
    Undrain {
        agent: AgentId,
        reply: Reply<Result<AgentView, AdminError>>,
    },
    Unrevoke {
        agent: AgentId,
        reply: Reply<Result<AgentView, AdminError>>,
    },
    Forget {
        agent: AgentId,
        reply: Reply<Result<(), AdminError>>,
    },
    ListAdmins {
        reply: Reply<Vec<AdminRecord>>,
    },
    RevokeAdmin {
        name: String,
        reason: String,
        /// The caller's own admin name.
        by: String,
        reply: Reply<Result<AdminRecord, AdminError>>,
    },
    UnrevokeAdmin {
        name: String,
        reply: Reply<Result<AdminRecord, AdminError>>,
    },
    Submit {
        task: NewTask,
        reply: Reply<Task>,
    },
    ListTasks {
        query: TaskQuery,
        reply: Reply<TaskPage>,
    },
    GetTask {
        task: TaskId,
        reply: Reply<Option<Task>>,
    },
    /// Answers the task as it is now, once committed, so history read
    /// afterwards cannot miss anything; with `follow`, registers `events`
    /// for the task's live events until it ends.
    Watch {
        task: TaskId,
        follow: bool,
        events: mpsc::Sender<TaskEvent>,
        reply: Reply<Option<Task>>,
    },
    Cancel {
        task: TaskId,
        reason: String,
        reply: Reply<Result<Task, TaskError>>,
    },
    Retry {
        task: TaskId,
        /// Why, and who asked.
        reason: String,
        reply: Reply<Result<Task, TaskError>>,
    },
    /// Answers the cluster as it is now (with at most `recent_ended` ended
    /// tasks), once committed, and registers `events` for its changes.
    WatchCluster {
        recent_ended: usize,
        events: mpsc::Sender<FeedEvent>,
        reply: Reply<feed::Snapshot>,
    },
    /// The gauges' values; writes nothing.
    MetricsSnapshot {
        reply: Reply<crate::metrics::Snapshot>,
    },
}

/// Deleting old output (`Driver::with_output_retention`).
#[derive(Debug)]
struct OutputRetention {
    keep: Duration,
    next: Instant,
    /// Where the round goes on (the last task looked at).
    cursor: Option<TaskId>,
}

/// Tasks looked at per step of a round, and the pause between steps: the
/// driver answers events in between.
const PRUNE_STEP_TASKS: usize = 500;
const PRUNE_STEP_PAUSE: Duration = Duration::from_millis(10);
const PRUNE_ROUND_EVERY: Duration = Duration::from_secs(3600);

/// A cheap handle to send commands to the driver.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
    /// Woken after a commit that owes GitHub writes.
    outbox: Arc<tokio::sync::Notify>,
}

#[derive(Debug, thiserror::Error)]
#[error("the coordinator is shutting down")]
pub struct DriverGone;

impl DriverHandle {
    /// Resolves after a commit that added GitHub writes (or at once if one
    /// happened since the last wait).
    pub async fn outbox_changed(&self) {
        self.outbox.notified().await;
    }

    /// The driver's loop still takes commands.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    pub async fn send(&self, cmd: Command) -> Result<(), DriverGone> {
        self.tx.send(cmd).await.map_err(|_| DriverGone)
    }

    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DriverGone> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| DriverGone)
    }
}

#[must_use = "the driver does nothing until it is started with `spawn`"]
pub struct Driver {
    core: Core,
    store: Arc<dyn Store>,
    /// Output of tasks ended longer ago is deleted (`None`: kept), a few
    /// hundred tasks at a time between events.
    retention: Option<OutputRetention>,
    rx: mpsc::Receiver<Command>,
    next_conn: u64,
    streams: HashMap<ConnId, mpsc::Sender<Outbound>>,
    watchers: HashMap<TaskId, Vec<mpsc::Sender<TaskEvent>>>,
    /// `WatchCluster` feeds.
    cluster_watchers: Vec<mpsc::Sender<FeedEvent>>,
    /// The latest committed output chunk of each task not yet ended, for
    /// the snapshots of new feeds.
    last_lines: HashMap<TaskId, feed::Line>,
    /// Answers held back until the batch that produced them is committed.
    replies: Vec<Box<dyn FnOnce() + Send>>,
    /// Revoked admins for the Admin API's check, published after a commit.
    revoked_admins: watch::Sender<RevokedAdmins>,
    /// A batch changed admin revocations: publish after its commit.
    admins_changed: bool,
    outbox: Arc<tokio::sync::Notify>,
    /// Counts what commits change (a registry nobody scrapes by default).
    metrics: crate::metrics::Metrics,
    task_events: crate::metrics::TaskEvents,
}

/// Why the driver's event loop ([`Driver::spawn`]) ended.
#[derive(Debug)]
pub enum Stopped {
    /// `shutdown` fired, or every handle is gone.
    Shutdown,
    /// A commit failed: nothing more may be acknowledged.
    CommitFailed(store::Error),
    /// A bug: the loop panicked (with the panic's message).
    Panicked(String),
}

impl Driver {
    /// The driver, its handle, and the revoked admins as committed (the
    /// Admin API refuses their certificates).
    pub fn new(
        core: Core,
        store: Arc<dyn Store>,
    ) -> (Self, DriverHandle, watch::Receiver<RevokedAdmins>) {
        let (tx, rx) = mpsc::channel(4096);
        let (revoked_admins, revoked_rx) = watch::channel(Arc::new(core.revoked_admins()));
        let driver = Self {
            core,
            store,
            retention: None,
            rx,
            next_conn: 0,
            streams: HashMap::new(),
            watchers: HashMap::new(),
            cluster_watchers: Vec::new(),
            last_lines: HashMap::new(),
            replies: Vec::new(),
            revoked_admins,
            admins_changed: false,
            outbox: Arc::new(tokio::sync::Notify::new()),
            metrics: crate::metrics::Metrics::default(),
            task_events: crate::metrics::TaskEvents::default(),
        };
        let handle = DriverHandle {
            tx,
            outbox: Arc::clone(&driver.outbox),
        };
        (driver, handle, revoked_rx)
    }

    /// Counts into `metrics` what commits change from now on (what the
    /// restored state holds is not counted again).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.task_events = crate::metrics::TaskEvents::new(self.core.tasks());
        self.metrics = metrics;
        self
    }

    /// Deletes the output of tasks that ended more than `keep` ago.
    pub fn with_output_retention(mut self, keep: Option<Duration>) -> Self {
        self.retention = keep.map(|keep| OutputRetention {
            keep,
            next: clock().0,
            cursor: None,
        });
        self
    }

    /// Starts the event loop on a thread of its own (`ccc-driver`, with a
    /// single-threaded runtime for its timers), where commits block only
    /// the loop. It runs until `shutdown` fires or a commit fails; the
    /// answer says which. A failed commit stops the coordinator: it can no
    /// longer promise durability. A panic in the loop is logged and
    /// answered as [`Stopped::Panicked`].
    pub fn spawn(self, shutdown: CancellationToken) -> std::io::Result<oneshot::Receiver<Stopped>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let (done, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("ccc-driver".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(self.run(shutdown))
                }));
                let _ = done.send(match ran {
                    Ok(Ok(())) => Stopped::Shutdown,
                    Ok(Err(e)) => Stopped::CommitFailed(e),
                    Err(panic) => {
                        let why = common::telemetry::panic_message(&*panic);
                        error!(panic = %why, "the driver's event loop panicked; stopping");
                        Stopped::Panicked(why)
                    }
                });
            })?;
        Ok(stopped)
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), store::Error> {
        // Writes from rebuilding state (e.g. agents marked disconnected).
        self.commit_and_dispatch()?;
        loop {
            let deadline = self.core.poll_timeout();
            let prune_at = self.retention.as_ref().map(|r| r.next);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => break,
                },
                () = sleep_until(deadline) => {
                    let (now, wall) = clock();
                    self.core.handle_timeout(now, wall);
                }
                () = sleep_until(prune_at) => self.prune_output(),
            }
            for _ in 0..MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(_) => break,
                }
            }
            self.commit_and_dispatch()?;
        }
        for (_, tx) in self.streams.drain() {
            let _ = tx.try_send(Outbound::Close(CloseReason::Protocol(
                "coordinator shutting down".into(),
            )));
        }
        Ok(())
    }

    fn apply(&mut self, cmd: Command) {
        let (now, wall) = clock();
        match cmd {
            Command::IssueTriggered {
                delivery,
                task,
                reply,
            } => {
                let outcome = self.core.issue_triggered(&delivery, task, now, wall);
                self.reply(reply, outcome);
            }
            Command::IssueCommand {
                delivery,
                command,
                task,
                reply,
            } => {
                // A rerun or retry of the issue's last task needs it in memory.
                if let Some(last) = task
                    .source
                    .issue()
                    .and_then(|(repo, issue)| self.core.issue_tasks(repo, issue).last().copied())
                {
                    self.bring_back(last);
                }
                let outcome = self.core.issue_command(&delivery, command, task, now, wall);
                self.reply(reply, outcome);
            }
            Command::IssueFound { task, reply } => {
                let outcome = self.core.issue_found(task, now, wall);
                self.reply(reply, outcome);
            }
            Command::PullFollowUp {
                delivery,
                repo,
                number,
                by,
                instructions,
                reply,
            } => {
                if let Some(original) = self.core.pull_task(&repo, number) {
                    self.bring_back(original);
                }
                let outcome = self.core.pull_follow_up(
                    &delivery,
                    &repo,
                    number,
                    &by,
                    &instructions,
                    now,
                    wall,
                );
                self.reply(reply, outcome);
            }
            Command::DueEffects { limit, reply } => {
                let due = self.core.due_effects(wall, limit);
                self.reply(reply, due);
            }
            Command::EffectDone {
                task,
                effect,
                version,
                result,
                reply,
            } => {
                self.core.effect_done(task, effect, version, result, wall);
                self.reply(reply, ());
            }
            Command::Open {
                agent,
                peer,
                outbound,
                reply,
            } => {
                self.next_conn += 1;
                let conn = ConnId(self.next_conn);
                let result = self.core.handle_open(conn, agent, peer, now);
                if result.is_ok() {
                    self.streams.insert(conn, outbound);
                }
                self.reply(reply, result.map(|()| conn));
            }
            Command::Message { conn, msg } => self.core.handle_message(conn, msg, now, wall),
            Command::Malformed { conn, why } => self.core.protocol_error(conn, why, now, wall),
            Command::Closed { conn, reason } => {
                self.streams.remove(&conn);
                self.core.handle_closed(conn, reason, now, wall);
            }
            Command::ListAgents { reply } => {
                let agents = self.core.agents();
                self.reply(reply, agents);
            }
            Command::GetAgent { agent, reply } => {
                let view = self.core.agent(&agent);
                self.reply(reply, view);
            }
            Command::Revoke {
                agent,
                reason,
                reply,
            } => {
                let result = self.core.revoke(&agent, reason, now, wall);
                self.reply(reply, result);
            }
            Command::Drain {
                agent,
                reason,
                reply,
            } => {
                let result = self.core.drain(&agent, reason, wall);
                self.reply(reply, result);
            }
            Command::Undrain { agent, reply } => {
                let result = self.core.undrain(&agent, now, wall);
                self.reply(reply, result);
            }
            Command::Unrevoke { agent, reply } => {
                let result = self.core.unrevoke(&agent, wall);
                self.reply(reply, result);
            }
            Command::Forget { agent, reply } => {
                let result = self.core.forget(&agent);
                self.reply(reply, result);
            }
            Command::ListAdmins { reply } => {
                let admins = self.core.admins();
                self.reply(reply, admins);
            }
            Command::RevokeAdmin {
                name,
                reason,
                by,
                reply,
            } => {
                let result = self.core.revoke_admin(&name, reason, &by, wall);
                self.admins_changed |= result.is_ok();
                self.reply(reply, result);
            }
            Command::UnrevokeAdmin { name, reply } => {
                let result = self.core.unrevoke_admin(&name);
                self.admins_changed |= result.is_ok();
                self.reply(reply, result);
            }
            Command::Submit { task, reply } => {
                let id = self.core.submit(task, now, wall);
                let task = self.task_view(id).expect("invariant: just submitted");
                self.reply(reply, task);
            }
            Command::ListTasks { query, reply } => {
                let page = self.list_tasks(&query);
                self.reply(reply, page);
            }
            Command::GetTask { task, reply } => {
                let task = self.task_view(task);
                self.reply(reply, task);
            }
            Command::Watch {
                task,
                follow,
                events,
                reply,
            } => {
                let snapshot = self.task_view(task);
                self.prune_watchers();
                if follow && snapshot.as_ref().is_some_and(|t| !t.state.is_terminal()) {
                    self.watchers.entry(task).or_default().push(events);
                }
                self.reply(reply, snapshot);
            }
            Command::Cancel {
                task,
                reason,
                reply,
            } => self.task_command(task, reply, |core| core.cancel(task, reason, now, wall)),
            Command::Retry {
                task,
                reason,
                reply,
            } => self.task_command(task, reply, |core| core.retry(task, reason, now, wall)),
            Command::WatchCluster {
                recent_ended,
                events,
                reply,
            } => {
                let snapshot = self.cluster_snapshot(recent_ended);
                self.cluster_watchers.retain(|w| !w.is_closed());
                self.cluster_watchers.push(events);
                self.reply(reply, snapshot);
            }
            Command::MetricsSnapshot { reply } => {
                let snapshot = crate::metrics::Snapshot::of(&self.core);
                self.reply(reply, snapshot);
            }
        }
    }

    /// Every agent, every task not yet ended and the `recent_ended` most
    /// recently updated ended ones, and the latest lines of the former.
    fn cluster_snapshot(&self, recent_ended: usize) -> feed::Snapshot {
        let (active, in_memory_ended): (Vec<&Task>, Vec<&Task>) =
            self.core.tasks().partition(|t| !t.state.is_terminal());
        // Ended tasks still in memory (owing GitHub a write), then those
        // that left it, read back from the store.
        let mut ended: Vec<Task> = in_memory_ended.into_iter().cloned().collect();
        let recent: Vec<TaskId> = self.core.recently_finished().collect();
        ended.extend(
            recent
                .iter()
                .rev()
                .take(recent_ended)
                .filter_map(|id| self.task_view(*id)),
        );
        ended.sort_by_key(|t| std::cmp::Reverse((t.updated_at, t.id)));
        ended.truncate(recent_ended);
        ended.sort_by_key(|t| t.id);
        let lines = active
            .iter()
            .filter_map(|t| self.last_lines.get(&t.id).cloned())
            .collect();
        let tasks = active
            .iter()
            .filter_map(|t| self.task_view(t.id))
            .chain(ended)
            .collect();
        feed::Snapshot {
            agents: self.core.agents(),
            tasks,
            lines,
        }
    }

    /// Keeps the latest lines of tasks not yet ended, and hands a committed
    /// batch's changes to the cluster feeds. A feed that is gone or too slow
    /// is dropped (a slow one starts over from a snapshot). A changed task
    /// also republishes the agent of its latest attempt, whose free slots
    /// follow its tasks.
    fn publish_changes(&mut self, changes: feed::Changes) {
        for id in &changes.tasks {
            if self.core.task(*id).is_none_or(|t| t.state.is_terminal()) {
                self.last_lines.remove(id);
            }
        }
        for (id, line) in &changes.lines {
            if self.core.task(*id).is_some_and(|t| !t.state.is_terminal()) {
                self.last_lines.insert(*id, line.clone());
            }
        }
        if self.cluster_watchers.is_empty() || changes.is_empty() {
            return;
        }
        let tasks: Vec<Task> = changes
            .tasks
            .iter()
            .filter_map(|id| self.task_view(*id))
            .collect();
        let mut agents = changes.agents;
        agents.extend(
            tasks
                .iter()
                .filter_map(Task::current)
                .map(|a| a.agent.clone()),
        );
        let events: Vec<FeedEvent> = agents
            .iter()
            .filter_map(|id| self.core.agent(id))
            .map(|view| FeedEvent::Agent(Box::new(view)))
            .chain(changes.forgotten.into_iter().map(FeedEvent::AgentForgotten))
            .chain(
                tasks
                    .into_iter()
                    .map(|task| FeedEvent::Task(Box::new(task))),
            )
            .chain(changes.lines.into_values().map(FeedEvent::Line))
            .collect();
        self.cluster_watchers
            .retain(|w| events.iter().all(|e| w.try_send(e.clone()).is_ok()));
    }

    /// The tasks matching `q`: those in memory and those ended and out of
    /// it, read from the store (an admin's listing costs what the history
    /// holds; no event of the cluster does).
    fn list_tasks(&self, q: &TaskQuery) -> TaskPage {
        let matches = |t: &Task| {
            q.state.is_none_or(|s| t.state == s)
                && q.specialty.is_none_or(|s| t.spec.specialty == s)
                && q.repo.as_ref().is_none_or(|r| &t.spec.repo_url == r)
                && q.agent
                    .as_ref()
                    .is_none_or(|a| t.attempts.iter().any(|at| &at.agent == a))
                && q.outcome
                    .is_none_or(|o| t.attempts.iter().rev().find_map(|a| a.outcome) == Some(o))
        };
        let mut ids: BTreeSet<TaskId> = self
            .core
            .tasks()
            .filter(|t| matches(t))
            .map(|t| t.id)
            .collect();
        let scanned = self.store.scan_tasks(&mut |task| {
            if self.core.left_memory(task.id) && matches(&task) {
                ids.insert(task.id);
            }
        });
        if let Err(e) = scanned {
            warn!(error = %e, "cannot read the stored tasks; listing those in memory");
        }
        let total = ids.len();
        let in_order: Box<dyn Iterator<Item = &TaskId>> = if q.newest_first {
            Box::new(
                ids.iter()
                    .rev()
                    .filter(|id| q.after.is_none_or(|after| **id < after)),
            )
        } else {
            Box::new(
                ids.iter()
                    .filter(|id| q.after.is_none_or(|after| **id > after)),
            )
        };
        let mut matching = in_order;
        let tasks: Vec<Task> = matching
            .by_ref()
            .take(q.limit)
            .filter_map(|id| self.task_view(*id))
            .collect();
        let more = matching.next().is_some();
        TaskPage { tasks, more, total }
    }

    /// One step of deleting old output: a few hundred tasks looked at, then
    /// the next step soon, or the next round in an hour.
    fn prune_output(&mut self) {
        let Some(retention) = self.retention.as_mut() else {
            return;
        };
        let (now, wall) = clock();
        let cutoff = UnixMillis(
            wall.0
                .saturating_sub(u64::try_from(retention.keep.as_millis()).unwrap_or(u64::MAX)),
        );
        match self
            .store
            .prune_output(cutoff, retention.cursor, PRUNE_STEP_TASKS)
        {
            Ok((cursor, pruned)) => {
                if pruned > 0 {
                    info!(pruned, "deleted the output of tasks ended long ago");
                }
                retention.cursor = cursor;
                retention.next = now
                    + if cursor.is_some() {
                        PRUNE_STEP_PAUSE
                    } else {
                        PRUNE_ROUND_EVERY
                    };
            }
            Err(e) => {
                warn!(error = %e, "cannot delete old output; trying again later");
                retention.next = now + PRUNE_ROUND_EVERY;
            }
        }
    }

    /// An admin's command about one task (which may have ended and left
    /// memory): answered with the task as it is after.
    fn task_command(
        &mut self,
        task: TaskId,
        reply: Reply<Result<Task, TaskError>>,
        command: impl FnOnce(&mut Core) -> Result<(), TaskError>,
    ) {
        self.bring_back(task);
        let result = command(&mut self.core).map(|()| {
            self.task_view(task)
                .expect("invariant: a changed task exists")
        });
        self.reply(reply, result);
    }

    /// An ended task that left memory, as last committed.
    fn stored_task(&self, id: TaskId) -> Option<Task> {
        self.store
            .load_task(id)
            .inspect_err(|e| warn!(task_id = %id, error = %e, "cannot read a stored task"))
            .ok()
            .flatten()
    }

    /// Puts an ended task back into the core for a command about it.
    fn bring_back(&mut self, id: TaskId) {
        if self.core.left_memory(id)
            && let Some(task) = self.stored_task(id)
        {
            self.core.bring_back(task);
        }
    }

    /// A task as answered to admins: with why it waits, if queued.
    fn task_view(&self, id: TaskId) -> Option<Task> {
        let mut task = match self.core.task(id) {
            Some(task) => task.clone(),
            None => self.stored_task(id)?,
        };
        let (now, wall) = clock();
        task.waiting_reason = self.core.waiting_reason(id, now, wall);
        task.pending_effects = self
            .core
            .pending_effects(id)
            .into_iter()
            .map(|e| match e.last_error {
                Some(error) => format!(
                    "{} (tried {} times; last: {error})",
                    e.effect.as_str(),
                    e.tries
                ),
                None => e.effect.as_str().to_owned(),
            })
            .collect();
        Some(task)
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.replies.push(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    /// Commits on the driver's thread (see [`Driver::spawn`]).
    fn commit_and_dispatch(&mut self) -> Result<(), store::Error> {
        // Performing an action can feed the core again (a stuck stream is
        // closed), so repeat until a round leaves nothing behind.
        loop {
            let writes = self.core.take_writes();
            let owes_github = writes.iter().any(|w| matches!(w, Write::Outbox(_)));
            let changes = feed::Changes::of(&writes);
            if !writes.is_empty() {
                let observed = self.task_events.observe(&writes);
                let n_writes = writes.len();
                let (started, _) = clock();
                self.store
                    .commit(&writes)
                    .inspect_err(|e| error!(error = %e, "commit failed; stopping"))?;
                let took = started.elapsed();
                self.metrics.store_commit(took);
                debug!(n_writes, ?took, "committed");
                self.metrics.record(&observed);
            }
            // What ended is in the store now.
            self.core.evict_finished();
            // Before any answer: a revoked admin's next call is refused.
            if std::mem::take(&mut self.admins_changed) {
                self.revoked_admins
                    .send_replace(Arc::new(self.core.revoked_admins()));
            }
            for reply in self.replies.drain(..) {
                reply();
            }
            self.publish_changes(changes);
            let mut performed = false;
            while let Some(action) = self.core.poll_action() {
                performed = true;
                self.perform(action);
            }
            // The GitHub worker last: answers and agents' messages are
            // what someone waits on; its writes to GitHub are not.
            if owes_github {
                self.outbox.notify_one();
            }
            if !performed {
                return Ok(());
            }
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Send { conn, msg } => {
                let Some(tx) = self.streams.get(&conn) else {
                    return;
                };
                if tx.try_send(Outbound::Msg(msg)).is_err() {
                    // A stream that cannot keep up is closed; the agent
                    // reconnects and resynchronises from Hello.
                    warn!(conn = conn.0, "agent stream is not keeping up; closing it");
                    self.streams.remove(&conn);
                    let (now, wall) = clock();
                    self.core
                        .handle_closed(conn, "outbound queue full".into(), now, wall);
                }
            }
            Action::Close { conn, reason } => {
                if let Some(tx) = self.streams.remove(&conn) {
                    let _ = tx.try_send(Outbound::Close(reason));
                }
            }
            Action::Publish(event) => self.publish(event),
        }
    }

    /// Forgets watchers whose client has gone. Done at every registration,
    /// so watchers of a quiet task that come and go cannot pile up while
    /// waiting for the task's next event: the closed ones never outnumber
    /// the watchers open at the last registration.
    fn prune_watchers(&mut self) {
        self.watchers.retain(|_, watchers| {
            watchers.retain(|w| !w.is_closed());
            !watchers.is_empty()
        });
    }

    /// Hands an event to the task's watchers; a watcher that is gone or too
    /// slow is dropped (it can resume from its last position). After a
    /// terminal state nothing more comes, so the watchers are released.
    fn publish(&mut self, event: TaskEvent) {
        let task = event.task();
        let Some(watchers) = self.watchers.get_mut(&task) else {
            return;
        };
        watchers.retain(|w| w.try_send(event.clone()).is_ok());
        let ended = matches!(&event, TaskEvent::Changed(t) if t.state.is_terminal());
        if ended || watchers.is_empty() {
            self.watchers.remove(&task);
        }
    }
}

/// The driver's one clock read: monotonic time for timers, wall time for
/// what is persisted and shown.
#[allow(clippy::disallowed_methods)]
pub fn clock() -> (Instant, UnixMillis) {
    (Instant::now(), UnixMillis::now())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use common::ids::Attempt;
    use common::types::Specialty;

    use super::*;
    use crate::core::{OutputPosition, Restored, Write};
    use crate::store::StoredChunk;

    /// Counts commits; holds nothing. A commit can be made to fail or
    /// panic.
    #[derive(Default)]
    struct CountingStore {
        commits: Mutex<usize>,
        commit_fails: bool,
        commit_panics: bool,
    }

    impl CountingStore {
        fn commits(&self) -> usize {
            self.commits.lock().map_or(0, |c| *c)
        }
    }

    impl Store for CountingStore {
        fn load_agents(&self) -> Result<Vec<crate::core::AgentRecord>, store::Error> {
            Ok(Vec::new())
        }
        fn load_task(&self, _: TaskId) -> Result<Option<Task>, store::Error> {
            Ok(None)
        }
        fn scan_tasks(&self, _: &mut dyn FnMut(Task)) -> Result<(), store::Error> {
            Ok(())
        }
        fn prune_output(
            &self,
            _: common::time::UnixMillis,
            _: Option<TaskId>,
            _: usize,
        ) -> Result<(Option<TaskId>, usize), store::Error> {
            Ok((None, 0))
        }
        fn load_tasks(&self) -> Result<Vec<Task>, store::Error> {
            Ok(Vec::new())
        }
        fn load_admins(&self) -> Result<Vec<AdminRecord>, store::Error> {
            Ok(Vec::new())
        }
        fn load_deliveries(&self) -> Result<Vec<(String, common::time::UnixMillis)>, store::Error> {
            Ok(Vec::new())
        }
        fn load_outbox(&self) -> Result<Vec<crate::core::outbox::OutboxEntry>, store::Error> {
            Ok(Vec::new())
        }
        fn output_position(
            &self,
            _: TaskId,
            _: Attempt,
            _: Attempt,
        ) -> Result<OutputPosition, store::Error> {
            Ok(OutputPosition::default())
        }
        fn read_output(
            &self,
            _: TaskId,
            _: (Attempt, u64),
            _: usize,
        ) -> Result<Vec<StoredChunk>, store::Error> {
            Ok(Vec::new())
        }
        fn commit(&self, _: &[Write]) -> Result<(), store::Error> {
            assert!(!self.commit_panics, "a commit that panics");
            if self.commit_fails {
                return Err(store::Error::Task("a commit that fails".into()));
            }
            if let Ok(mut c) = self.commits.lock() {
                *c += 1;
            }
            Ok(())
        }
    }

    fn driver() -> (Driver, Arc<CountingStore>) {
        driver_on(CountingStore::default())
    }

    fn driver_on(store: CountingStore) -> (Driver, Arc<CountingStore>) {
        let store = Arc::new(store);
        let (now, wall) = clock();
        let core = Core::new(crate::core::tests::config(), Restored::default(), now, wall);
        let (driver, _handle, _admins) = Driver::new(core, Arc::clone(&store) as Arc<dyn Store>);
        (driver, store)
    }

    /// Submits a task nobody can run: it stays queued.
    fn submit(driver: &mut Driver) -> TaskId {
        let (reply, _rx) = oneshot::channel();
        driver.apply(Command::Submit {
            task: crate::core::task_tests::manual(crate::core::task_tests::spec(
                "r",
                Specialty::Backend,
            )),
            reply,
        });
        driver.core.tasks().map(|t| t.id).max().expect("submitted")
    }

    /// Registers a watcher of `task`; returns its answer and its events.
    fn watch(
        driver: &mut Driver,
        task: TaskId,
        follow: bool,
    ) -> (oneshot::Receiver<Option<Task>>, mpsc::Receiver<TaskEvent>) {
        let (events, events_rx) = mpsc::channel(8);
        let (reply, reply_rx) = oneshot::channel();
        driver.apply(Command::Watch {
            task,
            follow,
            events,
            reply,
        });
        (reply_rx, events_rx)
    }

    fn watchers(driver: &Driver, task: TaskId) -> usize {
        driver.watchers.get(&task).map_or(0, Vec::len)
    }

    /// Runs `driver` on its thread with one task to commit and no handle
    /// left (so it stops after that commit); returns how it stopped.
    async fn stop_after_one_commit(store: CountingStore) -> Stopped {
        let (mut driver, _store) = driver_on(store);
        submit(&mut driver);
        driver
            .spawn(CancellationToken::new())
            .expect("driver thread")
            .await
            .expect("the driver answers how it stopped")
    }

    #[tokio::test]
    async fn the_driver_thread_says_how_its_loop_ended() {
        assert!(matches!(
            stop_after_one_commit(CountingStore::default()).await,
            Stopped::Shutdown
        ));
        let failed = CountingStore {
            commit_fails: true,
            ..CountingStore::default()
        };
        assert!(matches!(
            stop_after_one_commit(failed).await,
            Stopped::CommitFailed(store::Error::Task(why)) if why == "a commit that fails"
        ));
        let panicking = CountingStore {
            commit_panics: true,
            ..CountingStore::default()
        };
        assert!(matches!(
            stop_after_one_commit(panicking).await,
            Stopped::Panicked(why) if why == "a commit that panics"
        ));
    }

    #[tokio::test]
    async fn a_watch_is_answered_only_once_its_batch_is_committed() {
        let (mut driver, store) = driver();
        let task = submit(&mut driver);
        let (mut answer, _events) = watch(&mut driver, task, true);
        assert!(
            answer.try_recv().is_err(),
            "the snapshot shows a task not yet committed"
        );
        driver.commit_and_dispatch().expect("commit");
        assert_eq!(store.commits(), 1);
        let snapshot = answer.try_recv().expect("answered after the commit");
        assert_eq!(snapshot.map(|t| t.id), Some(task));
    }

    fn watch_cluster(
        driver: &mut Driver,
        queue: usize,
    ) -> (oneshot::Receiver<feed::Snapshot>, mpsc::Receiver<FeedEvent>) {
        let (events, events_rx) = mpsc::channel(queue);
        let (reply, reply_rx) = oneshot::channel();
        driver.apply(Command::WatchCluster {
            recent_ended: 5,
            events,
            reply,
        });
        (reply_rx, events_rx)
    }

    #[tokio::test]
    async fn a_cluster_feed_gets_a_snapshot_then_committed_changes_until_it_goes_or_lags() {
        let (mut driver, _store) = driver();
        let first = submit(&mut driver);
        driver.commit_and_dispatch().expect("commit");
        let (mut answer, mut events) = watch_cluster(&mut driver, 8);
        assert!(answer.try_recv().is_err(), "answered only after the commit");
        driver.commit_and_dispatch().expect("commit");
        let snapshot = answer.try_recv().expect("answered");
        assert_eq!(
            snapshot.tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
            [first]
        );
        assert!(
            snapshot.tasks[0].waiting_reason.is_some(),
            "tasks are shown as to admins"
        );

        let second = submit(&mut driver);
        driver.commit_and_dispatch().expect("commit");
        match events.try_recv() {
            Ok(FeedEvent::Task(task)) => assert_eq!(task.id, second),
            other => panic!("expected the new task, got {other:?}"),
        }

        let (_answer, slow) = watch_cluster(&mut driver, 1);
        driver.commit_and_dispatch().expect("commit");
        assert_eq!(driver.cluster_watchers.len(), 2);
        for _ in 0..2 {
            submit(&mut driver);
            driver.commit_and_dispatch().expect("commit");
        }
        assert_eq!(
            driver.cluster_watchers.len(),
            1,
            "a feed whose queue is full is dropped (it resyncs)"
        );
        drop(slow);

        drop(events);
        let (_answer, _kept) = watch_cluster(&mut driver, 8);
        assert_eq!(
            driver.cluster_watchers.len(),
            1,
            "a closed feed is pruned at the next registration"
        );
        driver.commit_and_dispatch().expect("commit");
    }

    #[tokio::test]
    async fn only_followers_are_registered_and_gone_ones_are_pruned() {
        let (mut driver, _store) = driver();
        let task = submit(&mut driver);
        let (_answer, _events) = watch(&mut driver, task, false);
        assert_eq!(
            watchers(&driver, task),
            0,
            "a one-off read is not a watcher"
        );

        let (_a1, gone) = watch(&mut driver, task, true);
        let (_a2, _kept) = watch(&mut driver, task, true);
        assert_eq!(watchers(&driver, task), 2);
        drop(gone);
        let (_a3, _also_kept) = watch(&mut driver, task, true);
        assert_eq!(
            watchers(&driver, task),
            2,
            "a closed watcher is pruned without waiting for an event"
        );

        let other = submit(&mut driver);
        drop((_kept, _also_kept));
        let (_a4, _watching_other) = watch(&mut driver, other, true);
        assert!(
            !driver.watchers.contains_key(&task),
            "a task without watchers is forgotten"
        );
        driver.commit_and_dispatch().expect("commit");
    }
}
