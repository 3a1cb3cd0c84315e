//! What an agent sends, and its validation: the coordinator decodes every
//! message of an agent here, so its core only sees values within the
//! limits of [`super`].

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::debug;

use super::{
    Error, MAX_CAPACITY, MAX_LABELS, MAX_OUTPUT_CHUNK, MAX_REASON, MAX_REPORTED_TASKS,
    MAX_TOOLCHAINS, MAX_UNHEALTHY_REASON, bounded, short, task_id, values,
};
use crate::ids::{Attempt, TaskId};
use crate::proto::{self, agent_message::Msg};
use crate::types::{
    AgentAdvert, CliResult, FinishedReport, OutputKind, Phase, Specialty, TestSummary, Toolchain,
};

/// A message from an agent to the coordinator.
#[derive(Clone, Debug, PartialEq)]
pub enum FromAgent {
    Hello {
        advert: AgentAdvert,
        running: Vec<ReportedTask>,
        /// `None`: the agent can work.
        unhealthy: Option<String>,
    },
    Heartbeat {
        free_slots: u32,
        running: Vec<ReportedTask>,
        unhealthy: Option<String>,
    },
    Draining {
        reason: String,
    },
    Accepted {
        task: TaskId,
        attempt: Attempt,
    },
    Rejected {
        task: TaskId,
        attempt: Attempt,
        reason: String,
    },
    Output(OutputChunk),
    Progress {
        task: TaskId,
        attempt: Attempt,
        phase: Phase,
    },
    Finished {
        task: TaskId,
        attempt: Attempt,
        report: FinishedReport,
    },
}

/// A task an agent holds (running, or finished but unacknowledged), as
/// listed in Hello and Heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportedTask {
    pub task: TaskId,
    pub attempt: Attempt,
    pub last_output_seq: u64,
}

/// One piece of an attempt's output. Seqs start at 1 for each attempt and
/// have no gap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    pub task: TaskId,
    pub attempt: Attempt,
    pub seq: u64,
    pub kind: OutputKind,
    pub data: Arc<[u8]>,
}

/// Bounds of a finished report's texts, which are for people: longer ones
/// are cut rather than refused.
const MAX_REPORT_MESSAGE: usize = 4096;
const MAX_BRANCH: usize = 256;
const MAX_COMMIT: usize = 64;
const MAX_TEST_COMMAND: usize = 1024;
const MAX_TAIL: usize = 16 * 1024;
const MAX_CLI_NAME: usize = 128;

impl FromAgent {
    /// Validates an agent's message. An empty one (no known message in it)
    /// is an error: the coordinator knows every message an agent may send.
    pub fn from_proto(msg: proto::AgentMessage) -> Result<Self, Error> {
        let Some(msg) = msg.msg else {
            return Err(Error::Missing("msg").in_message("AgentMessage"));
        };
        match msg {
            Msg::Hello(hello) => decode_hello(hello).map_err(|e| e.in_message("Hello")),
            Msg::Heartbeat(beat) => Ok(Self::Heartbeat {
                free_slots: beat.free_slots,
                running: reported(&beat.running).map_err(|e| e.in_message("Heartbeat"))?,
                unhealthy: unhealthy_reason(&beat.unhealthy_reason),
            }),
            Msg::Draining(d) => Ok(Self::Draining {
                reason: bounded(d.reason, MAX_REASON),
            }),
            Msg::TaskAccepted(m) => Ok(Self::Accepted {
                task: task_id("task_id", &m.task_id).map_err(|e| e.in_message("TaskAccepted"))?,
                attempt: Attempt(m.attempt),
            }),
            Msg::TaskRejected(m) => Ok(Self::Rejected {
                task: task_id("task_id", &m.task_id).map_err(|e| e.in_message("TaskRejected"))?,
                attempt: Attempt(m.attempt),
                reason: bounded(m.reason, MAX_REASON),
            }),
            Msg::TaskOutput(m) => decode_output(m)
                .map(Self::Output)
                .map_err(|e| e.in_message("TaskOutput")),
            Msg::TaskProgress(m) => decode_progress(m).map_err(|e| e.in_message("TaskProgress")),
            Msg::TaskFinished(m) => decode_finished(m).map_err(|e| e.in_message("TaskFinished")),
        }
    }

