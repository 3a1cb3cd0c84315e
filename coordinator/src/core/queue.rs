//! The tasks waiting for an agent, indexed so that a scheduling round costs
//! what the placeable work costs: tasks no free agent can take, tasks still
//! in a retry backoff and finished tasks are never looked at.
//!
//! A queued task is in exactly one of two places: `backoff` while its
//! `not_before` is ahead, else the ready lanes of its specialty. A ready
//! task of a specialist kind that has waited `general_fallback_after` is
//! also in the `fallback` lanes, which agents advertising `general` serve.
//! Lanes keep the placement order of DESIGN's scheduling section: priority
//! first, then the repository with the fewest live attempts (fairness), then
//! first in, first out (task ids grow with submission).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::ids::TaskId;
use common::time::UnixMillis;
use common::types::Specialty;

use super::task::Task;

/// Ready tasks by priority, then by repository, oldest first within.
#[derive(Debug, Default)]
struct Lanes(BTreeMap<Reverse<i32>, BTreeMap<String, BTreeSet<TaskId>>>);

impl Lanes {
    fn insert(&mut self, priority: i32, repo: &str, id: TaskId) {
        self.0
            .entry(Reverse(priority))
            .or_default()
            .entry(repo.to_owned())
            .or_default()
            .insert(id);
    }

    fn remove(&mut self, priority: i32, repo: &str, id: TaskId) {
        let Some(by_repo) = self.0.get_mut(&Reverse(priority)) else {
            return;
        };
        if let Some(ids) = by_repo.get_mut(repo) {
            ids.remove(&id);
            if ids.is_empty() {
                by_repo.remove(repo);
            }
        }
        if by_repo.is_empty() {
            self.0.remove(&Reverse(priority));
        }
    }

    /// The task that goes first: highest priority, then the repository with
    /// the fewest live attempts, then the oldest. Looks at one task per
    /// repository of the highest priority, and counts them in `examined`.
    fn first(&self, repo_live: &BTreeMap<String, usize>, examined: &mut u64) -> Option<Candidate> {
        let (priority, by_repo) = self.0.iter().next()?;
        by_repo
            .iter()
            .filter_map(|(repo, ids)| {
                *examined += 1;
                let id = *ids.first()?;
                Some(Candidate {
                    priority: *priority,
                    repo_load: repo_live.get(repo).copied().unwrap_or(0),
                    id,
                })
            })
            .min()
    }
}

/// A task a scheduling round may place, ordered as placement prefers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Candidate {
    priority: Reverse<i32>,
    repo_load: usize,
    pub(super) id: TaskId,
}

#[derive(Debug)]
struct Entry {
    specialty: Specialty,
    priority: i32,
    repo: String,
    /// In `backoff` until then; ready once it has passed (or if none).
    not_before: Option<UnixMillis>,
    /// When it may go to a `general` agent (specialist tasks only).
    fallback_at: Option<Instant>,
    in_fallback: bool,
}

/// Which agents have a free slot, by what they advertise.
#[derive(Debug, Default)]
pub(super) struct FreeAgents {
    pub(super) specialties: BTreeSet<Specialty>,
}

impl FreeAgents {
    fn serves_lane(&self, specialty: Specialty) -> bool {
        // A `general` task goes to anyone at once.
        self.specialties.contains(&specialty)
            || (specialty == Specialty::General && !self.specialties.is_empty())
    }

    fn serves_fallback(&self) -> bool {
        self.specialties.contains(&Specialty::General)
    }
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    entries: BTreeMap<TaskId, Entry>,
    backoff: BTreeSet<(UnixMillis, TaskId)>,
    fallback_due: BTreeSet<(Instant, TaskId)>,
    ready: BTreeMap<Specialty, Lanes>,
    fallback: Lanes,
    /// Queue entries looked at by scheduling, over the core's life: the
    /// measure of a round's cost that the counting tests check.
    examined: u64,
}

/// What the queue needs to know of a task to place it.
pub(super) struct Queued<'a> {
    pub(super) id: TaskId,
    pub(super) specialty: Specialty,
    pub(super) priority: i32,
    pub(super) repo: &'a str,
    pub(super) not_before: Option<UnixMillis>,
    /// When it entered the queue.
    pub(super) since: Instant,
}

impl<'a> Queued<'a> {
    pub(super) fn of(task: &'a Task, since: Instant) -> Self {
        Self {
            id: task.id,
            specialty: task.spec.specialty,
            priority: task.priority,
            repo: &task.spec.repo_url,
            not_before: task.not_before,
            since,
        }
    }
}

