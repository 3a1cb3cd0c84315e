//! Git work, and the only agent module that calls git2.
//!
//! Each repository is fetched into a bare mirror under `mirrors/` (keyed by
//! its URL), so a second task on the same repository downloads only what is
//! new; each attempt then gets its own clone of the mirror under `work/`,
//! never shared, with `origin` pointing at the real remote for the push.
//! All functions block: the driver calls them on the blocking pool.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::ids::{Attempt, TaskId};
use common::types::{PushCredential, TaskSpec};
use git2::{
    BranchType, Cred, CredentialType, FetchOptions, IndexAddOption, PushOptions, RemoteCallbacks,
    Repository, Signature, build::RepoBuilder,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {}", source.message())]
    Git { what: String, source: git2::Error },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("repository {url} does not exist: {why}")]
    RepoNotFound { url: String, why: String },
    #[error("{url} is not a repository URL the agent can use: {why}")]
    InvalidUrl { url: String, why: String },
    #[error("base branch {branch} does not exist in {url}")]
    NoBaseBranch { url: String, branch: String },
    #[error("branch {branch} does not exist in {url} (the follow-up continues it)")]
    NoFollowUpBranch { url: String, branch: String },
    #[error("{url} refused the credentials: {why}")]
    AuthRefused { url: String, why: String },
    #[error("the SSH host key of {host} cannot be trusted: {why}")]
    HostKey { host: String, why: String },
    #[error("{0:?} is not a valid branch name")]
    InvalidBranch(String),
    #[error("git work stopped unexpectedly: {0}")]
    Interrupted(String),
    #[error("the remote rejected the push of {branch}: {reason}")]
    PushRejected { branch: String, reason: String },
}

impl Error {
    pub fn is_push_rejected(&self) -> bool {
        matches!(self, Self::PushRejected { .. })
    }

    /// The same attempt would fail the same way again: a repository or
    /// branch that does not exist, an invalid URL or branch name, refused
    /// credentials, an untrusted host key. Network failures, timeouts,
    /// server errors and local I/O are worth another attempt.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::RepoNotFound { .. }
                | Self::InvalidUrl { .. }
                | Self::NoBaseBranch { .. }
                | Self::NoFollowUpBranch { .. }
                | Self::AuthRefused { .. }
                | Self::HostKey { .. }
                | Self::InvalidBranch(_)
        )
    }
}

/// How SSH remotes are authenticated and their servers recognised.
#[derive(Clone, Debug, Default)]
pub struct SshConfig {
    /// A private key, tried after the ssh-agent (`SSH_AUTH_SOCK`).
    pub key: Option<PathBuf>,
    /// Host keys that are trusted; without a file no SSH server is.
    pub known_hosts: Option<PathBuf>,
}

/// What the callbacks of one transfer found wrong, to name it in the error
/// (libgit2 reports a failed callback only as a generic error).
#[derive(Default)]
struct Problems {
    host_key: RefCell<Option<(String, String)>>,
    credentials: RefCell<Option<String>>,
}

/// A failed connect, fetch or push to `url`, classified: what is permanent
/// (the repository, the URL, the credentials, the host key) is named as
/// such; the rest stays a git error, worth another attempt.
fn remote_error(url: &str, what: String, source: git2::Error, problems: &Problems) -> Error {
    use git2::{ErrorClass, ErrorCode};
    if let Some((host, why)) = problems.host_key.borrow_mut().take() {
        return Error::HostKey { host, why };
    }
    if let Some(why) = problems.credentials.borrow_mut().take() {
        return Error::AuthRefused {
            url: url.to_owned(),
            why,
        };
    }
    let message = source.message().to_owned();
    let lower = message.to_ascii_lowercase();
    if source.code() == ErrorCode::Auth
        || lower.contains("authentication")
        || lower.contains("status code: 401")
        || lower.contains("status code: 403")
    {
        return Error::AuthRefused {
            url: url.to_owned(),
            why: message,
        };
    }
    if lower.contains("unsupported url protocol") || lower.contains("invalid url") {
        return Error::InvalidUrl {
            url: url.to_owned(),
            why: message,
        };
    }
    let not_found = [
        "status code: 404",
        "not found",
        "does not appear to be a git repository",
        "not exported",
        "no such file or directory",
        "could not find repository",
    ];
    if matches!(
        source.class(),
        ErrorClass::Net | ErrorClass::Http | ErrorClass::Ssh | ErrorClass::Repository
    ) && not_found.iter().any(|n| lower.contains(n))
    {
        return Error::RepoNotFound {
            url: url.to_owned(),
            why: message,
        };
    }
    Error::Git { what, source }
}

/// Refuses, before any network work, a URL that cannot name a repository: a
/// local path that does not exist (libgit2 would call it an unsupported URL
/// protocol), an unknown scheme.
fn check_url(url: &str) -> Result<(), Error> {
    let invalid = |why: &str| Error::InvalidUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    if url.trim().is_empty() {
        return Err(invalid("it is empty"));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return local_repo(url, Path::new(path));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        if !matches!(
            scheme,
            "https" | "http" | "ssh" | "git" | "git+ssh" | "ssh+git"
        ) {
            return Err(invalid(&format!(
                "unknown scheme {scheme} (https, ssh, git or a path)"
            )));
        }
        return Ok(());
    }
    if ssh_host(url).is_some() {
        return Ok(());
    }
    // Anything else is a path on this PC (relative: to the agent's
    // working directory, as git takes it).
    local_repo(url, Path::new(url))
}

