//! The gRPC adapters: `AgentGateway` (one bidirectional stream per agent) and
//! `Admin`. They authenticate the caller from its verified client
//! certificate, convert protobuf to domain types (validating everything an
//! agent sends), and hand the rest to the driver.
//!
//! API boundary: only this module and `common::wire` see protobuf types.

use std::pin::Pin;

use common::ids::AgentId;
use common::pki::Role;
use common::proto::{
    self, AgentInfo, AgentMessage, CoordinatorMessage, admin_server, agent_gateway_server,
    agent_message, coordinator_message,
};
use common::time::duration_ms;
use common::tls::PeerIdentity;
use common::wire;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use crate::core::{
    AdminError, AgentState, AgentView, CloseReason, FromAgent, OpenRejected, ReportedTask, ToAgent,
};
use crate::driver::{Command, DriverGone, DriverHandle, OUTBOUND_QUEUE, Outbound};

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
            AdminError::Revoked(id) => {
                Status::failed_precondition(format!("agent {id} is revoked"))
            }
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

/// Only admin-role certificates reach the `Admin` service.
#[allow(clippy::result_large_err)]
pub fn admin_only(req: Request<()>) -> Result<Request<()>, Status> {
    authorize(&req, Role::Admin, "Admin API")?;
    Ok(req)
}

pub struct Gateway {
    driver: DriverHandle,
}

impl Gateway {
    pub fn new(driver: DriverHandle) -> Self {
        Self { driver }
    }
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
        let guard = stop.drop_guard();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |out| {
            let _keep = &guard;
            match out {
                Outbound::Msg(msg) => Ok(to_proto(msg)),
                Outbound::Close(reason) => Err(close_status(reason)),
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

fn reported(tasks: &[proto::RunningTask]) -> Vec<ReportedTask> {
    tasks
        .iter()
        .map(|t| ReportedTask {
            task_id: t.task_id.clone(),
            attempt: t.attempt,
            last_output_seq: t.last_output_seq,
        })
        .collect()
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
                running: reported(&hello.running),
            }))
        }
        Some(Msg::Heartbeat(hb)) => Ok(Some(FromAgent::Heartbeat {
            free_slots: hb.free_slots,
            running: reported(&hb.running),
        })),
        Some(Msg::Draining(d)) => Ok(Some(FromAgent::Draining { reason: d.reason })),
        Some(
            Msg::TaskAccepted(_)
            | Msg::TaskRejected(_)
            | Msg::TaskOutput(_)
            | Msg::TaskProgress(_)
            | Msg::TaskFinished(_),
        ) => Ok(None),
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
        } => Msg::Welcome(proto::Welcome {
            agent_id: agent_id.to_string(),
            heartbeat_interval_ms: duration_ms(heartbeat_interval),
            heartbeat_timeout_ms: duration_ms(heartbeat_timeout),
            lease_timeout_ms: duration_ms(lease_timeout),
            held: Vec::new(),
        }),
        ToAgent::Heartbeat { now } => {
            Msg::Heartbeat(proto::CoordinatorHeartbeat { unix_ms: now.0 })
        }
        ToAgent::Drain { reason } => Msg::Drain(proto::Drain { reason }),
    };
    CoordinatorMessage { msg: Some(msg) }
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
    }
}

pub struct Admin {
    driver: DriverHandle,
}

impl Admin {
    pub fn new(driver: DriverHandle) -> Self {
        Self { driver }
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
                task_id: t.task_id,
                attempt: t.attempt,
                last_output_seq: t.last_output_seq,
            })
            .collect(),
        last_disconnect_reason: record.last_disconnect_reason.unwrap_or_default(),
        peer_address: record.peer_address,
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Admin {
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
        let reason = reason_or(&req.get_ref().reason, &admin, "revoked");
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
        let reason = reason_or(&req.get_ref().reason, &admin, "drain requested");
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

/// The admin's reason, bounded, with who gave it.
fn reason_or(given: &str, admin: &PeerIdentity, default: &str) -> String {
    let text: String = given
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let text = if text.trim().is_empty() {
        default.to_owned()
    } else {
        text
    };
    format!("{text} (by admin {})", admin.name)
}
