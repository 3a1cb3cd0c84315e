//! Agents that cannot work, second processes with one certificate, failures
//! that will recur, heartbeats that write nothing, and scheduling whose cost
//! does not grow with work that cannot be placed.

use common::ids::TaskId;
use common::types::{AgentAdvert, Outcome, Specialty};

use super::task_tests::{H, accepted, finished, id, report};
use super::*;

fn advert(specialties: &[Specialty], instance: &str) -> AgentAdvert {
    AgentAdvert {
        agent_version: "t".into(),
        specialties: specialties.to_vec(),
        capacity: 2,
        labels: Default::default(),
        toolchains: vec![],
        hostname: String::new(),
        instance_id: instance.into(),
    }
}

impl H {
    /// Opens a stream for `name` and says Hello as process `instance`;
    /// returns the stream and what the core did with it.
    fn hello_as(
        &mut self,
        name: &str,
        instance: &str,
        unhealthy: Option<&str>,
    ) -> (ConnId, Vec<Action>) {
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let (now, wall) = self.now();
        self.core
            .handle_open(conn, id(name), "127.0.0.9:5000".into(), now)
            .expect("open");
        self.core.handle_message(
            conn,
            FromAgent::Hello {
                advert: advert(&[Specialty::Backend], instance),
                running: vec![],
                unhealthy: unhealthy.map(str::to_owned),
            },
            now,
            wall,
        );
        let actions = std::iter::from_fn(|| self.core.poll_action()).collect();
        (conn, actions)
    }

    fn heartbeat(&mut self, agent: &str, unhealthy: Option<&str>) {
        self.msg(
            agent,
            FromAgent::Heartbeat {
                free_slots: 0,
                running: vec![],
                unhealthy: unhealthy.map(str::to_owned),
            },
        );
    }

    fn agent_writes(&mut self) -> usize {
        self.core
            .take_writes()
            .iter()
            .filter(|w| matches!(w, Write::Agent(_)))
            .count()
    }
}

fn closed_with(actions: &[Action], conn: ConnId) -> Option<&CloseReason> {
    actions.iter().find_map(|a| match a {
        Action::Close { conn: c, reason } if *c == conn => Some(reason),
        _ => None,
    })
}

#[test]
fn a_second_process_with_the_same_certificate_is_refused_while_the_first_is_live() {
    let mut h = H::new();
    let (first, actions) = h.hello_as("pc-02", "aaaa", None);
    assert_eq!(closed_with(&actions, first), None);
    h.conns.insert("pc-02".into(), first);

    let (second, actions) = h.hello_as("pc-02", "bbbb", None);
    match closed_with(&actions, second) {
        Some(CloseReason::Duplicate(why)) => {
            assert!(
                why.contains("agent pc-02 is already connected from 127.0.0.9:5000 since"),
                "{why}"
            );
        }
        other => panic!("the second process was not refused: {other:?}"),
    }
    assert_eq!(
        closed_with(&actions, first),
        None,
        "the first stream was touched"
    );
    let view = h.core.agent(&id("pc-02")).expect("agent");
    assert_eq!(view.record.state, AgentState::Connected);
    assert_eq!(
        view.record.advert.map(|a| a.instance_id).as_deref(),
        Some("aaaa")
    );

    // The same process reconnecting replaces its own older stream.
    let (again, actions) = h.hello_as("pc-02", "aaaa", None);
    assert_eq!(closed_with(&actions, again), None);
    assert_eq!(closed_with(&actions, first), Some(&CloseReason::Replaced));
    h.conns.insert("pc-02".into(), again);

    // Once the first process's stream is gone, another may take over.
    h.close("pc-02");
    let (other, actions) = h.hello_as("pc-02", "bbbb", None);
    assert_eq!(closed_with(&actions, other), None);
    assert_eq!(
        h.core
            .agent(&id("pc-02"))
            .and_then(|v| v.record.advert)
            .map(|a| a.instance_id)
            .as_deref(),
        Some("bbbb")
    );
}

#[test]
fn a_silent_first_process_gives_way_after_the_heartbeat_timeout() {
    // The task tests' config never times streams out; use the core's.
    let config = super::tests::config();
    let timeout = config.heartbeat_timeout;
    let mut h = H::with_config(config, Restored::default());
    let (first, _) = h.hello_as("pc-02", "aaaa", None);
    h.conns.insert("pc-02".into(), first);
    h.advance(timeout.as_secs() + 1);
    let (second, actions) = h.hello_as("pc-02", "bbbb", None);
    assert_eq!(closed_with(&actions, second), None, "{actions:?}");
}

