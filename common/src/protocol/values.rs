//! Conversions of the enums and small values that the agent stream shares
//! with the Admin API.

use super::Error;
use crate::proto;
use crate::types::{CliResult, Outcome, OutputKind, Phase, Specialty, TestSummary, Toolchain};

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

pub fn kind_to_proto(k: OutputKind) -> proto::OutputKind {
    match k {
        OutputKind::Stdout => proto::OutputKind::Stdout,
        OutputKind::Stderr => proto::OutputKind::Stderr,
        OutputKind::Event => proto::OutputKind::Event,
        OutputKind::System => proto::OutputKind::System,
    }
}

/// An advert's specialties as protobuf enum values.
pub fn specialties_to_proto(specialties: &[Specialty]) -> Vec<i32> {
    specialties
        .iter()
        .map(|&s| specialty_to_proto(s) as i32)
        .collect()
}

/// An advert's toolchains as protobuf messages.
pub fn toolchains_to_proto(toolchains: &[Toolchain]) -> Vec<proto::Toolchain> {
    toolchains.iter().map(toolchain_to_proto).collect()
}

pub fn toolchain_to_proto(t: &Toolchain) -> proto::Toolchain {
    proto::Toolchain {
        name: t.name.clone(),
        version: t.version.clone(),
    }
}

pub fn test_summary_to_proto(t: &TestSummary) -> proto::TestSummary {
    proto::TestSummary {
        ran: t.ran,
        passed: t.passed,
        command: t.command.clone(),
        exit_code: t.exit_code,
        tail: t.tail.clone(),
    }
}

pub fn cli_result_to_proto(c: &CliResult) -> proto::CliResult {
    proto::CliResult {
        cost_usd: c.cost_usd,
        turns: c.turns,
        duration_ms: c.duration_ms,
        session_id: c.session_id.clone(),
        is_error: c.is_error,
        subtype: c.subtype.clone(),
        result: c.result.clone(),
        model: c.model.clone(),
    }
}
