//! A faithful local fake of GitHub's REST API: a real HTTP server on
//! 127.0.0.1 (its own runtime and thread, so blocking tests can use it),
//! in memory and thread-safe, that the real octocrab client talks to with
//! `base_uri` set to `FakeGitHub::url()`.
//!
//! ```ignore
//! let github = FakeGitHub::start(GitHubConfig::with_token("t0ken"));
//! github.create_repo("acme/widgets");
//! let n = github.create_issue("acme/widgets", NewIssue::new("Crash").labels(&["ccc"]));
//! github.inject(Fault::bad_gateway().times(2).matching("POST", "/repos/acme/widgets/issues"));
//! // ... the code under test talks to github.url() ...
//! assert_eq!(github.comments("acme/widgets", n)[0].body, "...");
//! assert!(github.requests().iter().all(|r| r.status != 401));
//! ```
//!
//! What it models, with GitHub's documented JSON shapes (every field the
//! OpenAPI description marks required and octocrab 0.54's models need):
//! repositories (`owner/name`, default branch, branches, numeric ids),
//! issues and pull requests in one number space (the issues list includes
//! pull requests with a `pull_request` key, as GitHub's does), labels,
//! issue comments, a GitHub App with one installation per repository, and
//! installation tokens. Every request is checked for credentials
//! (`Authorization: token <t>` or `Bearer <t>`: a configured token or a
//! minted installation token; the App endpoints take the App's JWT) and
//! recorded; every answer carries GitHub's `x-ratelimit-*` headers, and
//! the remaining count goes down per request.
//!
//! Endpoints: `GET /repos/{o}/{r}`; `GET|POST /repos/{o}/{r}/issues`
//! (`state`, `labels`, `sort`, `direction`, `per_page`, `page`, with a
//! `Link` header); `GET|PATCH /repos/{o}/{r}/issues/{n}`;
//! `GET|POST /repos/{o}/{r}/issues/{n}/comments`;
//! `GET|PATCH|POST|DELETE /repos/{o}/{r}/issues/comments/{id}` (POST because
//! octocrab's `update_comment` sends it); `GET|POST
//! /repos/{o}/{r}/issues/{n}/labels`, `DELETE .../labels/{name}`;
//! `GET|POST /repos/{o}/{r}/pulls` (`state`, `head=owner:branch`, `base`;
//! a second pull request for the same head and base is GitHub's 422);
//! `GET|PATCH /repos/{o}/{r}/pulls/{n}`; `GET /repos/{o}/{r}/installation`
//! and `POST /app/installations/{id}/access_tokens` (JWT: RS256 signature
//! checked against the configured public key, `iss` = the App id, `exp` in
//! the future and at most 10 minutes ahead; the token expires in an hour).
//! `/repositories/{id}/...` is served as `/repos/{o}/{r}/...`. Links are
//! written with the public URL (`set_public_url`, e.g. Prism's in front of
//! the fake), so a client following them stays on the same path.
//!
//! Faults a test scripts (`inject`): the next N matching requests answer
//! 502, a secondary rate limit (403 with `Retry-After`), or a primary rate
//! limit (403 with `x-ratelimit-remaining: 0` and `x-ratelimit-reset`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

const DOCS: &str = "https://docs.github.com/rest";
const RATE_LIMIT: u64 = 5000;

/// Credentials the fake accepts.
#[derive(Clone, Debug)]
pub struct GitHubConfig {
    /// Personal or App tokens accepted as `token <t>` or `Bearer <t>`.
    pub tokens: Vec<String>,
    /// The GitHub App whose JWTs the App endpoints accept.
    pub app: Option<AppConfig>,
}

impl GitHubConfig {
    pub fn with_token(token: &str) -> Self {
        Self {
            tokens: vec![token.to_owned()],
            app: None,
        }
    }
}

/// A GitHub App: its id (the JWT's `iss`) and public key (PEM, PKCS#1 or
/// PKCS#8). Each repository gets an installation of it.
#[derive(Clone, Debug)]
pub struct AppConfig {
    pub app_id: u64,
    pub public_key_pem: String,
}

/// Who wrote an issue or a comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub login: String,
    /// `"User"` or `"Bot"`.
    pub kind: String,
}

impl User {
    pub fn person(login: &str) -> Self {
        Self {
            login: login.to_owned(),
            kind: "User".to_owned(),
        }
    }

    pub fn bot(login: &str) -> Self {
        Self {
            login: login.to_owned(),
            kind: "Bot".to_owned(),
        }
    }
}

/// An issue to create (test side).
#[derive(Clone, Debug)]
pub struct NewIssue {
    pub title: String,
    pub body: Option<String>,
    pub labels: Vec<String>,
    pub user: User,
    pub author_association: String,
}

impl NewIssue {
    /// By `octocat` (a `User`, association `OWNER`), no labels.
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            body: Some(String::new()),
            labels: Vec::new(),
            user: User::person("octocat"),
            author_association: "OWNER".to_owned(),
        }
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = Some(body.to_owned());
        self
    }

    pub fn labels(mut self, labels: &[&str]) -> Self {
        self.labels = labels.iter().map(|l| (*l).to_owned()).collect();
        self
    }

    pub fn user(mut self, user: User) -> Self {
        self.user = user;
        self
    }

    pub fn author_association(mut self, association: &str) -> Self {
        association.clone_into(&mut self.author_association);
        self
    }
}

/// An issue or a pull request, as the fake holds it.
#[derive(Clone, Debug)]
pub struct Issue {
    pub id: u64,
    pub number: u64,
    pub title: String,
    pub body: Option<String>,
    pub labels: Vec<String>,
    pub user: User,
    pub author_association: String,
    /// `"open"` or `"closed"`.
    pub state: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub n_comments: u64,
    pub pull: Option<Pull>,
}

/// What makes an issue a pull request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    pub id: u64,
    /// `owner:branch`.
    pub head_label: String,
    pub head_ref: String,
    pub base_ref: String,
    pub draft: bool,
}

/// An issue comment.
#[derive(Clone, Debug)]
pub struct Comment {
    pub id: u64,
    pub repo: String,
    pub issue: u64,
    pub body: String,
    pub user: User,
    pub author_association: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// One request the fake answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub status: u16,
    /// When it arrived (to check that waits honour GitHub's headers).
    pub at: std::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A scripted failure.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many matching requests it answers.
    pub times: usize,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// 502, `{"message":"Server Error"}`.
    BadGateway,
    /// 403, a secondary rate limit, `Retry-After: <retry_after_s>`.
    SecondaryRateLimit { retry_after_s: u64 },
    /// 403, the primary rate limit: `x-ratelimit-remaining: 0`, reset in
    /// `reset_in_s` seconds.
    PrimaryRateLimit { reset_in_s: u64 },
}

impl Fault {
    pub fn bad_gateway() -> Self {
        Self::of(FaultKind::BadGateway)
    }

    pub fn secondary_rate_limit(retry_after_s: u64) -> Self {
        Self::of(FaultKind::SecondaryRateLimit { retry_after_s })
    }

