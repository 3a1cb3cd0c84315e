//! Tasks that come from GitHub issues: at most one active task per issue,
//! the `/claude` commands on an issue's task, the reconciler's "create what
//! is missing", and webhook deliveries seen (a redelivery creates nothing).
//!
//! Pure like the rest of the core: the webhook handler has already verified,
//! parsed, checked the author and triaged; this decides against the tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::ids::TaskId;
use common::time::UnixMillis;
use tracing::info;

use super::task::TaskState;
use super::{Core, NewTask, Write};

/// Webhook deliveries seen within the dedupe window.
#[derive(Debug, Default)]
pub struct Deliveries {
    by_id: BTreeMap<String, UnixMillis>,
    by_age: BTreeSet<(UnixMillis, String)>,
}

impl Deliveries {
    pub fn new(seen: Vec<(String, UnixMillis)>) -> Self {
        let mut d = Self::default();
        for (id, at) in seen {
            d.insert(id, at);
        }
        d
    }

    fn insert(&mut self, id: String, at: UnixMillis) {
        if let Some(old) = self.by_id.insert(id.clone(), at) {
            self.by_age.remove(&(old, id.clone()));
        }
        self.by_age.insert((at, id));
    }
}

/// What an issue's `/claude` comment asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueCommand {
    /// Run (or run again) with the rest of the comment as instructions.
    Run {
        instructions: String,
        by: String,
    },
    Cancel {
        by: String,
    },
    Retry {
        by: String,
    },
}

/// What a webhook delivery, or a reconciled issue, led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueOutcome {
    Created(TaskId),
    /// A command applied to a task, in words ("cancelled", "queued again").
    Applied(TaskId, String),
    /// Nothing done, and why ("a task is already active: t-4").
    Declined(Option<TaskId>, String),
    /// This delivery was handled before.
    Duplicate,
}

impl Core {
    /// The task whose pull request is `number` in `repo`.
    pub fn pull_task(&self, repo: &str, number: u64) -> Option<TaskId> {
        self.pulls.get(&(repo.to_lowercase(), number)).copied()
    }

    pub(super) fn index_pull(&mut self, task: &super::Task) {
        if let (Some((repo, _)), Some(pull)) = (
            task.source.issue(),
            task.github.as_ref().and_then(|g| g.pull.as_ref()),
        ) {
            self.pulls
                .insert((repo.to_lowercase(), pull.number), task.id);
        }
    }

    /// A follow-up on the cluster's pull request `number` (a `/claude`
    /// comment on it, or a review): a new task on the same branch that
    /// pushes new commits to the same pull request, with `instructions`.
    #[allow(clippy::too_many_arguments)]
    pub fn pull_follow_up(
        &mut self,
        delivery: &str,
        repo: &str,
        number: u64,
        by: &str,
        instructions: &str,
        now: Instant,
        wall: UnixMillis,
    ) -> IssueOutcome {
        if !self.first_delivery(delivery, wall) {
            return IssueOutcome::Duplicate;
        }
        let Some(original) = self
            .pull_task(repo, number)
            .and_then(|id| self.tasks.get(&id))
        else {
            return IssueOutcome::Declined(
                None,
                format!("pull request #{number} was not opened by this cluster"),
            );
        };
        let Some((issue_repo, issue)) = original.source.issue().map(|(r, i)| (r.to_owned(), i))
        else {
            return IssueOutcome::Declined(None, "not an issue's task".into());
        };
        if let Some(active) = self.active_issue_task(&issue_repo, issue) {
            return IssueOutcome::Declined(
                Some(active),
                format!("a task is already active for this issue: {active}"),
            );
        }
        let mut spec = original.spec.clone();
        spec.follow_up = true;
        add_instructions(&mut spec.body, by, instructions);
        let github = original
            .github
            .clone()
            .map(|g| super::outbox::GithubState { error: None, ..g });
        let (url, labels) = match &original.source {
            super::TaskSource::Github { url, labels, .. } => (url.clone(), labels.clone()),
            super::TaskSource::Manual { .. } => (String::new(), Vec::new()),
        };
        let new = NewTask {
            source: super::TaskSource::Github {
                repo: issue_repo,
                issue,
                url,
                author: by.to_owned(),
                labels,
                delivery: delivery.to_owned(),
            },
            spec,
            priority: original.priority,
            triage: original.triage.clone(),
            needs_info: false,
        };
        let id = self.submit(new, now, wall);
        if let Some(task) = self.tasks.get_mut(&id) {
            // The same pull request and status comment.
            task.github = github;
            let snapshot = task.clone();
            self.index_pull(&snapshot);
            self.writes.push(Write::Task(Box::new(snapshot)));
        }
        info!(task_id = %id, attempt = 0, pull = number, by = %by, "follow-up on a pull request");
        IssueOutcome::Created(id)
    }