fn local_repo(url: &str, path: &Path) -> Result<(), Error> {
    if path.exists() {
        Ok(())
    } else {
        Err(Error::RepoNotFound {
            url: url.to_owned(),
            why: "no such path on this PC".into(),
        })
    }
}

/// The host and port of an SSH remote: `ssh://[user@]host[:port]/path` or
/// the scp-like `[user@]host:path`.
fn ssh_host(url: &str) -> Option<(String, u16)> {
    let rest = ["ssh://", "git+ssh://", "ssh+git://"]
        .iter()
        .find_map(|p| url.strip_prefix(p));
    if let Some(rest) = rest {
        let authority = rest.split('/').next()?;
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = after.strip_prefix(':').map(str::parse).transpose().ok()?;
            (host.to_owned(), port)
        } else {
            match host_port.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port.parse().ok()?)),
                None => (host_port.to_owned(), None),
            }
        };
        return (!host.is_empty()).then_some((host, port.unwrap_or(22)));
    }
    if url.contains("://") {
        return None;
    }
    // scp-like: a colon before any slash.
    let (authority, path) = url.split_once(':')?;
    if authority.contains('/') || path.is_empty() {
        return None;
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| (host.to_owned(), 22))
}

/// Checks an SSH server's host key against a known_hosts file (plain and
/// hashed `|1|` entries, `*`/`?` patterns, `!` negations, `@revoked`).
/// `Err` says why the key is not trusted.
pub fn check_host_key(
    known_hosts: Option<&Path>,
    host: &str,
    port: u16,
    key_type: &str,
    key: &[u8],
) -> Result<(), String> {
    let Some(file) = known_hosts else {
        return Err("no known_hosts file is configured ([git] known_hosts)".into());
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read known_hosts {}: {e}", file.display()))?;
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut same_type_differs = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        if first.starts_with('#') {
            continue;
        }
        let marker = first.strip_prefix('@');
        if marker.is_some() {
            let Some(next) = fields.next() else { continue };
            first = next;
        }
        let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(first, &name) {
            continue;
        }
        let Ok(blob) = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, blob)
        else {
            continue;
        };
        match marker {
            Some("revoked") if blob == key => {
                return Err(format!(
                    "its {key_type} key is marked revoked in {}",
                    file.display()
                ));
            }
            Some(_) => {}
            None if blob == key => return Ok(()),
            None if kind == key_type => same_type_differs = true,
            None => {}
        }
    }
    if same_type_differs {
        Err(format!(
            "its {key_type} key is not the one {} has for {name}: the key CHANGED (a new server, or someone in between)",
            file.display()
        ))
    } else {
        Err(format!(
            "{name} is not in {} (no {key_type} key); add it, e.g. with ssh-keyscan, after checking its fingerprint",
            file.display()
        ))
    }
}

/// Whether a known_hosts host field (comma-separated patterns, or one
/// hashed entry) names `name`.
fn hosts_match(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        use hmac::Mac;
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        let engine = base64::engine::general_purpose::STANDARD;
        let (Ok(salt), Ok(hash)) = (
            base64::Engine::decode(&engine, salt),
            base64::Engine::decode(&engine, hash),
        ) else {
            return false;
        };
        let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
            return false;
        };
        mac.update(name.as_bytes());
        return mac.verify_slice(&hash).is_ok();
    }
    let mut matched = false;
    for pattern in field.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated, name) {
                return false;
            }
        } else if glob(pattern, name) {
            matched = true;
        }
    }
    matched
}

/// `*` and `?` patterns, as in known_hosts (case-insensitive).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (
        pattern.to_ascii_lowercase().chars().collect(),
        name.to_ascii_lowercase().chars().collect(),
    );
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Bounds libgit2's network waits (connecting, then each read or write), so
/// a stalled fetch or push fails instead of holding its attempt (and its
/// repository's mirror lock) forever. Call it once at start, before any
/// other thread exists.
#[allow(unsafe_code)]
pub fn set_network_timeout(timeout: Duration) -> Result<(), Error> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: these set libgit2 globals without synchronization; the agent
    // calls this from `main` before it starts a runtime or any thread.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(ms)
            .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(ms))
            .map_err(git("set the git network timeout"))
    }
}

/// Runs git work on the blocking pool (git2 blocks), as an async step, in
/// the caller's span (its log lines keep the task id and attempt).
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .unwrap_or_else(|join| Err(Error::Interrupted(join.to_string())))
}

fn git(what: impl Into<String>) -> impl FnOnce(git2::Error) -> Error {
    let what = what.into();
    move |source| Error::Git { what, source }
}

/// Who commits.
#[derive(Clone, Debug)]
pub struct Author {
    pub name: String,
    pub email: String,
}

/// A prepared attempt directory.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub dir: PathBuf,
    pub branch: String,
    pub base_branch: String,
    /// True when the mirror already existed (no full download).
    pub mirror_reused: bool,
}

