//! The task lifecycle driven through scripted event sequences.

#![allow(clippy::disallowed_methods)] // one real Instant as the origin of simulated time

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ids::{AgentId, Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{
    AgentAdvert, FinishedReport, Outcome, OutputKind, Specialty, TaskSpec, Toolchain,
};

use super::*;

/// Streams never go silent here: the agents of these scripts do not send
/// heartbeats, and the lifecycle is what is under test.
fn config() -> CoreConfig {
    CoreConfig {
        heartbeat_interval: Duration::from_secs(86_400),
        heartbeat_timeout: Duration::from_secs(10 * 86_400),
        ..super::tests::config()
    }
}

pub(super) struct H {
    pub(super) core: Core,
    t0: Instant,
    pub(super) secs: u64,
    pub(super) next_conn: u64,
    pub(super) conns: BTreeMap<String, ConnId>,
}

pub(super) fn id(name: &str) -> AgentId {
    AgentId::new(name).expect("valid name")
}

/// A submission of `spec` by an admin, at priority 0.
pub(crate) fn manual(spec: TaskSpec) -> NewTask {
    NewTask {
        source: TaskSource::Manual {
            submitted_by: "root".into(),
        },
        spec,
        priority: 0,
        triage: None,
        needs_info: false,
    }
}

pub(crate) fn spec(repo: &str, specialty: Specialty) -> TaskSpec {
    TaskSpec {
        repo_url: repo.into(),
        base_branch: String::new(),
        issue_number: 0,
        title: "do it".into(),
        body: String::new(),
        issue_url: String::new(),
        author: "root".into(),
        labels: vec![],
        specialty,
        technologies: vec![],
        branch: String::new(),
        follow_up: false,
        test_command: String::new(),
    }
}

pub(super) fn report(outcome: Outcome) -> FinishedReport {
    FinishedReport::new(outcome, outcome.to_string())
}

impl H {
    pub(super) fn new() -> Self {
        Self::restored(Restored::default())
    }

    pub(super) fn restored(restored: Restored) -> Self {
        Self::with_config(config(), restored)
    }

    pub(super) fn with_config(config: CoreConfig, restored: Restored) -> Self {
        let t0 = Instant::now();
        Self {
            core: Core::new(config, restored, t0, UnixMillis(1_000_000)),
            t0,
            secs: 0,
            next_conn: 0,
            conns: BTreeMap::new(),
        }
    }

    pub(super) fn now(&self) -> (Instant, UnixMillis) {
        (
            self.t0 + Duration::from_secs(self.secs),
            UnixMillis(1_000_000 + self.secs * 1000),
        )
    }

    pub(super) fn advance(&mut self, secs: u64) {
        self.secs += secs;
        let (now, wall) = self.now();
        self.core.handle_timeout(now, wall);
    }

    pub(super) fn connect_with(
        &mut self,
        name: &str,
        specialties: &[Specialty],
        capacity: u32,
        toolchains: &[&str],
        running: Vec<ReportedTask>,
    ) -> ConnId {
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let (now, wall) = self.now();
        self.core
            .handle_open(conn, id(name), String::new(), now)
            .expect("open");
        let advert = AgentAdvert {
            agent_version: "t".into(),
            specialties: specialties.to_vec(),
            capacity,
            labels: Default::default(),
            toolchains: toolchains
                .iter()
                .map(|t| Toolchain {
                    name: (*t).into(),
                    version: "1.0".into(),
                })
                .collect(),
            hostname: String::new(),
            instance_id: String::new(),
        };
        self.core.handle_message(
            conn,
            FromAgent::Hello {
                advert,
                running,
                unhealthy: None,
            },
            now,
            wall,
        );
        self.conns.insert(name.into(), conn);
        conn
    }

    pub(super) fn connect(&mut self, name: &str, specialty: Specialty, capacity: u32) -> ConnId {
        self.connect_with(name, &[specialty], capacity, &[], vec![])
    }

    pub(super) fn submit(&mut self, repo: &str, specialty: Specialty, priority: i32) -> TaskId {
        let (now, wall) = self.now();
        let task = NewTask {
            priority,
            ..manual(spec(repo, specialty))
        };
        self.core.submit(task, now, wall)
    }

    pub(super) fn msg(&mut self, agent: &str, msg: FromAgent) {
        let conn = self.conns[agent];
        let (now, wall) = self.now();
        self.core.handle_message(conn, msg, now, wall);
    }

    pub(super) fn close(&mut self, agent: &str) {
        let conn = self.conns[agent];
        let (now, wall) = self.now();
        self.core.handle_closed(conn, "gone".into(), now, wall);
    }

    /// The messages sent since the last call, as (agent, message).
    pub(super) fn sent(&mut self) -> Vec<(String, ToAgent)> {
        let by_conn: BTreeMap<ConnId, String> =
            self.conns.iter().map(|(n, c)| (*c, n.clone())).collect();
        std::iter::from_fn(|| self.core.poll_action())
            .filter_map(|a| match a {
                Action::Send { conn, msg } => {
                    Some((by_conn.get(&conn).cloned().unwrap_or_default(), msg))
                }
                _ => None,
            })
            .collect()
    }

    pub(super) fn assigned(&mut self) -> Vec<(String, TaskId, Attempt)> {
        self.sent()
            .into_iter()
            .filter_map(|(agent, m)| match m {
                ToAgent::Assign { task, attempt, .. } => Some((agent, task, attempt)),
                _ => None,
            })
            .collect()
    }

    /// The output acknowledgements sent since the last call.
    pub(super) fn acks(&mut self) -> Vec<u64> {
        self.sent()
            .into_iter()
            .filter_map(|(_, m)| match m {
                ToAgent::OutputAck { seq, .. } => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// The seqs of the output chunks written since the last call.
    pub(super) fn stored_seqs(&mut self) -> Vec<u64> {
        self.core
            .take_writes()
            .into_iter()
            .filter_map(|w| match w {
                Write::Output(OutputChunk { seq, .. }) => Some(seq),
                _ => None,
            })
            .collect()
    }

    pub(super) fn state(&self, task: TaskId) -> TaskState {
        self.core.task(task).expect("task").state
    }
}

pub(super) fn accepted(task: TaskId, attempt: u32) -> FromAgent {
    FromAgent::Accepted {
        task,
        attempt: Attempt(attempt),
    }
}

pub(super) fn finished(task: TaskId, attempt: u32, outcome: Outcome) -> FromAgent {
    FromAgent::Finished {
        task,
        attempt: Attempt(attempt),
        report: report(outcome),
    }
}

/// A rate-limited result whose limit resets `reset_ms` after the start.
fn rate_limited(task: TaskId, attempt: u32, reset_ms: u64) -> FromAgent {
    let mut report = report(Outcome::RateLimited);
    report.rate_limit_reset_unix_ms = 1_000_000 + reset_ms;
    FromAgent::Finished {
        task,
        attempt: Attempt(attempt),
        report,
    }
}

fn output(task: TaskId, attempt: u32, seq: u64, data: &str) -> FromAgent {
    FromAgent::Output(OutputChunk {
        task,
        attempt: Attempt(attempt),
        seq,
        kind: OutputKind::Stdout,
        data: Arc::from(data.as_bytes()),
    })
}

#[test]
fn a_task_runs_from_queue_to_success() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    assert_eq!(h.state(t), TaskState::Queued);
    h.connect("a", Specialty::Backend, 1);
    assert_eq!(h.assigned(), vec![("a".into(), t, Attempt(1))]);
    assert_eq!(h.state(t), TaskState::Assigned);
    h.msg("a", accepted(t, 1));
    assert_eq!(h.state(t), TaskState::Running);
    h.core.take_writes();
    h.msg("a", output(t, 1, 1, "one"));
    h.msg("a", output(t, 1, 2, "two"));
    let stored: Vec<u64> = h.stored_seqs();
    assert_eq!(stored, vec![1, 2]);
    let acks: Vec<u64> = h.acks();
    assert_eq!(acks, vec![2], "acknowledgements are coalesced per batch");
    h.msg("a", finished(t, 1, Outcome::Succeeded));
    assert_eq!(h.state(t), TaskState::Succeeded);
    assert!(h.sent().contains(&(
        "a".into(),
        ToAgent::FinishedAck {
            task: t,
            attempt: Attempt(1)
        }
    )));
    assert_eq!(h.core.agent(&id("a")).map(|v| v.free_slots), Some(1));
}

#[test]
fn specialties_capacity_and_draining_decide_placement() {
    let mut h = H::new();
    h.connect("front", Specialty::Frontend, 1);
    h.connect("back", Specialty::Backend, 1);
    let t1 = h.submit("r", Specialty::Backend, 0);
    let t2 = h.submit("r", Specialty::Backend, 0);
    assert_eq!(h.assigned(), vec![("back".into(), t1, Attempt(1))]);
    assert_eq!(
        h.state(t2),
        TaskState::Queued,
        "back is full, front is no backend"
    );
    h.msg("back", finished(t1, 1, Outcome::Succeeded));
    assert_eq!(h.assigned(), vec![("back".into(), t2, Attempt(1))]);

    let (_, wall) = h.now();
    h.core
        .drain(&id("front"), "maint".into(), wall)
        .expect("drain");
    let t3 = h.submit("r", Specialty::Frontend, 0);
    assert!(h.assigned().is_empty());
    assert_eq!(
        h.state(t3),
        TaskState::Queued,
        "a draining agent takes nothing"
    );
}

#[test]
fn general_agents_take_other_work_only_after_the_fallback_wait() {
    let mut h = H::new();
    h.connect("gen", Specialty::General, 1);
    let t = h.submit("r", Specialty::Devops, 0);
    assert!(h.assigned().is_empty());
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.t0 + Duration::from_secs(120)),
        "the core asks to be woken when the fallback applies"
    );
    h.advance(119);
    assert!(h.assigned().is_empty());
    h.advance(1);
    assert_eq!(h.assigned(), vec![("gen".into(), t, Attempt(1))]);
    let placement = &h.core.task(t).expect("task").attempts[0].placement;
    assert!(placement.contains("general fallback"), "{placement}");
}

#[test]
fn priority_then_fairness_between_repositories_then_fifo() {
    let mut h = H::new();
    let a1 = h.submit("repo-a", Specialty::Backend, 0);
    let a2 = h.submit("repo-a", Specialty::Backend, 0);
    let b1 = h.submit("repo-b", Specialty::Backend, 0);
    let urgent = h.submit("repo-c", Specialty::Backend, 5);
    h.connect("x", Specialty::Backend, 3);
    let order: Vec<TaskId> = h.assigned().into_iter().map(|(_, t, _)| t).collect();
    // Priority first; then repo-a and repo-b alternate although a2 is older than b1.
    assert_eq!(order, vec![urgent, a1, b1]);
    assert_eq!(h.state(a2), TaskState::Queued);
}

#[test]
fn toolchains_then_a_warm_mirror_then_load_choose_among_agents() {
    let mut h = H::new();
    h.connect_with("plain", &[Specialty::Backend], 2, &[], vec![]);
    h.connect_with("py", &[Specialty::Backend], 2, &["python3"], vec![]);
    let (now, wall) = h.now();
    let mut with_tech = spec("repo", Specialty::Backend);
    with_tech.technologies = vec!["python".into()];
    let t = h.core.submit(manual(with_tech), now, wall);
    assert_eq!(h.assigned(), vec![("py".into(), t, Attempt(1))]);
    let placement = h.core.task(t).expect("task").attempts[0].placement.clone();
    assert!(placement.contains("toolchains cover 1/1"), "{placement}");
    h.msg("py", finished(t, 1, Outcome::Succeeded));
    h.sent();
    // Same repository, no technologies: the agent that ran it wins.
    let again = h.submit("repo", Specialty::Backend, 0);
    assert_eq!(h.assigned(), vec![("py".into(), again, Attempt(1))]);
    assert!(
        h.core.task(again).expect("task").attempts[0]
            .placement
            .contains("ran this repository before")
    );
    // Another repository: the less loaded agent wins.
    let other = h.submit("other", Specialty::Backend, 0);
    assert_eq!(h.assigned(), vec![("plain".into(), other, Attempt(1))]);
}

#[test]
fn a_lost_agent_keeps_its_task_until_the_lease_expires() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.sent();
    h.close("a");
    h.advance(599);
    assert_eq!(
        h.state(t),
        TaskState::Running,
        "a blip shorter than the lease changes nothing"
    );
    h.connect("b", Specialty::Backend, 1);
    assert!(h.assigned().is_empty());
    h.advance(1);
    // Requeued after backoff (10s), then placed on b as attempt 2.
    assert_eq!(h.state(t), TaskState::Queued);
    let task = h.core.task(t).expect("task");
    assert_eq!(task.attempts[0].outcome, Some(Outcome::LeaseExpired));
    h.advance(10);
    assert_eq!(h.assigned(), vec![("b".into(), t, Attempt(2))]);

    // The old agent comes back still holding attempt 1: told to cancel it.
    let running = vec![ReportedTask {
        task: t,
        attempt: Attempt(1),
        last_output_seq: 3,
    }];
    h.connect_with("a", &[Specialty::Backend], 1, &[], running);
    let sent = h.sent();
    assert!(sent.iter().any(|(agent, m)| agent == "a"
        && matches!(m, ToAgent::Cancel { task, attempt: Attempt(1), .. } if *task == t)));
    // Its late reports are dropped.
    h.core.take_writes();
    h.msg("a", output(t, 1, 4, "late"));
    h.msg("a", finished(t, 1, Outcome::Succeeded));
    assert_eq!(h.state(t), TaskState::Assigned, "attempt 2 is untouched");
    assert!(
        !h.core
            .take_writes()
            .iter()
            .any(|w| matches!(w, Write::Output(OutputChunk { .. })))
    );
}

