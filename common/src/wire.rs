//! Conversions between the protocol and domain types. Everything that arrives
//! from a peer is validated here, with an error that names the bad field, so
//! the cores only ever see well-formed values.

use std::collections::BTreeMap;

use crate::proto;
use crate::types::{AgentAdvert, Outcome, OutputKind, Phase, Specialty, Toolchain};

/// Limits on what an agent may advertise; larger values are rejected, not truncated.
pub const MAX_CAPACITY: u32 = 256;
pub const MAX_LABELS: usize = 64;
pub const MAX_TOOLCHAINS: usize = 128;
pub const MAX_SHORT_STRING: usize = 256;
/// The largest `TaskOutput.data`: the agent cuts its children's output into
/// lines of at most this many bytes and bounds its own lines the same way,
/// so the coordinator can refuse anything larger as a protocol error.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("field {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("field {0} is required")]
    Missing(&'static str),
}

impl Error {
    fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            why: why.into(),
        }
    }
}

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

pub fn specialty_from_proto(value: i32) -> Result<Specialty, Error> {
    match proto::Specialty::try_from(value) {
        Ok(proto::Specialty::Backend) => Ok(Specialty::Backend),
        Ok(proto::Specialty::Frontend) => Ok(Specialty::Frontend),
        Ok(proto::Specialty::Testing) => Ok(Specialty::Testing),
        Ok(proto::Specialty::Devops) => Ok(Specialty::Devops),
        Ok(proto::Specialty::General) => Ok(Specialty::General),
        Ok(proto::Specialty::Unspecified) | Err(_) => Err(Error::invalid(
            "specialties",
            format!("unknown specialty value {value}"),
        )),
    }
}

pub fn specialty_to_proto(s: Specialty) -> proto::Specialty {
    match s {
        Specialty::Backend => proto::Specialty::Backend,
        Specialty::Frontend => proto::Specialty::Frontend,
        Specialty::Testing => proto::Specialty::Testing,
        Specialty::Devops => proto::Specialty::Devops,
        Specialty::General => proto::Specialty::General,
    }
}

