//! The gRPC adapters: `AgentGateway` (one bidirectional stream per agent) and
//! `Admin`. They authenticate the caller from its verified client
//! certificate, convert protobuf to domain types (validating everything an
//! agent sends), and hand the rest to the driver.
//!
//! API boundary: only this module and `common::wire` see protobuf types.

use std::pin::Pin;
use std::sync::Arc;

use common::ids::{AgentId, Attempt, TaskId};
use common::pki::Role;
use common::proto::{
    self, AgentInfo, AgentMessage, CoordinatorMessage, admin_server, agent_gateway_server,
    agent_message, coordinator_message,
};
use common::time::duration_ms;
use common::tls::PeerIdentity;
use common::types::{CliResult, FinishedReport, OutputKind, TaskSpec, TestSummary};
use common::wire;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::core::{
    AdminError, AdminRecord, AgentState, AgentView, CloseReason, FromAgent, NewTask, OpenRejected,
    ReportedTask, Task, TaskError, TaskEvent, TaskSource, TaskState, TaskTriage, ToAgent,
};
use crate::driver::{
    Command, DriverGone, DriverHandle, OUTBOUND_QUEUE, Outbound, RevokedAdmins, TaskQuery,
    WATCH_QUEUE,
};
use crate::feed::{self, Coalescer, FeedEvent};
use crate::store::Store;
use crate::triage::{self, Rules};

