//! The GitHub settings: where the API is, the credentials, which
//! repositories the coordinator serves and what triggers work in each.
//!
//! ```toml
//! [github]
//! api_url = "https://api.github.com"
//! token_file = "/etc/ccc/github-token"
//! webhook_secret_file = "/etc/ccc/webhook-secret"
//! trusted_associations = ["OWNER", "MEMBER", "COLLABORATOR"]
//! reconcile_every = "5m"
//!
//! [[repos]]
//! name = "octo-org/hello-world"
//! trigger = "label"          # or "opened"
//! label = "claude"
//! clone_url = "git@github.com:octo-org/hello-world.git"
//! base_branch = ""
//! test_command = ""
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::de_opt_duration;
use common::types::Secret;
use serde::Deserialize;

/// `[github]` in the coordinator's file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubFile {
    pub api_url: Option<String>,
    pub token_file: Option<PathBuf>,
    /// A GitHub App instead of a token: its id and private key (PEM).
    pub app_id: Option<u64>,
    pub app_key_file: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    pub trusted_associations: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub reconcile_every: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub delivery_window: Option<Duration>,
}

/// One `[[repos]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoFile {
    pub name: String,
    pub trigger: Option<String>,
    pub label: Option<String>,
    pub clone_url: Option<String>,
    pub base_branch: Option<String>,
    pub test_command: Option<String>,
}

/// What starts work in a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Issues with this label (opened with it, or labeled later).
    Label(String),
    /// Every opened issue.
    Opened,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// `owner/name` as GitHub spells it.
    pub name: String,
    pub trigger: Trigger,
    /// Empty: the payload's clone URL.
    pub clone_url: String,
    /// Empty: the repository's default branch.
    pub base_branch: String,
    pub test_command: String,
}

#[derive(Clone, Debug)]
pub struct GithubConfig {
    pub api_url: String,
    pub token: Option<Secret>,
    /// A GitHub App (installation tokens per repository) instead of a token.
    pub app: Option<AppSettings>,
    /// Without one, webhook deliveries are refused.
    pub webhook_secret: Option<Secret>,
    /// `author_association` values whose issues and comments may trigger
    /// work, uppercase.
    pub trusted_associations: Vec<String>,
    pub reconcile_every: Duration,
    pub repos: Vec<RepoConfig>,
}

#[derive(Clone, Debug)]
pub struct AppSettings {
    pub app_id: u64,
    pub key_pem: Secret,
}

/// The settings that come from flags and the environment.
#[derive(Clone, Debug, Default)]
pub struct GithubArgs {
    pub api_url: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub webhook_secret: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    pub reconcile_every: Option<Duration>,
    pub app_id: Option<u64>,
    pub app_key_file: Option<PathBuf>,
}

pub const DEFAULT_API_URL: &str = "https://api.github.com";
pub const DEFAULT_LABEL: &str = "claude";
pub const DEFAULT_RECONCILE_EVERY: Duration = Duration::from_secs(300);