    pub fn primary_rate_limit(reset_in_s: u64) -> Self {
        Self::of(FaultKind::PrimaryRateLimit { reset_in_s })
    }

    fn of(kind: FaultKind) -> Self {
        Self {
            kind,
            times: 1,
            method: None,
            path_prefix: None,
        }
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }

    /// Only requests with this method (any when `""`) whose path starts
    /// with `path_prefix`.
    pub fn matching(mut self, method: &str, path_prefix: &str) -> Self {
        self.method = (!method.is_empty()).then(|| method.to_ascii_uppercase());
        self.path_prefix = Some(path_prefix.to_owned());
        self
    }

    fn applies(&self, method: &str, path: &str) -> bool {
        self.times > 0
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// The fake server. Dropping it stops it.
pub struct FakeGitHub {
    pub addr: SocketAddr,
    shared: Arc<Mutex<World>>,
    /// Serves the API until the fake is dropped.
    _runtime: tokio::runtime::Runtime,
}

struct Repo {
    id: u64,
    owner: String,
    name: String,
    default_branch: String,
    branches: BTreeSet<String>,
    /// A bare git repository whose branches count too.
    git_dir: Option<PathBuf>,
    issues: BTreeMap<u64, Issue>,
    installation_id: u64,
}

struct World {
    config: GitHubConfig,
    public_url: String,
    repos: BTreeMap<String, Repo>,
    comments: BTreeMap<u64, Comment>,
    users: BTreeMap<String, u64>,
    /// Installation tokens: token -> expiry (Unix seconds).
    minted: BTreeMap<String, u64>,
    faults: VecDeque<Fault>,
    recorded: Vec<Recorded>,
    /// Inline comments of submitted reviews, by review id: (path, line,
    /// body, reviewer).
    review_comments: BTreeMap<u64, Vec<(String, u64, String, User)>>,
    next_id: u64,
    used: u64,
    window_reset: u64,
    requests_seen: u64,
}

impl FakeGitHub {
    pub fn start(config: GitHubConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake GitHub runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind fake GitHub");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Mutex::new(World {
            config,
            public_url: format!("http://{addr}"),
            repos: BTreeMap::new(),
            comments: BTreeMap::new(),
            users: BTreeMap::new(),
            minted: BTreeMap::new(),
            faults: VecDeque::new(),
            recorded: Vec::new(),
            review_comments: BTreeMap::new(),
            next_id: 1000,
            used: 0,
            window_reset: now() + 3600,
            requests_seen: 0,
        }));
        let app = Router::new()
            .fallback(serve)
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            _runtime: runtime,
        }
    }

    /// The fake's own base URL (octocrab's `base_uri`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base URL written into answers (`url` fields, `Link` headers).
    pub fn set_public_url(&self, url: &str) {
        self.world().public_url = url.trim_end_matches('/').to_owned();
    }

    pub fn add_token(&self, token: &str) {
        self.world().config.tokens.push(token.to_owned());
    }

    pub fn set_app(&self, app: AppConfig) {
        self.world().config.app = Some(app);
    }

    /// A repository `owner/name` with default branch `main`; returns its id.
    pub fn create_repo(&self, full_name: &str) -> u64 {
        let (owner, name) = split_repo(full_name);
        let mut world = self.world();
        let id = 1_296_269 + world.repos.len() as u64;
        let installation_id = 40_000_000 + world.repos.len() as u64;
        world.repos.insert(
            full_name.to_owned(),
            Repo {
                id,
                owner: owner.to_owned(),
                name: name.to_owned(),
                default_branch: "main".to_owned(),
                branches: BTreeSet::from(["main".to_owned()]),
                git_dir: None,
                issues: BTreeMap::new(),
                installation_id,
            },
        );
        id
    }

    pub fn set_default_branch(&self, repo: &str, branch: &str) {
        self.with_repo(repo, |r| {
            branch.clone_into(&mut r.default_branch);
            r.branches.insert(branch.to_owned());
        });
    }

    /// Makes a branch exist (pull requests need their head and base).
    pub fn add_branch(&self, repo: &str, branch: &str) {
        self.with_repo(repo, |r| {
            r.branches.insert(branch.to_owned());
        });
    }

    /// Branches of this bare git repository exist too (e.g. the remote
    /// agents push to).
    pub fn use_git_remote(&self, repo: &str, bare: &std::path::Path) {
        self.with_repo(repo, |r| r.git_dir = Some(bare.to_path_buf()));
    }

    /// The installation id of the App on `repo`.
    pub fn installation_id(&self, repo: &str) -> u64 {
        self.with_repo(repo, |r| r.installation_id)
    }

    /// Creates an issue; returns its number.
    pub fn create_issue(&self, repo: &str, issue: NewIssue) -> u64 {
        let mut world = self.world();
        world.user_id(&issue.user.login);
        let id = world.next_id();
        let at = now();
        let r = world.repo_mut(repo);
        let number = next_number(r);
        r.issues.insert(
            number,
            Issue {
                id,
                number,
                title: issue.title,
                body: issue.body,
                labels: issue.labels,
                user: issue.user,
                author_association: issue.author_association,
                state: "open".to_owned(),
                created_at: at,
                updated_at: at,
                n_comments: 0,
                pull: None,
            },
        );
        number
    }

    /// Adds a comment to an issue or pull request; returns its id.
    pub fn add_comment(&self, repo: &str, number: u64, user: User, body: &str) -> u64 {
        self.world()
            .add_comment(repo, number, user, "OWNER", body)
            .expect("the issue exists")
    }

    /// A review of pull request `number` with inline comments (path, line,
    /// text), as `reviewer`; returns the review's id (a webhook delivery of
    /// `pull_request_review` names it).
    pub fn add_review(
        &self,
        _repo: &str,
        _number: u64,
        reviewer: User,
        comments: &[(&str, u64, &str)],
    ) -> u64 {
        let mut world = self.world();
        world.next_id += 1;
        let id = world.next_id;
        let comments = comments
            .iter()
            .map(|(p, l, b)| ((*p).to_owned(), *l, (*b).to_owned(), reviewer.clone()))
            .collect();
        world.review_comments.insert(id, comments);
        id
    }

    /// Opens a pull request from `head` (a branch of the repository) to
    /// `base`, by `octocat`; returns its number. The branches are added.
    pub fn create_pull(&self, repo: &str, head: &str, base: &str, title: &str) -> u64 {
        self.add_branch(repo, head);
        self.add_branch(repo, base);
        let mut world = self.world();
        let body = json!({"head": head, "base": base, "title": title});
        let user = User::person("octocat");
        match world.create_pull(repo, &body, &user) {
            Ok(issue) => issue.number,
            Err(reply) => panic!("cannot open the pull request: {}", reply.body),
        }
    }

    /// Sets an issue's (or pull request's) state: "open" or "closed".
    pub fn set_state(&self, repo: &str, number: u64, state: &str) {
        self.with_repo(repo, |r| {
            if let Some(issue) = r.issues.get_mut(&number) {
                state.clone_into(&mut issue.state);
                issue.updated_at = now();
            }
        });
    }

    /// Issues and pull requests of `repo`, by number.
    pub fn issues(&self, repo: &str) -> Vec<Issue> {
        self.with_repo(repo, |r| r.issues.values().cloned().collect())
    }

    pub fn issue(&self, repo: &str, number: u64) -> Option<Issue> {
        self.with_repo(repo, |r| r.issues.get(&number).cloned())
    }

    /// The payload GitHub sends for an `issues` event (`opened`, `labeled`
    /// with `label`, ...) on issue `number` of `repo`, sent by the issue's
    /// author: made of the same issue, repository and user objects the
    /// fake's REST API answers. `None` for an unknown issue.
    pub fn issues_event(
        &self,
        repo: &str,
        number: u64,
        action: &str,
        label: Option<&str>,
    ) -> Option<Value> {
        let mut world = self.world();
        let issue = world.repo_mut(repo).issues.get(&number).cloned()?;
        let mut payload = json!({
            "action": action,
            "issue": world.issue_json(repo, &issue),
            "repository": world.repo_json(repo),
            "sender": world.user_json(&issue.user),
        });
        if let Some(label) = label {
            payload["label"] = world.labels_json(repo, &[label.to_owned()])[0].clone();
        }
        Some(payload)
    }

    /// The pull requests of `repo` (issues that are pull requests).
    pub fn pulls(&self, repo: &str) -> Vec<Issue> {
        self.issues(repo)
            .into_iter()
            .filter(|i| i.pull.is_some())
            .collect()
    }

    /// The comments on an issue, oldest first.
    pub fn comments(&self, repo: &str, number: u64) -> Vec<Comment> {
        self.world()
            .comments
            .values()
            .filter(|c| c.repo == repo && c.issue == number)
            .cloned()
            .collect()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.world().recorded.clone()
    }

    pub fn clear_requests(&self) {
        self.world().recorded.clear();
    }

    /// Schedules a fault; faults apply in the order injected.
    pub fn inject(&self, fault: Fault) {
        self.world().faults.push_back(fault);
    }

    /// Installation tokens minted so far.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.world().minted.keys().cloned().collect()
    }

    /// Tells whether a token is one the fake minted (for a git server that
    /// should accept installation tokens).
    pub fn token_checker(&self) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move |token| {
            shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .minted
                .contains_key(token)
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_repo<T>(&self, repo: &str, f: impl FnOnce(&mut Repo) -> T) -> T {
        f(self.world().repo_mut(repo))
    }
}