impl From<DriverGone> for Status {
    fn from(e: DriverGone) -> Self {
        Status::unavailable(e.to_string())
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::UnknownAgent(id) => Status::not_found(format!("no agent named {id}")),
            AdminError::NotConnected(id) => {
                Status::failed_precondition(format!("agent {id} is not connected"))
            }
            AdminError::Revoked(id) => Status::failed_precondition(format!(
                "agent {id} is revoked (unrevoke it first with `ccc unrevoke {id}`)"
            )),
            AdminError::NotDrained(id) => {
                Status::failed_precondition(format!("agent {id} is not drained by an admin"))
            }
            AdminError::NotRevoked(id) => {
                Status::failed_precondition(format!("agent {id} is not revoked"))
            }
            AdminError::Connected(id) => Status::failed_precondition(format!(
                "agent {id} is connected: stop it before forgetting it"
            )),
            AdminError::HoldsTasks(id, tasks) => Status::failed_precondition(format!(
                "agent {id} holds {}: cancel them or wait for their leases to run out",
                tasks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            AdminError::UnknownAdmin(name) => {
                Status::not_found(format!("admin {name} is not revoked"))
            }
            AdminError::OwnName(name) => Status::invalid_argument(format!(
                "admin {name} cannot revoke its own certificate: ask another admin"
            )),
            AdminError::InvalidName(why) => Status::invalid_argument(format!("name: {why}")),
        }
    }
}

fn peer_address<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The verified identity of the caller, and that it has `role`.
fn authorize<T>(req: &Request<T>, role: Role, what: &str) -> Result<PeerIdentity, Status> {
    let peer = peer_address(req);
    let certs = req.peer_certs().ok_or_else(|| {
        warn!(%peer, "{what}: no client certificate");
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        warn!(%peer, "{what}: empty client certificate chain");
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let identity = PeerIdentity::from_der(leaf).map_err(|e| {
        warn!(%peer, error = %e, "{what}: unusable client certificate");
        Status::unauthenticated(e.to_string())
    })?;
    if identity.role != role {
        warn!(
            %peer,
            name = %identity.name,
            role = %identity.role,
            "{what}: refused, needs the {role} role"
        );
        return Err(Status::permission_denied(format!(
            "{what} needs a certificate with the {role} role; this one is {} {:?}",
            identity.role, identity.name
        )));
    }
    Ok(identity)
}

/// Only admin-role certificates that are not revoked reach the `Admin`
/// service.
#[allow(clippy::result_large_err)]
pub fn admin_only(
    req: Request<()>,
    revoked: &tokio::sync::watch::Receiver<RevokedAdmins>,
) -> Result<Request<()>, Status> {
    let identity = authorize(&req, Role::Admin, "Admin API")?;
    if let Some(reason) = revoked.borrow().get(&identity.name) {
        warn!(peer = %peer_address(&req), admin = %identity.name, %reason, "Admin API: refused a revoked admin");
        return Err(Status::permission_denied(format!(
            "the certificate of admin {} is revoked: {reason}",
            identity.name
        )));
    }
    Ok(req)
}

pub struct Gateway {
    driver: DriverHandle,
    /// Where push credentials come from (the GitHub token, or the App's
    /// installation tokens); none without GitHub credentials.
    github: Option<crate::github::client::Client>,
}

impl Gateway {
    pub fn new(driver: DriverHandle, github: Option<crate::github::client::Client>) -> Self {
        Self { driver, github }
    }
}

/// An assignment's push credential: the GitHub token, or an installation
/// token minted for the task's repository. It travels inside the mTLS
/// stream and is never stored (the core's copy of the assignment has none).
async fn with_credential(
    github: Option<&crate::github::client::Client>,
    msg: ToAgent,
) -> CoordinatorMessage {
    let push_as = match &msg {
        ToAgent::Assign {
            push_as: Some(repo),
            ..
        } => Some(repo.clone()),
        _ => None,
    };
    let mut out = to_proto(msg);
    if let (Some(repo), Some(github)) = (push_as, github) {
        match github.push_token(&repo).await {
            Ok(Some(token)) => {
                if let Some(coordinator_message::Msg::Assign(assign)) = out.msg.as_mut() {
                    assign.credential = Some(proto::PushCredential {
                        username: "x-access-token".into(),
                        token: token.expose().to_owned(),
                    });
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(repo = %repo, error = %e, "no push credential for the assignment; the agent uses its own")
            }
        }
    }
    out
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl agent_gateway_server::AgentGateway for Gateway {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = authorize(&req, Role::Agent, "agent stream")?;
        let peer = peer_address(&req);
        let agent = AgentId::new(identity.name)
            .map_err(|e| Status::unauthenticated(format!("certificate name: {e}")))?;
        let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let opened = self
            .driver
            .call(|reply| Command::Open {
                agent: agent.clone(),
                peer: peer.clone(),
                outbound,
                reply,
            })
            .await?;
        let conn = match opened {
            Ok(conn) => conn,
            Err(OpenRejected::Revoked { agent, reason }) => {
                warn!(agent_id = %agent, %peer, %reason, "refused stream of a revoked agent");
                return Err(Status::permission_denied(format!(
                    "agent {agent} is revoked ({reason})"
                )));
            }
        };
        // When tonic drops the response stream (stream over, connection
        // gone), stop reading the agent's messages too.
        let stop = CancellationToken::new();
        let span = info_span!("agent", agent_id = %agent, conn = conn.0);
        tokio::spawn(
            pump_inbound(self.driver.clone(), conn, req.into_inner(), stop.clone())
                .instrument(span),
        );
        let guard = Arc::new(stop.drop_guard());
        let github = self.github.clone();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).then(move |out| {
            let guard = Arc::clone(&guard);
            let github = github.clone();
            async move {
                let _keep = guard;
                match out {
                    Outbound::Msg(msg) => Ok(with_credential(github.as_ref(), msg).await),
                    Outbound::Close(reason) => Err(close_status(reason)),
                }
            }
        });
        // The driver drops its sender right after a `Close`, so the stream
        // ends with that status.
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Forwards the agent's messages to the driver until the stream ends.
async fn pump_inbound(
    driver: DriverHandle,
    conn: crate::core::ConnId,
    mut inbound: Streaming<AgentMessage>,
    stop: CancellationToken,
) {
    let reason = loop {
        let next = tokio::select! {
            () = stop.cancelled() => break "stream closed by the coordinator".to_owned(),
            next = inbound.next() => next,
        };
        let msg = match next {
            None => break "agent closed the stream".to_owned(),
            Some(Err(status)) => break format!("stream error: {}", status.message()),
            Some(Ok(msg)) => msg,
        };
        let cmd = match from_proto(msg) {
            Ok(Some(msg)) => Command::Message { conn, msg },
            Ok(None) => continue,
            Err(why) => {
                warn!(%why, "malformed message from agent");
                Command::Malformed { conn, why }
            }
        };
        if driver.send(cmd).await.is_err() {
            return;
        }
    };
    debug!(%reason, "agent stream ended");
    let _ = driver.send(Command::Closed { conn, reason }).await;
}

/// The largest output chunk an agent may send: the agent's own bound (its
/// lines of output are cut at this size), so a larger chunk is a protocol
/// error rather than a megabyte per message to buffer and store.
pub const MAX_CHUNK: usize = wire::MAX_OUTPUT_CHUNK;

fn task_id(raw: &str) -> Result<TaskId, String> {
    raw.parse::<TaskId>().map_err(|e| e.to_string())
}

fn reported(tasks: &[proto::RunningTask]) -> Result<Vec<ReportedTask>, String> {
    if tasks.len() > 4096 {
        return Err("too many running tasks".into());
    }
    tasks
        .iter()
        .map(|t| {
            Ok(ReportedTask {
                task: task_id(&t.task_id)?,
                attempt: Attempt(t.attempt),
                last_output_seq: t.last_output_seq,
            })
        })
        .collect()
}

/// Keeps at most `max` bytes of an agent-supplied string, on a char boundary.
fn bounded(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn report_from_proto(f: proto::TaskFinished) -> Result<FinishedReport, String> {
    Ok(FinishedReport {
        permanent: f.permanent,
        outcome: wire::outcome_from_proto(f.outcome).map_err(|e| e.to_string())?,
        message: bounded(f.message, 4096),
        branch: bounded(f.branch, 256),
        commit: bounded(f.commit, 64),
        tests: f.tests.map(|t| TestSummary {
            ran: t.ran,
            passed: t.passed,
            command: bounded(t.command, 1024),
            exit_code: t.exit_code,
            tail: bounded(t.tail, 16 * 1024),
        }),
        cli: f.cli.map(|c| CliResult {
            cost_usd: if c.cost_usd.is_finite() {
                c.cost_usd
            } else {
                0.0
            },
            turns: c.turns,
            duration_ms: c.duration_ms,
            session_id: bounded(c.session_id, 128),
            is_error: c.is_error,
            subtype: bounded(c.subtype, 128),
            result: bounded(c.result, 16 * 1024),
            model: bounded(c.model, 128),
        }),
        rate_limit_reset_unix_ms: f.rate_limit_reset_unix_ms,
        last_output_seq: f.last_output_seq,
    })
}

/// Validates an agent message; `Ok(None)` for messages the coordinator does
/// not act on yet (task reports arrive with the task lifecycle).
fn from_proto(msg: AgentMessage) -> Result<Option<FromAgent>, String> {
    use agent_message::Msg;
    match msg.msg {
        None => Err("empty AgentMessage".into()),
        Some(Msg::Hello(hello)) => {
            if !hello.claimed_name.is_empty() {
                debug!(claimed = %hello.claimed_name, "ignoring the name claimed in Hello");
            }
            let advert = wire::advert_from_hello(&hello).map_err(|e| format!("Hello: {e}"))?;
            Ok(Some(FromAgent::Hello {
                advert,
                running: reported(&hello.running).map_err(|e| format!("Hello: {e}"))?,
                unhealthy: wire::unhealthy_reason(&hello.unhealthy_reason),
            }))
        }
        Some(Msg::Heartbeat(hb)) => Ok(Some(FromAgent::Heartbeat {
            free_slots: hb.free_slots,
            running: reported(&hb.running).map_err(|e| format!("Heartbeat: {e}"))?,
            unhealthy: wire::unhealthy_reason(&hb.unhealthy_reason),
        })),
        Some(Msg::Draining(d)) => Ok(Some(FromAgent::Draining {
            reason: bounded(d.reason, 1024),
        })),
        Some(Msg::TaskAccepted(m)) => Ok(Some(FromAgent::Accepted {
            task: task_id(&m.task_id)?,
            attempt: Attempt(m.attempt),
        })),
        Some(Msg::TaskRejected(m)) => Ok(Some(FromAgent::Rejected {
            task: task_id(&m.task_id)?,
            attempt: Attempt(m.attempt),
            reason: bounded(m.reason, 1024),
        })),
        Some(Msg::TaskOutput(m)) => {
            if m.data.len() > MAX_CHUNK {
                return Err(format!(
                    "TaskOutput: chunk of {} bytes exceeds {MAX_CHUNK}",
                    m.data.len()
                ));
            }
            Ok(Some(FromAgent::Output {
                task: task_id(&m.task_id)?,
                attempt: Attempt(m.attempt),
                seq: wire::output_seq(m.seq).map_err(|e| format!("TaskOutput: {e}"))?,
                kind: wire::kind_from_proto(m.kind).map_err(|e| e.to_string())?,
                data: Arc::from(m.data),
            }))
        }
        Some(Msg::TaskProgress(m)) => Ok(Some(FromAgent::Progress {
            task: task_id(&m.task_id)?,
            attempt: Attempt(m.attempt),
            phase: wire::phase_from_proto(m.phase).map_err(|e| e.to_string())?,
        })),
        Some(Msg::TaskFinished(m)) => {
            let task = task_id(&m.task_id)?;
            let attempt = Attempt(m.attempt);
            Ok(Some(FromAgent::Finished {
                task,
                attempt,
                report: report_from_proto(m).map_err(|e| format!("TaskFinished: {e}"))?,
            }))
        }
    }
}

fn to_proto(msg: ToAgent) -> CoordinatorMessage {
    use coordinator_message::Msg;
    let msg = match msg {
        ToAgent::Welcome {
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
        ToAgent::Heartbeat { now } => {
            Msg::Heartbeat(proto::CoordinatorHeartbeat { unix_ms: now.0 })
        }
        ToAgent::Drain { reason } => Msg::Drain(proto::Drain { reason }),
        ToAgent::Assign {
            task,
            attempt,
            spec,
            deadline,
            ..
        } => Msg::Assign(proto::Assign {
            task: Some(spec_to_proto(task, &spec)),
            attempt: attempt.0,
            deadline_unix_ms: deadline.0,
            credential: None,
        }),
        ToAgent::Cancel {
            task,
            attempt,
            reason,
        } => Msg::Cancel(proto::Cancel {
            task_id: task.to_string(),
            attempt: attempt.0,
            reason,
        }),
        ToAgent::OutputAck { task, attempt, seq } => Msg::OutputAck(proto::OutputAck {
            task_id: task.to_string(),
            attempt: attempt.0,
            seq,
        }),
        ToAgent::FinishedAck { task, attempt } => Msg::FinishedAck(proto::FinishedAck {
            task_id: task.to_string(),
            attempt: attempt.0,
        }),
    };
    CoordinatorMessage { msg: Some(msg) }
}

fn spec_to_proto(task: TaskId, spec: &TaskSpec) -> proto::TaskSpec {
    proto::TaskSpec {
        task_id: task.to_string(),
        repo_url: spec.repo_url.clone(),
        base_branch: spec.base_branch.clone(),
        issue_number: spec.issue_number,
        title: spec.title.clone(),
        body: spec.body.clone(),
        issue_url: spec.issue_url.clone(),
        author: spec.author.clone(),
        labels: spec.labels.clone(),
        triage: Some(proto::Triage {
            specialty: wire::specialty_to_proto(spec.specialty) as i32,
            confidence: 1.0,
            complexity: String::new(),
            technologies: spec.technologies.clone(),
            keywords: Vec::new(),
        }),
        branch: spec.branch.clone(),
        follow_up: spec.follow_up,
        test_command: spec.test_command.clone(),
    }
}

fn close_status(reason: CloseReason) -> Status {
    match reason {
        CloseReason::Replaced => {
            Status::aborted("replaced by a newer stream with the same agent certificate")
        }
        CloseReason::HeartbeatTimeout => {
            Status::deadline_exceeded("no heartbeat within the timeout")
        }
        CloseReason::HelloTimeout => Status::deadline_exceeded("no Hello within the timeout"),
        CloseReason::Revoked(reason) => {
            Status::permission_denied(format!("agent revoked ({reason})"))
        }
        CloseReason::Protocol(why) => Status::invalid_argument(why),
        CloseReason::Duplicate(why) => Status::already_exists(why),
        CloseReason::Undrained => {
            Status::unavailable("the drain was lifted: reconnect to take work again")
        }
    }
}

pub struct Admin {
    driver: DriverHandle,
    store: Arc<dyn Store>,
    rules: Arc<Rules>,
}

impl Admin {
    pub fn new(driver: DriverHandle, store: Arc<dyn Store>, rules: Arc<Rules>) -> Self {
        Self {
            driver,
            store,
            rules,
        }
    }
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Unknown(id) => Status::not_found(format!("no task {id}")),
            TaskError::AlreadyFinished(id, state) => {
                Status::failed_precondition(format!("task {id} is already {}", state.as_str()))
            }
            TaskError::NotFinished(id, state) => Status::failed_precondition(format!(
                "task {id} is {}: only failed or cancelled tasks can be retried",
                state.as_str()
            )),
        }
    }
}

fn admin_task_id(raw: &str) -> Result<TaskId, Status> {
    raw.parse::<TaskId>()
        .map_err(|e| Status::invalid_argument(format!("task_id: {e}")))
}

fn task_state_to_proto(s: TaskState) -> proto::TaskState {
    match s {
        TaskState::NeedsInfo => proto::TaskState::NeedsInfo,
        TaskState::Queued => proto::TaskState::Queued,
        TaskState::Assigned => proto::TaskState::Assigned,
        TaskState::Running => proto::TaskState::Running,
        TaskState::Finishing => proto::TaskState::Finishing,
        TaskState::Succeeded => proto::TaskState::Succeeded,
        TaskState::Failed => proto::TaskState::Failed,
        TaskState::Cancelled => proto::TaskState::Cancelled,
    }
}

fn task_state_from_proto(value: i32) -> Result<Option<TaskState>, Status> {
    use proto::TaskState as P;
    Ok(match P::try_from(value) {
        Ok(P::Unspecified) => None,
        Ok(P::NeedsInfo) => Some(TaskState::NeedsInfo),
        Ok(P::Queued) => Some(TaskState::Queued),
        Ok(P::Assigned) => Some(TaskState::Assigned),
        Ok(P::Running) => Some(TaskState::Running),
        Ok(P::Finishing) => Some(TaskState::Finishing),
        Ok(P::Succeeded) => Some(TaskState::Succeeded),
        Ok(P::Failed) => Some(TaskState::Failed),
        Ok(P::Cancelled) => Some(TaskState::Cancelled),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown task state {value}"
            )));
        }
    })
}

pub fn task_info(task: &Task) -> proto::TaskInfo {
    proto::TaskInfo {
        task_id: task.id.to_string(),
        source: match &task.source {
            TaskSource::Manual { .. } => "manual".into(),
            TaskSource::Github { .. } => "github".into(),
        },
        repo: task.spec.repo_url.clone(),
        base_branch: task.spec.base_branch.clone(),
        title: task.spec.title.clone(),
        body: task.spec.body.clone(),
        issue_number: task.spec.issue_number,
        issue_url: task.spec.issue_url.clone(),
        author: task.spec.author.clone(),
        specialty: wire::specialty_to_proto(task.spec.specialty) as i32,
        technologies: task.spec.technologies.clone(),
        priority: task.priority,
        state: task_state_to_proto(task.state) as i32,
        state_reason: task.state_reason.clone(),
        attempts: task
            .attempts
            .iter()
            .map(|a| {
                let report = a.report.as_ref();
                proto::TaskAttempt {
                    attempt: a.attempt.0,
                    agent_id: a.agent.to_string(),
                    assigned_at: Some(a.assigned_at.to_timestamp()),
                    accepted_at: a.accepted_at.map(|t| t.to_timestamp()),
                    finished_at: a.finished_at.map(|t| t.to_timestamp()),
                    outcome: a
                        .outcome
                        .map_or(proto::Outcome::Unspecified, wire::outcome_to_proto)
                        as i32,
                    message: a.message.clone(),
                    placement: a.placement.clone(),
                    outcome_name: a.outcome.map(|o| o.as_str().to_owned()).unwrap_or_default(),
                    phase: a
                        .phase
                        .map_or(proto::Phase::Unspecified, wire::phase_to_proto)
                        as i32,
                    branch: report.map(|r| r.branch.clone()).unwrap_or_default(),
                    commit: report.map(|r| r.commit.clone()).unwrap_or_default(),
                    tests: report
                        .and_then(|r| r.tests.as_ref())
                        .map(|t| proto::TestSummary {
                            ran: t.ran,
                            passed: t.passed,
                            command: t.command.clone(),
                            exit_code: t.exit_code,
                            tail: t.tail.clone(),
                        }),
                    cli: report
                        .and_then(|r| r.cli.as_ref())
                        .map(|c| proto::CliResult {
                            cost_usd: c.cost_usd,
                            turns: c.turns,
                            duration_ms: c.duration_ms,
                            session_id: c.session_id.clone(),
                            is_error: c.is_error,
                            subtype: c.subtype.clone(),
                            result: c.result.clone(),
                            model: c.model.clone(),
                        }),
                }
            })
            .collect(),
        max_attempts: task.max_attempts,
        branch: task.spec.branch.clone(),
        created_at: Some(task.created_at.to_timestamp()),
        updated_at: Some(task.updated_at.to_timestamp()),
        not_before: task.not_before.map(|t| t.to_timestamp()),
        cancel_requested: task.cancel_requested.clone().unwrap_or_default(),
        test_command: task.spec.test_command.clone(),
        outcome: task
            .attempts
            .iter()
            .rev()
            .find_map(|a| a.outcome)
            .map(|o| o.to_string())
            .unwrap_or_default(),
        waiting_reason: task.waiting_reason.clone().unwrap_or_default(),
        triage: task.triage.as_ref().map(triage_report),
        github_repo: match &task.source {
            TaskSource::Github { repo, .. } => repo.clone(),
            TaskSource::Manual { .. } => String::new(),
        },
        labels: match &task.source {
            TaskSource::Github { labels, .. } => labels.clone(),
            TaskSource::Manual { .. } => Vec::new(),
        },
        delivery_id: match &task.source {
            TaskSource::Github { delivery, .. } => delivery.clone(),
            TaskSource::Manual { .. } => String::new(),
        },
        pull_request_url: task
            .github
            .as_ref()
            .and_then(|g| g.pull.as_ref())
            .map(|p| p.url.clone())
            .unwrap_or_default(),
        pull_request_draft: task
            .github
            .as_ref()
            .and_then(|g| g.pull.as_ref())
            .is_some_and(|p| p.draft),
        pending_effects: task.pending_effects.clone(),
        github_error: task
            .github
            .as_ref()
            .and_then(|g| g.error.clone())
            .unwrap_or_default(),
    }
}

fn output_event(
    task: TaskId,
    attempt: Attempt,
    seq: u64,
    kind: OutputKind,
    data: &[u8],
) -> proto::TaskEvent {
    proto::TaskEvent {
        event: Some(proto::task_event::Event::Output(proto::TaskOutput {
            task_id: task.to_string(),
            attempt: attempt.0,
            seq,
            kind: wire::kind_to_proto(kind) as i32,
            data: data.to_vec(),
        })),
    }
}

fn state_event(task: &Task) -> proto::TaskEvent {
    proto::TaskEvent {
        event: Some(proto::task_event::Event::Task(task_info(task))),
    }
}

fn new_task(
    req: proto::SubmitTaskRequest,
    admin: &PeerIdentity,
    rules: &Rules,
) -> Result<NewTask, Status> {
    let field = |name: &str, value: &str, max: usize, required: bool| -> Result<(), Status> {
        if required && value.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{name} is required")));
        }
        if value.len() > max {
            return Err(Status::invalid_argument(format!(
                "{name} is longer than {max} bytes"
            )));
        }
        Ok(())
    };
    field("repo", &req.repo, 2048, true)?;
    field("title", &req.title, 512, true)?;
    field("body", &req.body, 256 * 1024, false)?;
    field("base_branch", &req.base_branch, 256, false)?;
    field("test_command", &req.test_command, 4096, false)?;
    field("follow_up_branch", &req.follow_up_branch, 256, false)?;
    let invalid =
        |name: &str, e: &dyn std::fmt::Display| Status::invalid_argument(format!("{name}: {e}"));
    common::repo::check_repo_url(&req.repo).map_err(|e| invalid("repo", &e))?;
    if !req.base_branch.is_empty() {
        common::repo::check_branch(&req.base_branch).map_err(|e| invalid("base_branch", &e))?;
    }
    let follow_up = !req.follow_up_branch.is_empty();
    if follow_up {
        common::repo::check_branch(&req.follow_up_branch)
            .map_err(|e| invalid("follow_up_branch", &e))?;
    }
    if req.technologies.len() > 32 {
        return Err(Status::invalid_argument("at most 32 technologies"));
    }
    let given = if req.specialty == 0 {
        None
    } else {
        Some(
            wire::specialty_from_proto(req.specialty)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        )
    };
    // Every task is triaged; the submitter's specialty, when given, wins.
    let result = triage::triage(
        &triage::Issue {
            title: &req.title,
            body: &req.body,
            labels: &[],
            languages: &[],
        },
        rules,
    );
    let specialty = given.unwrap_or(result.specialty);
    let mut technologies: Vec<String> = req
        .technologies
        .into_iter()
        .map(|t| bounded(t, 64))
        .collect();
    for tech in &result.technologies {
        if !technologies.iter().any(|t| t.eq_ignore_ascii_case(tech)) {
            technologies.push(tech.clone());
        }
    }
    Ok(NewTask {
        source: TaskSource::Manual {
            submitted_by: admin.name.clone(),
        },
        spec: TaskSpec {
            repo_url: req.repo,
            base_branch: req.base_branch,
            issue_number: req.issue_number,
            title: req.title,
            body: req.body,
            issue_url: String::new(),
            author: admin.name.clone(),
            labels: Vec::new(),
            specialty,
            technologies,
            branch: req.follow_up_branch,
            follow_up,
            test_command: req.test_command,
        },
        priority: req.priority.clamp(-1000, 1000),
        needs_info: false,
        triage: Some(TaskTriage {
            result,
            specialty_given: given.is_some(),
        }),
    })
}

