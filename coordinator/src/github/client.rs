//! The GitHub REST client: the only module that imports octocrab. Requests
//! go to the configured `api_url` (GitHub, GitHub Enterprise, or a local
//! server in tests). octocrab's own retry is off: waiting on GitHub's
//! rate-limit headers is the caller's (a retry inside a request would fight
//! the caller's backoff and ignore `Retry-After`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use octocrab::Octocrab;
use octocrab::service::middleware::retry::RetryConfig;
use serde::de::DeserializeOwned;

use common::time::UnixMillis;
use common::types::Secret;
use tracing::info;

use super::auth::{App, Minted, parse_time};
use super::config::GithubConfig;
use super::event::{Issue, Repository};
use crate::metrics::{GithubCallResult, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the GitHub client: {0}")]
    Build(String),
    #[error("GitHub answered {status} to {what}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
        /// From `Retry-After` or `x-ratelimit-reset`, when GitHub said.
        retry_after: Option<Duration>,
    },
    #[error("cannot reach GitHub for {what}: {message}")]
    Transport { what: String, message: String },
    #[error("GitHub's answer to {what} is not what its API documents: {message}")]
    Decode { what: String, message: String },
}

impl Error {
    /// Worth trying again later: a network failure, a 5xx, a rate limit.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status {
                status,
                retry_after,
                ..
            } => *status >= 500 || *status == 429 || retry_after.is_some(),
            Self::Build(_) | Self::Decode { .. } => false,
        }
    }
}

/// At most this many pages of one listing are read (100 items a page).
const MAX_PAGES: usize = 50;

#[derive(Clone)]
pub struct Client {
    /// The client with the configured token (or none, for an App).
    octo: Octocrab,
    /// With a GitHub App: the App, and a client per repository with its
    /// installation token.
    app: Option<Arc<App>>,
    /// The configured token (pushes use it too).
    token: Option<Secret>,
    api_url: String,
    /// GitHub asked every request to wait until then (a rate limit is per
    /// token): shared by every clone, so the reconciler waits too.
    paused_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// Every request is counted by its result.
    metrics: Metrics,
}

impl Client {
    /// Must be called inside a tokio runtime (octocrab spawns its worker).
    pub fn new(config: &GithubConfig, metrics: Metrics) -> Result<Self, Error> {
        let octo = build(&config.api_url, config.token.as_ref())?;
        let app = config
            .app
            .as_ref()
            .map(|a| App::new(a.app_id, a.key_pem.expose()).map(Arc::new))
            .transpose()
            .map_err(Error::Build)?;
        Ok(Self {
            octo,
            app,
            token: config.token.clone(),
            api_url: config.api_url.clone(),
            paused_until: Arc::default(),
            metrics,
        })
    }

    pub async fn repository(&self, repo: &str) -> Result<Repository, Error> {
        let (body, _) = self
            .get(repo, &format!("/repos/{repo}"), "the repository")
            .await?;
        decode(&body, "the repository")
    }

    /// Open issues of `repo` with `label`, every page (pull requests left
    /// out).
    pub async fn open_issues_with_label(
        &self,
        repo: &str,
        label: &str,
    ) -> Result<Vec<Issue>, Error> {
        let what = format!("the open issues of {repo} labeled {label}");
        let url = format!(
            "/repos/{repo}/issues?state=open&labels={}&per_page=100",
            form_urlencoded::byte_serialize(label.as_bytes()).collect::<String>()
        );
        let issues: Vec<Issue> = self.all_pages(repo, url, &what).await?;
        Ok(issues
            .into_iter()
            .filter(|i| i.pull_request.is_none())
            .collect())
    }

    /// The comments of an issue, every page.
    pub async fn issue_comments(&self, repo: &str, issue: u64) -> Result<Vec<IssueComment>, Error> {
        let what = format!("the comments of {repo}#{issue}");
        let url = format!("/repos/{repo}/issues/{issue}/comments?per_page=100");
        self.all_pages(repo, url, &what).await
    }