#[test]
fn reconnecting_within_the_lease_resumes_the_same_attempt() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.msg("a", output(t, 1, 1, "x"));
    h.sent();
    h.close("a");
    h.advance(30);
    let running = vec![ReportedTask {
        task: t,
        attempt: Attempt(1),
        last_output_seq: 5,
    }];
    h.connect_with("a", &[Specialty::Backend], 1, &[], running);
    let welcome = h.sent().into_iter().find_map(|(_, m)| match m {
        ToAgent::Welcome { held, .. } => Some(held),
        _ => None,
    });
    assert_eq!(
        welcome,
        Some(vec![(t, Attempt(1), 1)]),
        "resend after seq 1"
    );
    h.msg("a", output(t, 1, 2, "y"));
    h.msg("a", finished(t, 1, Outcome::Succeeded));
    assert_eq!(h.state(t), TaskState::Succeeded);
    assert_eq!(h.core.task(t).expect("task").attempts.len(), 1);
}

#[test]
fn an_agent_that_returns_without_its_task_loses_it_at_once() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.close("a");
    h.connect("a", Specialty::Backend, 1);
    let task = h.core.task(t).expect("task");
    assert_eq!(task.attempts[0].outcome, Some(Outcome::LostByAgent));
    assert_eq!(task.state, TaskState::Queued);
}