/// Validates an agent's `Hello`. An agent that advertises no specialty is
/// treated as `general`; duplicates are removed.
pub fn advert_from_hello(hello: &proto::Hello) -> Result<AgentAdvert, Error> {
    let mut specialties = hello
        .specialties
        .iter()
        .map(|&s| specialty_from_proto(s))
        .collect::<Result<Vec<_>, _>>()?;
    specialties.sort();
    specialties.dedup();
    if specialties.is_empty() {
        specialties.push(Specialty::General);
    }
    if hello.capacity == 0 || hello.capacity > MAX_CAPACITY {
        return Err(Error::invalid(
            "capacity",
            format!("{} is not within 1..={MAX_CAPACITY}", hello.capacity),
        ));
    }
    if hello.labels.len() > MAX_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("more than {MAX_LABELS} labels"),
        ));
    }
    let labels = hello
        .labels
        .iter()
        .map(|(k, v)| Ok((short("labels", k)?, short("labels", v)?)))
        .collect::<Result<BTreeMap<_, _>, Error>>()?;
    if hello.toolchains.len() > MAX_TOOLCHAINS {
        return Err(Error::invalid(
            "toolchains",
            format!("more than {MAX_TOOLCHAINS} toolchains"),
        ));
    }
    let mut toolchains = hello
        .toolchains
        .iter()
        .map(|t| {
            if t.name.is_empty() {
                return Err(Error::invalid("toolchains", "empty toolchain name"));
            }
            Ok(Toolchain {
                name: short("toolchains.name", &t.name)?,
                version: short("toolchains.version", &t.version)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    toolchains.sort();
    toolchains.dedup_by(|a, b| a.name == b.name);
    Ok(AgentAdvert {
        agent_version: short("agent_version", &hello.agent_version)?,
        specialties,
        capacity: hello.capacity,
        labels,
        toolchains,
        hostname: short("hostname", &hello.hostname)?,
        instance_id: short("instance_id", &hello.instance_id)?,
    })
}

/// The longest unhealthy reason kept; the rest is cut.
pub const MAX_UNHEALTHY_REASON: usize = 1024;

/// An agent's `unhealthy_reason`: `None` when empty (the agent can work).
/// The text is for people, so it is cut to a bound and control characters
/// become spaces rather than failing the whole message.
pub fn unhealthy_reason(reason: &str) -> Option<String> {
    let reason = reason.trim();
    if reason.is_empty() {
        return None;
    }
    let mut end = reason.len().min(MAX_UNHEALTHY_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Some(
        reason[..end]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

pub fn outcome_from_proto(value: i32) -> Result<Outcome, Error> {
    use proto::Outcome as P;
    Ok(match P::try_from(value) {
        Ok(P::Succeeded) => Outcome::Succeeded,
        Ok(P::NoChanges) => Outcome::NoChanges,
        Ok(P::CliFailed) => Outcome::CliFailed,
        Ok(P::TurnLimit) => Outcome::TurnLimit,
        Ok(P::BudgetExceeded) => Outcome::BudgetExceeded,
        Ok(P::TimedOut) => Outcome::TimedOut,
        Ok(P::RateLimited) => Outcome::RateLimited,
        Ok(P::TestsFailed) => Outcome::TestsFailed,
        Ok(P::PushRejected) => Outcome::PushRejected,
        Ok(P::Cancelled) => Outcome::Cancelled,
        Ok(P::WorkspaceError) => Outcome::WorkspaceError,
        Ok(P::AgentFault) => Outcome::AgentFault,
        Ok(P::Unspecified) | Err(_) => {
            return Err(Error::invalid(
                "outcome",
                format!("unknown outcome {value}"),
            ));
        }
    })
}

/// The coordinator's own outcomes (lease expired, not accepted, rejected,
/// lost) have no agent-side code: they map to `Unspecified`.
pub fn outcome_to_proto(o: Outcome) -> proto::Outcome {
    use proto::Outcome as P;
    match o {
        Outcome::Succeeded => P::Succeeded,
        Outcome::NoChanges => P::NoChanges,
        Outcome::CliFailed => P::CliFailed,
        Outcome::TurnLimit => P::TurnLimit,
        Outcome::BudgetExceeded => P::BudgetExceeded,
        Outcome::TimedOut => P::TimedOut,
        Outcome::RateLimited => P::RateLimited,
        Outcome::TestsFailed => P::TestsFailed,
        Outcome::PushRejected => P::PushRejected,
        Outcome::Cancelled => P::Cancelled,
        Outcome::WorkspaceError => P::WorkspaceError,
        Outcome::AgentFault => P::AgentFault,
        Outcome::LeaseExpired | Outcome::NotAccepted | Outcome::Rejected | Outcome::LostByAgent => {
            P::Unspecified
        }
    }
}

pub fn phase_from_proto(value: i32) -> Result<Phase, Error> {
    use proto::Phase as P;
    Ok(match P::try_from(value) {
        Ok(P::Preparing) => Phase::Preparing,
        Ok(P::RunningClaude) => Phase::RunningClaude,
        Ok(P::Testing) => Phase::Testing,
        Ok(P::Committing) => Phase::Committing,
        Ok(P::Pushing) => Phase::Pushing,
        Ok(P::Unspecified) | Err(_) => {
            return Err(Error::invalid("phase", format!("unknown phase {value}")));
        }
    })
}

pub fn phase_to_proto(p: Phase) -> proto::Phase {
    use proto::Phase as P;
    match p {
        Phase::Preparing => P::Preparing,
        Phase::RunningClaude => P::RunningClaude,
        Phase::Testing => P::Testing,
        Phase::Committing => P::Committing,
        Phase::Pushing => P::Pushing,
    }
}

pub fn kind_from_proto(value: i32) -> Result<OutputKind, Error> {
    use proto::OutputKind as P;
    Ok(match P::try_from(value) {
        Ok(P::Stdout) => OutputKind::Stdout,
        Ok(P::Stderr) => OutputKind::Stderr,
        Ok(P::Event) => OutputKind::Event,
        Ok(P::System) => OutputKind::System,
        Ok(P::Unspecified) | Err(_) => {
            return Err(Error::invalid(
                "kind",
                format!("unknown output kind {value}"),
            ));
        }
    })
}

/// Validates an output chunk's seq: seqs start at 1 for each attempt, and
/// `u64::MAX` is reserved (in `Welcome.held` it means "the attempt is over").
pub fn output_seq(seq: u64) -> Result<u64, Error> {
    if seq == 0 || seq == u64::MAX {
        return Err(Error::invalid(
            "seq",
            format!("{seq} is not within 1..{} (u64::MAX is reserved)", u64::MAX),
        ));
    }
    Ok(seq)
}

pub fn kind_to_proto(k: OutputKind) -> proto::OutputKind {
    match k {
        OutputKind::Stdout => proto::OutputKind::Stdout,
        OutputKind::Stderr => proto::OutputKind::Stderr,
        OutputKind::Event => proto::OutputKind::Event,
        OutputKind::System => proto::OutputKind::System,
    }
}

pub fn toolchain_to_proto(t: &Toolchain) -> proto::Toolchain {
    proto::Toolchain {
        name: t.name.clone(),
        version: t.version.clone(),
    }
}

/// The `Hello` an agent sends for an advert; `claimed_name` is informational.
pub fn hello_from_advert(advert: &AgentAdvert, claimed_name: &str) -> proto::Hello {
    proto::Hello {
        agent_version: advert.agent_version.clone(),
        specialties: advert
            .specialties
            .iter()
            .map(|&s| specialty_to_proto(s) as i32)
            .collect(),
        capacity: advert.capacity,
        labels: advert
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        toolchains: advert.toolchains.iter().map(toolchain_to_proto).collect(),
        running: Vec::new(),
        claimed_name: claimed_name.to_owned(),
        hostname: advert.hostname.clone(),
        instance_id: advert.instance_id.clone(),
        unhealthy_reason: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> proto::Hello {
        proto::Hello {
            agent_version: "0.0.0".into(),
            specialties: vec![
                proto::Specialty::Frontend as i32,
                proto::Specialty::Backend as i32,
                proto::Specialty::Backend as i32,
            ],
            capacity: 2,
            toolchains: vec![proto::Toolchain {
                name: "node".into(),
                version: "20.1.0".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn hello_round_trips_through_the_advert() {
        let advert = advert_from_hello(&hello()).expect("valid hello");
        assert_eq!(
            advert.specialties,
            vec![Specialty::Backend, Specialty::Frontend]
        );
        let again = advert_from_hello(&hello_from_advert(&advert, "x")).expect("valid");
        assert_eq!(again, advert);
    }

    #[test]
    fn hostile_hellos_are_rejected_with_the_field_named() {
        let cases: Vec<(proto::Hello, &str)> = vec![
            (
                proto::Hello {
                    capacity: 0,
                    ..hello()
                },
                "capacity",
            ),
            (
                proto::Hello {
                    capacity: 100_000,
                    ..hello()
                },
                "capacity",
            ),
            (
                proto::Hello {
                    specialties: vec![42],
                    ..hello()
                },
                "specialties",
            ),
            (
                proto::Hello {
                    hostname: "x\u{1b}[2J".into(),
                    ..hello()
                },
                "hostname",
            ),
            (
                proto::Hello {
                    agent_version: "v".repeat(1000),
                    ..hello()
                },
                "agent_version",
            ),
        ];
        for (h, field) in cases {
            let err = advert_from_hello(&h).expect_err("must be rejected");
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn output_seqs_start_at_one_and_stop_before_the_reserved_maximum() {
        assert_eq!(output_seq(1), Ok(1));
        assert_eq!(output_seq(u64::MAX - 1), Ok(u64::MAX - 1));
        for bad in [0, u64::MAX] {
            let err = output_seq(bad).expect_err("rejected");
            assert!(err.to_string().starts_with("field seq: "), "{err}");
        }
    }

    #[test]
    fn unhealthy_reasons_are_bounded_and_printable() {
        assert_eq!(unhealthy_reason(""), None);
        assert_eq!(unhealthy_reason("  "), None);
        assert_eq!(
            unhealthy_reason("claude: not found\n\x1b[31m").as_deref(),
            Some("claude: not found  [31m")
        );
        let long = "é".repeat(MAX_UNHEALTHY_REASON);
        let cut = unhealthy_reason(&long).expect("a reason");
        assert!(cut.len() <= MAX_UNHEALTHY_REASON && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn no_specialty_means_general() {
        let advert = advert_from_hello(&proto::Hello {
            specialties: vec![],
            ..hello()
        })
        .expect("valid");
        assert_eq!(advert.specialties, vec![Specialty::General]);
    }
}
