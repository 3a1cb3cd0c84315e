//! The gauges' values, read from the core in one go (pure: no clock, no
//! I/O). Every state and specialty is listed, with zeros, so that a series
//! that drops to nothing shows 0 rather than vanishing.

use std::collections::BTreeMap;

use common::ids::AgentId;
use common::types::Specialty;

use crate::core::{AgentState, Core, TaskState};

/// Every task state, in lifecycle order.
const TASK_STATES: [TaskState; 8] = [
    TaskState::NeedsInfo,
    TaskState::Queued,
    TaskState::Assigned,
    TaskState::Running,
    TaskState::Finishing,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
];

const AGENT_STATES: [AgentState; 4] = [
    AgentState::Connected,
    AgentState::Draining,
    AgentState::Disconnected,
    AgentState::Revoked,
];

/// The state of the coordinator as the gauges show it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Tasks by (state, specialty).
    pub tasks: BTreeMap<(&'static str, &'static str), usize>,
    /// Tasks in state queued.
    pub queue_depth: usize,
    /// Agents by state.
    pub agents: BTreeMap<&'static str, usize>,
    /// Every known agent's slots.
    pub slots: Vec<AgentSlots>,
    /// GitHub writes owed.
    pub outbox_depth: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSlots {
    pub agent: AgentId,
    /// What it advertised in its latest Hello (0 before any).
    pub capacity: u32,
    /// What the scheduler may fill now.
    pub free: u32,
}

impl Snapshot {
    pub fn of(core: &Core) -> Self {
        let mut tasks: BTreeMap<_, usize> = TASK_STATES
            .iter()
            .flat_map(|state| {
                Specialty::ALL
                    .iter()
                    .map(move |specialty| ((state.as_str(), specialty.as_str()), 0))
            })
            .collect();
        let mut queue_depth = 0;
        for task in core.tasks() {
            *tasks
                .entry((task.state.as_str(), task.spec.specialty.as_str()))
                .or_default() += 1;
            queue_depth += usize::from(task.state == TaskState::Queued);
        }
        // Ended tasks out of memory are counted, not kept.
        for (state, specialty, n) in core.finished_counts() {
            *tasks
                .entry((state.as_str(), specialty.as_str()))
                .or_default() += usize::try_from(n).unwrap_or(usize::MAX);
        }
        let mut agents: BTreeMap<_, usize> =
            AGENT_STATES.iter().map(|s| (agent_state(*s), 0)).collect();
        let mut slots = Vec::new();
        for view in core.agents() {
            *agents.entry(agent_state(view.record.state)).or_default() += 1;
            slots.push(AgentSlots {
                capacity: view.record.advert.as_ref().map_or(0, |a| a.capacity),
                free: view.free_slots,
                agent: view.record.id,
            });
        }
        Self {
            tasks,
            queue_depth,
            agents,
            slots,
            outbox_depth: core.outbox_depth(),
        }
    }
}

pub fn agent_state(state: AgentState) -> &'static str {
    match state {
        AgentState::Connected => "connected",
        AgentState::Draining => "draining",
        AgentState::Disconnected => "disconnected",
        AgentState::Revoked => "revoked",
    }
}