impl Queue {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, id: TaskId) -> bool {
        self.entries.contains_key(&id)
    }

    pub(super) fn examined(&self) -> u64 {
        self.examined
    }

    /// When a queued specialist task may go to a `general` agent, if that
    /// is still ahead (or waits for its backoff to pass).
    pub(super) fn fallback_at(&self, id: TaskId) -> Option<Instant> {
        self.entries.get(&id)?.fallback_at
    }

    /// Queues a task (again); `advance` then makes it ready when due.
    pub(super) fn insert(&mut self, task: Queued<'_>, fallback_after: Duration) {
        self.remove(task.id);
        let fallback_at =
            (task.specialty != Specialty::General).then(|| task.since + fallback_after);
        if let Some(at) = fallback_at {
            self.fallback_due.insert((at, task.id));
        }
        match task.not_before {
            Some(nb) => {
                self.backoff.insert((nb, task.id));
            }
            None => self.ready.entry(task.specialty).or_default().insert(
                task.priority,
                task.repo,
                task.id,
            ),
        }
        self.entries.insert(
            task.id,
            Entry {
                specialty: task.specialty,
                priority: task.priority,
                repo: task.repo.to_owned(),
                not_before: task.not_before,
                fallback_at,
                in_fallback: false,
            },
        );
    }

    /// Takes a task out of the queue (assigned or cancelled).
    pub(super) fn remove(&mut self, id: TaskId) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if let Some(at) = entry.fallback_at {
            self.fallback_due.remove(&(at, id));
        }
        match entry.not_before {
            Some(nb) => {
                self.backoff.remove(&(nb, id));
            }
            None => {
                if let Some(lanes) = self.ready.get_mut(&entry.specialty) {
                    lanes.remove(entry.priority, &entry.repo, id);
                }
            }
        }
        if entry.in_fallback {
            self.fallback.remove(entry.priority, &entry.repo, id);
        }
    }

    /// Makes ready what is due at `now`/`wall`: backoffs that have passed,
    /// and the general fallback for tasks that have waited long enough.
    /// Costs one step per task that changes.
    pub(super) fn advance(&mut self, now: Instant, wall: UnixMillis) {
        while let Some(&(nb, id)) = self.backoff.first() {
            if nb > wall {
                break;
            }
            self.backoff.pop_first();
            self.examined += 1;
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.not_before = None;
                self.ready.entry(entry.specialty).or_default().insert(
                    entry.priority,
                    &entry.repo,
                    id,
                );
                if entry.fallback_at.is_some_and(|at| at <= now) && !entry.in_fallback {
                    entry.in_fallback = true;
                    self.fallback.insert(entry.priority, &entry.repo, id);
                }
            }
        }
        while let Some(&(at, id)) = self.fallback_due.first() {
            if at > now {
                break;
            }
            self.fallback_due.pop_first();
            self.examined += 1;
            if let Some(entry) = self.entries.get_mut(&id) {
                // A task still in its backoff joins the fallback lanes when
                // it becomes ready (in the loop above, on a later call).
                entry.fallback_at = entry.not_before.map(|_| at);
                if entry.not_before.is_none() && !entry.in_fallback {
                    entry.in_fallback = true;
                    self.fallback.insert(entry.priority, &entry.repo, id);
                }
            }
        }
    }

    /// Whether any task is ready to be placed (out of its backoff).
    pub(super) fn has_ready(&self) -> bool {
        self.ready.values().any(|lanes| !lanes.0.is_empty()) || !self.fallback.0.is_empty()
    }

    /// The task to place next given which agents are free, if any fits.
    pub(super) fn next(
        &mut self,
        free: &FreeAgents,
        repo_live: &BTreeMap<String, usize>,
    ) -> Option<Candidate> {
        let mut examined = 0;
        let mut best = self
            .ready
            .iter()
            .filter(|(specialty, _)| free.serves_lane(**specialty))
            .filter_map(|(_, lanes)| lanes.first(repo_live, &mut examined))
            .min();
        if free.serves_fallback()
            && let Some(c) = self.fallback.first(repo_live, &mut examined)
        {
            best = Some(best.map_or(c, |b| b.min(c)));
        }
        self.examined += examined;
        best
    }

    /// When `advance` has something to do next: the first backoff to pass
    /// (as wall-clock time) and the first fallback to start.
    pub(super) fn next_due(&self) -> (Option<UnixMillis>, Option<Instant>) {
        (
            self.backoff.first().map(|(nb, _)| *nb),
            self.fallback_due.first().map(|(at, _)| *at),
        )
    }

    /// Whether a queued task may already go to a `general` agent.
    pub(super) fn in_fallback(&self, id: TaskId) -> bool {
        self.entries.get(&id).is_some_and(|e| e.in_fallback)
    }
}
