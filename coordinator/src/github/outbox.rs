//! The GitHub worker: performs the outbox's effects after they are
//! committed, in key order, one at a time, and reports each result to the
//! core, which retries with backoff (honouring `Retry-After` and the rate
//! limit's reset), gives up on a refusal that cannot succeed, or marks the
//! effect done. Every effect looks before it creates, because a crash can
//! come between a call that succeeded and its mark: the status comment is
//! found by its marker, the pull request by its head branch (and a 422 "A
//! pull request already exists" is answered by finding and updating it).

use std::time::Duration;

use common::time::UnixMillis;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::client::{Client, Error, NewPull};
use super::render;
use crate::core::outbox::{Effect, EffectJob, EffectResult, PullRef, proposes_pull};
use crate::core::{Task, TaskSource};
use crate::driver::{Command, DriverHandle};
use crate::metrics::Metrics;

/// Effects taken per round.
const BATCH: usize = 16;

/// A testing failpoint: with `CCC_COORDINATOR_FAILPOINT` set to this, the
/// coordinator exits right after GitHub created a pull request and before
/// the outbox marks it done (the crash a restart must not turn into a
/// second pull request).
pub const FAILPOINT_AFTER_PULL_CREATED: &str = "after-pull-request-created";

pub async fn run(
    client: Client,
    driver: DriverHandle,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let failpoint = std::env::var("CCC_COORDINATOR_FAILPOINT").unwrap_or_default();
    loop {
        let Ok((jobs, next)) = driver
            .call(|reply| Command::DueEffects {
                limit: BATCH,
                reply,
            })
            .await
        else {
            return;
        };
        let worked = !jobs.is_empty();
        for job in jobs {
            let span = info_span!("effect", task_id = %job.entry.task, attempt = job.task.attempt_number(), effect = job.entry.effect.as_str(), version = job.entry.version);
            let result = perform(&client, &job, &failpoint).instrument(span).await;
            if matches!(result, EffectResult::Retry { .. }) {
                metrics.github_retry(job.entry.effect);
            }
            let done = driver
                .call(|reply| Command::EffectDone {
                    task: job.entry.task,
                    effect: job.entry.effect,
                    version: job.entry.version,
                    result,
                    reply,
                })
                .await;
            if done.is_err() {
                return;
            }
        }
        if worked {
            continue;
        }
        let wait = next.map(|at| Duration::from_millis(at.0.saturating_sub(UnixMillis::now().0)));
        tokio::select! {
            () = driver.outbox_changed() => {}
            () = sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn sleep(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn perform(client: &Client, job: &EffectJob, failpoint: &str) -> EffectResult {
    let TaskSource::Github { repo, issue, .. } = &job.task.source else {
        return EffectResult::GiveUp {
            error: "not a GitHub task".into(),
        };
    };
    let outcome = match job.entry.effect {
        Effect::StatusComment => status_comment(client, &job.task, repo, *issue).await,
        Effect::PullRequest => pull_request(client, job, repo, failpoint).await,
    };
    outcome.unwrap_or_else(|e| {
        if e.is_retryable() {
            let after = match &e {
                Error::Status { retry_after, .. } => *retry_after,
                _ => None,
            };
            EffectResult::Retry {
                error: e.to_string(),
                after,
            }
        } else {
            EffectResult::GiveUp {
                error: e.to_string(),
            }
        }
    })
}

async fn status_comment(
    client: &Client,
    task: &Task,
    repo: &str,
    issue: u64,
) -> Result<EffectResult, Error> {
    let body = render::status_comment(task);
    let known = task.github.as_ref().and_then(|g| g.comment_id);
    let id = match known {
        Some(id) => Some(id),
        // Look before creating: an earlier call may have created it just
        // before a crash, or another task of the issue did.
        None => client
            .issue_comments(repo, issue)
            .await?
            .into_iter()
            .find(|c| {
                c.body
                    .as_deref()
                    .is_some_and(|b| b.starts_with(render::STATUS_MARKER))
            })
            .map(|c| c.id),
    };
    let comment = match id {
        Some(id) => client.update_comment(repo, id, &body).await?,
        None => {
            let c = client.create_comment(repo, issue, &body).await?;
            info!(comment_id = c.id, "status comment created");
            c
        }
    };
    Ok(EffectResult::Commented {
        comment_id: comment.id,
    })
}

async fn pull_request(
    client: &Client,
    job: &EffectJob,
    repo: &str,
    failpoint: &str,
) -> Result<EffectResult, Error> {
    let task = &job.task;
    let Some(draft) = proposes_pull(task) else {
        return Ok(EffectResult::GiveUp {
            error: "nothing to propose: no branch was pushed".into(),
        });
    };
    let Some(report) = task.current().and_then(|a| a.report.as_ref()) else {
        return Ok(EffectResult::GiveUp {
            error: "no attempt report".into(),
        });
    };
    let owner = repo.split('/').next().unwrap_or_default();
    let head = format!("{owner}:{}", report.branch);
    let title = render::pull_title(task);
    let body = render::pull_body(task, draft, job.cli_version.as_deref());
    // Look before creating (a crash between the call and its mark).
    if let Some(found) = client.open_pull(repo, &head).await? {
        let pull = client
            .update_pull(repo, found.number, &title, &body)
            .await?;
        return Ok(EffectResult::PullOpened(pull_ref(&pull, draft)));
    }
    let base = task.spec.base_branch.clone();
    let created = client
        .create_pull(
            repo,
            &NewPull {
                title: &title,
                head: &head,
                base: &base,
                body: &body,
                draft,
            },
        )
        .await;
    let pull = match created {
        Ok(pull) => pull,
        Err(Error::Status {
            status: 422,
            message,
            ..
        }) if message.contains("already exists") || message.contains("Validation Failed") => {
            warn!(%message, "GitHub says the pull request exists: updating it");
            match client.open_pull(repo, &head).await? {
                Some(found) => {
                    client
                        .update_pull(repo, found.number, &title, &body)
                        .await?
                }
                None => {
                    return Ok(EffectResult::GiveUp {
                        error: format!("GitHub refused the pull request from {head}: {message}"),
                    });
                }
            }
        }
        Err(e) => return Err(e),
    };
    if failpoint == FAILPOINT_AFTER_PULL_CREATED {
        error!(
            number = pull.number,
            "failpoint: exiting after the pull request was created, before it is marked done"
        );
        std::process::exit(86);
    }
    Ok(EffectResult::PullOpened(pull_ref(&pull, draft)))
}

fn pull_ref(pull: &super::client::Pull, draft: bool) -> PullRef {
    PullRef {
        number: pull.number,
        url: pull.html_url.clone(),
        draft: pull.draft.unwrap_or(draft),
    }
}
