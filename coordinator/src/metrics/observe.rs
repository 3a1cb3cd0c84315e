//! What a commit changed, as the counters and histograms count it (pure:
//! durations come from the stamps in the records). A task can be written
//! several times before anything is scraped, and again after a restart, so
//! what was already counted is remembered per task: an attempt is counted
//! once when it appears and once when it ends, a task once per terminal
//! state it reaches. Ended tasks are forgotten: one written again is taken
//! as counted up to what it holds.

use std::collections::HashMap;
use std::time::Duration;

use common::ids::TaskId;
use common::protocol::OutputChunk;
use common::time::UnixMillis;
use common::types::Outcome;

use crate::core::{Task, TaskState, Write};

/// One thing that happened, for the metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// An attempt was assigned after the task waited this long in the queue.
    Assigned {
        waited: Duration,
    },
    /// An attempt ended; the CLI's cost and turns, when it reported them.
    AttemptEnded {
        outcome: Outcome,
        cost_usd: f64,
        turns: u32,
    },
    /// A task reached a terminal state this long after its submission.
    TaskEnded {
        state: TaskState,
        took: Duration,
    },
    OutputStored {
        bytes: u64,
    },
}

/// What has been counted of one task.
#[derive(Clone, Copy, Debug, Default)]
struct Counted {
    /// Attempts whose assignment was counted.
    assigned: usize,
    /// Leading attempts whose end was counted (attempts end in order).
    ended: usize,
    /// The task's terminal state was counted (an admin retry clears it).
    terminal: bool,
}

impl Counted {
    fn as_of(task: &Task) -> Self {
        Self {
            assigned: task.attempts.len(),
            ended: task
                .attempts
                .iter()
                .take_while(|a| a.outcome.is_some())
                .count(),
            terminal: task.state.is_terminal(),
        }
    }
}

/// Turns committed writes into observations, remembering what it counted.
#[derive(Debug, Default)]
pub struct TaskEvents {
    counted: HashMap<TaskId, Counted>,
}

impl TaskEvents {
    /// Starts from `tasks` as restored: what they already hold happened
    /// before this process and is not counted again.
    pub fn new<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> Self {
        Self {
            counted: tasks
                .into_iter()
                .map(|t| (t.id, Counted::as_of(t)))
                .collect(),
        }
    }

    /// What `writes` (one commit, in order) changed.
    pub fn observe(&mut self, writes: &[Write]) -> Vec<Observation> {
        let mut observed = Vec::new();
        let mut output_bytes = 0u64;
        for write in writes {
            match write {
                Write::Task(task) => self.task_written(task, &mut observed),
                Write::Output(OutputChunk { data, .. }) => {
                    output_bytes =
                        output_bytes.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                }
                _ => {}
            }
        }
        if output_bytes > 0 {
            observed.push(Observation::OutputStored {
                bytes: output_bytes,
            });
        }
        observed
    }

    fn task_written(&mut self, task: &Task, observed: &mut Vec<Observation>) {
        // A task first seen here either is new (it holds nothing yet), or
        // is an ended task written again (its GitHub state, a retry): what
        // it holds was counted when it happened.
        let counted = self
            .counted
            .entry(task.id)
            .or_insert_with(|| Counted::as_of(task));
        for attempt in task.attempts.iter().skip(counted.assigned) {
            observed.push(Observation::Assigned {
                waited: between(task.queued_at, attempt.assigned_at),
            });
        }
        counted.assigned = counted.assigned.max(task.attempts.len());
        for attempt in task.attempts.iter().skip(counted.ended) {
            let Some(outcome) = attempt.outcome else {
                break;
            };
            let cli = attempt.report.as_ref().and_then(|r| r.cli.as_ref());
            observed.push(Observation::AttemptEnded {
                outcome,
                cost_usd: cli.map_or(0.0, |c| c.cost_usd),
                turns: cli.map_or(0, |c| c.turns),
            });
            counted.ended += 1;
        }
        let terminal = task.state.is_terminal();
        if terminal && !counted.terminal {
            observed.push(Observation::TaskEnded {
                state: task.state,
                took: between(task.created_at, task.updated_at),
            });
        }
        counted.terminal = terminal;
        if terminal {
            // Remembered only while it can still change: memory follows the
            // live work, not the history.
            self.counted.remove(&task.id);
        }
    }
}

fn between(from: UnixMillis, to: UnixMillis) -> Duration {
    Duration::from_millis(to.0.saturating_sub(from.0))
}