    /// Every page of a listing (at most `MAX_PAGES`), following `Link`.
    async fn all_pages<T: DeserializeOwned>(
        &self,
        repo: &str,
        mut url: String,
        what: &str,
    ) -> Result<Vec<T>, Error> {
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            let (body, next) = self.get(repo, &url, what).await?;
            items.extend(decode::<Vec<T>>(&body, what)?);
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        Ok(items)
    }

    pub async fn create_comment(
        &self,
        repo: &str,
        issue: u64,
        body: &str,
    ) -> Result<IssueComment, Error> {
        let what = format!("a new comment on {repo}#{issue}");
        let route = format!("/repos/{repo}/issues/{issue}/comments");
        self.send(
            repo,
            Method::Post,
            &route,
            &serde_json::json!({ "body": body }),
            &what,
        )
        .await
    }

    pub async fn update_comment(
        &self,
        repo: &str,
        id: u64,
        body: &str,
    ) -> Result<IssueComment, Error> {
        let what = format!("comment {id} on {repo}");
        let route = format!("/repos/{repo}/issues/comments/{id}");
        self.send(
            repo,
            Method::Patch,
            &route,
            &serde_json::json!({ "body": body }),
            &what,
        )
        .await
    }

    /// A review's inline comments.
    pub async fn review_comments(
        &self,
        repo: &str,
        pull: u64,
        review: u64,
    ) -> Result<Vec<ReviewComment>, Error> {
        let what = format!("the comments of review {review} on {repo}#{pull}");
        let (body, _) = self
            .get(
                repo,
                &format!("/repos/{repo}/pulls/{pull}/reviews/{review}/comments?per_page=100"),
                &what,
            )
            .await?;
        decode(&body, &what)
    }

    /// The open pull request from `owner:branch`, if any.
    pub async fn open_pull(&self, repo: &str, head: &str) -> Result<Option<Pull>, Error> {
        let what = format!("the pull requests of {repo} from {head}");
        let route = format!(
            "/repos/{repo}/pulls?state=open&head={}&per_page=100",
            form_urlencoded::byte_serialize(head.as_bytes()).collect::<String>()
        );
        let (body, _) = self.get(repo, &route, &what).await?;
        Ok(decode::<Vec<Pull>>(&body, &what)?.into_iter().next())
    }

    pub async fn create_pull(&self, repo: &str, new: &NewPull<'_>) -> Result<Pull, Error> {
        let what = format!("a new pull request on {repo} from {}", new.head);
        self.send(
            repo,
            Method::Post,
            &format!("/repos/{repo}/pulls"),
            new,
            &what,
        )
        .await
    }

    pub async fn update_pull(
        &self,
        repo: &str,
        number: u64,
        title: &str,
        body: &str,
    ) -> Result<Pull, Error> {
        let what = format!("pull request {repo}#{number}");
        self.send(
            repo,
            Method::Patch,
            &format!("/repos/{repo}/pulls/{number}"),
            &serde_json::json!({ "title": title, "body": body }),
            &what,
        )
        .await
    }

    /// A GET of `route` (relative to the API URL, or a full URL from a
    /// `Link` header on the same host): the body and the next page's URL.
    async fn get(
        &self,
        repo: &str,
        route: &str,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        let url = self.url(route, what)?;
        self.wait_for_github().await;
        let octo = self.octo_for(repo).await?;
        self.exchange(octo._get(url.as_str()), what).await
    }

