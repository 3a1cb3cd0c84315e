//! The agent stream's protocol, for both ends: the messages an agent sends
//! ([`FromAgent`]) and the coordinator sends ([`ToAgent`]) as domain types,
//! the limits they respect, and their conversion to and from the generated
//! `ccc.v1` protobuf messages. The coordinator's core and the agent's
//! session speak these types; `coordinator::grpc` and `agent::conn` only
//! call the conversions here.
//!
//! - `from_agent.rs`: [`FromAgent`], decoded with validation: everything an
//!   agent sends is checked here (capacity, label and toolchain counts,
//!   string lengths, control characters, output chunk size and seq, the
//!   number of tasks listed), refused with an [`Error`] naming the message
//!   and the field, or bounded where the text is only for people.
//! - `to_agent.rs`: [`ToAgent`]; the agent bounds the timings it is told.
//! - `values.rs`: the enums and small values the stream shares with the
//!   Admin API (specialty, outcome, phase, output kind, toolchain, test
//!   summary, CLI result).
//!
//! Invariant (checked by property tests): a message within the limits
//! comes back unchanged from a trip through protobuf, and whatever a
//! decoder accepts is within the limits.

mod from_agent;
mod to_agent;
mod values;

#[cfg(test)]
mod tests;

pub use from_agent::{FromAgent, OutputChunk, ReportedTask};
pub use to_agent::{PushAuth, ToAgent};
pub use values::{
    cli_result_to_proto, kind_from_proto, kind_to_proto, outcome_from_proto, outcome_to_proto,
    phase_from_proto, phase_to_proto, specialties_to_proto, specialty_from_proto,
    specialty_to_proto, test_summary_to_proto, toolchain_to_proto, toolchains_to_proto,
};

/// The most attempts an agent may run at once.
pub const MAX_CAPACITY: u32 = 256;
/// The most labels an agent may advertise.
pub const MAX_LABELS: usize = 64;
/// The most toolchains an agent may advertise.
pub const MAX_TOOLCHAINS: usize = 128;
/// The longest name, version, hostname or label an agent may send.
pub const MAX_SHORT_STRING: usize = 256;
/// The largest `TaskOutput.data`: the agent cuts its children's output into
/// lines of at most this many bytes and bounds its own lines the same way,
/// so the coordinator can refuse anything larger as a protocol error.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// The most tasks Hello or Heartbeat may list.
pub const MAX_REPORTED_TASKS: usize = 4096;
/// The longest unhealthy reason kept; the rest is cut.
pub const MAX_UNHEALTHY_REASON: usize = 1024;
/// The longest reason (of a rejection, of a drain) kept; the rest is cut.
pub const MAX_REASON: usize = 1024;

/// Why a protobuf message is not a valid protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("field {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("field {0} is required")]
    Missing(&'static str),
    /// One of the errors above, in a message of this type.
    #[error("{message}: {error}")]
    InMessage {
        message: &'static str,
        error: Box<Error>,
    },
}

impl Error {
    fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            why: why.into(),
        }
    }

    fn in_message(self, message: &'static str) -> Self {
        Self::InMessage {
            message,
            error: Box::new(self),
        }
    }

    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Invalid { field, .. } | Self::Missing(field) => field,
            Self::InMessage { error, .. } => error.field(),
        }
    }
}

/// A short string: at most [`MAX_SHORT_STRING`] bytes, no control characters.
fn short(field: &'static str, s: &str) -> Result<String, Error> {
    if s.len() > MAX_SHORT_STRING {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_SHORT_STRING} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(s.to_owned())
}

/// Keeps at most `max` bytes of a peer's text, cut on a char boundary.
pub fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn task_id(field: &'static str, raw: &str) -> Result<crate::ids::TaskId, Error> {
    raw.parse()
        .map_err(|e: crate::ids::InvalidTaskId| Error::invalid(field, e.to_string()))
}
