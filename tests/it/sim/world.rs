//! The simulated world around the real [`Core`] and the real agent
//! [`Session`]s: a clock, a network of streams with latency, a coordinator
//! driver that commits to a real sled store before it acts, agent drivers
//! and their children (simulated CLI runs), an admin, and the faults.
//!
//! Everything happens in one thread, in the order of a queue keyed by
//! (simulated time, sequence number), so a seed always replays the same run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agent::session::{Command, Outbound, Session};
use common::ids::{AgentId, Attempt, TaskId};
use common::protocol::OutputChunk;
use common::time::UnixMillis;
use common::types::{AgentAdvert, Outcome, OutputKind, Phase, Specialty, TaskSpec, Toolchain};
use coordinator::core::task::TRUNCATION_MARKER;
use coordinator::core::{
    Action, AgentState, ConnId, Core, CoreConfig, FromAgent, NewTask, Task, TaskSource, TaskState,
    ToAgent, Write,
};
use coordinator::store::{SledStore, Store};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::agent::{Child, SimAgent, WorkPlan, chunk_data, report};
use super::checks;
use super::trace::{Trace, TraceItem};

/// Wall-clock time at simulated time zero.
const WALL_ORIGIN_MS: u64 = 1_700_000_000_000;
/// How long the driver's commit takes: inputs arriving meanwhile join the
/// batch (group commit).
const COMMIT_MS: u64 = 20;
/// How often the simulated driver polls while the core reports a deadline
/// that has already passed (see `Stats::stale_deadlines`).
const STALE_DEADLINE_POLL_MS: u64 = 250;
/// Simulated time the calm phase may take to finish every task.
const CALM_LIMIT_MS: u64 = 10 * 60 * 1000;
/// Events the whole run may take: a livelock detector.
const MAX_STEPS: u64 = 200_000;

// Fault rates while faults are on.
const P_SLOW_MESSAGE: f64 = 0.04;
const P_DUPLICATE: f64 = 0.03;
const P_CRASH_IN_BATCH: f64 = 0.01;
const P_CRASH_BEFORE_EACH_ACTION: f64 = 0.25;
/// A dropped stream is noticed by the coordinator's gRPC layer this often;
/// otherwise only the heartbeat timeout finds it.
const P_COORDINATOR_SEES_DROP: f64 = 0.7;
/// A dropped stream is noticed by the agent's link this often; otherwise
/// only the session's silence timeout finds it.
const P_AGENT_SEES_DROP: f64 = 0.8;
// How agents' attempts end: mostly success, sometimes a failure (retried),
// now and then the API's usage limit (requeued, the agent cools down) or a
// fault of the PC (requeued, the agent unhealthy until a check passes).
const P_CLI_FAILED: f64 = 0.12;
const P_RATE_LIMITED: f64 = 0.03;
const P_AGENT_FAULT: f64 = 0.02;
/// In seeds with few attempts, a task whose every run fails: it fails for
/// good once they are spent.
const P_DOOMED_TASK: f64 = 0.15;
/// Seeds whose tasks get only a few attempts (at most `MAX_FEW_ATTEMPTS`),
/// so faults and failures end some of them as `Failed`.
const P_FEW_ATTEMPTS: f64 = 0.3;
const MAX_FEW_ATTEMPTS: u32 = 3;
/// A health check of an unhealthy PC passes this often.
const P_HEALTH_CHECK_PASSES: f64 = 0.7;

const REPOS: [&str; 3] = [
    "https://git.example/shop",
    "https://git.example/site",
    "https://git.example/infra",
];
const TECHNOLOGIES: [&str; 4] = ["rust", "python", "react", "docker"];
const TOOLCHAINS: [&str; 4] = ["cargo", "python3", "node", "docker"];

/// Small timings: a simulated run lasts a minute or so.
pub(super) fn config(max_attempts: u32) -> CoreConfig {
    CoreConfig {
        heartbeat_interval: Duration::from_secs(3),
        heartbeat_timeout: Duration::from_secs(9),
        hello_timeout: Duration::from_secs(3),
        lease_timeout: Duration::from_secs(10),
        accept_timeout: Duration::from_secs(3),
        task_deadline: Duration::from_secs(600),
        max_attempts,
        retry_backoff_initial: Duration::from_millis(200),
        retry_backoff_max: Duration::from_secs(2),
        general_fallback_after: Duration::from_secs(4),
        output_cap_bytes: 2_000,
        rate_limit_cooldown: Duration::from_secs(5),
        rate_limit_cooldown_max: Duration::from_secs(600),
        delivery_window: Duration::from_secs(3600),
    }
}

/// Counts over one run (and summed over many) for the report.
#[derive(Clone, Debug, Default)]
pub(super) struct Stats {
    pub steps: u64,
    pub commits: u64,
    pub simulated_ms: u64,
    pub tasks: u64,
    pub succeeded: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub attempts: u64,
    pub coordinator_crashes: u64,
    pub agent_crashes: u64,
    pub dropped_streams: u64,
    pub duplicates: u64,
    pub slow_messages: u64,
    pub admin_cancels: u64,
    pub admin_retries: u64,
    pub revokes: u64,
    pub unrevokes: u64,
    pub drains: u64,
    pub undrains: u64,
    pub agent_stops: u64,
    pub silent_streams: u64,
    pub health_checks: u64,
    pub lost_submits: u64,
    /// Times `poll_timeout` named a deadline `handle_timeout` had already
    /// been given: a real driver would spin on it (a known core bug, see
    /// `World::timer_due`).
    pub stale_deadlines: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.commits += o.commits;
        self.simulated_ms += o.simulated_ms;
        self.tasks += o.tasks;
        self.succeeded += o.succeeded;
        self.cancelled += o.cancelled;
        self.failed += o.failed;
        self.attempts += o.attempts;
        self.coordinator_crashes += o.coordinator_crashes;
        self.agent_crashes += o.agent_crashes;
        self.dropped_streams += o.dropped_streams;
        self.duplicates += o.duplicates;
        self.slow_messages += o.slow_messages;
        self.admin_cancels += o.admin_cancels;
        self.admin_retries += o.admin_retries;
        self.revokes += o.revokes;
        self.unrevokes += o.unrevokes;
        self.drains += o.drains;
        self.undrains += o.undrains;
        self.agent_stops += o.agent_stops;
        self.silent_streams += o.silent_streams;
        self.health_checks += o.health_checks;
        self.lost_submits += o.lost_submits;
        self.stale_deadlines += o.stale_deadlines;
    }
}

