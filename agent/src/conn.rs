//! The agent's link to the coordinator: one mTLS bidirectional stream,
//! reopened with exponential backoff and jitter after any failure
//! (coordinator down or restarting, network, TLS), until shutdown.
//!
//! The link only moves messages: it reports `Up` with a sender for the new
//! stream, every message that arrives, and `Down` when the stream ends; the
//! driver decides what to send (Hello first). A refusal that retrying cannot
//! fix (`PERMISSION_DENIED`: revoked, or not an agent certificate;
//! `ALREADY_EXISTS`: another process is connected with this certificate) is
//! logged with the coordinator's words and reported as `Refused`. This module and `common::wire` are the only agent
//! code that sees protobuf: the conversions to the session's types are here.

use std::time::Duration;

use common::backoff::Backoff;
use common::ids::{Attempt, TaskId};
use common::proto::{
    self, AgentMessage, CoordinatorMessage, agent_gateway_client::AgentGatewayClient,
    agent_message, coordinator_message,
};
use common::telemetry::error_chain;
use common::time::UnixMillis;
use common::types::{AgentAdvert, PushCredential, Secret, Specialty, TaskSpec};
use common::wire;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::config::Config;
use crate::session::{FromCoordinator, Held, ToCoordinator};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid coordinator URL {url:?}: {why}")]
    Url { url: String, why: String },
}

/// What the link tells the driver.
#[derive(Debug)]
pub enum LinkEvent {
    /// A stream is open; send Hello on `tx` first. Cancelling `close` drops it.
    Up {
        tx: mpsc::Sender<AgentMessage>,
        close: CancellationToken,
    },
    Message(FromCoordinator),
    Down {
        reason: String,
    },
    /// The coordinator refuses this agent for good.
    Refused(String),
}

pub struct Link {
    endpoint: Endpoint,
    tls: common::tls::TlsMaterial,
    backoff: Backoff,
}

impl Link {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let url_err = |why: String| Error::Url {
            url: config.coordinator.clone(),
            why,
        };
        let endpoint = Endpoint::from_shared(config.coordinator.clone())
            .map_err(|e| url_err(e.to_string()))?
            .tls_config(config.tls.client_config())
            .map_err(|e| url_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(Self {
            endpoint,
            tls: config.tls.clone(),
            backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
        })
    }

    /// Keeps a stream open until `shutdown`, reporting to `events`. Once
    /// `closing` is cancelled, the current stream is the last: when it ends
    /// (the driver closed it), the link ends quietly.
    pub async fn run(
        mut self,
        events: mpsc::Sender<LinkEvent>,
        shutdown: CancellationToken,
        closing: CancellationToken,
    ) {
        let mut rng = rand::rngs::SmallRng::from_os_rng();
        loop {
            let (welcomed, why) = match self.session(&events, &shutdown).await {
                Ended::Shutdown => return,
                Ended::Refused(why) => {
                    let _ = events.send(LinkEvent::Refused(why)).await;
                    return;
                }
                Ended::Lost { .. } if closing.is_cancelled() => return,
                Ended::Lost { welcomed, why } => (welcomed, why),
            };
            let why = if welcomed {
                self.backoff.reset();
                why
            } else {
                match self.tls.diagnose(now_unix_secs()) {
                    // TLS 1.3 reports a refused certificate as a closed
                    // connection: say what is wrong with ours.
                    Some(cause) => format!("{why}; likely cause: {cause}"),
                    None => why,
                }
            };
            let delay = self.backoff.next_delay(rng.random());
            warn!(
                reason = %why,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                failures = self.backoff.failures(),
                "no connection to the coordinator"
            );
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(
        &mut self,
        events: &mpsc::Sender<LinkEvent>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let lost = |welcomed, why| Ended::Lost { welcomed, why };
        let channel = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            connected = self.endpoint.connect() => match connected {
                Ok(channel) => channel,
                Err(e) => return lost(false, error_chain(&e)),
            },
        };
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let mut client = AgentGatewayClient::new(channel);
        let close = CancellationToken::new();
        let call = client.connect(ReceiverStream::new(rx));
        // Announce the stream before its response arrives: the coordinator
        // answers only after Hello, which the driver sends on `tx`.
        if events
            .send(LinkEvent::Up {
                tx,
                close: close.clone(),
            })
            .await
            .is_err()
        {
            return Ended::Shutdown;
        }
        let mut inbound = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            () = close.cancelled() => return self.down(events, false, "closed by the agent".into()).await,
            response = call => match response {
                Ok(response) => response.into_inner(),
                Err(status) => return self.down_status(events, &status, false).await,
            },
        };
        let mut welcomed = false;
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                () = close.cancelled() => return self.down(events, welcomed, "closed by the agent".into()).await,
                next = inbound.message() => next,
            };
            match next {
                Ok(Some(msg)) => match from_proto(msg) {
                    Ok(Some(msg)) => {
                        welcomed |= matches!(msg, FromCoordinator::Welcome { .. });
                        if events.send(LinkEvent::Message(msg)).await.is_err() {
                            return Ended::Shutdown;
                        }
                    }
                    Ok(None) => {}
                    Err(why) => warn!(%why, "ignoring a malformed message from the coordinator"),
                },
                Ok(None) => {
                    return self
                        .down(events, welcomed, "the coordinator closed the stream".into())
                        .await;
                }
                Err(status) => return self.down_status(events, &status, welcomed).await,
            }
        }
    }

    async fn down(&self, events: &mpsc::Sender<LinkEvent>, welcomed: bool, why: String) -> Ended {
        let _ = events
            .send(LinkEvent::Down {
                reason: why.clone(),
            })
            .await;
        Ended::Lost { welcomed, why }
    }

    async fn down_status(
        &self,
        events: &mpsc::Sender<LinkEvent>,
        status: &Status,
        welcomed: bool,
    ) -> Ended {
        if is_final(status.code()) {
            tracing::error!(
                code = ?status.code(),
                reason = %status.message(),
                "the coordinator refuses this agent; not reconnecting"
            );
            let _ = events
                .send(LinkEvent::Down {
                    reason: status.message().to_owned(),
                })
                .await;
            return Ended::Refused(status.message().to_owned());
        }
        let mut why = format!("{:?}: {}", status.code(), status.message());
        if let Some(source) = std::error::Error::source(status) {
            why = format!("{why}: {}", error_chain(source));
        }
        self.down(events, welcomed, why).await
    }
}