#[derive(Clone, Debug)]
pub struct Workspaces {
    root: PathBuf,
    /// One lock per mirror: attempts on the same repository take turns to
    /// fetch and clone it, attempts on different ones do not wait.
    mirror_locks: Arc<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>>,
    /// Attempt directories in use: the sweep of old failed workspaces
    /// never touches them, however long an attempt runs.
    in_use: Arc<Mutex<HashSet<PathBuf>>>,
    ssh: Arc<SshConfig>,
}

/// An attempt directory marked as in use until this is dropped.
pub struct InUse {
    dir: PathBuf,
    in_use: Arc<Mutex<HashSet<PathBuf>>>,
}

impl InUse {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        lock(&self.in_use).remove(&self.dir);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Workspaces {
    pub fn new(data_dir: &Path, ssh: SshConfig) -> Self {
        Self {
            root: data_dir.to_owned(),
            mirror_locks: Arc::default(),
            in_use: Arc::default(),
            ssh: Arc::new(ssh),
        }
    }

    /// Marks the attempt's directory as in use while the result lives.
    pub fn claim(&self, task: TaskId, attempt: Attempt) -> InUse {
        let dir = self.dir(task, attempt);
        lock(&self.in_use).insert(dir.clone());
        InUse {
            dir,
            in_use: Arc::clone(&self.in_use),
        }
    }

    fn mirror_lock(&self, mirror: &Path) -> Arc<Mutex<()>> {
        Arc::clone(
            lock(&self.mirror_locks)
                .entry(mirror.to_owned())
                .or_default(),
        )
    }

    /// The attempt's own directory.
    pub fn dir(&self, task: TaskId, attempt: Attempt) -> PathBuf {
        self.root
            .join("work")
            .join(format!("{task}-a{}", attempt.0))
    }

    fn mirror_path(&self, url: &str) -> PathBuf {
        let readable: String = url
            .rsplit(['/', ':'])
            .find(|s| !s.is_empty())
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(40)
            .collect();
        // FNV-1a: a stable key per URL without another dependency.
        let hash = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.root
            .join("mirrors")
            .join(format!("{readable}-{hash:016x}.git"))
    }

    /// Updates the repository's mirror and makes the attempt's clone on the
    /// branch to work on: a new `spec.branch` from the base branch (default:
    /// the remote's HEAD), or for a follow-up the existing `spec.branch`.
    pub fn prepare(
        &self,
        task: TaskId,
        attempt: Attempt,
        spec: &TaskSpec,
        credential: Option<&PushCredential>,
        stop: &CancellationToken,
    ) -> Result<Prepared, Error> {
        check_url(&spec.repo_url)?;
        // Names from the task end up in refspecs: only valid branch names.
        if !spec.base_branch.is_empty() {
            check_branch(&spec.base_branch)?;
        }
        check_branch(&spec.branch)?;
        let mirror_path = self.mirror_path(&spec.repo_url);
        let lock = self.mirror_lock(&mirror_path);
        let _turn = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mirror_reused = mirror_path.exists();
        let mirror = if mirror_reused {
            Repository::open_bare(&mirror_path).map_err(git("open mirror"))?
        } else {
            // Made aside and renamed into place: a crash never leaves half a mirror.
            let fresh = mirror_path.with_extension("new");
            let _ = std::fs::remove_dir_all(&fresh);
            std::fs::create_dir_all(&fresh).map_err(|source| Error::Io {
                what: "cannot create mirror",
                path: fresh.clone(),
                source,
            })?;
            let repo = Repository::init_bare(&fresh).map_err(git("create mirror"))?;
            // Records where the mirror comes from, for a person looking at
            // it; fetches and pushes go through anonymous remotes.
            repo.remote("origin", &spec.repo_url)
                .map_err(git("configure mirror"))?;
            drop(repo);
            std::fs::rename(&fresh, &mirror_path).map_err(|source| Error::Io {
                what: "cannot create mirror",
                path: mirror_path.clone(),
                source,
            })?;
            Repository::open_bare(&mirror_path).map_err(git("open mirror"))?
        };
        // Only what the attempt needs is fetched: the base branch (and the
        // branch a follow-up continues) and tags, not every branch of the
        // remote; through an anonymous remote, so no remote-tracking refs
        // are written. A busy repository has thousands of branches, and
        // each would be a file to write in the mirror and in every clone.
        let url = spec.repo_url.as_str();
        let mut remote = mirror
            .remote_anonymous(url)
            .map_err(|e| remote_error(url, "mirror remote".into(), e, &Problems::default()))?;
        let problems = Problems::default();
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks(credential, &self.ssh, url, stop, &problems));
        // A branch gone from the remote goes from the mirror too.
        options.prune(git2::FetchPrune::On);
        let fetch = |remote: &mut git2::Remote<'_>,
                     base_branch: &str,
                     options: &mut FetchOptions<'_>|
         -> Result<usize, Error> {
            check_branch(base_branch)?;
            let mut refspecs = vec![
                format!("+refs/heads/{base_branch}:refs/heads/{base_branch}"),
                "+refs/tags/*:refs/tags/*".to_owned(),
            ];
            if spec.follow_up {
                refspecs.push(format!("+refs/heads/{0}:refs/heads/{0}", spec.branch));
            }
            remote
                .fetch(&refspecs, Some(options), None)
                .map_err(|e| remote_error(url, format!("fetch {url}"), e, &problems))?;
            Ok(remote.stats().received_objects())
        };
        let (head_branch, base_branch, received_objects) = if spec.base_branch.is_empty() {
            // The remote's HEAD names the default branch; the fetch goes
            // through the same connection (one connection to the remote,
            // not two: over git:// or SSH each is a server process).
            let mut connection = remote
                .connect_auth(
                    git2::Direction::Fetch,
                    Some(callbacks(credential, &self.ssh, url, stop, &problems)),
                    None,
                )
                .map_err(|e| remote_error(url, format!("connect to {url}"), e, &problems))?;
            let head_branch = connection
                .default_branch()
                .ok()
                .and_then(|b| b.as_str().ok().map(str::to_owned));
            let base_branch = head_branch
                .as_deref()
                .and_then(|r| r.strip_prefix("refs/heads/"))
                .map_or_else(|| "main".to_owned(), str::to_owned);
            let received = fetch(connection.remote(), &base_branch, &mut options)?;
            (head_branch, base_branch, received)
        } else {
            let received = fetch(&mut remote, &spec.base_branch, &mut options)?;
            (None, spec.base_branch.clone(), received)
        };
        info!(
            task_id = %task,
            repo = %spec.repo_url,
            mirror_reused,
            received_objects,
            "mirror updated"
        );
        drop(remote);
        if let Some(head) = &head_branch {
            let _ = mirror.set_head(head);
        }

