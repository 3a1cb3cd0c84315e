//! The cluster feed behind `WatchCluster` (`ccc top`): a snapshot of the
//! cluster, then its changes as they happen.
//!
//! The driver reads what changed off each committed batch
//! ([`Changes::of`]), so a feed shows only what is durable, and hands the
//! changes to every feed's bounded queue without waiting. Between that
//! queue and the client sits a [`Coalescer`]: it keeps the latest state of
//! each agent and task that changed and the latest output line of each
//! task, so a client that reads slowly gets what is current rather than a
//! backlog, and a chatty task cannot flood the stream. A feed whose queue
//! still fills up is dropped by the driver and starts over from a fresh
//! snapshot (drop and resync).

use std::collections::{BTreeMap, BTreeSet};

use common::ids::{AgentId, TaskId};
use common::protocol::OutputChunk;

use crate::core::{AgentView, Task, Write};

/// Changes queued for one feed before the driver drops it (it resyncs).
pub const FEED_QUEUE: usize = 1024;
/// Ended tasks in a snapshot when the client does not say.
pub const DEFAULT_RECENT_ENDED: usize = 20;
/// At most this many ended tasks in a snapshot.
pub const MAX_RECENT_ENDED: usize = 200;

/// The latest output chunk of a task: for a view, its last line.
pub type Line = OutputChunk;

/// One change, as the driver publishes it.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedEvent {
    Agent(Box<AgentView>),
    /// The agent's record was forgotten.
    AgentForgotten(AgentId),
    /// A task as answered to admins (with why it waits).
    Task(Box<Task>),
    Line(Line),
}

/// The cluster as a feed starts with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub agents: Vec<AgentView>,
    /// Every task not yet ended, then the most recently updated ended ones.
    pub tasks: Vec<Task>,
    /// The latest output chunk of each task not yet ended that has one.
    pub lines: Vec<Line>,
}

/// What one committed batch changed, read off its writes.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub agents: BTreeSet<AgentId>,
    pub forgotten: BTreeSet<AgentId>,
    pub tasks: BTreeSet<TaskId>,
    /// The batch's last output chunk of each task.
    pub lines: BTreeMap<TaskId, Line>,
}