    /// Tasks of an issue, oldest first.
    pub fn issue_tasks(&self, repo: &str, issue: u64) -> &[TaskId] {
        self.issues
            .get(&(repo.to_lowercase(), issue))
            .map_or(&[], Vec::as_slice)
    }

    /// The issue's task that is not finished, if any.
    pub fn active_issue_task(&self, repo: &str, issue: u64) -> Option<TaskId> {
        self.issue_tasks(repo, issue)
            .iter()
            .rev()
            .copied()
            .find(|id| self.tasks.get(id).is_some_and(|t| !t.state.is_terminal()))
    }

    pub(super) fn index_issue(&mut self, task: &super::Task) {
        if let Some((repo, issue)) = task.source.issue() {
            self.issues
                .entry((repo.to_lowercase(), issue))
                .or_default()
                .push(task.id);
        }
    }

    /// Whether `delivery` was handled within the window; records it if not.
    /// The record is written with whatever the delivery changes, in the
    /// same commit.
    fn first_delivery(&mut self, delivery: &str, wall: UnixMillis) -> bool {
        if delivery.is_empty() {
            return true;
        }
        self.forget_old_deliveries(wall);
        if self.deliveries.by_id.contains_key(delivery) {
            return false;
        }
        self.deliveries.insert(delivery.to_owned(), wall);
        self.writes.push(Write::Delivery {
            id: delivery.to_owned(),
            at: wall,
        });
        true
    }

    fn forget_old_deliveries(&mut self, wall: UnixMillis) {
        let window = u64::try_from(self.config.delivery_window.as_millis()).unwrap_or(u64::MAX);
        while let Some((at, id)) = self.deliveries.by_age.first().cloned() {
            if wall.0.saturating_sub(at.0) < window {
                break;
            }
            self.deliveries.by_age.pop_first();
            self.deliveries.by_id.remove(&id);
            self.writes.push(Write::ForgetDelivery(id));
        }
    }

    /// An issue was triggered (opened, labeled, reopened): a task unless
    /// one is active already.
    pub fn issue_triggered(
        &mut self,
        delivery: &str,
        task: NewTask,
        now: Instant,
        wall: UnixMillis,
    ) -> IssueOutcome {
        if !self.first_delivery(delivery, wall) {
            return IssueOutcome::Duplicate;
        }
        if let Some((repo, issue)) = task.source.issue()
            && let Some(active) = self.active_issue_task(repo, issue)
        {
            // Answered on the issue, by the status comment.
            if let Some(t) = self.tasks.get_mut(&active) {
                t.github.get_or_insert_with(Default::default).note = Some(format!(
                    "It was triggered again at {} while this task was active; it goes on as it is.",
                    wall.to_rfc3339()
                ));
            }
            self.persist_task(active);
            return IssueOutcome::Declined(
                Some(active),
                format!("a task is already active for this issue: {active}"),
            );
        }
        IssueOutcome::Created(self.submit(task, now, wall))
    }

    /// The reconciler found an open, triggered issue: a task only if the
    /// issue never had one.
    pub fn issue_found(&mut self, task: NewTask, now: Instant, wall: UnixMillis) -> IssueOutcome {
        if let Some((repo, issue)) = task.source.issue()
            && let Some(last) = self.issue_tasks(repo, issue).last()
        {
            return IssueOutcome::Declined(Some(*last), format!("the issue has a task: {last}"));
        }
        IssueOutcome::Created(self.submit(task, now, wall))
    }

    /// A `/claude` command on an issue. `task` is what a new task for the
    /// issue would be, for a `/claude` on an issue that has none.
    pub fn issue_command(
        &mut self,
        delivery: &str,
        command: IssueCommand,
        task: NewTask,
        now: Instant,
        wall: UnixMillis,
    ) -> IssueOutcome {
        let outcome = self.apply_issue_command(delivery, command, task, now, wall);
        if let IssueOutcome::Applied(id, what) = &outcome {
            info!(task_id = %id, attempt = self.attempt_of(*id), %what, "issue command applied");
        }
        outcome
    }

