//! Webhook events: the parts of GitHub's payloads the coordinator reads, and
//! what a delivery means. Pure: the handler has verified the signature; this
//! decides, from the event, the configuration and nothing else, whether the
//! delivery starts or steers work, and why not when it does not.
//!
//! Who may trigger: the issue's author must have a trusted
//! `author_association` (the issue's text becomes the prompt), and so must a
//! commenter; accounts of type `Bot` never trigger, whatever their name or
//! association. Labels can only be set by people with triage rights, so a
//! label event needs a trusted issue author and a sender that is not a bot.

use serde::Deserialize;

use super::config::{GithubConfig, RepoConfig, Trigger};
use super::sanitize::{self, Removed};
use crate::core::github::IssueCommand;

#[derive(Clone, Debug, Deserialize)]
pub struct User {
    pub login: String,
    #[serde(rename = "type", default)]
    pub kind: String,
}

impl User {
    fn is_bot(&self) -> bool {
        self.kind.eq_ignore_ascii_case("bot")
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Label {
    pub name: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    #[serde(default)]
    pub body: Option<String>,
    pub user: User,
    #[serde(default)]
    pub labels: Vec<Label>,
    #[serde(default)]
    pub author_association: String,
    pub html_url: String,
    #[serde(default)]
    pub state: String,
    /// Present when the "issue" is a pull request.
    #[serde(default)]
    pub pull_request: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Repository {
    pub full_name: String,
    #[serde(default)]
    pub clone_url: Option<String>,
    #[serde(default)]
    pub default_branch: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Comment {
    #[serde(default)]
    pub body: Option<String>,
    pub user: User,
    #[serde(default)]
    pub author_association: String,
}

#[derive(Debug, Deserialize)]
pub struct IssuesEvent {
    pub action: String,
    pub issue: Issue,
    pub repository: Repository,
    pub sender: User,
    #[serde(default)]
    pub label: Option<Label>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Review {
    pub id: u64,
    #[serde(default)]
    pub body: Option<String>,
    pub user: User,
    #[serde(default)]
    pub author_association: String,
    #[serde(default)]
    pub state: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PullRequest {
    pub number: u64,
}

#[derive(Debug, Deserialize)]
pub struct PullRequestReviewEvent {
    pub action: String,
    pub review: Review,
    pub pull_request: PullRequest,
    pub repository: Repository,
}

#[derive(Debug, Deserialize)]
pub struct IssueCommentEvent {
    pub action: String,
    pub issue: Issue,
    pub comment: Comment,
    pub repository: Repository,
}

/// A delivery, parsed.
#[derive(Debug)]
pub enum Event {
    Ping,
    Issues(Box<IssuesEvent>),
    IssueComment(Box<IssueCommentEvent>),
    PullRequestReview(Box<PullRequestReviewEvent>),
    /// An event this coordinator does not act on, by name.
    Other(String),
}

#[derive(Debug, thiserror::Error)]
#[error("malformed {event} payload: {source}")]
pub struct Malformed {
    event: String,
    source: serde_json::Error,
}

pub fn parse(event: &str, payload: &[u8]) -> Result<Event, Malformed> {
    let malformed = |source| Malformed {
        event: event.to_owned(),
        source,
    };
    match event {
        "ping" => {
            // A ping still has to be JSON.
            serde_json::from_slice::<serde_json::Value>(payload).map_err(malformed)?;
            Ok(Event::Ping)
        }
        "issues" => Ok(Event::Issues(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        "issue_comment" => Ok(Event::IssueComment(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        "pull_request_review" => Ok(Event::PullRequestReview(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        other => {
            serde_json::from_slice::<serde_json::Value>(payload).map_err(malformed)?;
            Ok(Event::Other(other.to_owned()))
        }
    }
}

/// An issue as it becomes a task: text cleaned of hidden content.
#[derive(Clone, Debug, PartialEq)]
pub struct IssueWork {
    pub repo: RepoConfig,
    pub number: u64,
    pub title: String,
    pub body: String,
    pub labels: Vec<String>,
    pub author: String,
    pub url: String,
    /// The repository's clone URL from the payload (used when the
    /// configuration names none).
    pub clone_url: String,
    pub default_branch: String,
    pub languages: Vec<String>,
    /// What the cleaning removed.
    pub removed: Removed,
}

/// What a delivery means.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Pong,
    /// Nothing to do; the reason goes into the 202 answer and the log.
    Ignore(String),
    /// Someone who may not trigger work did; logged, answered as ignored.
    Untrusted(String),
    Trigger(IssueWork),
    Command(IssueWork, IssueCommand),
    /// A follow-up on a pull request: a `/claude` comment on it, or a
    /// review (whose inline comments the handler fetches).
    FollowUp(FollowUp),
}

/// A follow-up asked for on a pull request.
#[derive(Debug, PartialEq)]
pub struct FollowUp {
    /// `owner/name`.
    pub repo: String,
    pub number: u64,
    pub by: String,
    pub instructions: String,
    /// For a review: its id, to fetch its inline comments.
    pub review: Option<u64>,
}

pub fn decide(event: &Event, config: &GithubConfig) -> Decision {
    match event {
        Event::Ping => Decision::Pong,
        Event::Other(name) => Decision::Ignore(format!("event {name:?} is not handled")),
        Event::Issues(e) => issues(e, config),
        Event::IssueComment(e) => comment(e, config),
        Event::PullRequestReview(e) => review(e, config),
    }
}

fn review(e: &PullRequestReviewEvent, config: &GithubConfig) -> Decision {
    if e.action != "submitted" {
        return Decision::Ignore(format!("pull_request_review.{} is not handled", e.action));
    }
    let repo = match configured(&e.repository, config) {
        Ok(repo) => repo,
        Err(why) => return Decision::Ignore(why),
    };
    if e.review.state.eq_ignore_ascii_case("approved")
        && e.review.body.as_deref().is_none_or(|b| b.trim().is_empty())
    {
        return Decision::Ignore("an approval without comments asks for nothing".into());
    }
    if let Some(why) = untrusted(
        &e.review.user,
        &e.review.author_association,
        config,
        "reviewer",
    ) {
        return Decision::Untrusted(why);
    }
    let (body, _) = sanitize::clean(e.review.body.as_deref().unwrap_or_default());
    Decision::FollowUp(FollowUp {
        repo: repo.name.clone(),
        number: e.pull_request.number,
        by: e.review.user.login.clone(),
        instructions: format!(
            "Review by @{} ({}):\n{}",
            e.review.user.login,
            e.review.state.to_lowercase().replace('_', " "),
            body.trim()
        ),
        review: Some(e.review.id),
    })
}

fn issues(e: &IssuesEvent, config: &GithubConfig) -> Decision {
    let repo = match configured(&e.repository, config) {
        Ok(repo) => repo,
        Err(why) => return Decision::Ignore(why),
    };
    if e.issue.pull_request.is_some() {
        return Decision::Ignore("a pull request, not an issue".into());
    }
    let has_label = |label: &str| {
        e.issue
            .labels
            .iter()
            .any(|l| l.name.eq_ignore_ascii_case(label))
    };
    let triggers = match (&repo.trigger, e.action.as_str()) {
        (Trigger::Opened, "opened" | "reopened") => true,
        (Trigger::Label(label), "opened" | "reopened") => has_label(label),
        (Trigger::Label(label), "labeled") => e
            .label
            .as_ref()
            .is_some_and(|l| l.name.eq_ignore_ascii_case(label)),
        _ => false,
    };
    if !triggers {
        return Decision::Ignore(format!(
            "issues.{} does not trigger work in {}",
            e.action, repo.name
        ));
    }
    if let Some(why) = untrusted(
        &e.issue.user,
        &e.issue.author_association,
        config,
        "issue author",
    ) {
        return Decision::Untrusted(why);
    }
    if e.sender.is_bot() {
        return Decision::Untrusted(format!(
            "the sender {} is a bot: bots never trigger work",
            e.sender.login
        ));
    }
    Decision::Trigger(work(&e.issue, &e.repository, repo))
}

fn comment(e: &IssueCommentEvent, config: &GithubConfig) -> Decision {
    if e.action != "created" {
        return Decision::Ignore(format!("issue_comment.{} is not handled", e.action));
    }
    let repo = match configured(&e.repository, config) {
        Ok(repo) => repo,
        Err(why) => return Decision::Ignore(why),
    };
    let Some(command) = parse_command(
        e.comment.body.as_deref().unwrap_or_default(),
        &e.comment.user.login,
    ) else {
        return Decision::Ignore("no /claude command in the comment".into());
    };
    if let Some(why) = untrusted(
        &e.comment.user,
        &e.comment.author_association,
        config,
        "commenter",
    ) {
        return Decision::Untrusted(why);
    }
    if e.issue.pull_request.is_some() {
        // On the cluster's pull request: a follow-up on its branch.
        return match command {
            IssueCommand::Run { instructions, by } => Decision::FollowUp(FollowUp {
                repo: repo.name.clone(),
                number: e.issue.number,
                by,
                instructions,
                review: None,
            }),
            IssueCommand::Cancel { .. } | IssueCommand::Retry { .. } => Decision::Ignore(
                "/claude cancel and retry are given on the issue, not on its pull request".into(),
            ),
        };
    }
    if let Some(why) = untrusted(
        &e.issue.user,
        &e.issue.author_association,
        config,
        "issue author",
    ) {
        return Decision::Untrusted(why);
    }
    Decision::Command(work(&e.issue, &e.repository, repo), command)
}

/// The configuration of the delivery's repository, or why it is ignored.
fn configured<'a>(
    repository: &Repository,
    config: &'a GithubConfig,
) -> Result<&'a RepoConfig, String> {
    config
        .repo(&repository.full_name)
        .ok_or_else(|| format!("repository {} is not configured", repository.full_name))
}

/// Why `user` may not trigger work, if so.
fn untrusted(user: &User, association: &str, config: &GithubConfig, role: &str) -> Option<String> {
    if user.is_bot() {
        return Some(format!(
            "the {role} {} is a bot: bots never trigger work",
            user.login
        ));
    }
    if !config.trusts(association) {
        return Some(format!(
            "the {role} {} is {} on the repository, which is not trusted (trusted: {})",
            user.login,
            if association.is_empty() {
                "NONE"
            } else {
                association
            },
            config.trusted_associations.join(", ")
        ));
    }
    None
}

/// An open issue the reconciler found: the work it is, if its author may
/// trigger work.
pub fn found(
    issue: &Issue,
    repository: &Repository,
    repo: &RepoConfig,
    config: &GithubConfig,
) -> Result<IssueWork, String> {
    if let Some(why) = untrusted(
        &issue.user,
        &issue.author_association,
        config,
        "issue author",
    ) {
        return Err(why);
    }
    Ok(work(issue, repository, repo))
}

fn work(issue: &Issue, repository: &Repository, repo: &RepoConfig) -> IssueWork {
    let (title, mut removed) = sanitize::clean(&issue.title);
    let (body, from_body) = sanitize::clean(issue.body.as_deref().unwrap_or_default());
    removed.add(from_body);
    IssueWork {
        repo: repo.clone(),
        number: issue.number,
        // A title is one line.
        title: title.replace('\n', " ").trim().to_owned(),
        body,
        labels: issue.labels.iter().map(|l| l.name.clone()).collect(),
        author: issue.user.login.clone(),
        url: issue.html_url.clone(),
        clone_url: repository.clone_url.clone().unwrap_or_default(),
        default_branch: repository.default_branch.clone().unwrap_or_default(),
        languages: repository.language.iter().cloned().collect(),
        removed,
    }
}

/// The `/claude` command of a comment: a line that starts with `/claude`.
/// `/claude cancel` and `/claude retry` alone on their line steer the task;
/// anything else is a run, the rest of the comment its instructions
/// (cleaned of hidden content like the issue).
pub fn parse_command(body: &str, by: &str) -> Option<IssueCommand> {
    let mut lines = body.lines();
    let mut rest_lines = Vec::new();
    let mut first = None;
    for line in lines.by_ref() {
        let trimmed = line.trim_start();
        if let Some(after) = trimmed.strip_prefix("/claude")
            && after.chars().next().is_none_or(char::is_whitespace)
        {
            first = Some(after.trim().to_owned());
            break;
        }
    }
    let first = first?;
    rest_lines.extend(lines);
    let by = by.to_owned();
    match first.to_ascii_lowercase().as_str() {
        "cancel" if rest_lines.iter().all(|l| l.trim().is_empty()) => {
            return Some(IssueCommand::Cancel { by });
        }
        "retry" if rest_lines.iter().all(|l| l.trim().is_empty()) => {
            return Some(IssueCommand::Retry { by });
        }
        _ => {}
    }
    let mut instructions = first;
    for line in rest_lines {
        instructions.push('\n');
        instructions.push_str(line);
    }
    let (instructions, _) = sanitize::clean(instructions.trim());
    Some(IssueCommand::Run { instructions, by })
}

#[cfg(test)]
mod tests;