        let dir = self.dir(task, attempt);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| Error::Io {
                what: "cannot clear workspace",
                path: dir.clone(),
                source,
            })?;
        }
        std::fs::create_dir_all(dir.parent().unwrap_or(&self.root)).map_err(|source| {
            Error::Io {
                what: "cannot create workspace",
                path: dir.clone(),
                source,
            }
        })?;
        let checkout_branch = if spec.follow_up {
            &spec.branch
        } else {
            &base_branch
        };
        if mirror
            .find_branch(checkout_branch, BranchType::Local)
            .is_err()
        {
            return Err(if spec.follow_up {
                Error::NoFollowUpBranch {
                    url: url.to_owned(),
                    branch: spec.branch.clone(),
                }
            } else {
                Error::NoBaseBranch {
                    url: url.to_owned(),
                    branch: base_branch.clone(),
                }
            });
        }
        let mirror_url = mirror_path.to_string_lossy().into_owned();
        // A single-branch clone: one remote-tracking ref, not one per branch.
        // (A follow-up also gets the base branch, to compare against.)
        let tracked = |branch: &str| format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        let repo = RepoBuilder::new()
            .branch(checkout_branch)
            .remote_create(|repo, name, url| {
                let remote = repo.remote_with_fetch(name, url, &tracked(checkout_branch))?;
                if checkout_branch != &base_branch {
                    repo.remote_add_fetch(name, &tracked(&base_branch))?;
                    return repo.find_remote(name);
                }
                Ok(remote)
            })
            .clone(&mirror_url, &dir)
            .map_err(git("clone the mirror"))?;
        repo.remote_set_url("origin", &spec.repo_url)
            .map_err(git("point origin at the remote"))?;
        // The CLI's own files never belong in the commit.
        let exclude = dir.join(".git").join("info").join("exclude");
        write_exclude(&exclude)?;
        if !spec.follow_up {
            let head = repo
                .head()
                .and_then(|h| h.peel_to_commit())
                .map_err(git("read the base commit"))?;
            repo.branch(&spec.branch, &head, true)
                .map_err(git(format!("create branch {}", spec.branch)))?;
            repo.set_head(&format!("refs/heads/{}", spec.branch))
                .map_err(git("switch to the branch"))?;
        }
        debug!(task_id = %task, dir = %dir.display(), branch = %spec.branch, "workspace ready");
        Ok(Prepared {
            dir,
            branch: spec.branch.clone(),
            base_branch,
            mirror_reused,
        })
    }

    /// Whether anything changed since the branch's last commit.
    pub fn has_changes(dir: &Path) -> Result<bool, Error> {
        let repo = Repository::open(dir).map_err(git("open workspace"))?;
        let mut options = git2::StatusOptions::new();
        options.include_untracked(true).recurse_untracked_dirs(true);
        let statuses = repo
            .statuses(Some(&mut options))
            .map_err(git("read status"))?;
        Ok(!statuses.is_empty())
    }

    /// Commits every change (new, modified, deleted; .gitignore respected).
    /// `None` when there was nothing to commit.
    pub fn commit_all(dir: &Path, message: &str, author: &Author) -> Result<Option<String>, Error> {
        let repo = Repository::open(dir).map_err(git("open workspace"))?;
        let mut index = repo.index().map_err(git("read index"))?;
        index
            .add_all(["*"], IndexAddOption::DEFAULT, None)
            .map_err(git("stage changes"))?;
        index
            .update_all(["*"], None)
            .map_err(git("stage deletions"))?;
        index.write().map_err(git("write index"))?;
        let tree_id = index.write_tree().map_err(git("write tree"))?;
        let parent = repo
            .head()
            .and_then(|h| h.peel_to_commit())
            .map_err(git("read HEAD"))?;
        if parent.tree_id() == tree_id {
            return Ok(None);
        }
        let tree = repo.find_tree(tree_id).map_err(git("find tree"))?;
        let signature =
            Signature::now(&author.name, &author.email).map_err(git("author signature"))?;
        let id = repo
            .commit(
                Some("HEAD"),
                &signature,
                &signature,
                message,
                &tree,
                &[&parent],
            )
            .map_err(git("commit"))?;
        Ok(Some(id.to_string()))
    }

    /// Pushes the workspace's `branch` to the repository at `url`. A fresh
    /// branch is force-pushed (each attempt starts again from the base); a
    /// follow-up must fast-forward.
    ///
    /// The push goes out from the mirror, never from the workspace: the CLI
    /// may have edited the workspace's `.git/config` (a `pushurl`, an
    /// `insteadOf`, a proxy), and the credential must only ever reach `url`.
    /// The commit is first copied into the mirror under a private ref by a
    /// local fetch, which reads the workspace's objects but not its config.
    pub fn push(
        &self,
        dir: &Path,
        url: &str,
        branch: &str,
        force: bool,
        credential: Option<&PushCredential>,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let mirror_path = self.mirror_path(url);
        let staging = format!(
            "refs/ccc/push/{}",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("attempt")
        );
        let mirror = {
            let lock = self.mirror_lock(&mirror_path);
            let _turn = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mirror = Repository::open_bare(&mirror_path).map_err(git("open mirror"))?;
            let workspace = dir.to_string_lossy();
            mirror
                .remote_anonymous(&workspace)
                .and_then(|mut local| {
                    // Tags the CLI made stay in the workspace.
                    let mut options = FetchOptions::new();
                    options.download_tags(git2::AutotagOption::None);
                    local.fetch(
                        &[format!("+refs/heads/{branch}:{staging}").as_str()],
                        Some(&mut options),
                        None,
                    )
                })
                .map_err(git(format!("take {branch} from the workspace")))?;
            mirror
        };
        // Outside the lock, so that a slow push does not hold up the next
        // attempt's fetch: the push reads the staging ref and objects, and
        // (through an anonymous remote, which has no fetch refspecs) writes
        // no ref of the mirror; the fetch never touches the staging ref.
        let pushed = push_ref(
            &mirror, url, &staging, branch, force, credential, &self.ssh, stop,
        );
        if let Ok(mut staged) = mirror.find_reference(&staging) {
            let _ = staged.delete();
        }
        pushed
    }

    /// Ends an attempt's use of its directory: removes it when the attempt
    /// succeeded, else keeps it (dated now) for `keep_failed_for` so that a
    /// person can look at it. Then sweeps kept directories older than that,
    /// sparing those in use by other attempts.
    pub fn finish(&self, attempt: InUse, succeeded: bool, keep_failed_for: Duration) {
        if succeeded {
            let _ = std::fs::remove_dir_all(attempt.dir());
        } else if let Err(e) = touch(attempt.dir()) {
            debug!(dir = %attempt.dir().display(), error = %e, "cannot date a kept workspace");
        }
        drop(attempt);
        self.sweep(keep_failed_for);
    }

    /// Removes kept attempt directories older than `keep_failed_for`.
    fn sweep(&self, keep_failed_for: Duration) {
        let Ok(entries) = std::fs::read_dir(self.root.join("work")) else {
            return;
        };
        #[allow(clippy::disallowed_methods)] // file ages are compared with the wall clock
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > keep_failed_for);
            if old && !lock(&self.in_use).contains(&path) {
                debug!(dir = %path.display(), "removing an old failed workspace");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Pushes the mirror's `staging` ref to `refs/heads/<branch>` at `url`.
#[allow(clippy::too_many_arguments)]
fn push_ref(
    repo: &Repository,
    url: &str,
    staging: &str,
    branch: &str,
    force: bool,
    credential: Option<&PushCredential>,
    ssh: &SshConfig,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let problems = Problems::default();
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|e| remote_error(url, "open the remote".into(), e, &problems))?;
    let rejected = std::cell::RefCell::new(None::<String>);
    // What the remote prints (hooks, branch protection) explains a refusal.
    let remote_said = std::cell::RefCell::new(String::new());
    let mut cbs = callbacks(credential, ssh, url, stop, &problems);
    cbs.push_update_reference(|refname, status| {
        if let Some(status) = status {
            *rejected.borrow_mut() = Some(format!("{refname}: {status}"));
        }
        Ok(())
    });
    cbs.sideband_progress(|data| {
        let mut said = remote_said.borrow_mut();
        if said.len() < 4096 {
            said.push_str(&String::from_utf8_lossy(data));
        }
        true
    });
    let mut options = PushOptions::new();
    options.remote_callbacks(cbs);
    let refspec = format!(
        "{}{staging}:refs/heads/{branch}",
        if force { "+" } else { "" }
    );
    let pushed = remote.push(&[refspec.as_str()], Some(&mut options));
    drop(options);
    let said = remote_said.into_inner();
    let said = said.trim();
    if let Some(mut reason) = rejected.into_inner() {
        if !said.is_empty() {
            reason = format!("{reason} (remote: {said})");
        }
        return Err(Error::PushRejected {
            branch: branch.to_owned(),
            reason,
        });
    }
    pushed.map_err(|source| {
        if matches!(source.code(), git2::ErrorCode::NotFastForward) {
            Error::PushRejected {
                branch: branch.to_owned(),
                reason: source.message().to_owned(),
            }
        } else {
            remote_error(url, format!("push {branch}"), source, &problems)
        }
    })
}