/// A task's triage as the Admin API answers it.
pub fn triage_report(t: &TaskTriage) -> proto::TriageReport {
    let r = &t.result;
    proto::TriageReport {
        specialty: wire::specialty_to_proto(r.specialty) as i32,
        confidence: r.confidence,
        scores: r.scores.iter().map(|(s, v)| (s.to_string(), *v)).collect(),
        complexity: r.complexity.as_str().to_owned(),
        technologies: r.technologies.clone(),
        keywords: r.keywords.clone(),
        evidence: r
            .evidence
            .iter()
            .map(|e| proto::TriageEvidence {
                signal: e.signal.clone(),
                source: e.source.as_str().to_owned(),
                weight: e.weight,
                specialty: e
                    .specialty
                    .map_or(proto::Specialty::Unspecified, wire::specialty_to_proto)
                    as i32,
                technology: e.technology.clone().unwrap_or_default(),
            })
            .collect(),
        unclear: r.unclear,
        missing: r.missing.clone(),
        specialty_given: t.specialty_given,
    }
}

fn agent_id(raw: &str) -> Result<AgentId, Status> {
    AgentId::new(raw).map_err(|e| Status::invalid_argument(format!("agent_id: {e}")))
}

fn agent_info(view: AgentView) -> AgentInfo {
    let record = view.record;
    let state = match record.state {
        AgentState::Connected => proto::AgentState::Connected,
        AgentState::Disconnected => proto::AgentState::Disconnected,
        AgentState::Draining => proto::AgentState::Draining,
        AgentState::Revoked => proto::AgentState::Revoked,
    };
    let advert = record.advert.unwrap_or_else(|| common::types::AgentAdvert {
        agent_version: String::new(),
        specialties: Vec::new(),
        capacity: 0,
        labels: Default::default(),
        toolchains: Vec::new(),
        hostname: String::new(),
        instance_id: String::new(),
    });
    AgentInfo {
        agent_id: record.id.to_string(),
        state: state as i32,
        specialties: advert
            .specialties
            .iter()
            .map(|&s| wire::specialty_to_proto(s) as i32)
            .collect(),
        capacity: advert.capacity,
        labels: advert.labels.into_iter().collect(),
        toolchains: advert
            .toolchains
            .iter()
            .map(wire::toolchain_to_proto)
            .collect(),
        agent_version: advert.agent_version,
        hostname: advert.hostname,
        first_seen: Some(record.first_seen.to_timestamp()),
        last_seen: Some(record.last_seen.to_timestamp()),
        connections: record.connections,
        free_slots: view.free_slots,
        running: view
            .running
            .into_iter()
            .map(|t| proto::RunningTask {
                task_id: t.task.to_string(),
                attempt: t.attempt.0,
                last_output_seq: t.last_output_seq,
            })
            .collect(),
        last_disconnect_reason: record.last_disconnect_reason.unwrap_or_default(),
        peer_address: record.peer_address,
        revoked_reason: record.revoked_reason.unwrap_or_default(),
        // A drain ends with its stream; the record keeps the reason until the
        // next Hello.
        drain_reason: if record.state == AgentState::Draining {
            record.drain_reason.unwrap_or_default()
        } else {
            String::new()
        },
        instance_id: advert.instance_id,
        assigned: view.assigned.iter().map(ToString::to_string).collect(),
        unhealthy_reason: record.unhealthy.unwrap_or_default(),
        cooldown_until: view.cooldown_until.map(|t| t.to_timestamp()),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::TaskEvent, Status>> + Send>>;
type ClusterStream = Pin<Box<dyn Stream<Item = Result<proto::ClusterEvent, Status>> + Send>>;

/// How often a cluster feed sends output lines at most.
const FEED_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// A task in a cluster feed: without its body and triage, which a live
/// view does not show and which would make a snapshot of many tasks large.
fn task_summary(task: &Task) -> proto::TaskInfo {
    proto::TaskInfo {
        body: String::new(),
        triage: None,
        ..task_info(task)
    }
}

fn task_line(line: &feed::Line) -> proto::TaskOutput {
    proto::TaskOutput {
        task_id: line.task.to_string(),
        attempt: line.attempt.0,
        seq: line.seq,
        kind: wire::kind_to_proto(line.kind) as i32,
        data: line.data.to_vec(),
    }
}

fn snapshot_event(snapshot: feed::Snapshot) -> proto::ClusterEvent {
    proto::ClusterEvent {
        event: Some(proto::cluster_event::Event::Snapshot(
            proto::ClusterSnapshot {
                agents: snapshot.agents.into_iter().map(agent_info).collect(),
                tasks: snapshot.tasks.iter().map(task_summary).collect(),
                lines: snapshot.lines.iter().map(task_line).collect(),
            },
        )),
    }
}

fn cluster_event(event: FeedEvent) -> proto::ClusterEvent {
    use proto::cluster_event::Event;
    proto::ClusterEvent {
        event: Some(match event {
            FeedEvent::Agent(view) => Event::Agent(agent_info(*view)),
            FeedEvent::AgentForgotten(id) => Event::AgentForgotten(id.to_string()),
            FeedEvent::Task(task) => Event::Task(task_summary(&task)),
            FeedEvent::Line(line) => Event::Line(task_line(&line)),
        }),
    }
}

/// Registers a cluster feed with the driver: its changes, and the snapshot
/// they follow.
async fn register_feed(
    driver: &DriverHandle,
    recent_ended: usize,
) -> Result<(mpsc::Receiver<FeedEvent>, feed::Snapshot), DriverGone> {
    let (events, rx) = mpsc::channel(feed::FEED_QUEUE);
    let snapshot = driver
        .call(|reply| Command::WatchCluster {
            recent_ended,
            events,
            reply,
        })
        .await?;
    Ok((rx, snapshot))
}

/// Streams a cluster feed to one client: the snapshot, then the driver's
/// changes through a [`Coalescer`], which keeps taking them while the
/// client is slow. Output lines go out at most every
/// [`FEED_LINE_INTERVAL`]. When the driver drops the feed (it fell behind),
/// it registers again and sends a fresh snapshot.
async fn stream_feed(
    driver: DriverHandle,
    recent_ended: usize,
    mut events: mpsc::Receiver<FeedEvent>,
    snapshot: feed::Snapshot,
    tx: mpsc::Sender<Result<proto::ClusterEvent, Status>>,
) {
    if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
        return;
    }
    let mut pending = Coalescer::default();
    let mut line_ticks = tokio::time::interval(FEED_LINE_INTERVAL);
    line_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lines_due = false;
    loop {
        let ready = pending.has_changes() || (lines_due && pending.has_lines());
        tokio::select! {
            () = tx.closed() => return,
            event = events.recv() => match event {
                Some(event) => pending.push(event),
                None => {
                    let (again, snapshot) = match register_feed(&driver, recent_ended).await {
                        Ok(registered) => registered,
                        Err(gone) => {
                            let _ = tx.send(Err(gone.into())).await;
                            return;
                        }
                    };
                    debug!("a cluster feed fell behind; sending a fresh snapshot");
                    events = again;
                    pending.clear();
                    if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
                        return;
                    }
                }
            },
            _ = line_ticks.tick(), if !lines_due && pending.has_lines() => lines_due = true,
            permit = tx.reserve(), if ready => {
                let Ok(permit) = permit else { return };
                if let Some(event) = pending.pop(lines_due) {
                    permit.send(Ok(cluster_event(event)));
                }
                lines_due &= pending.has_lines();
            }
        }
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Admin {
    type WatchTaskStream = WatchStream;
    type WatchClusterStream = ClusterStream;

    async fn watch_cluster(
        &self,
        req: Request<proto::WatchClusterRequest>,
    ) -> Result<Response<Self::WatchClusterStream>, Status> {
        let recent_ended = match req.get_ref().recent_ended {
            0 => feed::DEFAULT_RECENT_ENDED,
            n => {
                usize::try_from(n).map_or(feed::MAX_RECENT_ENDED, |n| n.min(feed::MAX_RECENT_ENDED))
            }
        };
        let (events, snapshot) = register_feed(&self.driver, recent_ended).await?;
        let (tx, rx) = mpsc::channel(16);
        if req.get_ref().snapshot_only {
            // The watcher's queue goes with `events`; the driver prunes it.
            drop(events);
            let _ = tx.send(Ok(snapshot_event(snapshot))).await;
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }
        tokio::spawn(stream_feed(
            self.driver.clone(),
            recent_ended,
            events,
            snapshot,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn undrain_agent(
        &self,
        req: Request<proto::UndrainAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "undrain requested");
        let view = self
            .driver
            .call(|reply| Command::Undrain { agent, reply })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn unrevoke_agent(
        &self,
        req: Request<proto::UnrevokeAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "unrevoke requested");
        let view = self
            .driver
            .call(|reply| Command::Unrevoke { agent, reply })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn forget_agent(
        &self,
        req: Request<proto::ForgetAgentRequest>,
    ) -> Result<Response<proto::ForgetAgentResponse>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "forget requested");
        self.driver
            .call(|reply| Command::Forget { agent, reply })
            .await??;
        Ok(Response::new(proto::ForgetAgentResponse {}))
    }

    async fn list_admins(
        &self,
        _req: Request<proto::ListAdminsRequest>,
    ) -> Result<Response<proto::ListAdminsResponse>, Status> {
        let admins = self
            .driver
            .call(|reply| Command::ListAdmins { reply })
            .await?;
        Ok(Response::new(proto::ListAdminsResponse {
            admins: admins.iter().map(admin_info).collect(),
        }))
    }

    async fn revoke_admin(
        &self,
        req: Request<proto::RevokeAdminRequest>,
    ) -> Result<Response<proto::AdminInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let name = req.get_ref().name.clone();
        let reason = reason_by(&req.get_ref().reason, &admin);
        let record = self
            .driver
            .call(|reply| Command::RevokeAdmin {
                name,
                reason,
                by: admin.name.clone(),
                reply,
            })
            .await??;
        Ok(Response::new(admin_info(&record)))
    }

    async fn unrevoke_admin(
        &self,
        req: Request<proto::UnrevokeAdminRequest>,
    ) -> Result<Response<proto::AdminInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let name = req.get_ref().name.clone();
        info!(admin = %admin.name, name = %name, "admin unrevoke requested");
        let record = self
            .driver
            .call(|reply| Command::UnrevokeAdmin { name, reply })
            .await??;
        Ok(Response::new(admin_info(&record)))
    }

    async fn submit_task(
        &self,
        req: Request<proto::SubmitTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let task = new_task(req.into_inner(), &admin, &self.rules)?;
        let task = self
            .driver
            .call(|reply| Command::Submit { task, reply })
            .await?;
        Ok(Response::new(task_info(&task)))
    }

    async fn list_tasks(
        &self,
        req: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let req = req.into_inner();
        let query = TaskQuery {
            state: task_state_from_proto(req.state)?,
            specialty: if req.specialty == 0 {
                None
            } else {
                Some(
                    wire::specialty_from_proto(req.specialty)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                )
            },
            agent: if req.agent_id.is_empty() {
                None
            } else {
                Some(agent_id(&req.agent_id)?)
            },
            repo: (!req.repo.is_empty()).then_some(req.repo),
            outcome: if req.outcome.is_empty() {
                None
            } else {
                Some(outcome_from_word(&req.outcome)?)
            },
            newest_first: req.newest_first,
            after: if req.page_token.is_empty() {
                None
            } else {
                Some(
                    admin_task_id(&req.page_token)
                        .map_err(|_| Status::invalid_argument("bad page_token"))?,
                )
            },
            limit: match req.page_size {
                0 => 100,
                n => usize::try_from(n.min(1000)).unwrap_or(1000),
            },
        };
        let page = self
            .driver
            .call(|reply| Command::ListTasks { query, reply })
            .await?;
        let next_page_token = if page.more {
            page.tasks
                .last()
                .map(|t| t.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListTasksResponse {
            tasks: page.tasks.iter().map(task_info).collect(),
            next_page_token,
            total: u64::try_from(page.total).unwrap_or(u64::MAX),
        }))
    }

    async fn get_task(
        &self,
        req: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let id = admin_task_id(&req.get_ref().task_id)?;
        let task = self
            .driver
            .call(|reply| Command::GetTask { task: id, reply })
            .await?
            .ok_or(TaskError::Unknown(id))?;
        Ok(Response::new(task_info(&task)))
    }

    async fn watch_task(
        &self,
        req: Request<proto::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let req = req.into_inner();
        let id = admin_task_id(&req.task_id)?;
        let (events_tx, mut events) = mpsc::channel(WATCH_QUEUE);
        let snapshot = self
            .driver
            .call(|reply| Command::Watch {
                task: id,
                follow: req.follow,
                events: events_tx,
                reply,
            })
            .await?
            .ok_or(TaskError::Unknown(id))?;
        let (tx, rx) = mpsc::channel::<Result<proto::TaskEvent, Status>>(64);
        let store = Arc::clone(&self.store);
        let from = (Attempt(req.from_attempt), req.from_seq);
        let follow = req.follow;
        tokio::spawn(async move {
            if tx.send(Ok(state_event(&snapshot))).await.is_err() {
                return;
            }
            // History first, page by page, then the live events after it.
            let mut next = from;
            loop {
                let store = Arc::clone(&store);
                let page = tokio::task::spawn_blocking(move || store.read_output(id, next, 256))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))
                    .and_then(|r| r.map_err(|e| Status::internal(e.to_string())));
                let page = match page {
                    Ok(page) => page,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let done = page.len() < 256;
                for chunk in page {
                    next = (chunk.attempt, chunk.seq + 1);
                    let event = output_event(id, chunk.attempt, chunk.seq, chunk.kind, &chunk.data);
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if done {
                    break;
                }
            }
            if snapshot.state.is_terminal() || !follow {
                return;
            }
            while let Some(event) = events.recv().await {
                let (event, last) = match &event {
                    TaskEvent::Output {
                        attempt,
                        seq,
                        kind,
                        data,
                        ..
                    } => {
                        if (*attempt, *seq) < next {
                            continue; // Already sent from the store.
                        }
                        next = (*attempt, seq + 1);
                        (output_event(id, *attempt, *seq, *kind, data), false)
                    }
                    TaskEvent::Changed(task) => (state_event(task), task.state.is_terminal()),
                };
                if tx.send(Ok(event)).await.is_err() || last {
                    return;
                }
            }
            // The driver dropped us: too slow, or shutting down.
            let _ = tx
                .send(Err(Status::unavailable(
                    "watch interrupted; resume from the last position received",
                )))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_task(
        &self,
        req: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let id = admin_task_id(&req.get_ref().task_id)?;
        let reason = reason_by(&req.get_ref().reason, &admin);
        let task = self
            .driver
            .call(|reply| Command::Cancel {
                task: id,
                reason,
                reply,
            })
            .await??;
        Ok(Response::new(task_info(&task)))
    }

    async fn retry_task(
        &self,
        req: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let id = admin_task_id(&req.get_ref().task_id)?;
        let task = self
            .driver
            .call(|reply| Command::Retry { task: id, reply })
            .await??;
        Ok(Response::new(task_info(&task)))
    }

    async fn list_agents(
        &self,
        _req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        let agents = self
            .driver
            .call(|reply| Command::ListAgents { reply })
            .await?;
        Ok(Response::new(proto::ListAgentsResponse {
            agents: agents.into_iter().map(agent_info).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<proto::GetAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let agent = agent_id(&req.get_ref().agent_id)?;
        let view = self
            .driver
            .call(|reply| Command::GetAgent {
                agent: agent.clone(),
                reply,
            })
            .await?
            .ok_or_else(|| Status::from(AdminError::UnknownAgent(agent)))?;
        Ok(Response::new(agent_info(view)))
    }

    async fn revoke_agent(
        &self,
        req: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        let reason = reason_by(&req.get_ref().reason, &admin);
        let view = self
            .driver
            .call(|reply| Command::Revoke {
                agent,
                reason,
                reply,
            })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn drain_agent(
        &self,
        req: Request<proto::DrainAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = authorize(&req, Role::Admin, "Admin API")?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        let reason = reason_by(&req.get_ref().reason, &admin);
        let view = self
            .driver
            .call(|reply| Command::Drain {
                agent,
                reason,
                reply,
            })
            .await??;
        Ok(Response::new(agent_info(view)))
    }
}

/// The admin's reason, bounded, with who gave it; only who gave it when
/// no reason was given (the state it explains already says what happened).
fn reason_by(given: &str, admin: &PeerIdentity) -> String {
    let text: String = given
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        format!("by admin {}", admin.name)
    } else {
        format!("{} (by admin {})", text.trim(), admin.name)
    }
}

/// An outcome given as a word (`tests_failed`), as `ccc tasks --outcome` sends it.
fn outcome_from_word(word: &str) -> Result<common::types::Outcome, Status> {
    serde_json::from_value(serde_json::Value::String(word.to_owned())).map_err(|_| {
        Status::invalid_argument(format!(
            "unknown outcome {word:?} (succeeded, tests_failed, no_changes, cli_failed, ...; see `ccc tasks --help`)"
        ))
    })
}

fn admin_info(record: &AdminRecord) -> proto::AdminInfo {
    proto::AdminInfo {
        name: record.name.clone(),
        revoked: record.revoked,
        revoked_reason: record.reason.clone(),
        revoked_at: record.revoked_at.map(|t| t.to_timestamp()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(seq: u64, len: usize) -> AgentMessage {
        AgentMessage {
            msg: Some(agent_message::Msg::TaskOutput(proto::TaskOutput {
                task_id: "t-1".into(),
                attempt: 1,
                seq,
                kind: proto::OutputKind::Stdout as i32,
                data: vec![b'x'; len],
            })),
        }
    }

    #[test]
    fn output_chunks_are_bounded_by_what_the_agent_sends() {
        assert!(matches!(
            from_proto(output(1, MAX_CHUNK)),
            Ok(Some(FromAgent::Output { .. }))
        ));
        let err = from_proto(output(1, MAX_CHUNK + 1)).expect_err("too big");
        assert!(err.contains("exceeds 65536"), "{err}");
        let err = from_proto(output(u64::MAX, 1)).expect_err("reserved seq");
        assert!(err.starts_with("TaskOutput: field seq"), "{err}");
    }
}
