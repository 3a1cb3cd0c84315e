//! Domain types both sides speak. The cores work on these, never on protobuf
//! types; [`crate::protocol`] converts at the edge and validates what comes in.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What kind of work an agent is good at, and what kind of work an issue is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Specialty {
    Backend,
    Frontend,
    Testing,
    Devops,
    /// Takes any task once it has waited for a specialist long enough.
    General,
}

impl Specialty {
    pub const ALL: [Specialty; 5] = [
        Self::Backend,
        Self::Frontend,
        Self::Testing,
        Self::Devops,
        Self::General,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backend => "backend",
            Self::Frontend => "frontend",
            Self::Testing => "testing",
            Self::Devops => "devops",
            Self::General => "general",
        }
    }
}

impl fmt::Display for Specialty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown specialty {0:?} (expected backend, frontend, testing, devops or general)")]
pub struct UnknownSpecialty(pub String);

impl FromStr for Specialty {
    type Err = UnknownSpecialty;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|sp| sp.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownSpecialty(s.to_owned()))
    }
}

/// A tool found on an agent's PC, e.g. `node 20.20.2`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Toolchain {
    pub name: String,
    pub version: String,
}

/// What an agent says about itself in `Hello`, validated. Its id is not
/// here: that comes from the certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAdvert {
    pub agent_version: String,
    pub specialties: Vec<Specialty>,
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub toolchains: Vec<Toolchain>,
    pub hostname: String,
    /// Chosen at process start and kept across reconnects: tells the same
    /// process reconnecting from a second process with the same certificate.
    #[serde(default)]
    pub instance_id: String,
}

/// How an attempt ended, as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    NoChanges,
    CliFailed,
    TurnLimit,
    BudgetExceeded,
    TimedOut,
    RateLimited,
    TestsFailed,
    PushRejected,
    Cancelled,
    WorkspaceError,
    /// The PC could not work (CLI missing, not logged in, invalid API key):
    /// requeued without spending the attempt; the agent is unhealthy.
    AgentFault,
    /// Set by the coordinator: the agent vanished and the lease ran out.
    LeaseExpired,
    /// Set by the coordinator: the agent did not accept the assignment in time.
    NotAccepted,
    /// Set by the coordinator: the agent refused the assignment.
    Rejected,
    /// Set by the coordinator: the agent came back without the task.
    LostByAgent,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::NoChanges => "no_changes",
            Self::CliFailed => "cli_failed",
            Self::TurnLimit => "turn_limit",
            Self::BudgetExceeded => "budget_exceeded",
            Self::TimedOut => "timed_out",
            Self::RateLimited => "rate_limited",
            Self::TestsFailed => "tests_failed",
            Self::PushRejected => "push_rejected",
            Self::Cancelled => "cancelled",
            Self::WorkspaceError => "workspace_error",
            Self::AgentFault => "agent_fault",
            Self::LeaseExpired => "lease_expired",
            Self::NotAccepted => "not_accepted",
            Self::Rejected => "rejected",
            Self::LostByAgent => "lost_by_agent",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an attempt is on the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    RunningClaude,
    Testing,
    Committing,
    Pushing,
}

/// Which stream an output chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Stdout,
    Stderr,
    /// A parsed stream-json event of the CLI.
    Event,
    /// A line written by the agent or the coordinator itself.
    System,
}

impl OutputKind {
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
            Self::Event => 3,
            Self::System => 4,
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            3 => Some(Self::Event),
            4 => Some(Self::System),
            _ => None,
        }
    }
}

/// What the agent needs to work on a task; sent in `Assign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub repo_url: String,
    /// Empty: the remote's HEAD.
    pub base_branch: String,
    pub issue_number: u64,
    pub title: String,
    pub body: String,
    pub issue_url: String,
    pub author: String,
    pub labels: Vec<String>,
    pub specialty: Specialty,
    pub technologies: Vec<String>,
    /// The branch to push.
    pub branch: String,
    pub follow_up: bool,
    /// Empty: the agent's default for the specialty.
    pub test_command: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TestSummary {
    pub ran: bool,
    pub passed: bool,
    pub command: String,
    pub exit_code: i32,
    pub tail: String,
}

/// What the CLI's final `result` event said.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CliResult {
    pub cost_usd: f64,
    pub turns: u32,
    pub duration_ms: u64,
    pub session_id: String,
    pub is_error: bool,
    pub subtype: String,
    pub result: String,
    /// The model that did the work, when the CLI said.
    #[serde(default)]
    pub model: String,
}

/// An agent's report that an attempt ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinishedReport {
    pub outcome: Outcome,
    pub message: String,
    pub branch: String,
    pub commit: String,
    pub tests: Option<TestSummary>,
    pub cli: Option<CliResult>,
    pub rate_limit_reset_unix_ms: u64,
    pub last_output_seq: u64,
    /// The failure will recur on every attempt (repository or branch not
    /// found, authentication refused, an invalid URL): no retry.
    #[serde(default)]
    pub permanent: bool,
}

impl FinishedReport {
    /// A report of `outcome` with nothing pushed, no tests and no CLI result.
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
            branch: String::new(),
            commit: String::new(),
            tests: None,
            cli: None,
            rate_limit_reset_unix_ms: 0,
            last_output_seq: 0,
            permanent: false,
        }
    }
}

/// The branch an attempt pushes: `ccc/issue-<n>-<slug>` for an issue,
/// `ccc/<task>-<slug>` for a manual task. The slug keeps ASCII letters and
/// digits of the title, lowercased, joined by '-', at most 40 characters, so
/// the name is safe for git refs and file names.
pub fn branch_name(issue_number: u64, task: crate::ids::TaskId, title: &str) -> String {
    let mut slug = String::new();
    for word in title
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if slug.len() + word.len() + 1 > 40 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word.to_ascii_lowercase());
    }
    let stem = if issue_number > 0 {
        format!("ccc/issue-{issue_number}")
    } else {
        format!("ccc/{task}")
    };
    if slug.is_empty() {
        stem
    } else {
        format!("{stem}-{slug}")
    }
}

#[cfg(test)]
mod branch_tests {
    use super::*;
    use crate::ids::TaskId;

    #[test]
    fn branch_names_are_safe() {
        assert_eq!(
            branch_name(12, TaskId(3), "Fix the login bug!"),
            "ccc/issue-12-fix-the-login-bug"
        );
        assert_eq!(branch_name(0, TaskId(3), "ログイン修正"), "ccc/t-3");
        assert_eq!(
            branch_name(1, TaskId(1), "../../etc/passwd; rm -rf ~ `x`"),
            "ccc/issue-1-etc-passwd-rm-rf-x"
        );
        assert!(branch_name(1, TaskId(1), &"word ".repeat(50)).len() <= 60);
    }
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// What an agent pushes with, from the assignment; never persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushCredential {
    /// Empty: `x-access-token`, as GitHub expects for tokens.
    pub username: String,
    pub token: Secret,
}