impl Changes {
    pub fn of(writes: &[Write]) -> Self {
        let mut changes = Self::default();
        for write in writes {
            match write {
                Write::Agent(record) => {
                    changes.forgotten.remove(&record.id);
                    changes.agents.insert(record.id.clone());
                }
                Write::ForgetAgent(id) => {
                    changes.agents.remove(id);
                    changes.forgotten.insert(id.clone());
                }
                Write::Task(task) => {
                    changes.tasks.insert(task.id);
                }
                Write::Output(chunk) => {
                    changes.lines.insert(chunk.task, chunk.clone());
                }
                Write::Delivery { .. }
                | Write::ForgetDelivery(_)
                | Write::Outbox(_)
                | Write::OutboxDone(..)
                | Write::Admin(_) => {}
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
            && self.forgotten.is_empty()
            && self.tasks.is_empty()
            && self.lines.is_empty()
    }
}

/// The changes a feed owes its client, each thing at its latest state:
/// agents and tasks go out as soon as the client takes them, output lines
/// when the caller says they are due (at most so often).
#[derive(Debug, Default)]
pub struct Coalescer {
    /// `None`: forgotten.
    agents: BTreeMap<AgentId, Option<Box<AgentView>>>,
    tasks: BTreeMap<TaskId, Box<Task>>,
    lines: BTreeMap<TaskId, Line>,
}

impl Coalescer {
    pub fn push(&mut self, event: FeedEvent) {
        match event {
            FeedEvent::Agent(view) => {
                self.agents.insert(view.record.id.clone(), Some(view));
            }
            FeedEvent::AgentForgotten(id) => {
                self.agents.insert(id, None);
            }
            FeedEvent::Task(task) => {
                self.tasks.insert(task.id, task);
            }
            FeedEvent::Line(line) => {
                self.lines.insert(line.task, line);
            }
        }
    }

    /// Agents or tasks are waiting.
    pub fn has_changes(&self) -> bool {
        !self.agents.is_empty() || !self.tasks.is_empty()
    }

    pub fn has_lines(&self) -> bool {
        !self.lines.is_empty()
    }

    /// The next event to send: agents and tasks first, output lines only
    /// when `lines_due`.
    pub fn pop(&mut self, lines_due: bool) -> Option<FeedEvent> {
        if let Some((id, view)) = self.agents.pop_first() {
            return Some(view.map_or(FeedEvent::AgentForgotten(id), FeedEvent::Agent));
        }
        if let Some((_, task)) = self.tasks.pop_first() {
            return Some(FeedEvent::Task(task));
        }
        if lines_due {
            return self
                .lines
                .pop_first()
                .map(|(_, line)| FeedEvent::Line(line));
        }
        None
    }

    /// Forgets everything owed (a fresh snapshot replaces it).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use common::ids::Attempt;
    use common::time::UnixMillis;
    use common::types::{OutputKind, Specialty};

    use super::*;
    use crate::core::task_tests::spec;
    use crate::core::{AgentRecord, AgentState, TaskSource, TaskState};

    fn line(task: u64, seq: u64, text: &str) -> Line {
        Line {
            task: TaskId(task),
            attempt: Attempt(1),
            seq,
            kind: OutputKind::Stdout,
            data: std::sync::Arc::from(text.as_bytes()),
        }
    }

    fn agent(name: &str, state: AgentState) -> AgentRecord {
        AgentRecord {
            id: AgentId::new(name).expect("name"),
            state,
            advert: None,
            first_seen: UnixMillis(0),
            last_seen: UnixMillis(0),
            connections: 1,
            peer_address: String::new(),
            last_disconnect_reason: None,
            revoked_reason: None,
            unhealthy: None,
            drain_reason: None,
        }
    }

    fn view(name: &str, state: AgentState) -> FeedEvent {
        FeedEvent::Agent(Box::new(AgentView {
            record: agent(name, state),
            free_slots: 1,
            running: Vec::new(),
            assigned: Vec::new(),
            cooldown_until: None,
        }))
    }

    fn task(id: u64, state: TaskState) -> Task {
        Task {
            id: TaskId(id),
            source: TaskSource::Manual {
                submitted_by: "root".into(),
            },
            spec: spec("r", Specialty::Backend),
            priority: 0,
            state,
            state_reason: String::new(),
            attempts: Vec::new(),
            max_attempts: 3,
            created_at: UnixMillis(0),
            updated_at: UnixMillis(0),
            queued_at: UnixMillis(0),
            not_before: None,
            cancel_requested: None,
            output_since: Attempt(1),
            waiting_reason: None,
            pending_effects: Vec::new(),
            triage: None,
            github: None,
        }
    }

    #[test]
    fn a_batch_names_what_it_changed_and_only_its_last_line_per_task() {
        let output = Write::Output;
        let changes = Changes::of(&[
            Write::Agent(Box::new(agent("pc-1", AgentState::Connected))),
            Write::ForgetAgent(AgentId::new("pc-2").expect("name")),
            Write::Task(Box::new(task(1, TaskState::Running))),
            output(line(1, 1, "first")),
            output(line(1, 2, "second")),
            output(line(2, 7, "other")),
            Write::Delivery {
                id: "d".into(),
                at: UnixMillis(0),
            },
        ]);
        assert_eq!(
            changes
                .agents
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["pc-1"]
        );
        assert_eq!(
            changes
                .forgotten
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["pc-2"]
        );
        assert_eq!(
            changes.tasks.iter().copied().collect::<Vec<_>>(),
            [TaskId(1)]
        );
        assert_eq!(changes.lines.get(&TaskId(1)), Some(&line(1, 2, "second")));
        assert_eq!(changes.lines.get(&TaskId(2)), Some(&line(2, 7, "other")));
        assert!(Changes::of(&[]).is_empty());
    }

    #[test]
    fn a_slow_client_gets_the_latest_state_of_each_thing_once() {
        let mut pending = Coalescer::default();
        for seq in 1..=1000 {
            pending.push(FeedEvent::Line(line(1, seq, "chatty")));
        }
        pending.push(FeedEvent::Task(Box::new(task(1, TaskState::Running))));
        pending.push(FeedEvent::Task(Box::new(task(1, TaskState::Succeeded))));
        pending.push(view("pc-1", AgentState::Connected));
        pending.push(view("pc-1", AgentState::Draining));
        pending.push(FeedEvent::AgentForgotten(
            AgentId::new("pc-2").expect("name"),
        ));

        assert!(pending.has_changes() && pending.has_lines());
        let Some(FeedEvent::Agent(first)) = pending.pop(false) else {
            panic!("agents first");
        };
        assert_eq!(first.record.state, AgentState::Draining, "the latest state");
        assert!(
            matches!(pending.pop(false), Some(FeedEvent::AgentForgotten(id)) if id.as_str() == "pc-2")
        );
        let Some(FeedEvent::Task(t)) = pending.pop(false) else {
            panic!("then tasks");
        };
        assert_eq!(t.state, TaskState::Succeeded);
        assert_eq!(pending.pop(false), None, "lines wait until they are due");
        assert_eq!(
            pending.pop(true),
            Some(FeedEvent::Line(line(1, 1000, "chatty"))),
            "a thousand lines become the last one"
        );
        assert_eq!(pending.pop(true), None);
        assert!(!pending.has_changes() && !pending.has_lines());

        pending.push(FeedEvent::Line(line(3, 1, "x")));
        pending.clear();
        assert!(!pending.has_lines());
    }
}
