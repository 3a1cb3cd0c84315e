//! What the coordinator sends an agent. The agent trusts its coordinator
//! (mTLS, the cluster CA) but still bounds the timings it is told, so that
//! the timers built from them cannot overflow.

use std::time::Duration;

use super::{Error, task_id, values};
use crate::ids::{AgentId, Attempt, TaskId};
use crate::proto::{self, coordinator_message::Msg};
use crate::time::{UnixMillis, duration_ms};
use crate::types::{PushCredential, Secret, Specialty, TaskSpec};

/// A message from the coordinator to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToAgent {
    Welcome {
        agent_id: AgentId,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
        lease_timeout: Duration,
        /// For each task the agent still holds: the highest output seq
        /// persisted (`u64::MAX`: the attempt is over, only its result is
        /// missing).
        held: Vec<(TaskId, Attempt, u64)>,
    },
    Heartbeat {
        now: UnixMillis,
    },
    Drain {
        reason: String,
    },
    Assign {
        task: TaskId,
        attempt: Attempt,
        spec: Box<TaskSpec>,
        deadline: UnixMillis,
        /// How the agent authenticates its push; `None`: with its own git
        /// credentials.
        push: Option<PushAuth>,
    },
    Cancel {
        task: TaskId,
        attempt: Attempt,
        reason: String,
    },
    OutputAck {
        task: TaskId,
        attempt: Attempt,
        seq: u64,
    },
    FinishedAck {
        task: TaskId,
        attempt: Attempt,
    },
}

/// What an assignment's push is authenticated with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushAuth {
    /// The credential of this GitHub repository (`owner/name`), which the
    /// coordinator's gateway puts in its place as the message is sent: the
    /// core names it, so no credential is ever stored. Not on the wire.
    GithubRepository(String),
    /// The credential itself, as the agent receives it.
    Credential(PushCredential),
}

impl PushAuth {
    pub fn into_credential(self) -> Option<PushCredential> {
        match self {
            Self::Credential(credential) => Some(credential),
            Self::GithubRepository(_) => None,
        }
    }
}

/// The shortest and longest heartbeat timings an agent accepts.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_HEARTBEAT_TIMING: Duration = Duration::from_secs(3600);

impl ToAgent {
    /// Reads the coordinator's message; `Ok(None)` for one this agent does
    /// not know (a newer coordinator's), which it ignores.
    pub fn from_proto(msg: proto::CoordinatorMessage) -> Result<Option<Self>, Error> {
        let Some(msg) = msg.msg else {
            return Ok(None);
        };
        let msg = match msg {
            Msg::Welcome(w) => decode_welcome(w).map_err(|e| e.in_message("Welcome"))?,
            Msg::Heartbeat(h) => Self::Heartbeat {
                now: UnixMillis(h.unix_ms),
            },
            Msg::Drain(d) => Self::Drain { reason: d.reason },
            Msg::Assign(a) => decode_assign(a).map_err(|e| e.in_message("Assign"))?,
            Msg::Cancel(c) => Self::Cancel {
                task: task_id("task_id", &c.task_id).map_err(|e| e.in_message("Cancel"))?,
                attempt: Attempt(c.attempt),
                reason: c.reason,
            },
            Msg::OutputAck(a) => Self::OutputAck {
                task: task_id("task_id", &a.task_id).map_err(|e| e.in_message("OutputAck"))?,
                attempt: Attempt(a.attempt),
                seq: a.seq,
            },
            Msg::FinishedAck(a) => Self::FinishedAck {
                task: task_id("task_id", &a.task_id).map_err(|e| e.in_message("FinishedAck"))?,
                attempt: Attempt(a.attempt),
            },
        };
        Ok(Some(msg))
    }