/// Whether the coordinator's refusal is for good: a revoked certificate
/// (PERMISSION_DENIED), or another process already connected with this
/// agent's certificate (ALREADY_EXISTS): reconnecting would only fight it.
pub fn is_final(code: Code) -> bool {
    matches!(code, Code::PermissionDenied | Code::AlreadyExists)
}

/// How one stream ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    Refused(String),
    Lost { welcomed: bool, why: String },
}

fn now_unix_secs() -> i64 {
    i64::try_from(UnixMillis::now().0 / 1000).unwrap_or(i64::MAX)
}

/// The longest heartbeat timing the agent accepts from Welcome.
const HOUR_MS: u64 = 3_600_000;

fn task_id(raw: &str) -> Result<TaskId, String> {
    raw.parse::<TaskId>().map_err(|e| e.to_string())
}

fn from_proto(msg: CoordinatorMessage) -> Result<Option<FromCoordinator>, String> {
    use coordinator_message::Msg;
    Ok(Some(match msg.msg {
        None => return Ok(None),
        Some(Msg::Welcome(w)) => FromCoordinator::Welcome {
            agent_id: w.agent_id,
            // Bounded both ways: timers built from them must not overflow.
            heartbeat_interval: Duration::from_millis(w.heartbeat_interval_ms.clamp(100, HOUR_MS)),
            heartbeat_timeout: Duration::from_millis(w.heartbeat_timeout_ms.clamp(200, HOUR_MS)),
            held: w
                .held
                .iter()
                .map(|h| Ok((task_id(&h.task_id)?, Attempt(h.attempt), h.acked_seq)))
                .collect::<Result<_, String>>()?,
        },
        Some(Msg::Heartbeat(_)) => FromCoordinator::Heartbeat,
        Some(Msg::Drain(d)) => FromCoordinator::Drain { reason: d.reason },
        Some(Msg::Assign(a)) => {
            let spec = a.task.ok_or("Assign without a task")?;
            let specialty = spec
                .triage
                .as_ref()
                .map(|t| wire::specialty_from_proto(t.specialty))
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(Specialty::General);
            FromCoordinator::Assign {
                task: task_id(&spec.task_id)?,
                attempt: Attempt(a.attempt),
                deadline: UnixMillis(a.deadline_unix_ms),
                credential: a
                    .credential
                    .filter(|c| !c.token.is_empty())
                    .map(|c| PushCredential {
                        username: c.username,
                        token: Secret::new(c.token),
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
            }
        }
        Some(Msg::Cancel(c)) => FromCoordinator::Cancel {
            task: task_id(&c.task_id)?,
            attempt: Attempt(c.attempt),
            reason: c.reason,
        },
        Some(Msg::OutputAck(a)) => FromCoordinator::OutputAck {
            task: task_id(&a.task_id)?,
            attempt: Attempt(a.attempt),
            seq: a.seq,
        },
        Some(Msg::FinishedAck(a)) => FromCoordinator::FinishedAck {
            task: task_id(&a.task_id)?,
            attempt: Attempt(a.attempt),
        },
    }))
}

fn running(held: &[Held]) -> Vec<proto::RunningTask> {
    held.iter()
        .map(|h| proto::RunningTask {
            task_id: h.task.to_string(),
            attempt: h.attempt.0,
            last_output_seq: h.last_output_seq,
        })
        .collect()
}

/// The protobuf message for a session message; Hello carries the advert.
/// `None` for a `Resend`, which the driver expands into the spooled chunks
/// and which has no message of its own.
pub fn to_proto(msg: ToCoordinator, advert: &AgentAdvert, name: &str) -> Option<AgentMessage> {
    use agent_message::Msg;
    let msg = match msg {
        ToCoordinator::Hello {
            running: held,
            unhealthy_reason,
        } => {
            let mut hello = wire::hello_from_advert(advert, name);
            hello.running = running(&held);
            hello.unhealthy_reason = unhealthy_reason;
            Msg::Hello(hello)
        }
        ToCoordinator::Heartbeat {
            running: held,
            free_slots,
            unhealthy_reason,
        } => Msg::Heartbeat(proto::Heartbeat {
            running: running(&held),
            free_slots,
            unhealthy_reason,
        }),
        ToCoordinator::Accepted { task, attempt } => Msg::TaskAccepted(proto::TaskAccepted {
            task_id: task.to_string(),
            attempt: attempt.0,
        }),
        ToCoordinator::Rejected {
            task,
            attempt,
            reason,
        } => Msg::TaskRejected(proto::TaskRejected {
            task_id: task.to_string(),
            attempt: attempt.0,
            reason,
        }),
        ToCoordinator::Output(chunk) => Msg::TaskOutput(proto::TaskOutput {
            task_id: chunk.task.to_string(),
            attempt: chunk.attempt.0,
            seq: chunk.seq,
            kind: wire::kind_to_proto(chunk.kind) as i32,
            data: chunk.data.to_vec(),
        }),
        ToCoordinator::Progress {
            task,
            attempt,
            phase,
        } => Msg::TaskProgress(proto::TaskProgress {
            task_id: task.to_string(),
            attempt: attempt.0,
            phase: wire::phase_to_proto(phase) as i32,
            detail: String::new(),
        }),
        ToCoordinator::Finished {
            task,
            attempt,
            report,
        } => Msg::TaskFinished(proto::TaskFinished {
            task_id: task.to_string(),
            attempt: attempt.0,
            outcome: wire::outcome_to_proto(report.outcome) as i32,
            permanent: report.permanent,
            message: report.message.clone(),
            branch: report.branch.clone(),
            commit: report.commit.clone(),
            tests: report.tests.clone().map(|t| proto::TestSummary {
                ran: t.ran,
                passed: t.passed,
                command: t.command,
                exit_code: t.exit_code,
                tail: t.tail,
            }),
            cli: report.cli.clone().map(|c| proto::CliResult {
                cost_usd: c.cost_usd,
                turns: c.turns,
                duration_ms: c.duration_ms,
                session_id: c.session_id,
                is_error: c.is_error,
                subtype: c.subtype,
                result: c.result,
                model: c.model,
            }),
            rate_limit_reset_unix_ms: report.rate_limit_reset_unix_ms,
            last_output_seq: report.last_output_seq,
        }),
        ToCoordinator::Draining { reason } => Msg::Draining(proto::Draining { reason }),
        ToCoordinator::Resend { .. } => return None,
    };
    Some(AgentMessage { msg: Some(msg) })
}

/// Logs the coordinator's view of our name once per stream.
pub fn log_welcome(agent_id: &str, cert_name: &str, heartbeat: Duration) {
    info!(
        agent_id,
        heartbeat_ms = u64::try_from(heartbeat.as_millis()).unwrap_or(0),
        "connected to the coordinator"
    );
    if agent_id != cert_name {
        warn!(
            agent_id,
            cert_name, "the coordinator knows this agent under another name"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_certificate_and_a_second_instance_are_final_other_statuses_are_not() {
        assert!(is_final(Code::PermissionDenied));
        assert!(is_final(Code::AlreadyExists));
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Unauthenticated,
            Code::InvalidArgument,
        ] {
            assert!(!is_final(code), "{code:?}");
        }
    }

    #[test]
    fn hello_and_heartbeat_carry_the_unhealthy_reason() {
        let advert = AgentAdvert {
            agent_version: "0".into(),
            specialties: vec![Specialty::General],
            capacity: 1,
            labels: Default::default(),
            toolchains: vec![],
            hostname: "h".into(),
            instance_id: "i".into(),
        };
        let hello = to_proto(
            ToCoordinator::Hello {
                running: vec![],
                unhealthy_reason: "not logged in".into(),
            },
            &advert,
            "pc-1",
        );
        assert!(matches!(
            hello.and_then(|m| m.msg),
            Some(agent_message::Msg::Hello(h)) if h.unhealthy_reason == "not logged in" && h.instance_id == "i"
        ));
        let beat = to_proto(
            ToCoordinator::Heartbeat {
                running: vec![],
                free_slots: 1,
                unhealthy_reason: "CLI missing".into(),
            },
            &advert,
            "pc-1",
        );
        assert!(matches!(
            beat.and_then(|m| m.msg),
            Some(agent_message::Msg::Heartbeat(h)) if h.unhealthy_reason == "CLI missing"
        ));
    }
}