#[test]
fn an_unhealthy_agent_gets_no_work_until_it_reports_healthy() {
    let mut h = H::new();
    let (conn, _) = h.hello_as("pc", "i", Some("claude: not found"));
    h.conns.insert("pc".into(), conn);
    let t = h.submit("r", Specialty::Backend, 0);
    assert!(h.assigned().is_empty());
    assert_eq!(
        h.core
            .agent(&id("pc"))
            .and_then(|v| v.record.unhealthy)
            .as_deref(),
        Some("claude: not found")
    );
    let waiting = h
        .core
        .waiting_reason(t, h.now().0, h.now().1)
        .expect("a reason");
    assert!(
        waiting.contains("pc (unhealthy: claude: not found)"),
        "{waiting}"
    );
    h.heartbeat("pc", Some("claude: not found"));
    assert!(h.assigned().is_empty());
    h.heartbeat("pc", None);
    assert_eq!(h.assigned(), vec![("pc".into(), t, Attempt(1))]);
    assert_eq!(
        h.core.agent(&id("pc")).and_then(|v| v.record.unhealthy),
        None
    );
}

#[test]
fn an_attempt_the_pc_could_not_run_is_free_and_makes_the_agent_unhealthy() {
    let mut h = H::new();
    h.connect("bad", Specialty::Backend, 2);
    let t = h.submit("r", Specialty::Backend, 0);
    assert_eq!(h.assigned(), vec![("bad".into(), t, Attempt(1))]);
    h.msg("bad", accepted(t, 1));
    let mut fault = report(Outcome::AgentFault);
    fault.message = "cannot start the CLI: claude not found".into();
    h.msg(
        "bad",
        FromAgent::Finished {
            task: t,
            attempt: Attempt(1),
            report: fault,
        },
    );
    let task = h.core.task(t).expect("task");
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(task.counted_attempts(), 0, "the attempt was spent");
    assert_eq!(task.not_before, None);
    assert_eq!(
        h.core
            .agent(&id("bad"))
            .and_then(|v| v.record.unhealthy)
            .as_deref(),
        Some("cannot start the CLI: claude not found")
    );
    // Not offered to the same agent again; a healthy one takes it, and the
    // failed attempt did not make the bad agent "know" the repository.
    assert!(h.assigned().is_empty());
    h.connect("good", Specialty::Backend, 2);
    let sent = h.assigned();
    assert_eq!(sent, vec![("good".into(), t, Attempt(2))]);
    let placement = &h.core.task(t).expect("task").attempts[1].placement;
    assert!(
        !placement.contains("ran this repository before"),
        "{placement}"
    );
    h.heartbeat("bad", None);
    let t2 = h.submit("r", Specialty::Backend, 0);
    let sent = h.assigned();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, t2);
}

#[test]
fn a_permanent_failure_fails_the_task_at_once() {
    let mut h = H::new();
    h.connect("a", Specialty::Backend, 1);
    let t = h.submit("/no/such/repo", Specialty::Backend, 0);
    assert_eq!(h.assigned().len(), 1);
    h.msg("a", accepted(t, 1));
    let mut gone = report(Outcome::WorkspaceError);
    gone.message = "repository /no/such/repo does not exist".into();
    gone.permanent = true;
    h.msg(
        "a",
        FromAgent::Finished {
            task: t,
            attempt: Attempt(1),
            report: gone,
        },
    );
    let task = h.core.task(t).expect("task");
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(
        task.state_reason,
        "workspace_error: repository /no/such/repo does not exist (permanent: not retried)"
    );
    // The same outcome without the flag is retried.
    let t2 = h.submit("r", Specialty::Backend, 0);
    assert_eq!(h.assigned().len(), 1);
    h.msg("a", accepted(t2, 1));
    h.msg("a", finished(t2, 1, Outcome::WorkspaceError));
    assert_eq!(h.state(t2), TaskState::Queued);
    // A permanent flag never turns a success or a free requeue into a failure.
    h.advance(600);
    let again = h.assigned();
    assert_eq!(again.len(), 1);
    for (outcome, state) in [
        (Outcome::RateLimited, TaskState::Queued),
        (Outcome::Succeeded, TaskState::Succeeded),
    ] {
        let (_, task, attempt) = h.assigned().pop().unwrap_or(again[0].clone());
        h.msg("a", accepted(task, attempt.0));
        let mut r = report(outcome);
        r.permanent = true;
        h.msg(
            "a",
            FromAgent::Finished {
                task,
                attempt,
                report: r,
            },
        );
        assert_eq!(h.state(task), state, "{outcome} marked permanent");
        h.advance(3600);
    }
}

#[test]
fn heartbeats_write_nothing_durable_but_last_seen_once_a_minute() {
    let mut h = H::new();
    h.connect("a", Specialty::Backend, 1);
    assert_eq!(h.agent_writes(), 1, "connecting is written");
    for _ in 0..59 {
        h.secs += 1;
        h.heartbeat("a", None);
    }
    assert_eq!(h.agent_writes(), 0, "a heartbeat was written");
    h.secs += 1;
    h.heartbeat("a", None);
    assert_eq!(
        h.agent_writes(),
        1,
        "last_seen was not written after a minute"
    );
    assert_eq!(
        h.core.agent(&id("a")).expect("agent").record.last_seen,
        h.now().1
    );
    // A change of health is written at once.
    h.heartbeat("a", Some("not logged in"));
    assert_eq!(h.agent_writes(), 1);
}