/// Keeps the CLI's own files (`.claude/`) out of every commit. A workspace
/// without it would commit them: failing to write it fails the attempt.
fn write_exclude(exclude: &Path) -> Result<(), Error> {
    let io = |source| Error::Io {
        what: "cannot write the exclude file",
        path: exclude.to_owned(),
        source,
    };
    if let Some(dir) = exclude.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(exclude, ".claude/\n").map_err(io)
}

/// A name that can be a branch: the cluster's one rule
/// (`common::repo::check_branch`, which the coordinator applies at submit),
/// so nothing that would change the meaning of a refspec it is put into
/// (`:`, `*`, spaces, `..`, ...).
fn check_branch(name: &str) -> Result<(), Error> {
    common::repo::check_branch(name).map_err(|e| Error::InvalidBranch(e.0))
}

/// Sets a directory's modification time to now: a kept workspace's age
/// counts from the end of its attempt.
fn touch(dir: &Path) -> std::io::Result<()> {
    #[allow(clippy::disallowed_methods)] // a file time is wall-clock time
    let now = SystemTime::now();
    std::fs::File::open(dir)?.set_modified(now)
}

/// Callbacks for fetch and push: credentials, the SSH host key check, and
/// cancellation. Credentials: the assignment's token over HTTPS when there
/// is one, else the PC's own (SSH: the ssh-agent, then the configured key
/// file; HTTPS: git's credential helper). Each kind is tried once, so a
/// wrong credential fails instead of looping; what was tried is kept in
/// `problems` to name it in the error.
fn callbacks<'a>(
    credential: Option<&'a PushCredential>,
    ssh: &'a SshConfig,
    url: &'a str,
    stop: &'a CancellationToken,
    problems: &'a Problems,
) -> RemoteCallbacks<'a> {
    let mut cbs = RemoteCallbacks::new();
    // A cancelled attempt stops its transfer at the next progress report.
    cbs.transfer_progress(move |_| !stop.is_cancelled());
    cbs.push_negotiation(move |_| {
        if stop.is_cancelled() {
            Err(git2::Error::from_str("cancelled"))
        } else {
            Ok(())
        }
    });
    cbs.certificate_check(move |cert, host| {
        // TLS certificates: libgit2's own verification decides.
        let Some(hostkey) = cert.as_hostkey() else {
            return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
        };
        let (host, port) = ssh_host(url).unwrap_or_else(|| (host.to_owned(), 22));
        let verdict = match (hostkey.hostkey(), hostkey.hostkey_type()) {
            (Some(key), Some(kind)) => {
                check_host_key(ssh.known_hosts.as_deref(), &host, port, kind.name(), key)
            }
            _ => Err("the server's raw host key is not available to check".into()),
        };
        match verdict {
            Ok(()) => Ok(git2::CertificateCheckStatus::CertificateOk),
            Err(why) => {
                *problems.host_key.borrow_mut() = Some((host, why.clone()));
                Err(git2::Error::from_str(&why))
            }
        }
    });
    let mut tried: Vec<&'static str> = Vec::new();
    cbs.credentials(move |url, username, allowed| {
        let user = username.unwrap_or("git");
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(user);
        }
        if let Some(c) = credential
            && allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
            && !tried.contains(&"the task's token")
        {
            tried.push("the task's token");
            let user = if c.username.is_empty() {
                "x-access-token"
            } else {
                &c.username
            };
            return Cred::userpass_plaintext(user, c.token.expose());
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if std::env::var_os("SSH_AUTH_SOCK").is_some() && !tried.contains(&"the ssh-agent") {
                tried.push("the ssh-agent");
                return Cred::ssh_key_from_agent(user);
            }
            if let Some(key) = &ssh.key
                && !tried.contains(&"the key file")
            {
                tried.push("the key file");
                return Cred::ssh_key(user, None, key, None);
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
            && !tried.contains(&"git's credential helper")
        {
            tried.push("git's credential helper");
            // A helper with nothing for this URL falls through: no
            // credential left, said as such.
            if let Ok(cred) = git2::Config::open_default()
                .and_then(|config| Cred::credential_helper(&config, url, username))
            {
                return Ok(cred);
            }
        }
        let why = if tried.is_empty() {
            if allowed.contains(CredentialType::SSH_KEY) {
                "no SSH key to offer (no ssh-agent in SSH_AUTH_SOCK, no [git] ssh_key)".to_owned()
            } else {
                "no credential for it (no token in the task, no credential helper)".to_owned()
            }
        } else {
            let mut why = format!("tried {}", tried.join(", "));
            if let Some(key) = ssh.key.as_ref().filter(|_| tried.contains(&"the key file")) {
                why.push_str(&format!(" ({})", key.display()));
            }
            if allowed.contains(CredentialType::SSH_KEY) {
                why.push_str(&format!(" as user {user}"));
            }
            why
        };
        *problems.credentials.borrow_mut() = Some(why.clone());
        Err(git2::Error::from_str(&why))
    });
    cbs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ccc-ws-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("work")).expect("scratch dir");
        dir
    }

    fn attempt_dir(ws: &Workspaces, task: u64, age: Duration) -> PathBuf {
        let dir = ws.dir(TaskId(task), Attempt(1));
        std::fs::create_dir_all(dir.join("src")).expect("attempt dir");
        #[allow(clippy::disallowed_methods)]
        let then = SystemTime::now() - age;
        std::fs::File::open(&dir)
            .and_then(|f| f.set_modified(then))
            .expect("date the dir");
        dir
    }

    #[test]
    fn ssh_remotes_name_their_host_and_port() {
        assert_eq!(
            ssh_host("git@github.com:owner/repo.git"),
            Some(("github.com".into(), 22))
        );
        assert_eq!(
            ssh_host("ssh://git@127.0.0.1:2222/srv/repo.git"),
            Some(("127.0.0.1".into(), 2222))
        );
        assert_eq!(
            ssh_host("ssh://[::1]:2200/r.git"),
            Some(("::1".into(), 2200))
        );
        assert_eq!(ssh_host("ssh://host/r.git"), Some(("host".into(), 22)));
        assert_eq!(ssh_host("https://github.com/o/r.git"), None);
        assert_eq!(ssh_host("/srv/repo.git"), None);
        assert_eq!(ssh_host("dir/with:colon"), None);
    }

    #[test]
    fn urls_that_cannot_name_a_repository_are_refused_before_any_network_work() {
        let missing = check_url("/no/such/repository.git").expect_err("fails");
        assert!(missing.is_permanent());
        assert_eq!(
            missing.to_string(),
            "repository /no/such/repository.git does not exist: no such path on this PC"
        );
        assert!(
            check_url("file:///no/such/repo.git")
                .expect_err("fails")
                .is_permanent()
        );
        let scheme = check_url("ftp://host/r.git").expect_err("fails");
        assert!(
            scheme.is_permanent() && scheme.to_string().contains("ftp"),
            "{scheme}"
        );
        let path = check_url("not/a repository").expect_err("fails");
        assert!(
            path.is_permanent() && path.to_string().contains("no such path"),
            "{path}"
        );
        assert!(check_url("").is_err());
        for good in [
            "https://github.com/o/r.git",
            "git@github.com:o/r.git",
            "ssh://git@host:2222/r.git",
            "git://127.0.0.1:9418/r.git",
            "/",
            ".",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn host_keys_are_checked_against_known_hosts_plain_hashed_and_patterns() {
        use base64::Engine;
        use hmac::Mac;
        let engine = base64::engine::general_purpose::STANDARD;
        let dir = scratch("known-hosts");
        let file = dir.join("known_hosts");
        let (key, other) = (b"the-real-key".to_vec(), b"another-key".to_vec());
        let (k, o) = (engine.encode(&key), engine.encode(&other));
        let salt = b"0123456789abcdefghij";
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).expect("hmac");
        mac.update(b"[hashed.example]:2222");
        let hashed = format!(
            "|1|{}|{}",
            engine.encode(salt),
            engine.encode(mac.finalize().into_bytes())
        );
        std::fs::write(
            &file,
            format!(
                "# a comment\n\
                 [127.0.0.1]:2222 ssh-ed25519 {k}\n\
                 plain.example,alias.example ssh-ed25519 {k}\n\
                 {hashed} ssh-ed25519 {k}\n\
                 *.lab.example,!evil.lab.example ssh-ed25519 {k}\n\
                 changed.example ssh-ed25519 {o}\n\
                 @revoked revoked.example ssh-ed25519 {k}\n\
                 revoked.example ssh-ed25519 {k}\n"
            ),
        )
        .expect("write known_hosts");
        let check = |host: &str, port: u16, key: &[u8]| {
            check_host_key(Some(&file), host, port, "ssh-ed25519", key)
        };
        assert_eq!(check("127.0.0.1", 2222, &key), Ok(()));
        assert!(
            check("127.0.0.1", 22, &key).is_err(),
            "the port is part of the name"
        );
        assert_eq!(check("alias.example", 22, &key), Ok(()));
        assert_eq!(check("hashed.example", 2222, &key), Ok(()));
        assert!(check("hashed.example", 22, &key).is_err());
        assert_eq!(check("pc7.lab.example", 22, &key), Ok(()));
        assert!(check("evil.lab.example", 22, &key).is_err(), "negated");
        let changed = check("changed.example", 22, &key).expect_err("fails");
        assert!(changed.contains("CHANGED"), "{changed}");
        let unknown = check("127.0.0.1", 2222, &other).expect_err("fails");
        assert!(unknown.contains("CHANGED"), "{unknown}");
        let stranger = check("stranger.example", 22, &key).expect_err("fails");
        assert!(stranger.contains("is not in"), "{stranger}");
        assert!(
            check("revoked.example", 22, &key)
                .expect_err("fails")
                .contains("revoked")
        );
        let none = check_host_key(None, "h", 22, "ssh-ed25519", &key).expect_err("fails");
        assert!(none.contains("known_hosts"), "{none}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_workspace_whose_exclude_file_cannot_be_written_fails() {
        let dir = scratch("exclude");
        let exclude = dir.join("info").join("exclude");
        write_exclude(&exclude).expect("written");
        assert_eq!(
            std::fs::read_to_string(&exclude).expect("read"),
            ".claude/\n"
        );
        // `info` is a file: the exclude file cannot be made.
        let blocked = dir.join("blocked");
        std::fs::write(&blocked, "a file").expect("file");
        let err = write_exclude(&blocked.join("exclude")).expect_err("fails");
        assert!(err.to_string().contains("exclude"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A repository with one commit on `main`, made with libgit2.
    fn origin(dir: &Path) -> String {
        let repo = Repository::init(dir).expect("init");
        repo.set_head("refs/heads/main").expect("head");
        std::fs::write(dir.join("a.txt"), "a\n").expect("file");
        let mut index = repo.index().expect("index");
        index.add_path(Path::new("a.txt")).expect("add");
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let who = Signature::now("t", "t@localhost").expect("signature");
        repo.commit(Some("HEAD"), &who, &who, "initial", &tree, &[])
            .expect("commit");
        dir.display().to_string()
    }

    fn spec(url: &str, base: &str, branch: &str, follow_up: bool) -> TaskSpec {
        TaskSpec {
            repo_url: url.to_owned(),
            base_branch: base.to_owned(),
            issue_number: 0,
            title: "t".into(),
            body: String::new(),
            issue_url: String::new(),
            author: String::new(),
            labels: vec![],
            specialty: common::types::Specialty::General,
            technologies: vec![],
            branch: branch.to_owned(),
            follow_up,
            test_command: String::new(),
        }
    }

    #[test]
    fn what_another_attempt_would_meet_again_is_permanent_and_named() {
        let root = scratch("permanent");
        let url = origin(&root.join("origin"));
        let ws = Workspaces::new(&root.join("agent"), SshConfig::default());
        let stop = CancellationToken::new();
        let prepare =
            |n: u64, spec: TaskSpec| ws.prepare(TaskId(n), Attempt(1), &spec, None, &stop);
        prepare(1, spec(&url, "", "ccc/ok", false)).expect("a workspace");

        let base = prepare(2, spec(&url, "release-9", "ccc/b", false)).expect_err("no base");
        assert!(base.is_permanent());
        assert_eq!(
            base.to_string(),
            format!("base branch release-9 does not exist in {url}")
        );
        let follow = prepare(3, spec(&url, "", "ccc/gone", true)).expect_err("no branch");
        assert!(follow.is_permanent());
        assert!(
            follow
                .to_string()
                .contains("branch ccc/gone does not exist"),
            "{follow}"
        );
        let missing = root.join("nowhere.git").display().to_string();
        let path = prepare(4, spec(&missing, "", "ccc/p", false)).expect_err("no repo");
        assert!(
            path.is_permanent() && !path.to_string().contains("protocol"),
            "{path}"
        );
        let bad = prepare(5, spec(&url, "", "a..b", false)).expect_err("bad branch");
        assert!(bad.is_permanent());

        // Nothing listens there: a network failure, worth another attempt.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a port");
        let closed = format!("git://127.0.0.1:{port}/r.git");
        let refused = prepare(6, spec(&closed, "main", "ccc/n", false)).expect_err("refused");
        assert!(!refused.is_permanent(), "{refused}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn names_that_could_change_a_refspec_are_not_branches() {
        for bad in ["a:b", "*", "ma*in", "a b", "x..y", "", "a/", "@{u}", "a^b"] {
            assert!(check_branch(bad).is_err(), "{bad:?}");
        }
        for good in ["main", "release/2.0", "ccc/issue-7-add-a-greeting"] {
            assert!(check_branch(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn success_removes_failure_keeps_and_the_sweep_spares_attempts_in_use() {
        let root = scratch("finish");
        let ws = Workspaces::new(&root, SshConfig::default());
        let day = Duration::from_secs(86_400);
        let two_days = 2 * day;
        let old_failed = attempt_dir(&ws, 1, two_days);
        let old_running = attempt_dir(&ws, 2, two_days);
        let recent_failed = attempt_dir(&ws, 3, Duration::from_secs(60));
        let running = ws.claim(TaskId(2), Attempt(1));

        // A failed attempt that started two days ago counts from its end.
        let failing_dir = attempt_dir(&ws, 4, two_days);
        ws.finish(ws.claim(TaskId(4), Attempt(1)), false, day);
        assert!(failing_dir.exists(), "a just-failed workspace is kept");
        assert!(!old_failed.exists(), "an old failed workspace is swept");
        assert!(old_running.exists(), "a workspace in use is never swept");
        assert!(recent_failed.exists(), "a recent failed one is kept");

        let succeeding_dir = attempt_dir(&ws, 5, Duration::ZERO);
        ws.finish(ws.claim(TaskId(5), Attempt(1)), true, day);
        assert!(!succeeding_dir.exists(), "a succeeded workspace is removed");

        // Once its attempt ends, the old one is swept like any other.
        drop(running);
        ws.sweep(day);
        assert!(!old_running.exists());
        let _ = std::fs::remove_dir_all(root);
    }
}