#[test]
fn an_assignment_not_accepted_in_time_is_requeued() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.sent();
    h.advance(30);
    let task = h.core.task(t).expect("task");
    assert_eq!(task.attempts[0].outcome, Some(Outcome::NotAccepted));
    assert!(h.sent().iter().any(|(_, m)| matches!(
        m,
        ToAgent::Cancel {
            attempt: Attempt(1),
            ..
        }
    )));
}

#[test]
fn duplicates_and_gaps_in_output_are_harmless() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.core.take_writes();
    for seq in [1, 2, 2, 1, 4, 3, 4] {
        h.msg("a", output(t, 1, seq, "z"));
    }
    let stored: Vec<u64> = h.stored_seqs();
    assert_eq!(stored, vec![1, 2, 3, 4]);
    h.msg("a", finished(t, 1, Outcome::Succeeded));
    h.sent();
    h.msg("a", finished(t, 1, Outcome::CliFailed));
    assert_eq!(
        h.state(t),
        TaskState::Succeeded,
        "a duplicate TaskFinished changes nothing"
    );
    assert!(
        h.sent()
            .iter()
            .any(|(_, m)| matches!(m, ToAgent::FinishedAck { .. }))
    );
}

#[test]
fn output_past_the_cap_is_replaced_by_one_marker() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.core.take_writes();
    let big = "x".repeat(400);
    for seq in 1..=5 {
        h.msg("a", output(t, 1, seq, &big));
    }
    let chunks: Vec<(u64, OutputKind)> = h
        .core
        .take_writes()
        .into_iter()
        .filter_map(|w| match w {
            Write::Output(OutputChunk { seq, kind, .. }) => Some((seq, kind)),
            _ => None,
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            (1, OutputKind::Stdout),
            (2, OutputKind::Stdout),
            (3, OutputKind::System)
        ]
    );
    let acks: Vec<u64> = h.acks();
    assert_eq!(acks, vec![5], "dropped output is still acknowledged");
}

