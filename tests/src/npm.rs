//! The npm tools the GitHub fakes use, installed into `tests/node` by
//! `make deps` (pinned in `tests/node/package.json`): where they are, and
//! Prism, GitHub's OpenAPI description served as a validating proxy.
//!
//! ```ignore
//! let github = FakeGitHub::start(GitHubConfig::with_token("t"));
//! let prism = Prism::start(&dir, &github.url());
//! github.set_public_url(&prism.url()); // pagination links go through Prism
//! // ... point octocrab at prism.url(), with `Accept: application/json` ...
//! assert_eq!(prism.violations(), Vec::<String>::new());
//! ```
//!
//! How Prism 5.16 reports a violation (`prism proxy --errors`, seen in
//! the tests): a request that breaks the description is not forwarded and
//! is answered `422` with a problem document, `{"type":
//! "https://stoplight.io/prism/errors#UNPROCESSABLE_ENTITY","title":"Invalid
//! request","status":422,"detail":...,"validation":[{"location":["body"],
//! "severity":"Error","code":"required","message":"Request body must have
//! required property 'head'"}]}`; a method the path does not have is `405`
//! with type `...#NO_METHOD_MATCHED_ERROR` (octocrab's `update_comment`
//! sends POST, which GitHub accepts but its description does not list); an
//! upstream answer that breaks it (e.g. a status the operation does not
//! list) is passed on with an `sl-violations` header holding the
//! violations as JSON. Every violation is also logged as a line with
//! `Violation:`. `Prism::violations` reads those lines, so `assert!(prism
//! .violations().is_empty())` says none happened; `is_violation` tells
//! Prism's reports from the fake's own answers (the fake's errors are
//! GitHub's `{"message":...}`, never a problem document). Prism is ready
//! when it logs "Prism is listening": readiness is not probed over HTTP,
//! since Prism would check the probe too.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::http::Answer;
use crate::process::Process;

/// `tests/node/node_modules`.
pub fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node/node_modules")
}

/// An installed npm executable (`node_modules/.bin/<name>`); panics with
/// the fix when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = node_modules().join(".bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install the test's npm packages (`make deps`, or `npm ci` in tests/node)",
        path.display()
    );
    path
}

/// GitHub's OpenAPI description of api.github.com (the plain one: the
/// dereferenced variant is 70 MB).
pub fn openapi_description() -> PathBuf {
    node_modules().join("@octokit/openapi/generated/api.github.com.json")
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process started as the leader of its own process group, with
/// its output in a log file; the whole group is killed on drop (node tools
/// may start helpers of their own).
pub struct GroupProcess {
    process: Process,
}

impl GroupProcess {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        cmd.process_group(0);
        Self {
            process: Process::spawn(name, cmd, log),
        }
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.process.wait_for_log(needle, timeout)
    }
}

impl Drop for GroupProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.process.pid())])
            .stderr(std::process::Stdio::null())
            .status();
        // `Process`'s own drop reaps the leader (and prints the log's end
        // when the test is failing).
    }
}

/// `prism proxy <GitHub's description> <upstream> --errors` on loopback.
pub struct Prism {
    pub port: u16,
    process: GroupProcess,
}

impl Prism {
    /// Starts Prism in front of `upstream` (a URL) and waits until it
    /// answers: loading the description takes about 7 s on 2 cores, so the
    /// wait allows 120 s on a loaded machine. Its log goes to `dir`.
    pub fn start(dir: &Path, upstream: &str) -> Self {
        let port = free_port();
        let mut cmd = Command::new(bin("prism"));
        cmd.arg("proxy")
            .arg(openapi_description())
            .arg(upstream)
            .arg("--errors")
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .args(["--verboseLevel", "info"])
            .env("NO_COLOR", "1")
            .env("FORCE_COLOR", "0");
        let process = GroupProcess::spawn("prism", cmd, dir.join("prism.log"));
        let prism = Self { port, process };
        // Not an HTTP probe: Prism would check the probe too, and report
        // it as a violation.
        prism
            .process
            .wait_for_log("Prism is listening", Duration::from_secs(120));
        prism
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The violations Prism has logged so far (request and response),
    /// one line each; empty when every exchange matched the description.
    pub fn violations(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("Violation:") || l.contains("sl-violations"))
            .map(str::to_owned)
            .collect()
    }
}

/// Whether an answer that came through Prism is Prism's report of a
/// violation (a problem document), rather than the upstream's own answer.
pub fn is_violation(answer: &Answer) -> bool {
    answer.headers.contains_key("sl-violations")
        || answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/problem+json"))
}