    /// A POST or PATCH with a JSON body; the answer's body.
    async fn send<B: serde::Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        repo: &str,
        method: Method,
        route: &str,
        body: &B,
        what: &str,
    ) -> Result<T, Error> {
        let url = self.url(route, what)?;
        self.wait_for_github().await;
        let octo = self.octo_for(repo).await?;
        let request = async {
            match method {
                Method::Post => octo._post(url.as_str(), Some(body)).await,
                Method::Patch => octo._patch(url.as_str(), Some(body)).await,
            }
        };
        let (answer, _) = self.exchange(request, what).await?;
        decode(&answer, what)
    }

    /// Awaits one request and reads its answer: the body and the next
    /// page's URL (from `Link`). Every request goes through here: it is
    /// counted, and a wait GitHub asks for holds every later request.
    async fn exchange(
        &self,
        request: impl Future<Output = Result<Answer, octocrab::Error>>,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        let result = async {
            let response = request.await.map_err(|e| transport(e, what))?;
            let next = response
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            Ok((read(response, what).await?, next))
        }
        .await;
        self.metrics.github_call(call_result(&result));
        self.noted(result)
    }

    /// The client that writes to `repo`: the token's, or one with the App's
    /// installation token for it (minted, then cached until shortly
    /// before it expires).
    async fn octo_for(&self, repo: &str) -> Result<Octocrab, Error> {
        if self.app.is_none() {
            return Ok(self.octo.clone());
        }
        let token = self.app_token(repo).await?;
        build(&self.api_url, Some(&token))
    }

    /// What an agent pushes `repo` with: the configured token, or an
    /// installation token of the App for that repository.
    pub async fn push_token(&self, repo: &str) -> Result<Option<Secret>, Error> {
        match (&self.app, &self.token) {
            (Some(_), _) => self.app_token(repo).await.map(Some),
            (None, token) => Ok(token.clone()),
        }
    }

    /// The App's installation token for `repo`: cached, or minted.
    async fn app_token(&self, repo: &str) -> Result<Secret, Error> {
        let Some(app) = &self.app else {
            return Err(Error::Build("no GitHub App is configured".into()));
        };
        let now = UnixMillis::now();
        if let Some(token) = app.cached(repo, now).await {
            return Ok(token);
        }
        let jwt = build(&self.api_url, Some(&app.jwt(now).map_err(Error::Build)?))?;
        let what = format!("the GitHub App's installation on {repo}");
        let url = format!("{}/repos/{repo}/installation", self.api_url);
        let (answer, _) = self.exchange(jwt._get(url.as_str()), &what).await?;
        let installation: Installation = decode(&answer, &what)?;
        let what = format!("an installation token for {repo}");
        let url = format!(
            "{}/app/installations/{}/access_tokens",
            self.api_url, installation.id
        );
        let (answer, _) = self
            .exchange(jwt._post(url.as_str(), None::<&()>), &what)
            .await?;
        let minted: Minted = decode(&answer, &what)?;
        let expires = parse_time(&minted.expires_at).ok_or_else(|| Error::Decode {
            what: what.clone(),
            message: format!("expires_at {:?} is not a time", minted.expires_at),
        })?;
        let token = Secret::new(minted.token);
        info!(
            repo,
            installation = installation.id,
            "minted an installation token"
        );
        app.remember(repo, token.clone(), expires).await;
        Ok(token)
    }

    /// Waits while GitHub's rate limit says so.
    async fn wait_for_github(&self) {
        let until = *self
            .paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Remembers a wait GitHub asked for, for every later request.
    fn noted<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::Status {
            retry_after: Some(wait),
            ..
        }) = &result
        {
            // An adapter's own bookkeeping of GitHub's word, not core state.
            #[allow(clippy::disallowed_methods)]
            let until = tokio::time::Instant::now() + *wait;
            let mut paused = self
                .paused_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *paused = Some(paused.map_or(until, |p| p.max(until)));
        }
        result
    }

    fn url(&self, route: &str, what: &str) -> Result<String, Error> {
        if route.starts_with("http://") || route.starts_with("https://") {
            if !route.starts_with(&self.api_url) {
                return Err(Error::Decode {
                    what: what.to_owned(),
                    message: format!("a pagination link leaves the API: {route}"),
                });
            }
            Ok(route.to_owned())
        } else {
            Ok(format!("{}{route}", self.api_url))
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    Post,
    Patch,
}

fn transport(e: octocrab::Error, what: &str) -> Error {
    Error::Transport {
        what: what.to_owned(),
        message: e.to_string(),
    }
}

/// An answer of GitHub's, as octocrab gives it.
type Answer = axum::http::Response<BoxBody<axum::body::Bytes, octocrab::Error>>;

/// How a request went, as the metrics count it.
fn call_result<T>(result: &Result<T, Error>) -> GithubCallResult {
    match result {
        Ok(_) => GithubCallResult::Success,
        Err(Error::Status {
            status,
            retry_after,
            ..
        }) => {
            if *status == 429 || retry_after.is_some() {
                GithubCallResult::RateLimited
            } else if *status >= 500 {
                GithubCallResult::ServerError
            } else {
                GithubCallResult::ClientError
            }
        }
        Err(Error::Transport { .. } | Error::Decode { .. } | Error::Build(_)) => {
            GithubCallResult::Transport
        }
    }
}

/// The body of a successful answer; anything else becomes `Error::Status`.
async fn read(response: Answer, what: &str) -> Result<Vec<u8>, Error> {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| transport(e, what))?
        .to_bytes()
        .to_vec();
    if !status.is_success() {
        return Err(Error::Status {
            what: what.to_owned(),
            status: status.as_u16(),
            message: message(&body),
            retry_after,
        });
    }
    Ok(body)
}