    fn apply_issue_command(
        &mut self,
        delivery: &str,
        command: IssueCommand,
        task: NewTask,
        now: Instant,
        wall: UnixMillis,
    ) -> IssueOutcome {
        if !self.first_delivery(delivery, wall) {
            return IssueOutcome::Duplicate;
        }
        let Some((repo, issue)) = task.source.issue().map(|(r, i)| (r.to_owned(), i)) else {
            return IssueOutcome::Declined(None, "not an issue".into());
        };
        let last = self.issue_tasks(&repo, issue).last().copied();
        match command {
            IssueCommand::Cancel { by } => {
                let Some(id) = self.active_issue_task(&repo, issue) else {
                    return IssueOutcome::Declined(last, "no active task to cancel".into());
                };
                match self.cancel(id, format!("by @{by} (/claude cancel)"), now, wall) {
                    Ok(()) => IssueOutcome::Applied(id, "cancel requested".into()),
                    Err(e) => IssueOutcome::Declined(Some(id), format!("{e:?}")),
                }
            }
            IssueCommand::Retry { by } => {
                let Some(id) = last else {
                    return IssueOutcome::Declined(None, "the issue has no task to retry".into());
                };
                match self.retry(id, format!("retried by @{by} (/claude retry)"), now, wall) {
                    Ok(()) => {
                        info!(task_id = %id, attempt = self.attempt_of(id), by = %by, "retried from the issue");
                        IssueOutcome::Applied(id, "queued again".into())
                    }
                    Err(_) => IssueOutcome::Declined(
                        Some(id),
                        format!(
                            "{id} is {}: only a failed or cancelled task can be retried",
                            self.tasks.get(&id).map_or("gone", |t| t.state.as_str())
                        ),
                    ),
                }
            }
            IssueCommand::Run { instructions, by } => {
                let Some(id) = last else {
                    // A `/claude` on an issue without a task starts one, with
                    // the instructions.
                    let mut task = task;
                    add_instructions(&mut task.spec.body, &by, &instructions);
                    task.needs_info = false;
                    return IssueOutcome::Created(self.submit(task, now, wall));
                };
                self.rerun(id, &by, &instructions, now, wall)
            }
        }
    }

    /// `/claude` on an issue with a task: a task waiting for information runs
    /// now, an ended one runs again with a fresh attempt budget; both with
    /// the comment's instructions. An active task is left alone.
    fn rerun(
        &mut self,
        id: TaskId,
        by: &str,
        instructions: &str,
        now: Instant,
        wall: UnixMillis,
    ) -> IssueOutcome {
        let Some(task) = self.tasks.get_mut(&id) else {
            return IssueOutcome::Declined(None, "the task is gone".into());
        };
        match task.state {
            TaskState::NeedsInfo => {
                add_instructions(&mut task.spec.body, by, instructions);
                self.requeue(id, format!("run by @{by} (/claude)"), None, now, wall);
                self.schedule(now, wall);
                IssueOutcome::Applied(id, "queued".into())
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {
                add_instructions(&mut task.spec.body, by, instructions);
                self.run_again(id, format!("run again by @{by} (/claude)"), now, wall);
                IssueOutcome::Applied(id, "queued again with the new instructions".into())
            }
            TaskState::Queued | TaskState::Assigned | TaskState::Running | TaskState::Finishing => {
                IssueOutcome::Declined(Some(id), format!("{id} is already {}", task.state.as_str()))
            }
        }
    }
}

/// Appends a `/claude` comment's instructions to a task's text, marked as
/// coming from that comment.
fn add_instructions(body: &mut String, by: &str, instructions: &str) {
    let instructions = instructions.trim();
    if instructions.is_empty() {
        return;
    }
    if !body.is_empty() {
        body.push_str("\n\n");
    }
    body.push_str(&format!(
        "--- instructions from @{by} (a /claude comment) ---\n{instructions}"
    ));
}

/// The dedupe window's default: GitHub lets a delivery be redelivered for
/// a few days.
pub const DEFAULT_DELIVERY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
