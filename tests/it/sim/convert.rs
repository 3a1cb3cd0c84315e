//! The one place where the simulation translates between the two halves of
//! the protocol: the agent session's messages and the coordinator core's.
//! (The real processes convert through protobuf in `common::wire`,
//! `agent::conn` and the coordinator's gRPC layer.)

use agent::session::{FromCoordinator, Held, ToCoordinator};
use common::types::AgentAdvert;
use coordinator::core::{FromAgent, ReportedTask, ToAgent};

/// The core's view of a session message. `Resend` is no message of its
/// own (the driver expands it from the spool), so it has none.
pub(super) fn to_core(msg: ToCoordinator, advert: &AgentAdvert) -> Option<FromAgent> {
    let unhealthy = |reason: String| Some(reason).filter(|r| !r.is_empty());
    Some(match msg {
        ToCoordinator::Hello {
            running,
            unhealthy_reason,
        } => FromAgent::Hello {
            advert: advert.clone(),
            running: reported(&running),
            unhealthy: unhealthy(unhealthy_reason),
        },
        ToCoordinator::Heartbeat {
            running,
            free_slots,
            unhealthy_reason,
        } => FromAgent::Heartbeat {
            free_slots,
            running: reported(&running),
            unhealthy: unhealthy(unhealthy_reason),
        },
        ToCoordinator::Accepted { task, attempt } => FromAgent::Accepted { task, attempt },
        ToCoordinator::Rejected {
            task,
            attempt,
            reason,
        } => FromAgent::Rejected {
            task,
            attempt,
            reason,
        },
        ToCoordinator::Output(chunk) => FromAgent::Output {
            task: chunk.task,
            attempt: chunk.attempt,
            seq: chunk.seq,
            kind: chunk.kind,
            data: chunk.data,
        },
        ToCoordinator::Progress {
            task,
            attempt,
            phase,
        } => FromAgent::Progress {
            task,
            attempt,
            phase,
        },
        ToCoordinator::Finished {
            task,
            attempt,
            report,
        } => FromAgent::Finished {
            task,
            attempt,
            report: *report,
        },
        ToCoordinator::Draining { reason } => FromAgent::Draining { reason },
        ToCoordinator::Resend { .. } => return None,
    })
}

fn reported(held: &[Held]) -> Vec<ReportedTask> {
    held.iter()
        .map(|h| ReportedTask {
            task: h.task,
            attempt: h.attempt,
            last_output_seq: h.last_output_seq,
        })
        .collect()
}

/// The session's view of a core message. No push credential travels in
/// the simulation.
pub(super) fn to_session(msg: ToAgent) -> FromCoordinator {
    match msg {
        ToAgent::Welcome {
            agent_id,
            heartbeat_interval,
            heartbeat_timeout,
            held,
            ..
        } => FromCoordinator::Welcome {
            agent_id: agent_id.to_string(),
            heartbeat_interval,
            heartbeat_timeout,
            held,
        },
        ToAgent::Heartbeat { .. } => FromCoordinator::Heartbeat,
        ToAgent::Drain { reason } => FromCoordinator::Drain { reason },
        ToAgent::Assign {
            task,
            attempt,
            spec,
            deadline,
            ..
        } => FromCoordinator::Assign {
            task,
            attempt,
            spec,
            deadline,
            credential: None,
        },
        ToAgent::Cancel {
            task,
            attempt,
            reason,
        } => FromCoordinator::Cancel {
            task,
            attempt,
            reason,
        },
        ToAgent::OutputAck { task, attempt, seq } => {
            FromCoordinator::OutputAck { task, attempt, seq }
        }
        ToAgent::FinishedAck { task, attempt } => FromCoordinator::FinishedAck { task, attempt },
    }
}
