//! Identity newtypes. An agent's id is the CN of its certificate; the same
//! rules apply to admin names, so both can be used in file names
//! (`agent-<name>.pem`), URIs (`ccc://agent/<name>`) and data directories.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name we accept: fits a certificate CN (64) and a DNS label (63).
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid name {name:?}: {why}")]
pub struct InvalidName {
    pub name: String,
    pub why: &'static str,
}

/// Checks a name used for agents and admins: 1 to 63 ASCII letters, digits,
/// '.', '_' or '-', starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let fail = |why| {
        Err(InvalidName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 63 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return fail("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("may only contain ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// An agent's identity: the CN of its client certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for AgentId {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for AgentId {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<AgentId> for String {
    fn from(id: AgentId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "pc-01", "build.box_2", "9lives"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "ünï", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            "pc-01".parse::<AgentId>().map(|id| id.to_string()),
            Ok("pc-01".to_owned())
        );
    }
}

/// A task's id: `t-<n>`, short enough to type (`ccc task t-42`), stable for
/// the task's whole life, allocated in submission order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t-{}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid task id {0:?} (expected t-<number>, e.g. t-42)")]
pub struct InvalidTaskId(pub String);

impl FromStr for TaskId {
    type Err = InvalidTaskId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim().strip_prefix("t-").unwrap_or(s.trim());
        digits
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Self)
            .ok_or_else(|| InvalidTaskId(s.to_owned()))
    }
}

/// Which attempt of a task; starts at 1 and only grows. Every report of an
/// agent carries it so that a late report of an old attempt is recognised
/// (fencing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The position of an output chunk within one attempt; starts at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

#[cfg(test)]
mod task_id_tests {
    use super::*;

    #[test]
    fn task_ids_parse_with_or_without_prefix() {
        assert_eq!("t-42".parse(), Ok(TaskId(42)));
        assert_eq!("42".parse(), Ok(TaskId(42)));
        assert_eq!(TaskId(7).to_string(), "t-7");
        for bad in ["", "t-", "t-0", "x-1", "t--1", "t-1a"] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad}");
        }
    }
}