    /// The protobuf message; `claimed_name` goes in Hello and is
    /// informational (the coordinator knows an agent by its certificate).
    pub fn into_proto(self, claimed_name: &str) -> proto::AgentMessage {
        let msg = match self {
            Self::Hello {
                advert,
                running,
                unhealthy,
            } => Msg::Hello(proto::Hello {
                agent_version: advert.agent_version,
                specialties: values::specialties_to_proto(&advert.specialties),
                capacity: advert.capacity,
                labels: advert.labels.into_iter().collect(),
                toolchains: values::toolchains_to_proto(&advert.toolchains),
                running: running_to_proto(&running),
                claimed_name: claimed_name.to_owned(),
                hostname: advert.hostname,
                instance_id: advert.instance_id,
                unhealthy_reason: unhealthy.unwrap_or_default(),
            }),
            Self::Heartbeat {
                free_slots,
                running,
                unhealthy,
            } => Msg::Heartbeat(proto::Heartbeat {
                running: running_to_proto(&running),
                free_slots,
                unhealthy_reason: unhealthy.unwrap_or_default(),
            }),
            Self::Draining { reason } => Msg::Draining(proto::Draining { reason }),
            Self::Accepted { task, attempt } => Msg::TaskAccepted(proto::TaskAccepted {
                task_id: task.to_string(),
                attempt: attempt.0,
            }),
            Self::Rejected {
                task,
                attempt,
                reason,
            } => Msg::TaskRejected(proto::TaskRejected {
                task_id: task.to_string(),
                attempt: attempt.0,
                reason,
            }),
            Self::Output(chunk) => Msg::TaskOutput(chunk.to_proto()),
            Self::Progress {
                task,
                attempt,
                phase,
            } => Msg::TaskProgress(proto::TaskProgress {
                task_id: task.to_string(),
                attempt: attempt.0,
                phase: values::phase_to_proto(phase) as i32,
                detail: String::new(),
            }),
            Self::Finished {
                task,
                attempt,
                report,
            } => Msg::TaskFinished(proto::TaskFinished {
                task_id: task.to_string(),
                attempt: attempt.0,
                outcome: values::outcome_to_proto(report.outcome) as i32,
                message: report.message,
                branch: report.branch,
                commit: report.commit,
                tests: report.tests.as_ref().map(values::test_summary_to_proto),
                cli: report.cli.as_ref().map(values::cli_result_to_proto),
                rate_limit_reset_unix_ms: report.rate_limit_reset_unix_ms,
                last_output_seq: report.last_output_seq,
                permanent: report.permanent,
            }),
        };
        proto::AgentMessage { msg: Some(msg) }
    }
}