impl GithubConfig {
    pub fn resolve(
        args: GithubArgs,
        file: GithubFile,
        repos: Vec<RepoFile>,
    ) -> Result<Self, String> {
        let api_url = args
            .api_url
            .or(file.api_url)
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            return Err(format!(
                "github.api_url (--github-api-url) {api_url:?} is not an http(s) URL"
            ));
        }
        let token = secret(
            args.token,
            args.token_file.or(file.token_file),
            "github token",
        )?;
        let app = match (
            args.app_id.or(file.app_id),
            args.app_key_file.or(file.app_key_file),
        ) {
            (None, None) => None,
            (Some(app_id), Some(key)) => Some(AppSettings {
                app_id,
                key_pem: read_secret(&key, "GitHub App key")?,
            }),
            (Some(_), None) => {
                return Err(
                    "github.app_id is set without github.app_key_file (--github-app-key-file)"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "github.app_key_file is set without github.app_id (--github-app-id)".into(),
                );
            }
        };
        if token.is_some() && app.is_some() {
            return Err(
                "give either a GitHub token or a GitHub App (app_id, app_key_file), not both"
                    .into(),
            );
        }
        if let Some(app) = &app {
            super::auth::App::new(app.app_id, app.key_pem.expose())?;
        }
        let webhook_secret = secret(
            args.webhook_secret,
            args.webhook_secret_file.or(file.webhook_secret_file),
            "webhook secret",
        )?;
        let trusted_associations: Vec<String> = file
            .trusted_associations
            .unwrap_or_else(|| vec!["OWNER".into(), "MEMBER".into(), "COLLABORATOR".into()])
            .into_iter()
            .map(|a| a.trim().to_uppercase())
            .collect();
        const KNOWN: [&str; 8] = [
            "OWNER",
            "MEMBER",
            "COLLABORATOR",
            "CONTRIBUTOR",
            "FIRST_TIME_CONTRIBUTOR",
            "FIRST_TIMER",
            "MANNEQUIN",
            "NONE",
        ];
        if let Some(bad) = trusted_associations
            .iter()
            .find(|a| !KNOWN.contains(&a.as_str()))
        {
            return Err(format!(
                "github.trusted_associations: {bad:?} is not an author association GitHub uses ({})",
                KNOWN.join(", ")
            ));
        }
        let reconcile_every = args
            .reconcile_every
            .or(file.reconcile_every)
            .unwrap_or(DEFAULT_RECONCILE_EVERY);
        if reconcile_every < Duration::from_secs(1) {
            return Err(
                "github.reconcile_every (--github-reconcile-every) must be at least 1s".into(),
            );
        }
        let mut resolved: Vec<RepoConfig> = Vec::new();
        for (i, r) in repos.into_iter().enumerate() {
            let what = format!("repos[{i}] ({})", r.name);
            let valid_name = r.name.split_once('/').is_some_and(|(o, n)| {
                !o.is_empty()
                    && !n.is_empty()
                    && !n.contains('/')
                    && r.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            });
            if !valid_name {
                return Err(format!(
                    "{what}: name must be owner/name as GitHub spells it"
                ));
            }
            if resolved
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&r.name))
            {
                return Err(format!("{what}: listed twice"));
            }
            let trigger = match r.trigger.as_deref().unwrap_or("label") {
                "label" => Trigger::Label(
                    r.label
                        .clone()
                        .filter(|l| !l.trim().is_empty())
                        .unwrap_or_else(|| DEFAULT_LABEL.to_owned()),
                ),
                "opened" => {
                    if r.label.is_some() {
                        return Err(format!(
                            "{what}: a label is only used with trigger = \"label\""
                        ));
                    }
                    Trigger::Opened
                }
                other => {
                    return Err(format!(
                        "{what}: trigger {other:?} is not \"label\" or \"opened\""
                    ));
                }
            };
            let clone_url = r.clone_url.unwrap_or_default();
            if !clone_url.is_empty() {
                common::repo::check_repo_url(&clone_url)
                    .map_err(|e| format!("{what}: clone_url: {e}"))?;
            }
            let base_branch = r.base_branch.unwrap_or_default();
            if !base_branch.is_empty() {
                common::repo::check_branch(&base_branch)
                    .map_err(|e| format!("{what}: base_branch: {e}"))?;
            }
            resolved.push(RepoConfig {
                name: r.name,
                trigger,
                clone_url,
                base_branch,
                test_command: r.test_command.unwrap_or_default(),
            });
        }
        Ok(Self {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token,
            app,
            webhook_secret,
            trusted_associations,
            reconcile_every,
            repos: resolved,
        })
    }

    /// Whether the coordinator can write to GitHub (a token or an App).
    pub fn can_write(&self) -> bool {
        self.token.is_some() || self.app.is_some()
    }

    /// The configured repository `full_name` names, if any.
    pub fn repo(&self, full_name: &str) -> Option<&RepoConfig> {
        self.repos
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(full_name))
    }

    pub fn trusts(&self, association: &str) -> bool {
        self.trusted_associations
            .iter()
            .any(|a| a.eq_ignore_ascii_case(association))
    }
}

/// A secret from its value (environment) or a file; a file's trailing
/// newline is not part of it.
fn secret(
    value: Option<String>,
    file: Option<PathBuf>,
    what: &str,
) -> Result<Option<Secret>, String> {
    match (value, file) {
        (Some(v), _) if !v.trim().is_empty() => Ok(Some(Secret::new(v.trim()))),
        (_, Some(path)) => read_secret(&path, what).map(Some),
        _ => Ok(None),
    }
}

fn read_secret(path: &Path, what: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the {what} from {}: {e}", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("the {what} file {} is empty", path.display()));
    }
    Ok(Secret::new(value))
}
