//! The agent's pure core: which tasks it holds, what it owes the coordinator
//! (output not yet acknowledged, results not yet acknowledged), what it
//! must do (start or stop a child process, check the PC) and when (the
//! Welcome and silence timeouts, heartbeats, health checks, the end of a
//! shutdown's grace). No I/O, no clock, no async: time is an argument, the
//! driver feeds it events, sends what `poll_outbound` returns, does what
//! `poll_command` returns and calls `handle_timeout` at `poll_timeout`.
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
use std::time::{Duration, Instant};

use common::ids::{Attempt, TaskId};
use common::protocol::{FromAgent, OutputChunk, PushAuth, ReportedTask, ToAgent};
use common::time::UnixMillis;
use common::types::{
    AgentAdvert, FinishedReport, Outcome, OutputKind, Phase, PushCredential, TaskSpec,
};
use tracing::{debug, info, warn};

#[cfg(test)]
mod tests;

/// What goes to the coordinator, in order.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // Nearly every item is a message: boxing would cost more.
pub enum Outbound {
    Message(FromAgent),
    /// Resend, from the spool, the attempt's chunks after `after`.
    Resend {
        task: TaskId,
        attempt: Attempt,
        after: u64,
    },
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
    /// The coordinator went silent (no Welcome in time, or nothing heard
    /// for the heartbeat timeout): close the stream; the link opens another.
    CloseStream,
    /// Check the PC again (it is unhealthy); the result comes back through
    /// `handle_health`.
    CheckHealth,
}

/// The session's settings.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What Hello says of this agent; its capacity is how many attempts run
    /// at once.
    pub advert: AgentAdvert,
    /// How long a new stream waits for the coordinator's Welcome.
    pub welcome_timeout: Duration,
    /// How often the PC is checked again while it is unhealthy.
    pub health_check_interval: Duration,
    /// How long a shutdown waits for running attempts to be handed back.
    pub stop_grace: Duration,
}

/// The stream the session is on, and its clocks.
#[derive(Debug)]
enum Link {
    Down,
    /// Hello is out; the coordinator must answer by `silent_after`.
    AwaitingWelcome {
        silent_after: Instant,
    },
    Welcomed {
        /// The stream counts as dead after this much silence.
        silence: Duration,
        silent_after: Instant,
        heartbeat_every: Duration,
        next_heartbeat: Instant,
    },
}

/// The PC's check, which runs again and again while it is unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HealthCheck {
    /// Healthy: no check is due.
    Idle,
    Due(Instant),
    /// Asked for; its result has not come back yet.
    Running,
}