/// Something that happens at a point of simulated time.
#[derive(Clone, Debug)]
pub(super) enum Event {
    /// An agent's message arrives at the coordinator.
    ToCoordinator {
        conn: ConnId,
        msg: FromAgent,
        /// A second copy of a message (shown in the trace).
        duplicate: bool,
    },
    /// A coordinator's message arrives at an agent.
    ToAgent {
        conn: ConnId,
        msg: ToAgent,
    },
    /// The coordinator's gRPC layer notices that a stream ended.
    CoordinatorSeesClose {
        conn: ConnId,
    },
    /// An agent notices that its stream ended.
    AgentSeesClose {
        agent: usize,
        conn: ConnId,
    },
    /// An agent (re)connects: after a lost stream, a crash, or at start;
    /// its process starts first if it is down.
    AgentConnect {
        agent: usize,
        incarnation: u32,
    },
    /// A health check the session asked for has its result.
    HealthChecked {
        agent: usize,
        incarnation: u32,
        passed: bool,
    },
    /// The next step of an agent's child (a CLI run) on an attempt.
    AgentWork {
        agent: usize,
        incarnation: u32,
        task: TaskId,
        attempt: Attempt,
    },
    /// The driver commits its batch, then performs the batch's actions.
    Commit {
        life: u32,
    },
    CoordinatorRestart,
    Submit(Box<NewTask>),
    /// The fault injector picks something to break.
    Fault,
    /// From here on nothing breaks; every task must finish.
    EndOfFaults,
    /// The admin lets every revoked or drained agent back (again, until
    /// the coordinator is up to hear it).
    LetAgentsBack,
}

/// Whose driver a timer wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Coordinator,
    Agent(usize),
}

/// What an admin does to an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentChange {
    Revoke,
    Unrevoke,
    Drain,
    Undrain,
}

/// One gRPC stream between an agent and one life of the coordinator.
#[derive(Debug)]
struct Link {
    agent: usize,
    /// The coordinator life that accepted it.
    life: u32,
    open: bool,
    /// Messages of one stream arrive in order: the latest arrival so far,
    /// per direction.
    last_to_coordinator: u64,
    last_to_agent: u64,
    /// The agent has received the stream's Welcome.
    welcomed: bool,
}

/// An admin answer held back until its batch is committed.
#[derive(Debug)]
enum Reply {
    Submitted(TaskId, Box<NewTask>),
}

/// A running coordinator process: the core and its driver's batch.
struct Coordinator {
    core: Core,
    life: u32,
    batch_open: bool,
    replies: Vec<Reply>,
    /// When `handle_timeout` was last called.
    last_timeout_ms: Option<u64>,
    /// `poll_timeout` in simulated ms, cached until the next input.
    deadline: Option<Option<u64>>,
}

/// Where the coordinator dies when a batch is cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashPoint {
    BeforeCommit,
    AfterCommit,
    AmongActions,
}

/// What the simulation knows independently of the core.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The tasks in the store, read back after each commit.
    pub committed: BTreeMap<TaskId, Task>,
    /// Each task's first committed terminal version: it must never change.
    pub terminal: BTreeMap<TaskId, Task>,
    /// Tasks whose submission was acknowledged to the admin.
    pub acknowledged: BTreeSet<TaskId>,
    /// Tasks an admin asked to cancel.
    pub cancel_requested: BTreeSet<TaskId>,
    /// The output chunks each attempt's agent produced (the last seq).
    pub produced: BTreeMap<(TaskId, Attempt), u64>,
    /// Tasks whose every run fails.
    pub doomed: BTreeMap<TaskId, bool>,
    /// Submissions not yet acknowledged (the admin retries lost ones).
    pub unacknowledged_submits: usize,
    /// The highest output seq in the store per attempt.
    pub stored_seq: BTreeMap<(TaskId, Attempt), u64>,
    /// Tasks whose output reached the cap (the store holds a marker).
    pub truncated: BTreeSet<TaskId>,
}

impl Ledger {
    /// Reads back from the store what a committed batch stored of the
    /// tasks it touched: their records and output. A task the batch wrote
    /// must read back as written, and a terminal task must never be
    /// rewritten differently (seen as the store holds it after each batch:
    /// a batch is committed at once).
    fn record(&mut self, store: &impl Store, writes: &[Write]) -> Result<(), String> {
        let touched: BTreeSet<TaskId> = writes.iter().filter_map(Write::task).collect();
        for id in touched {
            // Output is stored for a task's live attempt only: what the
            // batch stored follows what was stored of the attempt that was
            // current before it.
            let from =
                self.committed
                    .get(&id)
                    .and_then(Task::current)
                    .map_or((Attempt(0), 0), |a| {
                        let stored = self.stored_seq.get(&(id, a.attempt)).copied();
                        (a.attempt, stored.unwrap_or(0) + 1)
                    });
            let output = store
                .read_output(id, from, usize::MAX)
                .map_err(|e| format!("the store cannot read the output of {id}: {e}"))?;
            for chunk in output {
                let stored = self.stored_seq.entry((id, chunk.attempt)).or_default();
                *stored = (*stored).max(chunk.seq);
                if chunk.kind == OutputKind::System && chunk.data.starts_with(TRUNCATION_MARKER) {
                    self.truncated.insert(id);
                }
            }
            let stored = store
                .load_task(id)
                .map_err(|e| format!("the store cannot read task {id}: {e}"))?;
            let written = writes.iter().rev().find_map(|w| match w {
                Write::Task(task) if task.id == id => Some(&**task),
                _ => None,
            });
            if written.is_some() && written != stored.as_ref() {
                return Err(format!(
                    "task {id} reads back from the store differently from what was committed: \
                     {written:?} became {stored:?}"
                ));
            }
            let Some(task) = stored else {
                continue;
            };
            match self.terminal.get(&id) {
                Some(done) if *done != task => {
                    return Err(format!(
                        "terminal task {id} was rewritten: {:?} ({}) became {:?} ({})",
                        done.state, done.state_reason, task.state, task.state_reason
                    ));
                }
                Some(_) => {}
                None if task.state.is_terminal() => {
                    self.terminal.insert(id, task.clone());
                }
                None => {}
            }
            self.committed.insert(id, task);
        }
        Ok(())
    }
}

pub(super) struct World {
    rng: StdRng,
    config: CoreConfig,
    origin: Instant,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    next_seq: u64,
    store: SledStore,
    coordinator: Option<Coordinator>,
    lives: u32,
    agents: Vec<SimAgent>,
    links: BTreeMap<ConnId, Link>,
    next_conn: u64,
    faults: bool,
    /// The core was given an input since the invariants were last checked.
    core_changed: bool,
    calm_since: u64,
    strict: bool,
    ledger: Ledger,
    pub trace: Trace,
    pub stats: Stats,
}

/// The origin of simulated time. Only differences of instants matter to
/// the core, so any instant will do; this is the one clock read of the sim.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