#[test]
fn cancel_reaches_the_agent_and_ends_the_task() {
    let mut h = H::new();
    let queued = h.submit("r", Specialty::Frontend, 0);
    let (now, wall) = h.now();
    h.core
        .cancel(queued, "no".into(), now, wall)
        .expect("cancel");
    assert_eq!(h.state(queued), TaskState::Cancelled);
    assert_eq!(
        h.core.cancel(queued, "again".into(), now, wall),
        Err(TaskError::AlreadyFinished(queued, TaskState::Cancelled))
    );

    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.sent();
    let (now, wall) = h.now();
    h.core.cancel(t, "stop".into(), now, wall).expect("cancel");
    assert!(h.sent().iter().any(|(agent, m)| agent == "a"
        && matches!(
            m,
            ToAgent::Cancel {
                attempt: Attempt(1),
                ..
            }
        )));
    assert_eq!(h.state(t), TaskState::Running, "until the agent confirms");
    h.msg("a", finished(t, 1, Outcome::Cancelled));
    assert_eq!(h.state(t), TaskState::Cancelled);
}

#[test]
fn failures_retry_with_backoff_until_attempts_run_out() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    for (attempt, wait) in [(1u32, 10u64), (2, 20)] {
        h.msg("a", accepted(t, attempt));
        h.msg("a", finished(t, attempt, Outcome::CliFailed));
        assert_eq!(h.state(t), TaskState::Queued);
        h.advance(wait - 1);
        assert_eq!(h.state(t), TaskState::Queued, "still backing off");
        h.advance(1);
        assert_eq!(h.state(t), TaskState::Assigned);
    }
    h.msg("a", accepted(t, 3));
    h.msg("a", finished(t, 3, Outcome::CliFailed));
    assert_eq!(h.state(t), TaskState::Failed);
    let (now, wall) = h.now();
    h.core.retry(t, "retried".into(), now, wall).expect("retry");
    assert_eq!(h.state(t), TaskState::Assigned);
    assert_eq!(
        h.core.task(t).expect("task").current().map(|a| a.attempt),
        Some(Attempt(4))
    );
}

