//! The outbox: every GitHub write a task owes (its issue's status comment,
//! its pull request), written in the same commit as the state change that
//! causes it, performed after the commit by the GitHub worker, retried with
//! backoff, never lost across a restart, and never done twice: an effect
//! whose call succeeded but whose mark was not written is performed again,
//! and the worker looks before it creates (the comment by its marker, the
//! pull request by its head branch).
//!
//! One entry per (task, effect): a newer change replaces what an older one
//! asked for (the comment always shows the task as it is when it is
//! written), and its version tells a stale result from a current one.

use std::collections::BTreeMap;
use std::time::Duration;

use common::ids::TaskId;
use common::time::UnixMillis;
use common::types::Outcome;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::task::{Task, TaskState};
use super::{Core, Write};

/// A GitHub write a task owes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Create or edit the issue's one status comment.
    StatusComment,
    /// Open (or find and update) the task's pull request.
    PullRequest,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StatusComment => "status_comment",
            Self::PullRequest => "pull_request",
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Self::StatusComment => 1,
            Self::PullRequest => 2,
        }
    }
}

/// A pending effect, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub task: TaskId,
    pub effect: Effect,
    /// Grows with every change that asks for the effect again.
    pub version: u64,
    /// Failed tries since it was last asked for.
    pub tries: u32,
    /// Not before then (a backoff, or what GitHub's rate limit said).
    pub not_before: Option<UnixMillis>,
    pub last_error: Option<String>,
}

/// What GitHub knows of a task: written back by the worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GithubState {
    /// The issue's status comment.
    pub comment_id: Option<u64>,
    pub pull: Option<PullRef>,
    /// The last effect that GitHub refused for good, in words.
    pub error: Option<String>,
    /// Something the status comment answers (a second trigger while the
    /// task is active).
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRef {
    pub number: u64,
    pub url: String,
    pub draft: bool,
}

/// One effect to perform now, with the task as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectJob {
    pub entry: OutboxEntry,
    pub task: Box<Task>,
    /// The Claude Code CLI version the attempt's agent advertised.
    pub cli_version: Option<String>,
}

/// How performing an effect went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EffectResult {
    Commented {
        comment_id: u64,
    },
    PullOpened(PullRef),
    /// Try again later; at least `after` when GitHub said so.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// A refusal that cannot succeed (a 4xx that is not a rate limit).
    GiveUp {
        error: String,
    },
}

/// Backoff of a failed effect: 2 s doubling to 10 min.
fn backoff(tries: u32) -> Duration {
    common::backoff::exponential(Duration::from_secs(2), Duration::from_secs(600), tries)
}

/// Whether a task's end leaves a pushed branch to propose: a success, or
/// work stopped by failing tests or at a limit (a draft).
pub fn proposes_pull(task: &Task) -> Option<bool> {
    let attempt = task.current()?;
    let report = attempt.report.as_ref()?;
    if report.branch.is_empty() || report.commit.is_empty() {
        return None;
    }
    match (task.state, attempt.outcome?) {
        (TaskState::Succeeded, Outcome::Succeeded) => Some(false),
        (TaskState::Succeeded, Outcome::TestsFailed)
        | (TaskState::Failed, Outcome::TurnLimit | Outcome::BudgetExceeded | Outcome::TimedOut) => {
            Some(true)
        }
        _ => None,
    }
}

impl Core {
    /// How many GitHub writes are owed, over every task.
    pub fn outbox_depth(&self) -> usize {
        self.outbox.len()
    }