impl World {
    /// A random cluster and workload drawn from `seed`. `strict` turns the
    /// known-bug observations into failures.
    pub fn new(seed: u64, strict: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n_agents = rng.random_range(2..=5);
        let agents = (0..n_agents).map(|i| random_agent(&mut rng, i)).collect();
        let max_attempts = if rng.random_bool(P_FEW_ATTEMPTS) {
            rng.random_range(1..=MAX_FEW_ATTEMPTS)
        } else {
            // Faults alone do not use up a task's attempts.
            20
        };
        let config = config(max_attempts);
        let store = SledStore::temporary().expect("a temporary sled store opens");
        let origin = origin();
        let core = Core::new(
            config.clone(),
            coordinator::restore(&store).expect("an empty store restores"),
            origin,
            UnixMillis(WALL_ORIGIN_MS),
        );
        let mut world = Self {
            rng,
            config,
            origin,
            now: 0,
            queue: BTreeMap::new(),
            next_seq: 0,
            store,
            coordinator: Some(Coordinator {
                core,
                life: 0,
                batch_open: false,
                replies: Vec::new(),
                last_timeout_ms: None,
                deadline: None,
            }),
            lives: 0,
            agents,
            links: BTreeMap::new(),
            next_conn: 0,
            faults: true,
            core_changed: false,
            calm_since: 0,
            strict,
            ledger: Ledger::default(),
            trace: Trace::default(),
            stats: Stats::default(),
        };
        world.plan_scenario();
        world
    }

    /// Schedules the workload: agents coming up, submissions, faults, and
    /// the end of faults.
    fn plan_scenario(&mut self) {
        let chaos_ms = self.rng.random_range(5_000..16_000);
        for agent in 0..self.agents.len() {
            let at = self.rng.random_range(0..1_000);
            self.schedule(
                at,
                Event::AgentConnect {
                    agent,
                    incarnation: 0,
                },
            );
        }
        let n_tasks = self.rng.random_range(4..=16);
        for _ in 0..n_tasks {
            let at = self.rng.random_range(0..chaos_ms);
            let task = random_task(&mut self.rng);
            self.ledger.unacknowledged_submits += 1;
            self.schedule(at, Event::Submit(Box::new(task)));
        }
        let first_fault = self.rng.random_range(300..2_000);
        self.schedule(first_fault, Event::Fault);
        self.schedule(chaos_ms, Event::EndOfFaults);
    }

    // ---- the run ----