#[test]
fn a_rate_limit_requeues_without_spending_an_attempt() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.msg("a", rate_limited(t, 1, 60_000));
    let task = h.core.task(t).expect("task");
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(task.counted_attempts(), 0);
    h.advance(59);
    assert_eq!(h.state(t), TaskState::Queued);
    h.advance(1);
    assert_eq!(h.state(t), TaskState::Assigned);
    assert_eq!(
        h.core.task(t).expect("task").current().map(|a| a.attempt),
        Some(Attempt(2))
    );
}

#[test]
fn a_rate_limited_agent_gets_no_work_until_its_limit_resets() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 2);
    h.msg("a", accepted(t, 1));
    h.msg("a", rate_limited(t, 1, 90_000));
    h.sent();
    let other = h.submit("r", Specialty::Backend, 0);
    assert!(h.assigned().is_empty(), "the agent cools down");
    h.advance(89);
    assert!(h.assigned().is_empty());
    h.advance(1);
    let placed: Vec<TaskId> = h.assigned().into_iter().map(|(_, t, _)| t).collect();
    assert_eq!(placed, vec![t, other]);
}

#[test]
fn a_restarted_core_resumes_live_attempts_from_the_store() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    let q = h.submit("r", Specialty::Frontend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    let tasks: Vec<Task> = h.core.tasks().cloned().collect();
    let agents = h.core.agents().into_iter().map(|v| v.record).collect();
    let mut output = BTreeMap::new();
    output.insert(
        t,
        OutputPosition {
            last_seq: 7,
            stored_bytes: 70,
            truncated: false,
        },
    );
    let mut h2 = H::restored(Restored {
        agents,
        tasks,
        output,
        ..Restored::default()
    });
    assert_eq!(h2.state(t), TaskState::Running);
    assert_eq!(h2.state(q), TaskState::Queued);
    let running = vec![ReportedTask {
        task: t,
        attempt: Attempt(1),
        last_output_seq: 9,
    }];
    h2.connect_with("a", &[Specialty::Backend], 1, &[], running);
    let held = h2.sent().into_iter().find_map(|(_, m)| match m {
        ToAgent::Welcome { held, .. } => Some(held),
        _ => None,
    });
    assert_eq!(held, Some(vec![(t, Attempt(1), 7)]));
    let next = h2.submit("r", Specialty::Backend, 0);
    assert_eq!(next, TaskId(3), "ids continue after the stored ones");
}