impl OutputChunk {
    /// The protobuf message, also what the Admin API streams of a task.
    pub fn to_proto(&self) -> proto::TaskOutput {
        proto::TaskOutput {
            task_id: self.task.to_string(),
            attempt: self.attempt.0,
            seq: self.seq,
            kind: values::kind_to_proto(self.kind) as i32,
            data: self.data.to_vec(),
        }
    }
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

/// An agent's `unhealthy_reason`: `None` when empty (the agent can work).
/// The text is for people, so it is cut to a bound and control characters
/// become spaces rather than failing the whole message.
pub fn unhealthy_reason(reason: &str) -> Option<String> {
    let printable: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cut = bounded(printable.trim().to_owned(), MAX_UNHEALTHY_REASON);
    let reason = cut.trim_end();
    (!reason.is_empty()).then(|| reason.to_owned())
}

/// Validates an agent's `Hello`. An agent that advertises no specialty is
/// treated as `general`; duplicates are removed.
fn decode_hello(hello: proto::Hello) -> Result<FromAgent, Error> {
    if !hello.claimed_name.is_empty() {
        debug!(claimed = %hello.claimed_name, "ignoring the name claimed in Hello");
    }
    Ok(FromAgent::Hello {
        advert: advert(&hello)?,
        running: reported(&hello.running)?,
        unhealthy: unhealthy_reason(&hello.unhealthy_reason),
    })
}

fn advert(hello: &proto::Hello) -> Result<AgentAdvert, Error> {
    let mut specialties = hello
        .specialties
        .iter()
        .map(|&s| values::specialty_from_proto(s))
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

fn reported(tasks: &[proto::RunningTask]) -> Result<Vec<ReportedTask>, Error> {
    if tasks.len() > MAX_REPORTED_TASKS {
        return Err(Error::invalid(
            "running",
            format!("more than {MAX_REPORTED_TASKS} tasks"),
        ));
    }
    tasks
        .iter()
        .map(|t| {
            Ok(ReportedTask {
                task: task_id("running.task_id", &t.task_id)?,
                attempt: Attempt(t.attempt),
                last_output_seq: t.last_output_seq,
            })
        })
        .collect()
}

fn running_to_proto(running: &[ReportedTask]) -> Vec<proto::RunningTask> {
    running
        .iter()
        .map(|t| proto::RunningTask {
            task_id: t.task.to_string(),
            attempt: t.attempt.0,
            last_output_seq: t.last_output_seq,
        })
        .collect()
}

fn decode_output(m: proto::TaskOutput) -> Result<OutputChunk, Error> {
    if m.data.len() > MAX_OUTPUT_CHUNK {
        return Err(Error::invalid(
            "data",
            format!("chunk of {} bytes exceeds {MAX_OUTPUT_CHUNK}", m.data.len()),
        ));
    }
    Ok(OutputChunk {
        task: task_id("task_id", &m.task_id)?,
        attempt: Attempt(m.attempt),
        seq: output_seq(m.seq)?,
        kind: values::kind_from_proto(m.kind)?,
        data: Arc::from(m.data),
    })
}

fn decode_progress(m: proto::TaskProgress) -> Result<FromAgent, Error> {
    Ok(FromAgent::Progress {
        task: task_id("task_id", &m.task_id)?,
        attempt: Attempt(m.attempt),
        phase: values::phase_from_proto(m.phase)?,
    })
}

fn decode_finished(f: proto::TaskFinished) -> Result<FromAgent, Error> {
    let report = FinishedReport {
        permanent: f.permanent,
        outcome: values::outcome_from_proto(f.outcome)?,
        message: bounded(f.message, MAX_REPORT_MESSAGE),
        branch: bounded(f.branch, MAX_BRANCH),
        commit: bounded(f.commit, MAX_COMMIT),
        tests: f.tests.map(|t| TestSummary {
            ran: t.ran,
            passed: t.passed,
            command: bounded(t.command, MAX_TEST_COMMAND),
            exit_code: t.exit_code,
            tail: bounded(t.tail, MAX_TAIL),
        }),
        cli: f.cli.map(|c| CliResult {
            cost_usd: if c.cost_usd.is_finite() {
                c.cost_usd
            } else {
                0.0
            },
            turns: c.turns,
            duration_ms: c.duration_ms,
            session_id: bounded(c.session_id, MAX_CLI_NAME),
            is_error: c.is_error,
            subtype: bounded(c.subtype, MAX_CLI_NAME),
            result: bounded(c.result, MAX_TAIL),
            model: bounded(c.model, MAX_CLI_NAME),
        }),
        rate_limit_reset_unix_ms: f.rate_limit_reset_unix_ms,
        last_output_seq: f.last_output_seq,
    };
    Ok(FromAgent::Finished {
        task: task_id("task_id", &f.task_id)?,
        attempt: Attempt(f.attempt),
        report,
    })
}
