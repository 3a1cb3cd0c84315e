//! What a repository location and a branch name may be, checked where a task
//! enters the cluster so that a task that can never run is refused at once,
//! with the field named, instead of failing its attempts on an agent.

use std::fmt;

/// How a repository is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoLocation {
    /// `https://`, `http://`, `ssh://`, `git://` or `file://`.
    Url,
    /// `[user@]host:path`, as ssh and git write it (`git@github.com:o/r.git`).
    ScpLike,
    /// An absolute path on the agent's PC (a LAN mirror, a test repository).
    LocalPath,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRepo {
    #[error("is empty")]
    Empty,
    #[error("{0:?} contains white space or control characters")]
    Characters(String),
    #[error("{0:?} starts with '-'")]
    Option(String),
    #[error("{url:?} has an unsupported scheme {scheme:?} (use https, http, ssh, git or file)")]
    Scheme { url: String, scheme: String },
    #[error("{0:?} names no host")]
    NoHost(String),
    #[error("{0:?} names no repository path")]
    NoPath(String),
    #[error(
        "{0:?} is not a repository location: expected a URL (https://host/owner/repo.git, \
         ssh://git@host/owner/repo.git), git@host:owner/repo.git, or an absolute path"
    )]
    Unrecognised(String),
}

const SCHEMES: [&str; 5] = ["https", "http", "ssh", "git", "file"];

/// Checks that `url` can name a git repository, and says how it is reached.
pub fn check_repo_url(url: &str) -> Result<RepoLocation, InvalidRepo> {
    if url.is_empty() {
        return Err(InvalidRepo::Empty);
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidRepo::Characters(url.to_owned()));
    }
    if url.starts_with('-') {
        return Err(InvalidRepo::Option(url.to_owned()));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
            return Err(InvalidRepo::Scheme {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            });
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if scheme.eq_ignore_ascii_case("file") {
            // file:///path (empty authority) or file://localhost/path.
            if path.trim_matches('/').is_empty() {
                return Err(InvalidRepo::NoPath(url.to_owned()));
            }
            return Ok(RepoLocation::Url);
        }
        let host = authority.rsplit('@').next().unwrap_or_default();
        if host.is_empty() || host.starts_with(':') {
            return Err(InvalidRepo::NoHost(url.to_owned()));
        }
        if path.trim_matches('/').is_empty() {
            return Err(InvalidRepo::NoPath(url.to_owned()));
        }
        return Ok(RepoLocation::Url);
    }
    if url.starts_with('/') {
        return Ok(RepoLocation::LocalPath);
    }
    // scp-like: a host before the first ':' with no '/' in it.
    if let Some((user_host, path)) = url.split_once(':')
        && !user_host.contains('/')
    {
        let host = user_host.rsplit('@').next().unwrap_or_default();
        if host.is_empty() {
            return Err(InvalidRepo::NoHost(url.to_owned()));
        }
        if path.trim_matches('/').is_empty() {
            return Err(InvalidRepo::NoPath(url.to_owned()));
        }
        return Ok(RepoLocation::ScpLike);
    }
    Err(InvalidRepo::Unrecognised(url.to_owned()))
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidBranch(pub String);

impl fmt::Display for InvalidBranch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a branch name this cluster uses (ASCII letters, digits, '/', '-', '_' \
             and '.'; no '..', '//', leading '-', '/' or '.', trailing '/', '.' or \".lock\")",
            self.0
        )
    }
}

/// A branch name git accepts and that cannot escape `refs/heads/` or change
/// the meaning of a refspec it is put into.
pub fn check_branch(name: &str) -> Result<(), InvalidBranch> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("/.")
        && !name.ends_with(".lock")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(InvalidBranch(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_locations_people_use_are_accepted() {
        for (url, kind) in [
            ("https://github.com/octo/app.git", RepoLocation::Url),
            ("http://git.lan:8080/app", RepoLocation::Url),
            ("ssh://git@127.0.0.1:2222/srv/app.git", RepoLocation::Url),
            ("git://127.0.0.1:9418/app.git", RepoLocation::Url),
            ("file:///srv/git/app.git", RepoLocation::Url),
            ("git@github.com:octo/app.git", RepoLocation::ScpLike),
            ("mirror.lan:app.git", RepoLocation::ScpLike),
            ("/srv/git/app.git", RepoLocation::LocalPath),
        ] {
            assert_eq!(check_repo_url(url), Ok(kind), "{url}");
        }
    }

    #[test]
    fn what_cannot_be_a_repository_is_named() {
        for (url, says) in [
            ("", "is empty"),
            ("not a url", "white space"),
            ("relative/path", "not a repository location"),
            ("-uhttps://x/y", "starts with '-'"),
            ("ftp://host/repo", "unsupported scheme"),
            ("https:///repo", "names no host"),
            ("https://github.com/", "names no repository path"),
            ("git@github.com:", "names no repository path"),
            ("file://", "names no repository path"),
            ("@:x", "names no host"),
        ] {
            let err = check_repo_url(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn branch_names_cannot_escape_refs_heads() {
        for ok in ["main", "release/1.2", "ccc/issue-12-fix-login", "a_b"] {
            assert_eq!(check_branch(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-f", "/x", ".x", "x/", "x.", "a..b", "a//b", "a/.b", "x.lock", "a b", "a:b", "a*",
            "a~1", "a^", "ä",
        ] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
    }
}