#[test]
fn a_reset_far_in_the_future_waits_only_the_maximum_cool_down() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 2);
    h.msg("a", accepted(t, 1));
    // A reset a thousand years away: believed only up to the maximum (1h here).
    h.msg("a", rate_limited(t, 1, 1000 * 365 * 86_400_000));
    let (_, wall) = h.now();
    let max = config().rate_limit_cooldown_max;
    assert_eq!(
        h.core.task(t).expect("task").not_before,
        Some(wall.saturating_add(max)),
        "the task waits at most the maximum cool-down"
    );
    h.sent();
    let other = h.submit("r", Specialty::Backend, 0);
    assert!(h.assigned().is_empty(), "the agent cools down");
    h.advance(max.as_secs() - 1);
    assert!(h.assigned().is_empty());
    h.advance(1);
    let placed: Vec<TaskId> = h.assigned().into_iter().map(|(_, t, _)| t).collect();
    assert_eq!(
        placed,
        vec![t, other],
        "both the task and the agent are free again"
    );
}

#[test]
fn past_the_cap_any_seq_is_acknowledged_without_overflow() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.msg("a", output(t, 1, 1, &"x".repeat(2000)));
    // Truncated now: later seqs are acknowledged, however far they jump.
    for seq in [u64::MAX, 5, u64::MAX] {
        h.msg("a", output(t, 1, seq, "z"));
    }
    assert_eq!(h.core.acked_seq(t), Some(u64::MAX));
    let acks: Vec<u64> = h.acks();
    assert_eq!(acks, vec![u64::MAX], "the position never moves back");
}

#[test]
fn a_retried_task_gets_a_fresh_output_budget() {
    let mut h = H::new();
    let t = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(t, 1));
    h.msg("a", output(t, 1, 1, &"x".repeat(2000)));
    h.msg("a", finished(t, 1, Outcome::NoChanges));
    assert_eq!(h.state(t), TaskState::Failed);
    let (now, wall) = h.now();
    h.core.retry(t, "retried".into(), now, wall).expect("retry");
    assert_eq!(
        h.core.task(t).expect("task").output_since,
        Attempt(2),
        "persisted, so that a restart restores the same budget"
    );
    h.msg("a", accepted(t, 2));
    h.core.take_writes();
    h.msg("a", output(t, 2, 1, "fresh"));
    assert_eq!(h.stored_seqs(), vec![1], "the retry's output is stored");
}