fn split_repo(full_name: &str) -> (&str, &str) {
    full_name
        .split_once('/')
        .unwrap_or_else(|| panic!("{full_name:?} is not owner/name"))
}

fn next_number(repo: &Repo) -> u64 {
    repo.issues.keys().next_back().map_or(1, |n| n + 1)
}

/// An answer before it becomes an HTTP response.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(
            status,
            json!({"message": message, "documentation_url": DOCS, "status": status.to_string()}),
        )
    }

    fn not_found() -> Self {
        Self::error(404, "Not Found")
    }

    fn validation(errors: Value, docs: &str) -> Self {
        Self::json(
            422,
            json!({"message": "Validation Failed", "errors": errors, "documentation_url": docs, "status": "422"}),
        )
    }

    fn header(mut self, name: &str, value: impl ToString) -> Self {
        self.headers.push((name.to_owned(), value.to_string()));
        self
    }
}

async fn serve(
    AxumState(shared): AxumState<Arc<Mutex<World>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut world = shared.lock().unwrap_or_else(|e| e.into_inner());
    let reply = world.answer(&method, &uri, &headers, &body);
    world.recorded.push(Recorded {
        #[allow(clippy::disallowed_methods)] // a fake server stamping requests
        at: std::time::Instant::now(),
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        status: reply.status,
    });
    let status = reply.status;
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8")
        .header("x-github-media-type", "github.v3; format=json")
        .header("x-github-api-version-selected", "2022-11-28")
        .header(
            "x-github-request-id",
            format!("FAKE:{:X}", world.requests_seen),
        );
    for (name, value) in &reply.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    let body = if status == 204 {
        Body::empty()
    } else {
        Body::from(reply.body.to_string())
    };
    response.body(body).expect("a valid response")
}

impl World {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn user_id(&mut self, login: &str) -> u64 {
        let next = 583_231 + self.users.len() as u64;
        *self.users.entry(login.to_owned()).or_insert(next)
    }

    fn repo_mut(&mut self, repo: &str) -> &mut Repo {
        self.repos
            .get_mut(repo)
            .unwrap_or_else(|| panic!("no repository {repo:?} in the fake: create_repo first"))
    }