/// The work of one scheduling event, in queue entries looked at, with
/// `unplaceable` frontend tasks queued that no connected agent can take.
fn work_per_event(unplaceable: usize) -> Vec<u64> {
    let mut h = H::new();
    h.connect("be", Specialty::Backend, 4);
    for _ in 0..unplaceable {
        h.submit("web", Specialty::Frontend, 0);
    }
    let mut per_event = Vec::new();
    for round in 0..20 {
        let before = h.core.schedule_work();
        match round % 4 {
            // A backend task comes and goes: placement runs each time.
            0 => {
                h.submit("api", Specialty::Backend, 0);
            }
            1 => {
                let (task, attempt) = h
                    .assigned()
                    .first()
                    .map(|(_, t, a)| (*t, *a))
                    .expect("the backend task was placed");
                h.msg("be", accepted(task, attempt.0));
                h.msg("be", finished(task, attempt.0, Outcome::Succeeded));
            }
            2 => h.advance(1),
            _ => h.heartbeat("be", None),
        }
        per_event.push(h.core.schedule_work() - before);
    }
    per_event
}

#[test]
fn scheduling_costs_the_same_with_ten_thousand_unplaceable_tasks_queued() {
    let few = work_per_event(1);
    let many = work_per_event(10_000);
    assert_eq!(few, many, "an event's work grew with unplaceable tasks");
    assert!(many.iter().all(|&w| w <= 4), "{many:?}");
    // They are still placed once an agent that can take them comes.
    let mut h = H::new();
    let tasks: Vec<TaskId> = (0..3)
        .map(|_| h.submit("web", Specialty::Frontend, 0))
        .collect();
    h.connect("fe", Specialty::Frontend, 3);
    let placed: Vec<TaskId> = h.assigned().into_iter().map(|(_, t, _)| t).collect();
    assert_eq!(placed, tasks);
}

#[test]
fn finished_tasks_cost_scheduling_nothing() {
    let mut h = H::new();
    h.connect("be", Specialty::Backend, 1);
    for _ in 0..500 {
        let t = h.submit("api", Specialty::Backend, 0);
        h.assigned();
        h.msg("be", accepted(t, 1));
        h.msg("be", finished(t, 1, Outcome::Succeeded));
    }
    let before = h.core.schedule_work();
    h.submit("api", Specialty::Backend, 0);
    assert!(h.core.schedule_work() - before <= 2);
}

#[test]
fn a_waiting_task_says_why() {
    let mut h = H::new();
    let t = h.submit("web", Specialty::Frontend, 0);
    assert_eq!(
        h.core.waiting_reason(t, h.now().0, h.now().1).as_deref(),
        Some(
            "no connected agent has specialty frontend; general agents may take it after 2m \
             (none is connected now)"
        )
    );
    h.connect("gen", Specialty::General, 1);
    h.secs += 30;
    assert_eq!(
        h.core.waiting_reason(t, h.now().0, h.now().1).as_deref(),
        Some("no connected agent has specialty frontend; general agents may take it after 1m 30s")
    );
    h.advance(90);
    assert_eq!(h.assigned().len(), 1, "the general fallback did not start");
    assert_eq!(h.core.waiting_reason(t, h.now().0, h.now().1), None);

    let busy = h.submit("web", Specialty::General, 0);
    assert_eq!(
        h.core.waiting_reason(busy, h.now().0, h.now().1).as_deref(),
        Some("every general agent is busy or unavailable: gen (1 of 1 slots taken)")
    );
}

#[test]
fn placing_a_task_looks_at_the_free_agents_not_the_fleet() {
    let mut h = H::new();
    let busy = 1_000;
    for n in 0..busy {
        h.connect(&format!("busy-{n:04}"), Specialty::Backend, 1);
        h.submit("api", Specialty::Backend, 0);
    }
    assert_eq!(h.assigned().len(), busy, "every busy agent holds a task");
    h.connect("free", Specialty::Backend, 1);
    let before = h.core.placement_work();
    let task = h.submit("web", Specialty::Backend, 0);
    let placed = h.assigned();
    assert_eq!(
        placed.iter().map(|(_, t, _)| *t).collect::<Vec<_>>(),
        vec![task],
        "the task goes to the one free agent"
    );
    let looked = h.core.placement_work() - before;
    assert!(
        looked <= 4,
        "placing one task looked at {looked} agents of {}",
        busy + 1
    );
}