/// The last committed state of every task `h` wrote, as a store holds it.
fn committed(h: &mut H) -> BTreeMap<TaskId, Task> {
    let mut tasks = BTreeMap::new();
    for w in h.core.take_writes() {
        if let Write::Task(task) = w {
            tasks.insert(task.id, *task);
        }
    }
    tasks
}

#[test]
fn an_ended_task_leaves_memory_once_committed_and_comes_back_for_a_retry() {
    let mut h = H::new();
    let done = h.submit("r", Specialty::Backend, 0);
    let failed = h.submit("r", Specialty::Backend, 0);
    h.connect("a", Specialty::Backend, 2);
    h.msg("a", accepted(done, 1));
    h.msg("a", accepted(failed, 1));
    h.msg("a", finished(done, 1, Outcome::Succeeded));
    h.msg("a", finished(failed, 1, Outcome::NoChanges));
    let store = committed(&mut h);
    h.core.evict_finished();
    assert!(h.core.task(done).is_none() && h.core.task(failed).is_none());
    assert!(h.core.left_memory(done) && h.core.left_memory(failed));
    assert!(!h.core.left_memory(TaskId(99)), "never submitted");
    assert_eq!(h.core.tasks().count(), 0, "nothing ended stays in memory");
    let counts: Vec<_> = h.core.finished_counts().filter(|c| c.2 > 0).collect();
    assert_eq!(
        counts,
        vec![
            (TaskState::Succeeded, Specialty::Backend, 1),
            (TaskState::Failed, Specialty::Backend, 1)
        ]
    );
    assert_eq!(
        h.core.recently_finished().collect::<Vec<_>>(),
        vec![done, failed]
    );

    // A late copy of a result of an ended task is acknowledged, not fenced.
    h.msg("a", finished(done, 1, Outcome::Succeeded));
    assert!(h.sent().contains(&(
        "a".into(),
        ToAgent::FinishedAck {
            task: done,
            attempt: Attempt(1)
        }
    )));

    // A retry brings the task back from the store.
    h.core.bring_back(store[&failed].clone());
    let (now, wall) = h.now();
    h.core
        .retry(failed, "retried".into(), now, wall)
        .expect("retry");
    assert_eq!(h.state(failed), TaskState::Assigned);
    assert!(
        h.core
            .finished_counts()
            .all(|c| c.0 != TaskState::Failed || c.2 == 0),
        "counted in memory again"
    );
    h.core.take_writes();
    h.core.evict_finished();
    assert!(h.core.task(failed).is_some(), "a live task stays");
    // Brought back but left as it was: it leaves again.
    h.core.bring_back(store[&done].clone());
    h.core.evict_finished();
    assert!(h.core.task(done).is_none());
    assert_eq!(
        h.core
            .finished_counts()
            .find(|c| c.0 == TaskState::Succeeded)
            .map(|c| c.2),
        Some(1),
        "counted once"
    );
}

#[test]
fn a_restart_keeps_only_unended_tasks_in_memory() {
    let mut h = H::new();
    let done = h.submit("r", Specialty::Backend, 0);
    let waiting = h.submit("r", Specialty::Frontend, 0);
    h.connect("a", Specialty::Backend, 1);
    h.msg("a", accepted(done, 1));
    h.msg("a", finished(done, 1, Outcome::Succeeded));
    let store = committed(&mut h);
    let restarted = H::restored(Restored {
        tasks: store.into_values().collect(),
        ..Restored::default()
    });
    assert!(restarted.core.task(done).is_none());
    assert!(restarted.core.left_memory(done));
    assert_eq!(restarted.state(waiting), TaskState::Queued);
    let mut h2 = restarted;
    let next = h2.submit("r", Specialty::Backend, 0);
    assert_eq!(next, TaskId(3), "ids go on after the ended ones");
}