/// An issue comment, as much as is read.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct IssueComment {
    pub id: u64,
    #[serde(default)]
    pub body: Option<String>,
}

/// An inline review comment, as much as is read.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ReviewComment {
    pub path: String,
    #[serde(default)]
    pub line: Option<u64>,
    #[serde(default)]
    pub original_line: Option<u64>,
    #[serde(default)]
    pub body: String,
}

/// A pull request, as much as is read.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Pull {
    pub number: u64,
    pub html_url: String,
    #[serde(default)]
    pub draft: Option<bool>,
}

/// What a new pull request is made of.
#[derive(Debug, serde::Serialize)]
pub struct NewPull<'a> {
    pub title: &'a str,
    /// `owner:branch`.
    pub head: &'a str,
    pub base: &'a str,
    pub body: &'a str,
    pub draft: bool,
}

/// A client of the API at `api_url` with `token`, without octocrab's own
/// retry.
fn build(api_url: &str, token: Option<&Secret>) -> Result<Octocrab, Error> {
    let mut builder = Octocrab::builder()
        .base_uri(api_url)
        .map_err(|e| Error::Build(format!("api_url {api_url}: {e}")))?
        .add_retry_config(RetryConfig::None)
        .set_connect_timeout(Some(Duration::from_secs(10)))
        .set_read_timeout(Some(Duration::from_secs(30)));
    if let Some(token) = token {
        builder = builder.personal_token(token.expose().to_owned());
    }
    builder.build().map_err(|e| Error::Build(e.to_string()))
}

#[derive(serde::Deserialize)]
struct Installation {
    id: u64,
}

fn decode<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// GitHub's `message` of an error body, else the start of the body.
fn message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

/// How long GitHub asks to wait: `Retry-After` (seconds), else the primary
/// limit's reset when no requests remain.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secs) = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs));
    }
    if header("x-ratelimit-remaining") == Some("0") {
        let reset = header("x-ratelimit-reset")?.trim().parse::<u64>().ok()?;
        #[allow(clippy::disallowed_methods)] // the reset is wall-clock time
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        let now_ms = u64::try_from(now_ms).unwrap_or(u64::MAX);
        return Some(Duration::from_millis(
            reset.saturating_mul(1000).saturating_sub(now_ms).max(1000),
        ));
    }
    None
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        let link = "<https://api.github.com/repositories/1/issues?page=2>; rel=\"next\", \
                    <https://api.github.com/repositories/1/issues?page=5>; rel=\"last\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some("https://api.github.com/repositories/1/issues?page=2")
        );
        assert_eq!(next_link("<https://x/1>; rel=\"prev\""), None);
    }
}
