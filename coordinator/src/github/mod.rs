//! GitHub: webhook events and what they mean (`event`), the settings
//! (`config`), cleaning issue text of hidden content (`sanitize`), the REST
//! client (`client`, the only module that imports octocrab) and the
//! reconciler that finds issues whose delivery was missed (`reconcile`).

use crate::core::{NewTask, TaskSource, TaskTriage};
use crate::triage::{self, Issue, Rules};
use common::types::TaskSpec;

pub mod auth;
pub mod client;
pub mod config;
pub mod event;
pub mod outbox;
pub mod reconcile;
pub mod render;
pub mod sanitize;

pub use config::GithubConfig;
pub use event::IssueWork;

/// The task an issue becomes: triaged with its labels and the repository's
/// language; an issue triage finds unclear waits in `needs_info`.
pub fn new_task(work: &IssueWork, delivery: &str, rules: &Rules) -> NewTask {
    let result = triage::triage(
        &Issue {
            title: &work.title,
            body: &work.body,
            labels: &work.labels,
            languages: &work.languages,
        },
        rules,
    );
    let repo_url = if work.repo.clone_url.is_empty() {
        work.clone_url.clone()
    } else {
        work.repo.clone_url.clone()
    };
    let base_branch = if work.repo.base_branch.is_empty() {
        work.default_branch.clone()
    } else {
        work.repo.base_branch.clone()
    };
    NewTask {
        source: TaskSource::Github {
            repo: work.repo.name.clone(),
            issue: work.number,
            url: work.url.clone(),
            author: work.author.clone(),
            labels: work.labels.clone(),
            delivery: delivery.to_owned(),
        },
        spec: TaskSpec {
            repo_url,
            base_branch,
            issue_number: work.number,
            title: work.title.clone(),
            body: work.body.clone(),
            issue_url: work.url.clone(),
            author: work.author.clone(),
            labels: work.labels.clone(),
            specialty: result.specialty,
            technologies: result.technologies.clone(),
            branch: String::new(),
            follow_up: false,
            test_command: work.repo.test_command.clone(),
        },
        priority: 0,
        needs_info: result.unclear,
        triage: Some(TaskTriage {
            result,
            specialty_given: false,
        }),
    }
}
