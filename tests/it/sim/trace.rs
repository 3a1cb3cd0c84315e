//! The last events of a run, kept cheaply and printed one line each when a
//! run fails, so a failure can be read without replaying it first.

use std::collections::VecDeque;

use common::ids::Attempt;
use coordinator::core::{ConnId, FromAgent, ReportedTask, ToAgent};

use super::world::Event;

/// How many events a failure report shows.
const KEEP: usize = 50;

#[derive(Debug)]
pub(super) enum TraceItem {
    Event(Box<Event>),
    /// The coordinator's driver called `handle_timeout`.
    Timer,
    /// An agent's driver called its session's `handle_timeout`.
    AgentTimer(usize),
    Note(String),
}

#[derive(Debug, Default)]
pub(super) struct Trace {
    last: VecDeque<(u64, TraceItem)>,
}

impl Trace {
    pub fn push(&mut self, at_ms: u64, item: TraceItem) {
        if self.last.len() == KEEP {
            self.last.pop_front();
        }
        self.last.push_back((at_ms, item));
    }

    /// Renders the kept events; `agent` names an agent by index,
    /// `agent_of` the agent of a stream.
    pub fn lines<'a>(
        &self,
        agent: &dyn Fn(usize) -> &'a str,
        agent_of: &dyn Fn(ConnId) -> &'a str,
    ) -> Vec<String> {
        self.last
            .iter()
            .map(|(at, item)| {
                let what = match item {
                    TraceItem::Event(event) => describe(event, agent, agent_of),
                    TraceItem::Timer => "coordinator: handle_timeout".into(),
                    TraceItem::AgentTimer(a) => format!("{}: handle_timeout", agent(*a)),
                    TraceItem::Note(note) => format!("** {note}"),
                };
                format!("{:>6}.{:03}s  {what}", at / 1000, at % 1000)
            })
            .collect()
    }
}

fn describe<'a>(
    event: &Event,
    agent: &dyn Fn(usize) -> &'a str,
    agent_of: &dyn Fn(ConnId) -> &'a str,
) -> String {
    match event {
        Event::ToCoordinator {
            conn,
            msg,
            duplicate,
        } => format!(
            "{} -> coordinator (conn {}){}: {}",
            agent_of(*conn),
            conn.0,
            if *duplicate { " DUPLICATE" } else { "" },
            from_agent(msg)
        ),
        Event::ToAgent { conn, msg } => format!(
            "coordinator -> {} (conn {}): {}",
            agent_of(*conn),
            conn.0,
            to_agent(msg)
        ),
        Event::CoordinatorSeesClose { conn } => format!(
            "coordinator sees conn {} of {} closed",
            conn.0,
            agent_of(*conn)
        ),
        Event::AgentSeesClose { agent: a, conn } => {
            format!("{} sees conn {} closed", agent(*a), conn.0)
        }
        Event::AgentConnect {
            agent: a,
            incarnation,
        } => format!("{} tries to connect (life {incarnation})", agent(*a)),
        Event::HealthChecked {
            agent: a, passed, ..
        } => format!(
            "{}'s health check {}",
            agent(*a),
            if *passed { "passes" } else { "fails" }
        ),
        Event::AgentWork {
            agent: a,
            task,
            attempt,
            ..
        } => format!("{} works on {task}#{attempt}", agent(*a)),
        Event::Commit { life } => format!("driver commits (life {life})"),
        Event::CoordinatorRestart => "coordinator restarts".into(),
        Event::Submit(task) => format!(
            "admin submits a {} task for {}",
            task.spec.specialty, task.spec.repo_url
        ),
        Event::Fault => "fault injector".into(),
        Event::EndOfFaults => "faults end".into(),
        Event::LetAgentsBack => "the admin lets revoked and drained agents back".into(),
    }
}

fn reported(running: &[ReportedTask]) -> String {
    let items: Vec<String> = running
        .iter()
        .map(|r| format!("{}#{}@{}", r.task, r.attempt, r.last_output_seq))
        .collect();
    format!("[{}]", items.join(" "))
}

fn from_agent(msg: &FromAgent) -> String {
    match msg {
        FromAgent::Hello { running, .. } => format!("Hello {}", reported(running)),
        FromAgent::Heartbeat {
            free_slots,
            running,
            ..
        } => format!("Heartbeat free={free_slots} {}", reported(running)),
        FromAgent::Draining { .. } => "Draining".into(),
        FromAgent::Accepted { task, attempt } => format!("Accepted {task}#{attempt}"),
        FromAgent::Rejected {
            task,
            attempt,
            reason,
        } => format!("Rejected {task}#{attempt} ({reason})"),
        FromAgent::Output(chunk) => {
            format!("Output {}#{} seq {}", chunk.task, chunk.attempt, chunk.seq)
        }
        FromAgent::Progress { task, attempt, .. } => format!("Progress {task}#{attempt}"),
        FromAgent::Finished {
            task,
            attempt,
            report,
        } => format!("Finished {task}#{attempt} {}", report.outcome),
    }
}

fn held(held: &[(common::ids::TaskId, Attempt, u64)]) -> String {
    let items: Vec<String> = held
        .iter()
        .map(|(task, attempt, seq)| match seq {
            &u64::MAX => format!("{task}#{attempt}@done"),
            seq => format!("{task}#{attempt}@{seq}"),
        })
        .collect();
    format!("[{}]", items.join(" "))
}

fn to_agent(msg: &ToAgent) -> String {
    match msg {
        ToAgent::Welcome { held: h, .. } => format!("Welcome {}", held(h)),
        ToAgent::Heartbeat { .. } => "Heartbeat".into(),
        ToAgent::Drain { .. } => "Drain".into(),
        ToAgent::Assign { task, attempt, .. } => format!("Assign {task}#{attempt}"),
        ToAgent::Cancel {
            task,
            attempt,
            reason,
        } => format!("Cancel {task}#{attempt} ({reason})"),
        ToAgent::OutputAck { task, attempt, seq } => format!("OutputAck {task}#{attempt} {seq}"),
        ToAgent::FinishedAck { task, attempt } => format!("FinishedAck {task}#{attempt}"),
    }
}