    /// Runs until every submitted task is finished and the faults are over.
    pub fn run(&mut self) -> Result<(), String> {
        loop {
            if !self.faults && self.quiescent() {
                return self.final_checks();
            }
            self.stats.steps += 1;
            if self.stats.steps > MAX_STEPS {
                return Err(format!("livelock: not quiescent after {MAX_STEPS} steps"));
            }
            if !self.faults && self.now > self.calm_since + CALM_LIMIT_MS {
                return Err(format!(
                    "livelock: tasks still unfinished {}s after the last fault: {}",
                    CALM_LIMIT_MS / 1000,
                    self.unfinished()
                ));
            }
            let timer = self.next_timer();
            let next = self.queue.first_key_value().map(|(&(at, _), _)| at);
            match (next, timer) {
                (Some(at), Some((t, timer))) if t < at => self.fire(timer, t)?,
                (None, Some((t, timer))) => self.fire(timer, t)?,
                (Some(_), _) => {
                    let ((at, _), event) = self.queue.pop_first().expect("peeked above");
                    self.now = self.now.max(at);
                    self.trace
                        .push(self.now, TraceItem::Event(Box::new(event.clone())));
                    self.handle(event)?;
                }
                (None, None) => {
                    return Err(format!(
                        "nothing left to happen, yet tasks are unfinished: {}",
                        self.unfinished()
                    ));
                }
            }
            self.stats.simulated_ms = self.now;
            // Only inputs change the core; committing and polling do not.
            if std::mem::take(&mut self.core_changed)
                && let Some(c) = &self.coordinator
            {
                checks::core_invariants(&c.core, &self.ledger)?;
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::ToCoordinator { conn, msg, .. } => {
                if self.link_reaches_coordinator(conn) {
                    self.feed(|core, now, wall| core.handle_message(conn, msg, now, wall));
                }
            }
            Event::ToAgent { conn, msg } => {
                let agent = self
                    .links
                    .get(&conn)
                    .filter(|l| l.open)
                    .map(|l| l.agent)
                    .filter(|&a| self.agents[a].link == Some(conn));
                if let Some(agent) = agent {
                    self.agent_receives(agent, conn, msg)?;
                }
            }
            Event::CoordinatorSeesClose { conn } => {
                if self.link_belongs_to_this_life(conn) {
                    self.feed(|core, now, wall| {
                        core.handle_closed(conn, "stream ended".into(), now, wall);
                    });
                }
            }
            Event::AgentSeesClose { agent, conn } => {
                if self.agents[agent].link == Some(conn) {
                    self.agents[agent].link = None;
                    if let Some(session) = self.agents[agent].session.as_mut() {
                        session.handle_disconnected();
                    }
                    self.reconnect_later(agent);
                }
            }
            Event::AgentConnect { agent, incarnation } => self.connect(agent, incarnation)?,
            Event::HealthChecked {
                agent,
                incarnation,
                passed,
            } => {
                let now = self.instant();
                let a = &mut self.agents[agent];
                if a.incarnation == incarnation
                    && let Some(session) = a.session.as_mut()
                {
                    let reason = (!passed).then(|| "simulated: the CLI is not logged in".into());
                    session.handle_health(reason, now);
                    self.flush_agent(agent)?;
                }
            }
            Event::AgentWork {
                agent,
                incarnation,
                task,
                attempt,
            } => self.work(agent, incarnation, task, attempt)?,
            Event::Commit { life } => self.commit(life)?,
            Event::CoordinatorRestart => self.restart()?,
            Event::Submit(task) => self.submit(task),
            Event::Fault => self.fault()?,
            Event::EndOfFaults => {
                self.faults = false;
                self.calm_since = self.now;
                self.schedule(self.now, Event::LetAgentsBack);
            }
            Event::LetAgentsBack => self.let_agents_back(),
        }
        Ok(())
    }

    // ---- time ----

    fn instant(&self) -> Instant {
        self.origin + Duration::from_millis(self.now)
    }

    fn wall(&self) -> UnixMillis {
        UnixMillis(WALL_ORIGIN_MS + self.now)
    }

    fn note(&mut self, what: String) {
        self.trace.push(self.now, TraceItem::Note(what));
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.next_seq += 1;
        self.queue.insert((at, self.next_seq), event);
    }

    /// The next timer due: the coordinator driver's or an agent driver's,
    /// whichever comes first.
    fn next_timer(&mut self) -> Option<(u64, Timer)> {
        let coordinator = self.coordinator_timer().map(|at| (at, Timer::Coordinator));
        let origin = self.origin;
        let now = self.now;
        let agents = self.agents.iter().enumerate().filter_map(|(i, a)| {
            let at = a.session.as_ref()?.poll_timeout()?;
            Some((ms_since(origin, at).max(now), Timer::Agent(i)))
        });
        coordinator.into_iter().chain(agents).min()
    }

    fn fire(&mut self, timer: Timer, at: u64) -> Result<(), String> {
        match timer {
            Timer::Coordinator => self.fire_coordinator_timer(at),
            Timer::Agent(agent) => self.fire_agent_timer(agent, at),
        }
    }

    /// When the coordinator's driver would call `handle_timeout` next.
    fn coordinator_timer(&mut self) -> Option<u64> {
        let origin = self.origin;
        let c = self.coordinator.as_mut()?;
        // Only inputs move the core's deadlines.
        let deadline = *c
            .deadline
            .get_or_insert_with(|| c.core.poll_timeout().map(|at| ms_since(origin, at)));
        let deadline = deadline?;
        match c.last_timeout_ms {
            // A `poll_timeout` that stays in the past would make the real
            // driver spin (a bug this simulation found and that is fixed:
            // passed retry backoffs were returned). It is counted in
            // `Stats::stale_deadlines` and fails the run unless
            // SIM_STRICT=0; meanwhile poll so later deadlines are served.
            Some(last) if deadline <= last => Some(last + STALE_DEADLINE_POLL_MS),
            _ => Some(deadline.max(self.now)),
        }
    }

    fn fire_coordinator_timer(&mut self, at: u64) -> Result<(), String> {
        self.now = self.now.max(at);
        self.trace.push(self.now, TraceItem::Timer);
        self.feed(|core, now, wall| core.handle_timeout(now, wall));
        let now = self.now;
        let Some(c) = self.coordinator.as_mut() else {
            return Ok(());
        };
        c.last_timeout_ms = Some(now);
        let next = c.core.poll_timeout().map(|at| ms_since(self.origin, at));
        if next.is_some_and(|d| d <= now) {
            self.stats.stale_deadlines += 1;
            if self.strict {
                return Err(format!(
                    "poll_timeout() is still {}ms after handle_timeout({now}ms): the driver would spin",
                    next.unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    /// The agent's driver wakes at its session's `poll_timeout`.
    fn fire_agent_timer(&mut self, agent: usize, at: u64) -> Result<(), String> {
        self.now = self.now.max(at);
        self.trace.push(self.now, TraceItem::AgentTimer(agent));
        let now = self.instant();
        let Some(session) = self.agents[agent].session.as_mut() else {
            return Ok(());
        };
        session.handle_timeout(now);
        if session.poll_timeout().is_some_and(|next| next <= now) {
            return Err(format!(
                "{}: the session's poll_timeout() is not past handle_timeout({}ms): the driver would spin",
                self.agents[agent].id, self.now
            ));
        }
        self.flush_agent(agent)
    }

    // ---- the coordinator and its driver ----

    /// Applies one input to the core, in the current batch.
    fn feed(&mut self, input: impl FnOnce(&mut Core, Instant, UnixMillis)) {
        let (now, wall) = (self.instant(), self.wall());
        let Some(c) = self.coordinator.as_mut() else {
            return;
        };
        input(&mut c.core, now, wall);
        c.deadline = None;
        self.core_changed = true;
        if !c.batch_open {
            c.batch_open = true;
            let life = c.life;
            self.schedule(self.now + COMMIT_MS, Event::Commit { life });
        }
    }

    /// The driver's `commit_and_dispatch`: writes first, then answers, then
    /// actions. A crash may cut it short anywhere.
    fn commit(&mut self, life: u32) -> Result<(), String> {
        let crash = self.crash_point();
        let Some(c) = self.coordinator.as_mut().filter(|c| c.life == life) else {
            return Ok(());
        };
        c.batch_open = false;
        if crash == Some(CrashPoint::BeforeCommit) {
            self.crash_coordinator("before committing its batch");
            return Ok(());
        }
        let writes = c.core.take_writes();
        let replies = std::mem::take(&mut c.replies);
        if !writes.is_empty() {
            self.store
                .commit(&writes)
                .expect("the temporary store commits");
            self.stats.commits += 1;
        }
        // As the driver does: what ended is in the store now.
        c.core.evict_finished();
        self.ledger.record(&self.store, &writes)?;
        for reply in replies {
            match reply {
                Reply::Submitted(id, _) => {
                    self.ledger.acknowledged.insert(id);
                    self.ledger.unacknowledged_submits -= 1;
                }
            }
        }
        if crash == Some(CrashPoint::AfterCommit) {
            self.core_matches_store()?;
            self.crash_coordinator("after committing, before acting");
            return Ok(());
        }
        while let Some(action) = self.coordinator.as_mut().and_then(|c| c.core.poll_action()) {
            if crash == Some(CrashPoint::AmongActions)
                && self.rng.random_bool(P_CRASH_BEFORE_EACH_ACTION)
            {
                self.crash_coordinator("while performing its actions");
                return Ok(());
            }
            self.perform(action);
        }
        Ok(())
    }

    fn crash_point(&mut self) -> Option<CrashPoint> {
        if !self.faults || !self.rng.random_bool(P_CRASH_IN_BATCH) {
            return None;
        }
        [
            CrashPoint::BeforeCommit,
            CrashPoint::AfterCommit,
            CrashPoint::AmongActions,
        ]
        .choose(&mut self.rng)
        .copied()
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Send { conn, msg } => self.coordinator_sends(conn, msg),
            Action::Close { conn, .. } => {
                if self.close_link(conn) {
                    // The gRPC layer reports the end of every stream.
                    let delay = self.rng.random_range(1..20);
                    self.schedule(self.now + delay, Event::CoordinatorSeesClose { conn });
                }
            }
            Action::Publish(_) => {}
        }
    }

    /// The process dies: the batch in progress is lost, every stream drops.
    fn crash_coordinator(&mut self, when: &str) {
        let Some(c) = self.coordinator.take() else {
            return;
        };
        self.stats.coordinator_crashes += 1;
        self.note(format!("the coordinator crashes {when}"));
        for reply in c.replies {
            let Reply::Submitted(_, task) = reply;
            // The admin saw an error and submits again.
            self.stats.lost_submits += 1;
            let delay = self.rng.random_range(300..2_000);
            self.schedule(self.now + delay, Event::Submit(task));
        }
        let streams: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| l.open && l.life == c.life)
            .map(|(conn, _)| *conn)
            .collect();
        for conn in streams {
            self.close_link(conn);
        }
        let delay = self.rng.random_range(200..3_000);
        self.schedule(self.now + delay, Event::CoordinatorRestart);
    }

    /// A new coordinator process rebuilds its core from the same store.
    fn restart(&mut self) -> Result<(), String> {
        let restored = coordinator::restore(&self.store).expect("the store restores");
        let core = Core::new(self.config.clone(), restored, self.instant(), self.wall());
        let tasks = known_tasks(&core, &self.ledger.committed);
        if tasks != self.ledger.committed {
            return Err(checks::diff_tasks(
                "the restarted core's tasks differ from those committed",
                &self.ledger.committed,
                &tasks,
            ));
        }
        checks::stored_output(&self.store, &self.ledger, false)?;
        self.lives += 1;
        self.note(format!("coordinator life {} starts", self.lives));
        self.coordinator = Some(Coordinator {
            core,
            life: self.lives,
            batch_open: false,
            replies: Vec::new(),
            last_timeout_ms: None,
            deadline: None,
        });
        // Rebuilding writes too (agents marked disconnected).
        self.feed(|_, _, _| {});
        Ok(())
    }

    fn core_matches_store(&self) -> Result<(), String> {
        let Some(c) = &self.coordinator else {
            return Ok(());
        };
        let memory = known_tasks(&c.core, &self.ledger.committed);
        if memory != self.ledger.committed {
            return Err(checks::diff_tasks(
                "after a commit, the core's tasks differ from the store's",
                &self.ledger.committed,
                &memory,
            ));
        }
        Ok(())
    }

    // ---- the admin ----

    fn submit(&mut self, task: Box<NewTask>) {
        if self.coordinator.is_none() {
            let retry = self.rng.random_range(1_000..2_000);
            self.schedule(self.now + retry, Event::Submit(task));
            return;
        }
        let mut id = None;
        let new = (*task).clone();
        self.feed(|core, now, wall| id = Some(core.submit(new, now, wall)));
        if let (Some(c), Some(id)) = (self.coordinator.as_mut(), id) {
            c.replies.push(Reply::Submitted(id, task));
        }
    }

    fn cancel_some_task(&mut self) {
        let candidates: Vec<TaskId> = self.ledger.acknowledged.iter().copied().collect();
        let Some(&id) = candidates.choose(&mut self.rng) else {
            return;
        };
        let mut accepted = false;
        let stored = self.ledger.committed.get(&id).cloned();
        self.feed(|core, now, wall| {
            bring_back(core, stored);
            accepted = core.cancel(id, "simulated admin".into(), now, wall).is_ok();
        });
        self.note(format!("the admin cancels {id}"));
        if accepted {
            self.stats.admin_cancels += 1;
            self.ledger.cancel_requested.insert(id);
        }
    }

    /// An admin retries a failed or cancelled task: the one change a
    /// terminal task may see.
    fn retry_some_task(&mut self) {
        let Some(c) = &self.coordinator else {
            return;
        };
        let ended: Vec<TaskId> = known_tasks(&c.core, &self.ledger.committed)
            .into_values()
            .filter(|t| matches!(t.state, TaskState::Failed | TaskState::Cancelled))
            .map(|t| t.id)
            .collect();
        let Some(&id) = ended.choose(&mut self.rng) else {
            return;
        };
        let mut accepted = false;
        let stored = self.ledger.committed.get(&id).cloned();
        self.feed(|core, now, wall| {
            bring_back(core, stored);
            accepted = core
                .retry(id, "retried by an admin".into(), now, wall)
                .is_ok()
        });
        self.note(format!("the admin retries {id}"));
        if accepted {
            self.stats.admin_retries += 1;
            self.ledger.terminal.remove(&id);
        }
    }

    /// The admin's agent mutators: revoke (the agent is refused at its next
    /// connect and exits), unrevoke (it is started again), drain, undrain.
    fn admin_on_agent(&mut self, agent: usize, what: AgentChange) {
        let id = self.agents[agent].id.clone();
        let mut accepted = false;
        self.feed(|core, now, wall| {
            let reason = "simulated admin".to_owned();
            accepted = match what {
                AgentChange::Revoke => core.revoke(&id, reason, now, wall).is_ok(),
                AgentChange::Unrevoke => core.unrevoke(&id, wall).is_ok(),
                AgentChange::Drain => core.drain(&id, reason, wall).is_ok(),
                AgentChange::Undrain => core.undrain(&id, now, wall).is_ok(),
            };
        });
        if !accepted {
            return;
        }
        self.note(format!("the admin: {what:?} {id}"));
        match what {
            AgentChange::Revoke => self.stats.revokes += 1,
            AgentChange::Unrevoke => {
                self.stats.unrevokes += 1;
                // The operator starts the refused agent again.
                if std::mem::take(&mut self.agents[agent].refused) {
                    let incarnation = self.agents[agent].incarnation;
                    let delay = self.rng.random_range(100..1_000);
                    self.schedule(self.now + delay, Event::AgentConnect { agent, incarnation });
                }
            }
            AgentChange::Drain => self.stats.drains += 1,
            AgentChange::Undrain => self.stats.undrains += 1,
        }
    }

    /// Agents the core has in `state` (and, for `Draining`, drained by an
    /// admin).
    fn agents_in(&self, state: AgentState) -> Vec<usize> {
        let Some(c) = &self.coordinator else {
            return Vec::new();
        };
        (0..self.agents.len())
            .filter(|&i| {
                c.core.agent(&self.agents[i].id).is_some_and(|v| {
                    v.record.state == state
                        && (state != AgentState::Draining || v.record.drain_reason.is_some())
                })
            })
            .collect()
    }

    /// Once faults are over, every agent may work again.
    fn let_agents_back(&mut self) {
        if self.coordinator.is_none() {
            self.schedule(self.now + 500, Event::LetAgentsBack);
            return;
        }
        for agent in self.agents_in(AgentState::Revoked) {
            self.admin_on_agent(agent, AgentChange::Unrevoke);
        }
        for agent in self.agents_in(AgentState::Draining) {
            self.admin_on_agent(agent, AgentChange::Undrain);
        }
        // Refused by a revocation the coordinator has since forgotten (it
        // was lost in a crash): started again too.
        for agent in 0..self.agents.len() {
            if std::mem::take(&mut self.agents[agent].refused) {
                let incarnation = self.agents[agent].incarnation;
                self.schedule(self.now + 100, Event::AgentConnect { agent, incarnation });
            }
        }
    }

    // ---- faults ----

    fn fault(&mut self) -> Result<(), String> {
        if !self.faults {
            return Ok(());
        }
        let agent = self.rng.random_range(0..self.agents.len());
        match self.rng.random_range(0..100) {
            0..32 => self.drop_stream(agent),
            32..46 => self.crash_agent(agent),
            46..51 => self.stop_agent(agent)?,
            51..61 => self.crash_coordinator("at a random moment"),
            61..71 => self.cancel_some_task(),
            71..77 => self.retry_some_task(),
            77..80 => self.admin_on_agent(agent, AgentChange::Revoke),
            80..85 => {
                if let Some(&agent) = self.agents_in(AgentState::Revoked).choose(&mut self.rng) {
                    self.admin_on_agent(agent, AgentChange::Unrevoke);
                }
            }
            85..89 => self.admin_on_agent(agent, AgentChange::Drain),
            89..93 => {
                if let Some(&agent) = self.agents_in(AgentState::Draining).choose(&mut self.rng) {
                    self.admin_on_agent(agent, AgentChange::Undrain);
                }
            }
            _ => {}
        }
        let next = self.rng.random_range(250..2_000);
        self.schedule(self.now + next, Event::Fault);
        Ok(())
    }

    fn drop_stream(&mut self, agent: usize) {
        let Some(conn) = self.agents[agent].link else {
            return;
        };
        self.stats.dropped_streams += 1;
        self.note(format!(
            "the network drops {}'s stream (conn {})",
            self.agents[agent].id, conn.0
        ));
        self.close_link(conn);
        if self.rng.random_bool(P_COORDINATOR_SEES_DROP) {
            let delay = self.latency();
            self.schedule(self.now + delay, Event::CoordinatorSeesClose { conn });
        }
    }

    fn crash_agent(&mut self, agent: usize) {
        if !self.agents[agent].is_up() {
            return;
        }
        self.stats.agent_crashes += 1;
        self.note(format!("{} crashes", self.agents[agent].id));
        self.end_agent(agent);
    }

    /// The agent's process ends; its stream drops, and it starts again a
    /// while later (unless the coordinator refused it).
    fn end_agent(&mut self, agent: usize) {
        let conn = self.agents[agent].link;
        self.agents[agent].end();
        if let Some(conn) = conn {
            self.close_link(conn);
            if self.rng.random_bool(P_COORDINATOR_SEES_DROP) {
                let delay = self.latency();
                self.schedule(self.now + delay, Event::CoordinatorSeesClose { conn });
            }
        }
        if !self.agents[agent].refused {
            let down_for = self.rng.random_range(500..6_000);
            let incarnation = self.agents[agent].incarnation;
            self.schedule(
                self.now + down_for,
                Event::AgentConnect { agent, incarnation },
            );
        }
    }

    /// SIGTERM: the agent drains, hands its running attempts back and ends.
    fn stop_agent(&mut self, agent: usize) -> Result<(), String> {
        let now = self.instant();
        let Some(session) = self.agents[agent].session.as_mut() else {
            return Ok(());
        };
        self.stats.agent_stops += 1;
        session.begin_shutdown("agent shutting down", now);
        self.note(format!("{} is asked to stop", self.agents[agent].id));
        self.flush_agent(agent)
    }

    // ---- the network ----

    fn latency(&mut self) -> u64 {
        if self.faults && self.rng.random_bool(P_SLOW_MESSAGE) {
            self.stats.slow_messages += 1;
            self.rng.random_range(300..2_000)
        } else {
            self.rng.random_range(1..40)
        }
    }

    fn link_belongs_to_this_life(&self, conn: ConnId) -> bool {
        let life = self.coordinator.as_ref().map(|c| c.life);
        self.links.get(&conn).is_some_and(|l| Some(l.life) == life)
    }

    fn link_reaches_coordinator(&self, conn: ConnId) -> bool {
        self.link_belongs_to_this_life(conn) && self.links.get(&conn).is_some_and(|l| l.open)
    }

    /// Closes a stream; what is in flight on it is lost. The agent's link
    /// notices after a while, or (now and then while faults last) never:
    /// then the session's silence timeout must. Returns whether it was open.
    fn close_link(&mut self, conn: ConnId) -> bool {
        let Some(link) = self.links.get_mut(&conn).filter(|l| l.open) else {
            return false;
        };
        link.open = false;
        let agent = link.agent;
        if self.agents[agent].link == Some(conn) {
            if self.faults && !self.rng.random_bool(P_AGENT_SEES_DROP) {
                self.note(format!(
                    "{} does not notice that conn {} closed",
                    self.agents[agent].id, conn.0
                ));
            } else {
                let delay = self.rng.random_range(5..500);
                self.schedule(self.now + delay, Event::AgentSeesClose { agent, conn });
            }
        }
        true
    }

    /// An agent's message goes out on its stream. Nothing but Hello may
    /// precede the stream's Welcome.
    fn agent_sends(&mut self, agent: usize, msg: FromAgent) -> Result<(), String> {
        let Some(conn) = self.agents[agent].link else {
            return Ok(());
        };
        let latency = self.latency();
        let Some(link) = self.links.get_mut(&conn).filter(|l| l.open) else {
            return Ok(());
        };
        let hello = matches!(msg, FromAgent::Hello { .. });
        if !link.welcomed && !hello {
            return Err(format!(
                "{} sent {msg:?} on conn {} before its Welcome",
                self.agents[agent].id, conn.0
            ));
        }
        let at = (self.now + latency).max(link.last_to_coordinator);
        link.last_to_coordinator = at;
        let duplicate = self.faults && !hello && self.rng.random_bool(P_DUPLICATE);
        if duplicate {
            self.stats.duplicates += 1;
            let later = at + self.rng.random_range(1..500);
            self.schedule(
                later,
                Event::ToCoordinator {
                    conn,
                    msg: msg.clone(),
                    duplicate: true,
                },
            );
        }
        self.schedule(
            at,
            Event::ToCoordinator {
                conn,
                msg,
                duplicate: false,
            },
        );
        Ok(())
    }

    fn coordinator_sends(&mut self, conn: ConnId, msg: ToAgent) {
        let latency = self.latency();
        let Some(link) = self.links.get_mut(&conn).filter(|l| l.open) else {
            return; // The driver has no such stream any more.
        };
        let at = (self.now + latency).max(link.last_to_agent);
        link.last_to_agent = at;
        self.schedule(at, Event::ToAgent { conn, msg });
    }

    // ---- agents ----

    /// The agent's link opens a stream (its process starts first if it is
    /// down). A revoked agent is refused and its process exits.
    fn connect(&mut self, agent: usize, incarnation: u32) -> Result<(), String> {
        let a = &mut self.agents[agent];
        if a.incarnation != incarnation || a.link.is_some() || a.refused {
            return Ok(());
        }
        if !a.is_up() {
            a.start();
            let id = a.id.clone();
            self.note(format!("{id} starts"));
        }
        let Some(life) = self.coordinator.as_ref().map(|c| c.life) else {
            self.reconnect_later(agent);
            return Ok(());
        };
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let id = self.agents[agent].id.clone();
        self.note(format!("{id} opens conn {}", conn.0));
        let mut opened = false;
        self.feed(|core, now, _| {
            opened = core
                .handle_open(conn, id, format!("10.0.0.{agent}:443"), now)
                .is_ok();
        });
        if !opened {
            self.note(format!(
                "{} is refused (revoked) and exits",
                self.agents[agent].id
            ));
            self.agents[agent].refused = true;
            self.end_agent(agent);
            return Ok(());
        }
        self.links.insert(
            conn,
            Link {
                agent,
                life,
                open: true,
                last_to_coordinator: 0,
                last_to_agent: 0,
                welcomed: false,
            },
        );
        let now = self.instant();
        let a = &mut self.agents[agent];
        a.link = Some(conn);
        a.session
            .as_mut()
            .expect("started above")
            .handle_connected(now);
        self.flush_agent(agent)
    }

    fn reconnect_later(&mut self, agent: usize) {
        let delay = self.rng.random_range(200..2_000);
        let incarnation = self.agents[agent].incarnation;
        self.schedule(self.now + delay, Event::AgentConnect { agent, incarnation });
    }

    fn agent_receives(&mut self, agent: usize, conn: ConnId, msg: ToAgent) -> Result<(), String> {
        checks::promise_is_committed(&msg, &self.ledger)?;
        if matches!(msg, ToAgent::Welcome { .. })
            && let Some(link) = self.links.get_mut(&conn)
        {
            link.welcomed = true;
        }
        let fenced = match &msg {
            ToAgent::Cancel { task, attempt, .. } => Some((*task, *attempt)),
            _ => None,
        };
        let now = self.instant();
        let Some(session) = self.agents[agent].session.as_mut() else {
            return Ok(());
        };
        session.handle_message(msg, now);
        self.flush_agent(agent)?;
        if let Some((task, attempt)) = fenced {
            checks::fenced_attempt_is_stopped(&self.agents[agent], task, attempt)?;
        }
        Ok(())
    }

    /// The agent's driver does what its session asks: commands first, then
    /// messages. A session whose shutdown is over ends the process.
    fn flush_agent(&mut self, agent: usize) -> Result<(), String> {
        loop {
            let Some(session) = self.agents[agent].session.as_mut() else {
                return Ok(());
            };
            if let Some(command) = session.poll_command() {
                self.perform_command(agent, command)?;
            } else if let Some(msg) = session.poll_outbound() {
                self.perform_send(agent, msg)?;
            } else {
                break;
            }
        }
        if self.agents[agent]
            .session
            .as_ref()
            .is_some_and(Session::is_stopped)
        {
            self.note(format!("{} has stopped", self.agents[agent].id));
            self.end_agent(agent);
        }
        Ok(())
    }

    fn perform_command(&mut self, agent: usize, command: Command) -> Result<(), String> {
        let incarnation = self.agents[agent].incarnation;
        match command {
            Command::Start { task, attempt, .. } => {
                if let Some(running) = self.agents[agent].children.get(&task) {
                    return Err(format!(
                        "{} starts {task}#{attempt} while it still runs {task}#{}",
                        self.agents[agent].id, running.attempt
                    ));
                }
                let plan = self.draw_plan(task);
                self.agents[agent].children.insert(
                    task,
                    Child {
                        attempt,
                        plan,
                        produced: 0,
                        stopping: false,
                    },
                );
                self.schedule_work(agent, incarnation, task, attempt, 1..30);
            }
            Command::Stop { task, attempt } => {
                if let Some(child) = self.agents[agent]
                    .children
                    .get_mut(&task)
                    .filter(|c| c.attempt == attempt)
                {
                    child.stopping = true;
                    // The process group gets TERM: the run ends soon.
                    self.schedule_work(agent, incarnation, task, attempt, 10..300);
                }
            }
            Command::Forget { task, attempt } => {
                self.agents[agent].spool.remove(&(task, attempt));
            }
            Command::CloseStream => {
                let Some(conn) = self.agents[agent].link.take() else {
                    return Ok(());
                };
                self.stats.silent_streams += 1;
                self.note(format!(
                    "{} finds conn {} silent and closes it",
                    self.agents[agent].id, conn.0
                ));
                if self.close_link(conn) {
                    let delay = self.latency();
                    self.schedule(self.now + delay, Event::CoordinatorSeesClose { conn });
                }
                self.reconnect_later(agent);
            }
            Command::CheckHealth => {
                self.stats.health_checks += 1;
                let passed = self.rng.random_bool(P_HEALTH_CHECK_PASSES);
                let delay = self.rng.random_range(50..500);
                self.schedule(
                    self.now + delay,
                    Event::HealthChecked {
                        agent,
                        incarnation,
                        passed,
                    },
                );
            }
        }
        Ok(())
    }

    /// Sends what the session sends; a resend is read from the agent's spool.
    fn perform_send(&mut self, agent: usize, out: Outbound) -> Result<(), String> {
        match out {
            Outbound::Message(msg) => self.agent_sends(agent, msg),
            Outbound::Resend {
                task,
                attempt,
                after,
            } => {
                let chunks: Vec<OutputChunk> = self.agents[agent]
                    .spool
                    .get(&(task, attempt))
                    .map(|spooled| {
                        spooled
                            .chunks
                            .iter()
                            .filter(|c| c.seq > after)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for chunk in chunks {
                    self.agent_sends(agent, FromAgent::Output(chunk))?;
                }
                Ok(())
            }
        }
    }

    /// How a run of `task` will go.
    fn draw_plan(&mut self, task: TaskId) -> WorkPlan {
        let few_attempts = self.config.max_attempts <= MAX_FEW_ATTEMPTS;
        let doomed = *self
            .ledger
            .doomed
            .entry(task)
            .or_insert_with(|| few_attempts && self.rng.random_bool(P_DOOMED_TASK));
        let roll: f64 = self.rng.random();
        let outcome = if doomed || roll < P_CLI_FAILED {
            Outcome::CliFailed
        } else if roll < P_CLI_FAILED + P_RATE_LIMITED {
            Outcome::RateLimited
        } else if roll < P_CLI_FAILED + P_RATE_LIMITED + P_AGENT_FAULT {
            Outcome::AgentFault
        } else {
            Outcome::Succeeded
        };
        WorkPlan {
            chunks: self.rng.random_range(0..=6),
            outcome,
        }
    }

    fn schedule_work(
        &mut self,
        agent: usize,
        incarnation: u32,
        task: TaskId,
        attempt: Attempt,
        after_ms: std::ops::Range<u64>,
    ) {
        let step = self.rng.random_range(after_ms);
        self.schedule(
            self.now + step,
            Event::AgentWork {
                agent,
                incarnation,
                task,
                attempt,
            },
        );
    }

    /// One step of a child: its first step says it runs the CLI; then a
    /// burst of output, and the end once all of it is out (or at once when
    /// it was asked to stop).
    fn work(
        &mut self,
        agent: usize,
        incarnation: u32,
        task: TaskId,
        attempt: Attempt,
    ) -> Result<(), String> {
        let now = self.instant();
        let burst = self.rng.random_range(1..=3);
        let a = &mut self.agents[agent];
        if a.incarnation != incarnation {
            return Ok(());
        }
        let (Some(session), Some(child)) = (
            a.session.as_mut(),
            a.children.get_mut(&task).filter(|c| c.attempt == attempt),
        ) else {
            return Ok(());
        };
        if child.produced == 0 && !child.stopping {
            session.handle_progress(task, attempt, Phase::RunningClaude);
        }
        let ended = if child.stopping {
            Some(report(
                Outcome::Cancelled,
                "stopped on request",
                child.produced,
            ))
        } else {
            for _ in 0..burst {
                if child.produced == child.plan.chunks {
                    break;
                }
                child.produced += 1;
                let data = chunk_data(task, attempt, child.produced);
                let Some(chunk) =
                    session.handle_child_output(task, attempt, OutputKind::Stdout, data)
                else {
                    continue;
                };
                if chunk.seq != child.produced {
                    return Err(format!(
                        "{}: {task}#{attempt} output numbered {} for chunk {}",
                        a.id, chunk.seq, child.produced
                    ));
                }
                self.ledger.produced.insert((task, attempt), chunk.seq);
                a.spool
                    .entry((task, attempt))
                    .or_default()
                    .chunks
                    .push(chunk);
            }
            (child.produced == child.plan.chunks).then(|| {
                let message = format!("simulated {}", child.plan.outcome);
                report(child.plan.outcome, &message, child.produced)
            })
        };
        match ended {
            Some(end) => {
                a.children.remove(&task);
                if let Some(saved) = session.handle_child_exit(task, attempt, end, now) {
                    a.spool.entry((task, attempt)).or_default().result = Some(saved);
                }
            }
            None => self.schedule_work(agent, incarnation, task, attempt, 100..700),
        }
        self.flush_agent(agent)
    }

    // ---- the end ----

    /// Every submission acknowledged, every task finished, all committed,
    /// and every agent up with nothing running and nothing owed.
    fn quiescent(&self) -> bool {
        let Some(c) = &self.coordinator else {
            return false;
        };
        self.ledger.unacknowledged_submits == 0
            && !c.batch_open
            && self.ledger.acknowledged.iter().all(|id| {
                c.core
                    .task(*id)
                    .map_or_else(|| c.core.left_memory(*id), |t| t.state.is_terminal())
            })
            && self.agents.iter().all(SimAgent::is_idle)
    }

    fn unfinished(&self) -> String {
        let Some(c) = &self.coordinator else {
            return "(the coordinator is down)".into();
        };
        let open: Vec<String> = c
            .core
            .tasks()
            .filter(|t| !t.state.is_terminal())
            .map(|t| format!("{} {} ({})", t.id, t.state.as_str(), t.state_reason))
            .collect();
        let agents: Vec<String> = self
            .agents
            .iter()
            .filter(|a| !a.is_idle())
            .map(|a| match &a.session {
                None => format!("{} down (refused: {})", a.id, a.refused),
                Some(session) => format!(
                    "{} holds {:?}, runs {:?}",
                    a.id,
                    session.held(),
                    a.children.keys().collect::<Vec<_>>()
                ),
            })
            .collect();
        format!(
            "{} unacknowledged submissions; tasks: {}; agents: {}",
            self.ledger.unacknowledged_submits,
            open.join("; "),
            agents.join("; ")
        )
    }

    fn final_checks(&mut self) -> Result<(), String> {
        let c = self
            .coordinator
            .as_ref()
            .expect("quiescent means the coordinator is up");
        self.core_matches_store()?;
        let stored: BTreeMap<TaskId, Task> = self
            .store
            .load_tasks()
            .expect("the store loads")
            .into_iter()
            .map(|t| (t.id, t))
            .collect();
        if stored != self.ledger.committed {
            return Err(checks::diff_tasks(
                "the store differs from what was committed",
                &self.ledger.committed,
                &stored,
            ));
        }
        let tasks = known_tasks(&c.core, &self.ledger.committed);
        let known: BTreeSet<TaskId> = tasks.keys().copied().collect();
        if known != self.ledger.acknowledged {
            return Err(format!(
                "the coordinator knows tasks {known:?}, the admin was acknowledged {:?}",
                self.ledger.acknowledged
            ));
        }
        let mut counts = Stats::default();
        for task in tasks.values() {
            checks::final_task(task, &self.ledger)?;
            counts.tasks += 1;
            counts.attempts += task.attempts.len() as u64;
            match task.state {
                TaskState::Succeeded => counts.succeeded += 1,
                TaskState::Cancelled => counts.cancelled += 1,
                _ => counts.failed += 1,
            }
        }
        self.stats.add(&counts);
        for agent in &self.agents {
            checks::agent_at_rest(agent)?;
        }
        checks::stored_output(&self.store, &self.ledger, true)
    }

    /// The last events, one line each, agents named.
    pub fn trace_lines(&self) -> Vec<String> {
        let name = |agent: usize| self.agents.get(agent).map_or("?", |a| a.id.as_str());
        let agent_of = |conn: ConnId| self.links.get(&conn).map_or("?", |l| name(l.agent));
        self.trace.lines(&name, &agent_of)
    }
}

/// Simulated milliseconds of an instant, rounded up.
fn ms_since(origin: Instant, at: Instant) -> u64 {
    let nanos = at.saturating_duration_since(origin).as_nanos();
    u64::try_from(nanos.div_ceil(1_000_000)).expect("simulated time is short")
}

fn random_agent(rng: &mut StdRng, index: usize) -> SimAgent {
    let n_specialties = rng.random_range(1..=2);
    let mut specialties: Vec<Specialty> = Specialty::ALL
        .choose_multiple(rng, n_specialties)
        .copied()
        .collect();
    // Somebody must be able to take anything, or tasks of a missing
    // specialty would wait forever.
    if index == 0 && !specialties.contains(&Specialty::General) {
        specialties.push(Specialty::General);
    }
    let n_toolchains = rng.random_range(0..=2);
    let toolchains = TOOLCHAINS
        .choose_multiple(rng, n_toolchains)
        .map(|name| Toolchain {
            name: (*name).into(),
            version: "1".into(),
        })
        .collect();
    let advert = AgentAdvert {
        agent_version: "sim".into(),
        specialties,
        capacity: rng.random_range(1..=3),
        labels: BTreeMap::new(),
        toolchains,
        hostname: format!("pc-{index}"),
        instance_id: format!("sim-{index}"),
    };
    let id = AgentId::new(format!("sim-{index}")).expect("a valid agent name");
    SimAgent::new(id, advert)
}

fn random_task(rng: &mut StdRng) -> NewTask {
    let specialty = *Specialty::ALL.choose(rng).expect("five specialties");
    let repo = *REPOS.choose(rng).expect("three repositories");
    let n_technologies = rng.random_range(0..=2);
    let technologies = TECHNOLOGIES
        .choose_multiple(rng, n_technologies)
        .map(|t| (*t).to_owned())
        .collect();
    NewTask {
        source: TaskSource::Manual {
            submitted_by: "sim-admin".into(),
        },
        spec: TaskSpec {
            repo_url: repo.into(),
            base_branch: String::new(),
            issue_number: rng.random_range(0..100),
            title: "simulated work".into(),
            body: String::new(),
            issue_url: String::new(),
            author: "sim-admin".into(),
            labels: vec![],
            specialty,
            technologies,
            branch: String::new(),
            follow_up: false,
            test_command: String::new(),
        },
        priority: rng.random_range(-2..=2),
        triage: None,
        needs_info: false,
    }
}

/// The tasks a core knows: those in its memory, and the ended ones that
/// left it, as committed (a task out of memory that had not ended is
/// missing here, so comparing with what was committed finds it).
fn known_tasks(core: &Core, committed: &BTreeMap<TaskId, Task>) -> BTreeMap<TaskId, Task> {
    let mut tasks: BTreeMap<TaskId, Task> = core.tasks().map(|t| (t.id, t.clone())).collect();
    for (id, task) in committed {
        if core.left_memory(*id) && task.state.is_terminal() {
            tasks.insert(*id, task.clone());
        }
    }
    tasks
}

/// As the driver does for an admin's command about an ended task.
fn bring_back(core: &mut Core, stored: Option<Task>) {
    if let Some(task) = stored.filter(|t| core.left_memory(t.id)) {
        core.bring_back(task);
    }
}