    /// The protobuf message. An assignment's `PushAuth::GithubRepository`
    /// is not sent: the gateway replaces it with the credential first.
    pub fn into_proto(self) -> proto::CoordinatorMessage {
        let msg = match self {
            Self::Welcome {
                agent_id,
                heartbeat_interval,
                heartbeat_timeout,
                lease_timeout,
                held,
            } => Msg::Welcome(proto::Welcome {
                agent_id: agent_id.to_string(),
                heartbeat_interval_ms: duration_ms(heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(heartbeat_timeout),
                lease_timeout_ms: duration_ms(lease_timeout),
                held: held
                    .into_iter()
                    .map(|(task, attempt, acked_seq)| proto::OutputPosition {
                        task_id: task.to_string(),
                        attempt: attempt.0,
                        acked_seq,
                    })
                    .collect(),
            }),
            Self::Heartbeat { now } => {
                Msg::Heartbeat(proto::CoordinatorHeartbeat { unix_ms: now.0 })
            }
            Self::Drain { reason } => Msg::Drain(proto::Drain { reason }),
            Self::Assign {
                task,
                attempt,
                spec,
                deadline,
                push,
            } => Msg::Assign(proto::Assign {
                task: Some(spec_to_proto(task, *spec)),
                attempt: attempt.0,
                deadline_unix_ms: deadline.0,
                credential: push.and_then(PushAuth::into_credential).map(|c| {
                    proto::PushCredential {
                        username: c.username,
                        token: c.token.expose().to_owned(),
                    }
                }),
            }),
            Self::Cancel {
                task,
                attempt,
                reason,
            } => Msg::Cancel(proto::Cancel {
                task_id: task.to_string(),
                attempt: attempt.0,
                reason,
            }),
            Self::OutputAck { task, attempt, seq } => Msg::OutputAck(proto::OutputAck {
                task_id: task.to_string(),
                attempt: attempt.0,
                seq,
            }),
            Self::FinishedAck { task, attempt } => Msg::FinishedAck(proto::FinishedAck {
                task_id: task.to_string(),
                attempt: attempt.0,
            }),
        };
        proto::CoordinatorMessage { msg: Some(msg) }
    }
}

fn decode_welcome(w: proto::Welcome) -> Result<ToAgent, Error> {
    let timing =
        |ms: u64, min: Duration| Duration::from_millis(ms).clamp(min, MAX_HEARTBEAT_TIMING);
    Ok(ToAgent::Welcome {
        agent_id: AgentId::new(w.agent_id)
            .map_err(|e| Error::invalid("agent_id", e.to_string()))?,
        heartbeat_interval: timing(w.heartbeat_interval_ms, MIN_HEARTBEAT_INTERVAL),
        heartbeat_timeout: timing(w.heartbeat_timeout_ms, MIN_HEARTBEAT_TIMEOUT),
        lease_timeout: Duration::from_millis(w.lease_timeout_ms),
        held: w
            .held
            .iter()
            .map(|h| {
                Ok((
                    task_id("held.task_id", &h.task_id)?,
                    Attempt(h.attempt),
                    h.acked_seq,
                ))
            })
            .collect::<Result<_, Error>>()?,
    })
}

fn decode_assign(a: proto::Assign) -> Result<ToAgent, Error> {
    let spec = a.task.ok_or(Error::Missing("task"))?;
    let specialty = spec
        .triage
        .as_ref()
        .map(|t| values::specialty_from_proto(t.specialty))
        .transpose()?
        .unwrap_or(Specialty::General);
    Ok(ToAgent::Assign {
        task: task_id("task.task_id", &spec.task_id)?,
        attempt: Attempt(a.attempt),
        deadline: UnixMillis(a.deadline_unix_ms),
        push: a.credential.filter(|c| !c.token.is_empty()).map(|c| {
            PushAuth::Credential(PushCredential {
                username: c.username,
                token: Secret::new(c.token),
            })
        }),
        spec: Box::new(TaskSpec {
            repo_url: spec.repo_url,
            base_branch: spec.base_branch,
            issue_number: spec.issue_number,
            title: spec.title,
            body: spec.body,
            issue_url: spec.issue_url,
            author: spec.author,
            labels: spec.labels,
            specialty,
            technologies: spec.triage.map(|t| t.technologies).unwrap_or_default(),
            branch: spec.branch,
            follow_up: spec.follow_up,
            test_command: spec.test_command,
        }),
    })
}

fn spec_to_proto(task: TaskId, spec: TaskSpec) -> proto::TaskSpec {
    proto::TaskSpec {
        task_id: task.to_string(),
        repo_url: spec.repo_url,
        base_branch: spec.base_branch,
        issue_number: spec.issue_number,
        title: spec.title,
        body: spec.body,
        issue_url: spec.issue_url,
        author: spec.author,
        labels: spec.labels,
        triage: Some(proto::Triage {
            specialty: values::specialty_to_proto(spec.specialty) as i32,
            confidence: 1.0,
            complexity: String::new(),
            technologies: spec.technologies,
            keywords: Vec::new(),
        }),
        branch: spec.branch,
        follow_up: spec.follow_up,
        test_command: spec.test_command,
    }
}
