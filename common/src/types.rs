//! Domain types both sides speak. The cores work on these, never on protobuf
//! types; [`crate::wire`] converts at the edge and validates what comes in.

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
}
