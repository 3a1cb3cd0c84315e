//! GitHub does not redeliver a webhook by itself: deliveries sent while the
//! coordinator was down, or lost on the way, are missed. At start and every
//! `reconcile_every`, the reconciler lists the open issues with the trigger
//! label in each configured repository and creates the tasks that are
//! missing: never a second task for an issue that has one (of any state).
//! Repositories whose trigger is "every opened issue" are not reconciled:
//! that would start work on every old open issue.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::{Client, Error};
use super::config::{GithubConfig, Trigger};
use super::event;
use crate::core::github::IssueOutcome;
use crate::driver::{Command, DriverHandle};
use crate::triage::Rules;

/// Reconciles until `shutdown`, once at once and then every
/// `reconcile_every`.
pub async fn run(
    client: Client,
    config: Arc<GithubConfig>,
    rules: Arc<Rules>,
    driver: DriverHandle,
    shutdown: CancellationToken,
) {
    loop {
        match round(&client, &config, &rules, &driver).await {
            Ok(0) => {}
            Ok(created) => info!(created, "reconciler created tasks for missed issues"),
            Err(e) => warn!(error = %e, "reconciling with GitHub failed; trying again later"),
        }
        tokio::select! {
            () = tokio::time::sleep(config.reconcile_every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One pass over every label-triggered repository; how many tasks it made.
pub async fn round(
    client: &Client,
    config: &GithubConfig,
    rules: &Rules,
    driver: &DriverHandle,
) -> Result<usize, Error> {
    let mut created = 0;
    for repo in &config.repos {
        let Trigger::Label(label) = &repo.trigger else {
            continue;
        };
        let repository = client.repository(&repo.name).await?;
        for issue in client.open_issues_with_label(&repo.name, label).await? {
            let work = match event::found(&issue, &repository, repo, config) {
                Ok(work) => work,
                Err(why) => {
                    info!(repo = %repo.name, issue = issue.number, %why, "open issue not reconciled");
                    continue;
                }
            };
            let task = super::new_task(&work, "", rules);
            match driver
                .call(|reply| Command::IssueFound { task, reply })
                .await
            {
                Ok(IssueOutcome::Created(id)) => {
                    info!(task_id = %id, attempt = 0, repo = %repo.name, issue = issue.number, "task created for an issue whose delivery was missed");
                    created += 1;
                }
                Ok(_) => {}
                Err(gone) => {
                    return Err(Error::Transport {
                        what: "the driver".into(),
                        message: gone.to_string(),
                    });
                }
            }
        }
    }
    Ok(created)
}