/// A shutdown in progress.
#[derive(Debug)]
struct Shutdown {
    reason: String,
    /// Running attempts are waited for until then.
    grace_until: Instant,
    grace_over: bool,
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

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    work: BTreeMap<TaskId, Work>,
    link: Link,
    draining: bool,
    /// Once the agent is stopping: why (said again on each new stream) and
    /// until when it waits.
    shutdown: Option<Shutdown>,
    /// Why this PC cannot work (its CLI is missing, not logged in, ...):
    /// said in Hello and every Heartbeat until a check passes.
    unhealthy: Option<String>,
    health_check: HealthCheck,
    outbound: VecDeque<Outbound>,
    commands: VecDeque<Command>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            work: BTreeMap::new(),
            link: Link::Down,
            draining: false,
            shutdown: None,
            unhealthy: None,
            health_check: HealthCheck::Idle,
            outbound: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }

    // ---- getters ----

    pub fn held(&self) -> Vec<ReportedTask> {
        self.work
            .iter()
            .map(|(task, w)| ReportedTask {
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
        self.config
            .advert
            .capacity
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

    /// How long the coordinator may stay silent on the current stream: a
    /// send that waits longer counts as a dead stream. `None` without one.
    pub fn silence_allowed(&self) -> Option<Duration> {
        match self.link {
            Link::Down => None,
            Link::AwaitingWelcome { .. } => Some(self.config.welcome_timeout),
            Link::Welcomed { silence, .. } => Some(silence),
        }
    }

    /// A shutdown is over: every attempt ended and its result is out (or
    /// no stream can take it), or the grace period has passed.
    pub fn is_stopped(&self) -> bool {
        self.shutdown.as_ref().is_some_and(|shutdown| {
            let running = self.work.values().any(|w| w.result.is_none());
            shutdown.grace_over
                || (!running && (self.work.is_empty() || matches!(self.link, Link::Down)))
        })
    }

    fn welcomed(&self) -> bool {
        matches!(self.link, Link::Welcomed { .. })
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

    /// A new stream is open: Hello goes first, and alone until Welcome,
    /// which must come within the Welcome timeout.
    pub fn handle_connected(&mut self, now: Instant) {
        self.link = Link::AwaitingWelcome {
            silent_after: now + self.config.welcome_timeout,
        };
        // A coordinator's drain lasts for the stream it was sent on.
        self.draining = self.shutdown.is_some();
        self.outbound.clear();
        self.outbound.push_back(Outbound::Message(FromAgent::Hello {
            advert: self.config.advert.clone(),
            running: self.held(),
            unhealthy: self.unhealthy.clone(),
        }));
    }

    pub fn handle_disconnected(&mut self) {
        self.link = Link::Down;
        self.outbound.clear();
    }

    /// A message of the coordinator on the current stream: any message
    /// shows it is alive.
    pub fn handle_message(&mut self, msg: ToAgent, now: Instant) {
        match &mut self.link {
            Link::Down => {}
            Link::AwaitingWelcome { silent_after } => {
                *silent_after = now + self.config.welcome_timeout;
            }
            Link::Welcomed {
                silence,
                silent_after,
                ..
            } => *silent_after = now + *silence,
        }
        match msg {
            ToAgent::Welcome {
                heartbeat_interval,
                heartbeat_timeout,
                held,
                ..
            } => self.handle_welcome(&held, heartbeat_interval, heartbeat_timeout, now),
            ToAgent::Heartbeat { .. } => {}
            ToAgent::Drain { reason } => {
                info!(%reason, "the coordinator asked this agent to drain");
                self.draining = true;
            }
            ToAgent::Assign {
                task,
                attempt,
                spec,
                deadline,
                push,
            } => {
                let credential = push.and_then(PushAuth::into_credential);
                self.handle_assign(task, attempt, *spec, deadline, credential);
            }
            ToAgent::Cancel {
                task,
                attempt,
                reason,
            } => self.handle_cancel(task, attempt, &reason),
            ToAgent::OutputAck { task, attempt, seq } => {
                self.handle_output_ack(task, attempt, seq);
            }
            ToAgent::FinishedAck { task, attempt } => {
                self.handle_finished_ack(task, attempt);
            }
        }
    }

    /// Timers: a coordinator silent for too long closes the stream,
    /// heartbeats go out, a health check falls due, a shutdown's grace ends.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.link {
            Link::AwaitingWelcome { silent_after } | Link::Welcomed { silent_after, .. }
                if now >= *silent_after =>
            {
                warn!("the coordinator went silent; reconnecting");
                self.handle_disconnected();
                self.commands.push_back(Command::CloseStream);
            }
            Link::Welcomed {
                heartbeat_every,
                next_heartbeat,
                ..
            } if now >= *next_heartbeat => {
                *next_heartbeat = now + *heartbeat_every;
                self.heartbeat();
            }
            _ => {}
        }
        if let HealthCheck::Due(at) = self.health_check
            && now >= at
        {
            self.health_check = HealthCheck::Running;
            self.commands.push_back(Command::CheckHealth);
        }
        if let Some(shutdown) = &mut self.shutdown
            && now >= shutdown.grace_until
        {
            shutdown.grace_over = true;
        }
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = match self.link {
            Link::Down => None,
            Link::AwaitingWelcome { silent_after } => Some(silent_after),
            Link::Welcomed {
                silent_after,
                next_heartbeat,
                ..
            } => Some(silent_after.min(next_heartbeat)),
        };
        let health = match self.health_check {
            HealthCheck::Due(at) => Some(at),
            HealthCheck::Idle | HealthCheck::Running => None,
        };
        let grace = self
            .shutdown
            .as_ref()
            .filter(|s| !s.grace_over)
            .map(|s| s.grace_until);
        [link, health, grace].into_iter().flatten().min()
    }

    /// The coordinator answered Hello: `held` lists the tasks it still
    /// considers ours with the highest seq it persisted. Everything after is
    /// resent, then any result; tasks it does not list are dropped (it sends
    /// a Cancel for them too). Heartbeats go out every `heartbeat_every`
    /// from now on, and `silence` without a word closes the stream.
    fn handle_welcome(
        &mut self,
        held: &[(TaskId, Attempt, u64)],
        heartbeat_every: Duration,
        silence: Duration,
        now: Instant,
    ) {
        if matches!(self.link, Link::Down) {
            return; // The Welcome of a stream already closed.
        }
        self.link = Link::Welcomed {
            silence,
            silent_after: now + silence,
            heartbeat_every,
            next_heartbeat: now + heartbeat_every,
        };
        if let Some(shutdown) = &self.shutdown {
            self.outbound
                .push_back(Outbound::Message(FromAgent::Draining {
                    reason: shutdown.reason.clone(),
                }));
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
                self.outbound.push_back(Outbound::Resend {
                    task,
                    attempt,
                    after: acked,
                });
            }
            if let Some(report) = &work.result {
                self.outbound
                    .push_back(Outbound::Message(FromAgent::Finished {
                        task,
                        attempt,
                        report: report.clone(),
                    }));
            }
        }
    }

    fn heartbeat(&mut self) {
        if self.welcomed() {
            self.outbound
                .push_back(Outbound::Message(FromAgent::Heartbeat {
                    free_slots: self.free_slots(),
                    running: self.held(),
                    unhealthy: self.unhealthy.clone(),
                }));
        }
    }

    // ---- health ----

    /// The result of a check of this PC (at start, or again while
    /// unhealthy): `Some(reason)` while it cannot work, `None` once it can.
    pub fn handle_health(&mut self, reason: Option<String>, now: Instant) {
        if self.health_check == HealthCheck::Running {
            self.health_check = HealthCheck::Idle;
        }
        self.set_health(reason, now);
    }

    /// A change is told to the coordinator at once, in a heartbeat; while
    /// the PC is unhealthy a check falls due every `health_check_interval`.
    fn set_health(&mut self, reason: Option<String>, now: Instant) {
        let reason = reason.map(|r| one_short_line(&r));
        if self.unhealthy != reason {
            match &reason {
                Some(why) => {
                    warn!(reason = %why, "this PC cannot work: unhealthy until a check passes")
                }
                None => info!("the health check passed: this PC can work again"),
            }
            self.unhealthy = reason;
            self.heartbeat();
        }
        self.health_check = match (self.unhealthy.is_some(), self.health_check) {
            (false, HealthCheck::Due(_)) => HealthCheck::Idle,
            (true, HealthCheck::Idle) => HealthCheck::Due(now + self.config.health_check_interval),
            (_, unchanged) => unchanged,
        };
    }

    // ---- the coordinator ----

    fn handle_assign(
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
            Some(format!(
                "all {} slots are busy",
                self.config.advert.capacity
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            warn!(task_id = %task, attempt = attempt.0, %reason, "refusing assignment");
            self.send(FromAgent::Rejected {
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
        self.send(FromAgent::Accepted { task, attempt });
        self.commands.push_back(Command::Start {
            task,
            attempt,
            spec: Box::new(spec),
            deadline,
            credential,
        });
    }

    fn handle_cancel(&mut self, task: TaskId, attempt: Attempt, reason: &str) {
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

    fn handle_output_ack(&mut self, task: TaskId, attempt: Attempt, seq: u64) {
        if let Some(work) = self.work.get_mut(&task)
            && work.attempt == attempt
        {
            trim(work, seq);
        }
    }

    fn handle_finished_ack(&mut self, task: TaskId, attempt: Attempt) {
        if self
            .work
            .get(&task)
            .is_some_and(|w| w.attempt == attempt && w.result.is_some())
        {
            debug!(task_id = %task, attempt = attempt.0, "result acknowledged; attempt forgotten");
            self.forget(task, attempt);
        }
    }

    /// The agent is stopping: tell the coordinator, take no more work, and
    /// stop running attempts, which are handed back; `is_stopped` says when
    /// it is over.
    pub fn begin_shutdown(&mut self, reason: &str, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.draining = true;
        self.shutdown = Some(Shutdown {
            reason: reason.to_owned(),
            grace_until: now + self.config.stop_grace,
            grace_over: false,
        });
        self.send(FromAgent::Draining {
            reason: reason.to_owned(),
        });
        for (task, work) in &self.work {
            if work.result.is_none() {
                self.commands.push_back(Command::Stop {
                    task: *task,
                    attempt: work.attempt,
                });
            }
        }
    }

    // ---- the child processes ----

    /// A chunk of the child's output (a line, or part of a long one). It
    /// gets the next seq; the driver must hand the returned chunk to the
    /// spool before anything it sends later (a resend reads the spool).
    pub fn handle_child_output(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        kind: OutputKind,
        data: Arc<[u8]>,
    ) -> Option<OutputChunk> {
        let work = self.work.get_mut(&task)?;
        if work.attempt != attempt || work.result.is_some() || work.stop_requested {
            return None;
        }
        work.last_seq += 1;
        let chunk = OutputChunk {
            task,
            attempt,
            seq: work.last_seq,
            kind,
            data,
        };
        work.unacked_bytes += chunk.data.len();
        work.unacked.push_back((chunk.seq, chunk.data.len()));
        self.send(FromAgent::Output(chunk.clone()));
        Some(chunk)
    }

    fn forget(&mut self, task: TaskId, attempt: Attempt) {
        self.work.remove(&task);
        self.commands.push_back(Command::Forget { task, attempt });
    }

    pub fn handle_progress(&mut self, task: TaskId, attempt: Attempt, phase: Phase) {
        if self.work.get(&task).is_some_and(|w| w.attempt == attempt) {
            self.send(FromAgent::Progress {
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
        now: Instant,
    ) -> Option<FinishedReport> {
        let shutting_down = self.shutdown.as_ref().map(|s| s.reason.clone());
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
        self.send(FromAgent::Finished {
            task,
            attempt,
            report: report.clone(),
        });
        if fault.is_some() {
            self.set_health(fault, now);
        }
        Some(report)
    }

    // ---- outputs ----

    pub fn poll_outbound(&mut self) -> Option<Outbound> {
        self.outbound.pop_front()
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    fn send(&mut self, msg: FromAgent) {
        // Until Welcome everything stays in the per-task buffers and is
        // resent after it; nothing is queued for a stream that is gone.
        if self.welcomed() {
            self.outbound.push_back(Outbound::Message(msg));
        }
    }
}

/// A reason as the coordinator accepts it: one line (control characters
/// become spaces), at most `protocol::MAX_SHORT_STRING` bytes, cut on a char
/// boundary with an ellipsis.
fn one_short_line(text: &str) -> String {
    let max = common::protocol::MAX_SHORT_STRING;
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