    fn answer(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Reply {
        self.requests_seen += 1;
        let at = now();
        if at >= self.window_reset {
            self.window_reset = at + 3600;
            self.used = 0;
        }
        self.used += 1;
        let path = uri.path().to_owned();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let reply = self
            .fault(method.as_str(), &path)
            .unwrap_or_else(|| self.route(method, &path, &query, headers, body));
        if reply
            .headers
            .iter()
            .any(|(n, _)| n == "x-ratelimit-remaining")
        {
            return reply;
        }
        let remaining = RATE_LIMIT.saturating_sub(self.used);
        reply
            .header("x-ratelimit-limit", RATE_LIMIT)
            .header("x-ratelimit-remaining", remaining)
            .header("x-ratelimit-reset", self.window_reset)
            .header("x-ratelimit-used", self.used)
            .header("x-ratelimit-resource", "core")
    }

    fn fault(&mut self, method: &str, path: &str) -> Option<Reply> {
        let idx = self.faults.iter().position(|f| f.applies(method, path))?;
        let fault = &mut self.faults[idx];
        fault.times -= 1;
        let kind = fault.kind.clone();
        if fault.times == 0 {
            self.faults.remove(idx);
        }
        let request_id = format!("FAKE:{:X}", self.requests_seen);
        Some(match kind {
            FaultKind::BadGateway => Reply::json(502, json!({"message": "Server Error"})),
            FaultKind::SecondaryRateLimit { retry_after_s } => Reply::json(
                403,
                json!({
                    "message": format!("You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach out to GitHub Support for help, please include the request ID {request_id}."),
                    "documentation_url": "https://docs.github.com/free-pro-team@latest/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
                    "status": "403",
                }),
            )
            .header("retry-after", retry_after_s),
            FaultKind::PrimaryRateLimit { reset_in_s } => Reply::json(
                403,
                json!({
                    "message": format!("API rate limit exceeded for user ID 1. If you reach out to GitHub Support for help, please include the request ID {request_id}."),
                    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                    "status": "403",
                }),
            )
            .header("x-ratelimit-limit", RATE_LIMIT)
            .header("x-ratelimit-remaining", 0)
            .header("x-ratelimit-reset", now() + reset_in_s)
            .header("x-ratelimit-used", RATE_LIMIT)
            .header("x-ratelimit-resource", "core"),
        })
    }

    fn route(
        &mut self,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Reply {
        let mut segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        // `/repositories/{id}/...` is `/repos/{owner}/{name}/...`.
        if segments.first().map(String::as_str) == Some("repositories") && segments.len() >= 2 {
            let Some(full) = self
                .repos
                .iter()
                .find(|(_, r)| r.id.to_string() == segments[1])
                .map(|(k, _)| k.clone())
            else {
                return Reply::not_found();
            };
            let (owner, name) = split_repo(&full);
            let mut rest = vec!["repos".to_owned(), owner.to_owned(), name.to_owned()];
            rest.extend(segments.drain(2..));
            segments = rest;
        }
        let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let credential = authorization
            .strip_prefix("token ")
            .or_else(|| authorization.strip_prefix("Bearer "))
            .or_else(|| authorization.strip_prefix("bearer "))
            .unwrap_or_default()
            .trim();
        let app_endpoint = seg.first() == Some(&"app")
            || (seg.len() == 4 && seg[0] == "repos" && seg[3] == "installation");
        if app_endpoint {
            if let Err(reply) = self.check_jwt(credential) {
                return reply;
            }
        } else if !self.token_ok(credential) {
            return Reply::error(401, "Bad credentials");
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => return Reply::error(400, "Problems parsing JSON"),
            }
        };
        let m = method.as_str();
        match (m, seg.as_slice()) {
            ("POST", ["app", "installations", id, "access_tokens"]) => self.mint(id),
            (_, ["repos", owner, name, rest @ ..]) => {
                let full = format!("{owner}/{name}");
                if !self.repos.contains_key(&full) {
                    return Reply::not_found();
                }
                // Who the API writes as: the App's bot with an installation
                // token, else the token's user.
                let actor = if self.minted.contains_key(credential) {
                    User::bot("ccc-fake[bot]")
                } else {
                    User::person("ccc-bot")
                };
                self.repo_route(m, &full, rest, query, &body, actor)
            }
            _ => Reply::not_found(),
        }
    }

    fn repo_route(
        &mut self,
        m: &str,
        full: &str,
        rest: &[&str],
        query: &BTreeMap<String, String>,
        body: &Value,
        user: User,
    ) -> Reply {
        match (m, rest) {
            ("GET", []) => Reply::json(200, self.repo_json(full)),
            ("GET", ["installation"]) => {
                let id = self.repo_mut(full).installation_id;
                Reply::json(200, self.installation_json(full, id))
            }
            ("GET", ["issues"]) => self.list_issues(full, query, false),
            ("GET", ["pulls", number, "reviews", review, "comments"]) => {
                let review: u64 = review.parse().unwrap_or(0);
                let Some(comments) = self.review_comments.get(&review).cloned() else {
                    return Reply::not_found();
                };
                let mut out = Vec::new();
                for (i, (path, line, text, reviewer)) in comments.iter().enumerate() {
                    let user = self.user_json(reviewer);
                    let id = review * 1000 + i as u64;
                    out.push(json!({
                        "url": format!("{}/repos/{full}/pulls/comments/{id}", self.public_url),
                        "pull_request_review_id": review,
                        "id": id,
                        "node_id": format!("PRRC_{id}"),
                        "diff_hunk": "@@ -1,1 +1,1 @@",
                        "path": path,
                        "position": line,
                        "original_position": line,
                        "commit_id": "0000000000000000000000000000000000000000",
                        "original_commit_id": "0000000000000000000000000000000000000000",
                        "user": user,
                        "body": text,
                        "created_at": rfc3339(0),
                        "updated_at": rfc3339(0),
                        "html_url": format!("https://github.com/{full}/pull/{number}#discussion_r{id}"),
                        "pull_request_url": format!("{}/repos/{full}/pulls/{number}", self.public_url),
                        "author_association": "MEMBER",
                        "_links": {
                            "self": {"href": format!("{}/repos/{full}/pulls/comments/{id}", self.public_url)},
                            "html": {"href": format!("https://github.com/{full}/pull/{number}#discussion_r{id}")},
                            "pull_request": {"href": format!("{}/repos/{full}/pulls/{number}", self.public_url)}
                        },
                        "line": line,
                        "original_line": line,
                        "side": "RIGHT"
                    }));
                }
                Reply::json(200, Value::Array(out))
            }
            ("POST", ["issues"]) => {
                let Some(title) = body["title"].as_str() else {
                    return Reply::validation(
                        json!([{"resource": "Issue", "code": "missing_field", "field": "title"}]),
                        "https://docs.github.com/rest/issues/issues#create-an-issue",
                    );
                };
                let labels: Vec<String> = body["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect();
                let id = self.next_id();
                let at = now();
                let r = self.repo_mut(full);
                let number = next_number(r);
                r.issues.insert(
                    number,
                    Issue {
                        id,
                        number,
                        title: title.to_owned(),
                        body: body["body"].as_str().map(str::to_owned),
                        labels,
                        user: user.clone(),
                        author_association: "NONE".to_owned(),
                        state: "open".to_owned(),
                        created_at: at,
                        updated_at: at,
                        n_comments: 0,
                        pull: None,
                    },
                );
                let issue = self.repo_mut(full).issues[&number].clone();
                Reply::json(201, self.issue_json(full, &issue))
            }
            ("GET", ["issues", "comments", id]) => match self.comment(full, id) {
                Some(c) => Reply::json(200, self.comment_json(&c)),
                None => Reply::not_found(),
            },
            ("PATCH" | "POST", ["issues", "comments", id]) => {
                let Some(mut comment) = self.comment(full, id) else {
                    return Reply::not_found();
                };
                let Some(text) = body["body"].as_str() else {
                    return Reply::validation(
                        json!([{"resource": "IssueComment", "code": "missing_field", "field": "body"}]),
                        "https://docs.github.com/rest/issues/comments#update-an-issue-comment",
                    );
                };
                text.clone_into(&mut comment.body);
                comment.updated_at = now();
                self.comments.insert(comment.id, comment.clone());
                Reply::json(200, self.comment_json(&comment))
            }
            ("DELETE", ["issues", "comments", id]) => match self.comment(full, id) {
                Some(c) => {
                    self.comments.remove(&c.id);
                    if let Some(issue) = self.repo_mut(full).issues.get_mut(&c.issue) {
                        issue.n_comments = issue.n_comments.saturating_sub(1);
                    }
                    Reply::json(204, Value::Null)
                }
                None => Reply::not_found(),
            },
            (_, ["issues", n, more @ ..]) => {
                let Some(number) = n.parse::<u64>().ok().filter(|n| {
                    self.repos
                        .get(full)
                        .is_some_and(|r| r.issues.contains_key(n))
                }) else {
                    return Reply::not_found();
                };
                self.issue_route(m, full, number, more, query, body, user)
            }
            ("GET", ["pulls"]) => self.list_issues(full, query, true),
            ("POST", ["pulls"]) => match self.create_pull(full, body, &user) {
                Ok(issue) => Reply::json(201, self.pull_json(full, &issue)),
                Err(reply) => reply,
            },
            (_, ["pulls", n]) => {
                let Some(mut issue) = n
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| self.repos.get(full)?.issues.get(&n).cloned())
                    .filter(|i| i.pull.is_some())
                else {
                    return Reply::not_found();
                };
                match m {
                    "GET" => Reply::json(200, self.pull_json(full, &issue)),
                    "PATCH" => {
                        apply_edit(&mut issue, body);
                        if let (Some(base), Some(pull)) =
                            (body["base"].as_str(), issue.pull.as_mut())
                        {
                            base.clone_into(&mut pull.base_ref);
                        }
                        self.repo_mut(full)
                            .issues
                            .insert(issue.number, issue.clone());
                        Reply::json(200, self.pull_json(full, &issue))
                    }
                    _ => Reply::not_found(),
                }
            }
            _ => Reply::not_found(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_route(
        &mut self,
        m: &str,
        full: &str,
        number: u64,
        more: &[&str],
        query: &BTreeMap<String, String>,
        body: &Value,
        user: User,
    ) -> Reply {
        match (m, more) {
            ("GET", []) => {
                let issue = self.repo_mut(full).issues[&number].clone();
                Reply::json(200, self.issue_json(full, &issue))
            }
            ("PATCH", []) => {
                let mut issue = self.repo_mut(full).issues[&number].clone();
                apply_edit(&mut issue, body);
                if let Some(labels) = body["labels"].as_array() {
                    issue.labels = labels
                        .iter()
                        .filter_map(|l| l.as_str().or_else(|| l["name"].as_str()))
                        .map(str::to_owned)
                        .collect();
                }
                self.repo_mut(full).issues.insert(number, issue.clone());
                Reply::json(200, self.issue_json(full, &issue))
            }
            ("GET", ["comments"]) => {
                let all: Vec<Comment> = self
                    .comments
                    .values()
                    .filter(|c| c.repo == full && c.issue == number)
                    .cloned()
                    .collect();
                let (page, link) =
                    self.paginate(full, &format!("issues/{number}/comments"), query, all.len());
                let items: Vec<Value> = all[page].iter().map(|c| self.comment_json(c)).collect();
                with_link(Reply::json(200, Value::Array(items)), link)
            }
            ("POST", ["comments"]) => {
                let Some(text) = body["body"].as_str() else {
                    return Reply::validation(
                        json!([{"resource": "IssueComment", "code": "missing_field", "field": "body"}]),
                        "https://docs.github.com/rest/issues/comments#create-an-issue-comment",
                    );
                };
                match self.add_comment(full, number, user, "NONE", text) {
                    Some(id) => {
                        let comment = self.comments[&id].clone();
                        Reply::json(201, self.comment_json(&comment))
                            .header("location", comment_api_url(&self.public_url, full, id))
                    }
                    None => Reply::not_found(),
                }
            }
            ("GET", ["labels"]) => {
                let issue = self.repo_mut(full).issues[&number].clone();
                Reply::json(200, self.labels_json(full, &issue.labels))
            }
            ("POST" | "PUT", ["labels"]) => {
                let names: Vec<String> = body
                    .as_array()
                    .or_else(|| body["labels"].as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().or_else(|| l["name"].as_str()))
                    .map(str::to_owned)
                    .collect();
                let issue = self
                    .repo_mut(full)
                    .issues
                    .get_mut(&number)
                    .expect("checked");
                if m == "PUT" {
                    issue.labels.clear();
                }
                for name in names {
                    if !issue.labels.contains(&name) {
                        issue.labels.push(name);
                    }
                }
                issue.updated_at = now();
                let labels = issue.labels.clone();
                Reply::json(200, self.labels_json(full, &labels))
            }
            ("DELETE", ["labels", name]) => {
                let issue = self
                    .repo_mut(full)
                    .issues
                    .get_mut(&number)
                    .expect("checked");
                let Some(idx) = issue.labels.iter().position(|l| l == name) else {
                    return Reply::error(404, "Label does not exist");
                };
                issue.labels.remove(idx);
                issue.updated_at = now();
                let labels = issue.labels.clone();
                Reply::json(200, self.labels_json(full, &labels))
            }
            _ => Reply::not_found(),
        }
    }

    fn comment(&self, full: &str, id: &str) -> Option<Comment> {
        let id: u64 = id.parse().ok()?;
        self.comments.get(&id).filter(|c| c.repo == full).cloned()
    }

    fn add_comment(
        &mut self,
        full: &str,
        number: u64,
        user: User,
        association: &str,
        body: &str,
    ) -> Option<u64> {
        self.user_id(&user.login);
        let id = self.next_id();
        let at = now();
        let issue = self.repos.get_mut(full)?.issues.get_mut(&number)?;
        issue.n_comments += 1;
        issue.updated_at = at;
        self.comments.insert(
            id,
            Comment {
                id,
                repo: full.to_owned(),
                issue: number,
                body: body.to_owned(),
                user,
                author_association: association.to_owned(),
                created_at: at,
                updated_at: at,
            },
        );
        Some(id)
    }

    fn branch_exists(&self, full: &str, branch: &str) -> bool {
        let Some(repo) = self.repos.get(full) else {
            return false;
        };
        repo.branches.contains(branch)
            || repo.git_dir.as_ref().is_some_and(|dir| {
                std::process::Command::new("git")
                    .args(["rev-parse", "--verify", "--quiet"])
                    .arg(format!("refs/heads/{branch}"))
                    .current_dir(dir)
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
    }

    fn create_pull(&mut self, full: &str, body: &Value, user: &User) -> Result<Issue, Reply> {
        const DOCS_PR: &str = "https://docs.github.com/rest/pulls/pulls#create-a-pull-request";
        let owner = self.repo_mut(full).owner.clone();
        let mut missing = Vec::new();
        for field in ["head", "base"] {
            if body[field].as_str().is_none_or(str::is_empty) {
                missing.push(
                    json!({"resource": "PullRequest", "code": "missing_field", "field": field}),
                );
            }
        }
        if !missing.is_empty() {
            return Err(Reply::validation(Value::Array(missing), DOCS_PR));
        }
        let head = body["head"].as_str().unwrap_or_default();
        let base = body["base"].as_str().unwrap_or_default();
        let (head_owner, head_ref) = head.split_once(':').unwrap_or((owner.as_str(), head));
        let head_label = format!("{head_owner}:{head_ref}");
        let mut invalid = Vec::new();
        if !self.branch_exists(full, base) {
            invalid.push(json!({"resource": "PullRequest", "field": "base", "code": "invalid"}));
        }
        if head_owner != owner || !self.branch_exists(full, head_ref) {
            invalid.push(json!({"resource": "PullRequest", "field": "head", "code": "invalid"}));
        }
        if !invalid.is_empty() {
            return Err(Reply::validation(Value::Array(invalid), DOCS_PR));
        }
        if head_ref == base {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "custom", "message": format!("No commits between {base} and {head_ref}")}]),
                DOCS_PR,
            ));
        }
        let exists = self.repo_mut(full).issues.values().any(|i| {
            i.state == "open"
                && i.pull
                    .as_ref()
                    .is_some_and(|p| p.head_label == head_label && p.base_ref == base)
        });
        if exists {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "custom", "message": format!("A pull request already exists for {head_label}.")}]),
                DOCS_PR,
            ));
        }
        let Some(title) = body["title"].as_str() else {
            return Err(Reply::validation(
                json!([{"resource": "PullRequest", "code": "missing_field", "field": "title"}]),
                DOCS_PR,
            ));
        };
        self.user_id(&user.login);
        let id = self.next_id();
        let pull_id = self.next_id();
        let at = now();
        let r = self.repo_mut(full);
        let number = next_number(r);
        let issue = Issue {
            id,
            number,
            title: title.to_owned(),
            body: body["body"].as_str().map(str::to_owned),
            labels: Vec::new(),
            user: user.clone(),
            author_association: "NONE".to_owned(),
            state: "open".to_owned(),
            created_at: at,
            updated_at: at,
            n_comments: 0,
            pull: Some(Pull {
                id: pull_id,
                head_label,
                head_ref: head_ref.to_owned(),
                base_ref: base.to_owned(),
                draft: body["draft"].as_bool().unwrap_or(false),
            }),
        };
        r.issues.insert(number, issue.clone());
        Ok(issue)
    }

    /// The issues (or pull requests) list with GitHub's filters and pages.
    fn list_issues(&mut self, full: &str, query: &BTreeMap<String, String>, pulls: bool) -> Reply {
        let state = query.get("state").map_or("open", String::as_str);
        let labels: Vec<&str> = query
            .get("labels")
            .map(|l| l.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        let head = query.get("head");
        let base = query.get("base");
        let sort = query.get("sort").map_or("created", String::as_str);
        let direction = query.get("direction").map_or("desc", String::as_str);
        let mut items: Vec<Issue> = self
            .repo_mut(full)
            .issues
            .values()
            .filter(|i| state == "all" || i.state == state)
            .filter(|i| !pulls || i.pull.is_some())
            .filter(|i| labels.iter().all(|l| i.labels.iter().any(|x| x == l)))
            .filter(|i| head.is_none_or(|h| i.pull.as_ref().is_some_and(|p| &p.head_label == h)))
            .filter(|i| base.is_none_or(|b| i.pull.as_ref().is_some_and(|p| &p.base_ref == b)))
            .cloned()
            .collect();
        items.sort_by_key(|i| match sort {
            "updated" => (i.updated_at, i.number),
            "comments" => (i.n_comments, i.number),
            _ => (i.created_at, i.number),
        });
        if direction == "desc" {
            items.reverse();
        }
        let what = if pulls { "pulls" } else { "issues" };
        let (page, link) = self.paginate(full, what, query, items.len());
        let json: Vec<Value> = items[page]
            .iter()
            .map(|i| {
                if pulls {
                    self.pull_json(full, i)
                } else {
                    self.issue_json(full, i)
                }
            })
            .collect();
        with_link(Reply::json(200, Value::Array(json)), link)
    }

    /// The slice of `total` items a page covers, and the `Link` header.
    fn paginate(
        &self,
        full: &str,
        what: &str,
        query: &BTreeMap<String, String>,
        total: usize,
    ) -> (std::ops::Range<usize>, Option<String>) {
        let per_page = query
            .get("per_page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(30)
            .clamp(1, 100);
        let page = query
            .get("page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let last = total.div_ceil(per_page).max(1);
        let start = ((page - 1) * per_page).min(total);
        let end = (start + per_page).min(total);
        let url = |p: usize| {
            let mut q: Vec<(String, String)> = query
                .iter()
                .filter(|(k, _)| k.as_str() != "page")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            q.push(("page".to_owned(), p.to_string()));
            let q = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(q)
                .finish();
            format!("{}/repos/{full}/{what}?{q}", self.public_url)
        };
        let mut links = Vec::new();
        if page > 1 {
            links.push(format!("<{}>; rel=\"prev\"", url(page - 1)));
        }
        if page < last {
            links.push(format!("<{}>; rel=\"next\"", url(page + 1)));
            links.push(format!("<{}>; rel=\"last\"", url(last)));
        }
        if page > 1 {
            links.push(format!("<{}>; rel=\"first\"", url(1)));
        }
        (start..end, (!links.is_empty()).then(|| links.join(", ")))
    }

    fn token_ok(&mut self, credential: &str) -> bool {
        if credential.is_empty() {
            return false;
        }
        let at = now();
        self.minted.retain(|_, expiry| *expiry > at);
        self.config.tokens.iter().any(|t| t == credential) || self.minted.contains_key(credential)
    }

    fn check_jwt(&self, jwt: &str) -> Result<(), Reply> {
        let Some(app) = self.config.app.as_ref() else {
            return Err(Reply::error(401, "A JSON web token could not be decoded"));
        };
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(app.public_key_pem.as_bytes())
            .map_err(|_| Reply::error(500, "the fake's App public key is not a PEM RSA key"))?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.leeway = 0;
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let claims: Value = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
            .map_err(|_| Reply::error(401, "A JSON web token could not be decoded"))?
            .claims;
        let at = now();
        let exp = claims["exp"].as_u64();
        let iat = claims["iat"].as_u64();
        match (iat, exp) {
            (_, None) => {
                return Err(Reply::error(
                    401,
                    "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires",
                ));
            }
            (None, _) => {
                return Err(Reply::error(
                    401,
                    "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued",
                ));
            }
            (Some(iat), _) if iat > at + 60 => {
                return Err(Reply::error(
                    401,
                    "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued",
                ));
            }
            (_, Some(exp)) if exp <= at => {
                return Err(Reply::error(
                    401,
                    "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires",
                ));
            }
            (_, Some(exp)) if exp > at + 600 => {
                return Err(Reply::error(
                    401,
                    "'Expiration time' claim ('exp') is too far in the future",
                ));
            }
            _ => {}
        }
        let iss = match &claims["iss"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        if iss != app.app_id.to_string() {
            return Err(Reply::error(
                401,
                "'Issuer' claim ('iss') must be an Integer",
            ));
        }
        Ok(())
    }

    fn mint(&mut self, id: &str) -> Reply {
        let Some(full) = self
            .repos
            .iter()
            .find(|(_, r)| r.installation_id.to_string() == id)
            .map(|(k, _)| k.clone())
        else {
            return Reply::not_found();
        };
        let serial = self.next_id();
        let token = format!("ghs_fake{serial:0>28}");
        let expires = now() + 3600;
        self.minted.insert(token.clone(), expires);
        let repo = self.repo_json(&full);
        Reply::json(
            201,
            json!({
                "token": token,
                "expires_at": rfc3339(expires),
                "permissions": {"issues": "write", "pull_requests": "write", "contents": "write", "metadata": "read"},
                "repository_selection": "selected",
                "repositories": [repo],
            }),
        )
    }

    // GitHub's JSON shapes.

    fn user_json(&mut self, user: &User) -> Value {
        let id = self.user_id(&user.login);
        let api = format!("{}/users/{}", self.public_url, user.login);
        json!({
            "login": user.login, "id": id, "node_id": format!("MDQ6VXNlcj{id}"),
            "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
            "gravatar_id": "", "url": api, "html_url": format!("https://github.com/{}", user.login),
            "followers_url": format!("{api}/followers"),
            "following_url": format!("{api}/following{{/other_user}}"),
            "gists_url": format!("{api}/gists{{/gist_id}}"),
            "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{api}/subscriptions"),
            "organizations_url": format!("{api}/orgs"),
            "repos_url": format!("{api}/repos"),
            "events_url": format!("{api}/events{{/privacy}}"),
            "received_events_url": format!("{api}/received_events"),
            "type": user.kind, "user_view_type": "public", "site_admin": false,
        })
    }

    fn repo_json(&mut self, full: &str) -> Value {
        let (id, owner, name, default_branch) = {
            let r = self.repo_mut(full);
            (
                r.id,
                r.owner.clone(),
                r.name.clone(),
                r.default_branch.clone(),
            )
        };
        let owner = self.user_json(&User::person(&owner));
        let open = self.repos[full]
            .issues
            .values()
            .filter(|i| i.state == "open")
            .count();
        let api = format!("{}/repos/{full}", self.public_url);
        let html = format!("https://github.com/{full}");
        let t = rfc3339(1_700_000_000);
        json!({
            "id": id, "node_id": format!("R_fake{id}"), "name": name, "full_name": full,
            "owner": owner, "private": false, "html_url": html, "description": null, "fork": false,
            "url": api,
            "archive_url": format!("{api}/{{archive_format}}{{/ref}}"),
            "assignees_url": format!("{api}/assignees{{/user}}"),
            "blobs_url": format!("{api}/git/blobs{{/sha}}"),
            "branches_url": format!("{api}/branches{{/branch}}"),
            "collaborators_url": format!("{api}/collaborators{{/collaborator}}"),
            "comments_url": format!("{api}/comments{{/number}}"),
            "commits_url": format!("{api}/commits{{/sha}}"),
            "compare_url": format!("{api}/compare/{{base}}...{{head}}"),
            "contents_url": format!("{api}/contents/{{+path}}"),
            "contributors_url": format!("{api}/contributors"),
            "deployments_url": format!("{api}/deployments"),
            "downloads_url": format!("{api}/downloads"),
            "events_url": format!("{api}/events"),
            "forks_url": format!("{api}/forks"),
            "git_commits_url": format!("{api}/git/commits{{/sha}}"),
            "git_refs_url": format!("{api}/git/refs{{/sha}}"),
            "git_tags_url": format!("{api}/git/tags{{/sha}}"),
            "git_url": format!("git://github.com/{full}.git"),
            "issue_comment_url": format!("{api}/issues/comments{{/number}}"),
            "issue_events_url": format!("{api}/issues/events{{/number}}"),
            "issues_url": format!("{api}/issues{{/number}}"),
            "keys_url": format!("{api}/keys{{/key_id}}"),
            "labels_url": format!("{api}/labels{{/name}}"),
            "languages_url": format!("{api}/languages"),
            "merges_url": format!("{api}/merges"),
            "milestones_url": format!("{api}/milestones{{/number}}"),
            "notifications_url": format!("{api}/notifications{{?since,all,participating}}"),
            "pulls_url": format!("{api}/pulls{{/number}}"),
            "releases_url": format!("{api}/releases{{/id}}"),
            "ssh_url": format!("git@github.com:{full}.git"),
            "stargazers_url": format!("{api}/stargazers"),
            "statuses_url": format!("{api}/statuses/{{sha}}"),
            "subscribers_url": format!("{api}/subscribers"),
            "subscription_url": format!("{api}/subscription"),
            "tags_url": format!("{api}/tags"),
            "teams_url": format!("{api}/teams"),
            "trees_url": format!("{api}/git/trees{{/sha}}"),
            "clone_url": format!("{html}.git"),
            "mirror_url": null, "hooks_url": format!("{api}/hooks"), "svn_url": html,
            "homepage": null, "language": null, "forks_count": 0, "stargazers_count": 0,
            "watchers_count": 0, "size": 1, "default_branch": default_branch,
            "open_issues_count": open, "is_template": false, "topics": [],
            "has_issues": true, "has_projects": true, "has_wiki": true, "has_pages": false,
            "has_downloads": true, "has_discussions": false, "archived": false, "disabled": false,
            "visibility": "public", "pushed_at": t, "created_at": t, "updated_at": t,
            "permissions": {"admin": false, "maintain": false, "push": true, "triage": true, "pull": true},
            "allow_rebase_merge": true, "allow_squash_merge": true, "allow_auto_merge": false,
            "delete_branch_on_merge": false, "allow_merge_commit": true, "allow_forking": true,
            "web_commit_signoff_required": false,
            "subscribers_count": 1, "network_count": 0, "license": null,
            "forks": 0, "open_issues": open, "watchers": 0,
        })
    }

    fn installation_json(&mut self, full: &str, id: u64) -> Value {
        let owner = self.repo_mut(full).owner.clone();
        let account = self.user_json(&User::person(&owner));
        let app_id = self.config.app.as_ref().map_or(1, |a| a.app_id);
        json!({
            "id": id, "account": account, "repository_selection": "selected",
            "access_tokens_url": format!("{}/app/installations/{id}/access_tokens", self.public_url),
            "repositories_url": format!("{}/installation/repositories", self.public_url),
            "html_url": format!("https://github.com/settings/installations/{id}"),
            "app_id": app_id, "client_id": "Iv1.fakefakefakefake", "app_slug": "ccc-fake",
            "target_id": account["id"], "target_type": "User",
            "permissions": {"issues": "write", "pull_requests": "write", "contents": "write", "metadata": "read"},
            "events": ["issues", "issue_comment", "pull_request", "pull_request_review"],
            "created_at": rfc3339(1_700_000_000), "updated_at": rfc3339(1_700_000_000),
            "single_file_name": null, "has_multiple_single_files": false, "single_file_paths": [],
            "suspended_by": null, "suspended_at": null,
        })
    }

    fn labels_json(&mut self, full: &str, names: &[String]) -> Value {
        let api = format!("{}/repos/{full}/labels", self.public_url);
        Value::Array(
            names
                .iter()
                .map(|name| {
                    let id = 208_045_946 + name.bytes().map(u64::from).sum::<u64>();
                    json!({
                        "id": id, "node_id": format!("LA_fake{id}"),
                        "url": format!("{api}/{}", form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()),
                        "name": name, "description": null, "color": "ededed", "default": false,
                    })
                })
                .collect(),
        )
    }

    fn issue_json(&mut self, full: &str, issue: &Issue) -> Value {
        let api = format!("{}/repos/{full}", self.public_url);
        let n = issue.number;
        let user = self.user_json(&issue.user);
        let labels = self.labels_json(full, &issue.labels);
        let html_kind = if issue.pull.is_some() {
            "pull"
        } else {
            "issues"
        };
        let mut value = json!({
            "id": issue.id, "node_id": format!("I_fake{}", issue.id),
            "url": format!("{api}/issues/{n}"), "repository_url": api,
            "labels_url": format!("{api}/issues/{n}/labels{{/name}}"),
            "comments_url": format!("{api}/issues/{n}/comments"),
            "events_url": format!("{api}/issues/{n}/events"),
            "html_url": format!("https://github.com/{full}/{html_kind}/{n}"),
            "number": n, "state": issue.state,
            "state_reason": if issue.state == "closed" { json!("completed") } else { Value::Null },
            "title": issue.title, "body": issue.body, "user": user, "labels": labels,
            "assignee": null, "assignees": [], "milestone": null, "locked": false,
            "active_lock_reason": null, "comments": issue.n_comments,
            "closed_at": if issue.state == "closed" { json!(rfc3339(issue.updated_at)) } else { Value::Null },
            "created_at": rfc3339(issue.created_at), "updated_at": rfc3339(issue.updated_at),
            "closed_by": null, "author_association": issue.author_association,
            "timeline_url": format!("{api}/issues/{n}/timeline"),
            "performed_via_github_app": null,
            "reactions": {"url": format!("{api}/issues/{n}/reactions"), "total_count": 0, "+1": 0, "-1": 0, "laugh": 0, "hooray": 0, "confused": 0, "heart": 0, "rocket": 0, "eyes": 0},
        });
        if let Some(pull) = &issue.pull {
            value["draft"] = json!(pull.draft);
            value["pull_request"] = json!({
                "url": format!("{api}/pulls/{n}"),
                "html_url": format!("https://github.com/{full}/pull/{n}"),
                "diff_url": format!("https://github.com/{full}/pull/{n}.diff"),
                "patch_url": format!("https://github.com/{full}/pull/{n}.patch"),
                "merged_at": null,
            });
        }
        value
    }

    fn comment_json(&mut self, c: &Comment) -> Value {
        let api = format!("{}/repos/{}", self.public_url, c.repo);
        let user = self.user_json(&c.user);
        json!({
            "id": c.id, "node_id": format!("IC_fake{}", c.id),
            "url": comment_api_url(&self.public_url, &c.repo, c.id),
            "html_url": format!("https://github.com/{}/issues/{}#issuecomment-{}", c.repo, c.issue, c.id),
            "issue_url": format!("{api}/issues/{}", c.issue),
            "body": c.body, "user": user,
            "created_at": rfc3339(c.created_at), "updated_at": rfc3339(c.updated_at),
            "author_association": c.author_association,
            "performed_via_github_app": null,
            "reactions": {"url": format!("{api}/issues/comments/{}/reactions", c.id), "total_count": 0, "+1": 0, "-1": 0, "laugh": 0, "hooray": 0, "confused": 0, "heart": 0, "rocket": 0, "eyes": 0},
        })
    }

    fn pull_json(&mut self, full: &str, issue: &Issue) -> Value {
        let pull = issue.pull.clone().expect("a pull request");
        let api = format!("{}/repos/{full}", self.public_url);
        let html = format!("https://github.com/{full}/pull/{}", issue.number);
        let n = issue.number;
        let user = self.user_json(&issue.user);
        let labels = self.labels_json(full, &issue.labels);
        let repo = self.repo_json(full);
        let owner = self.user_json(&User::person(&self.repos[full].owner.clone()));
        let branch = |label: &str, r#ref: &str| json!({"label": label, "ref": r#ref, "sha": fake_sha(r#ref), "user": owner, "repo": repo});
        let head = branch(&pull.head_label, &pull.head_ref);
        let base = branch(
            &format!("{}:{}", self.repos[full].owner, pull.base_ref),
            &pull.base_ref,
        );
        let closed = issue.state == "closed";
        let href = |h: String| json!({"href": h});
        json!({
            "url": format!("{api}/pulls/{n}"), "id": pull.id, "node_id": format!("PR_fake{}", pull.id),
            "html_url": html, "diff_url": format!("{html}.diff"), "patch_url": format!("{html}.patch"),
            "issue_url": format!("{api}/issues/{n}"),
            "commits_url": format!("{api}/pulls/{n}/commits"),
            "review_comments_url": format!("{api}/pulls/{n}/comments"),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{api}/issues/{n}/comments"),
            "statuses_url": format!("{api}/statuses/{}", fake_sha(&pull.head_ref)),
            "number": n, "state": issue.state, "locked": false, "title": issue.title,
            "user": user, "body": issue.body, "labels": labels, "milestone": null,
            "active_lock_reason": null,
            "created_at": rfc3339(issue.created_at), "updated_at": rfc3339(issue.updated_at),
            "closed_at": if closed { json!(rfc3339(issue.updated_at)) } else { Value::Null },
            "merged_at": null, "merge_commit_sha": null, "assignee": null, "assignees": [],
            "requested_reviewers": [], "requested_teams": [], "head": head, "base": base,
            "_links": {
                "self": href(format!("{api}/pulls/{n}")), "html": href(html.clone()),
                "issue": href(format!("{api}/issues/{n}")),
                "comments": href(format!("{api}/issues/{n}/comments")),
                "review_comments": href(format!("{api}/pulls/{n}/comments")),
                "review_comment": href(format!("{api}/pulls/comments{{/number}}")),
                "commits": href(format!("{api}/pulls/{n}/commits")),
                "statuses": href(format!("{api}/statuses/{}", fake_sha(&pull.head_ref))),
            },
            "author_association": issue.author_association, "auto_merge": null,
            "draft": pull.draft, "merged": false, "mergeable": null, "rebaseable": null,
            "mergeable_state": "unknown", "merged_by": null, "comments": issue.n_comments,
            "review_comments": 0, "maintainer_can_modify": false, "commits": 1,
            "additions": 1, "deletions": 0, "changed_files": 1,
        })
    }
}

fn apply_edit(issue: &mut Issue, body: &Value) {
    if let Some(title) = body["title"].as_str() {
        title.clone_into(&mut issue.title);
    }
    if let Some(text) = body.get("body") {
        issue.body = text.as_str().map(str::to_owned);
    }
    if let Some(state) = body["state"]
        .as_str()
        .filter(|s| ["open", "closed"].contains(s))
    {
        state.clone_into(&mut issue.state);
    }
    issue.updated_at = now();
}

fn with_link(reply: Reply, link: Option<String>) -> Reply {
    match link {
        Some(link) => reply.header("link", link),
        None => reply,
    }
}

fn comment_api_url(public_url: &str, full: &str, id: u64) -> String {
    format!("{public_url}/repos/{full}/issues/comments/{id}")
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A stable 40-hex "commit" for a branch name.
fn fake_sha(name: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(name.as_bytes())[..20])
}

#[allow(clippy::disallowed_methods)]
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (UTC), as GitHub writes times.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}