    /// The effects pending for a task.
    pub fn pending_effects(&self, task: TaskId) -> Vec<OutboxEntry> {
        self.outbox
            .range((task, Effect::StatusComment)..=(task, Effect::PullRequest))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Asks for `effect` of `task` (again): the newest ask replaces older.
    pub(super) fn enqueue(&mut self, task: TaskId, effect: Effect) {
        let entry = self
            .outbox
            .entry((task, effect))
            // A newer ask replaces the content, not the wait: a backoff or
            // a rate limit GitHub asked for still holds.
            .and_modify(|e| e.version += 1)
            .or_insert(OutboxEntry {
                task,
                effect,
                version: 1,
                tries: 0,
                not_before: None,
                last_error: None,
            })
            .clone();
        self.writes.push(Write::Outbox(Box::new(entry)));
    }

    /// The effects a task's change owes: the status comment always, and
    /// the pull request when it ends with work to propose.
    pub(super) fn effects_of_change(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if task.source.issue().is_none() {
            return;
        }
        let pull = proposes_pull(task).is_some();
        self.enqueue(id, Effect::StatusComment);
        if pull && self.tasks.get(&id).is_some_and(|t| t.state.is_terminal()) {
            self.enqueue(id, Effect::PullRequest);
        }
    }

    /// Effects due at `wall`, in key order, and when the next one is due.
    pub fn due_effects(
        &self,
        wall: UnixMillis,
        limit: usize,
    ) -> (Vec<EffectJob>, Option<UnixMillis>) {
        // GitHub asked every request to wait (a rate limit is per token).
        if let Some(until) = self.github_paused_until.filter(|u| *u > wall) {
            return (Vec::new(), Some(until));
        }
        let mut due = Vec::new();
        let mut next: Option<UnixMillis> = None;
        for entry in self.outbox.values() {
            match entry.not_before {
                Some(at) if at > wall => {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                _ if due.len() < limit => {
                    if let Some(task) = self.tasks.get(&entry.task) {
                        let cli_version = task
                            .current()
                            .and_then(|a| self.agents.get(&a.agent))
                            .and_then(|e| e.record.advert.as_ref())
                            .and_then(|ad| ad.toolchains.iter().find(|t| t.name == "claude"))
                            .map(|t| t.version.clone());
                        due.push(EffectJob {
                            entry: entry.clone(),
                            task: Box::new(task.clone()),
                            cli_version,
                        });
                    }
                }
                _ => {}
            }
        }
        (due, next)
    }

    /// The worker performed `effect` of `task` as of `version`.
    pub fn effect_done(
        &mut self,
        task: TaskId,
        effect: Effect,
        version: u64,
        result: EffectResult,
        wall: UnixMillis,
    ) {
        let key = (task, effect);
        let Some(entry) = self.outbox.get(&key).cloned() else {
            return;
        };
        let current = entry.version == version;
        match result {
            EffectResult::Commented { comment_id } => {
                self.note_github(task, |g| g.comment_id = Some(comment_id));
                self.finish_effect(key, current);
            }
            EffectResult::PullOpened(pull) => {
                info!(task_id = %task, attempt = self.attempt_of(task), number = pull.number, url = %pull.url, draft = pull.draft, "pull request opened");
                let changed = self
                    .tasks
                    .get(&task)
                    .and_then(|t| t.github.as_ref())
                    .and_then(|g| g.pull.as_ref())
                    != Some(&pull);
                self.note_github(task, |g| g.pull = Some(pull));
                if let Some(t) = self.tasks.get(&task).cloned() {
                    self.index_pull(&t);
                }
                self.finish_effect(key, current);
                if changed {
                    // The comment names the pull request.
                    self.enqueue(task, Effect::StatusComment);
                }
            }
            EffectResult::Retry { error, after } => {
                let mut entry = entry;
                entry.tries += 1;
                let wait = backoff(entry.tries).max(after.unwrap_or_default());
                if let Some(after) = after {
                    // GitHub's word holds for every request, not just this one.
                    let until = wall.saturating_add(after);
                    self.github_paused_until =
                        Some(self.github_paused_until.map_or(until, |u| u.max(until)));
                }
                warn!(task_id = %task, attempt = self.attempt_of(task), effect = effect.as_str(), tries = entry.tries, wait_s = wait.as_secs(), %error, "GitHub effect failed; trying again later");
                entry.not_before = Some(wall.saturating_add(wait));
                entry.last_error = Some(error);
                self.writes.push(Write::Outbox(Box::new(entry.clone())));
                self.outbox.insert(key, entry);
            }
            EffectResult::GiveUp { error } => {
                warn!(task_id = %task, attempt = self.attempt_of(task), effect = effect.as_str(), %error, "GitHub refused an effect for good");
                self.note_github(task, |g| {
                    g.error = Some(format!("{}: {error}", effect.as_str()))
                });
                // The refusal is final for this version; a newer ask stays.
                self.finish_effect(key, current);
            }
        }
    }

    fn finish_effect(&mut self, key: (TaskId, Effect), current: bool) {
        if current {
            self.outbox.remove(&key);
            self.writes.push(Write::OutboxDone(key.0, key.1));
            self.maybe_finished.insert(key.0);
        }
    }

    /// Records what GitHub said about a task without asking for a new
    /// status comment (which would loop).
    fn note_github(&mut self, id: TaskId, change: impl FnOnce(&mut GithubState)) {
        if let Some(task) = self.tasks.get_mut(&id) {
            change(task.github.get_or_insert_with(GithubState::default));
            self.writes.push(Write::Task(Box::new(task.clone())));
        }
    }

    pub(super) fn restore_outbox(&mut self, entries: Vec<OutboxEntry>) {
        self.outbox = entries
            .into_iter()
            .map(|e| ((e.task, e.effect), e))
            .collect::<BTreeMap<_, _>>();
    }
}
