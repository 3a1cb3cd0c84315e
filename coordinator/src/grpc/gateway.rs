//! `AgentGateway`: one bidirectional stream per agent. The inbound pump
//! decodes (and so validates, in `common::protocol`) what the agent sends
//! and forwards it to the driver; the outbound side is a bounded queue the
//! driver fills, encoded as it is sent; a `Close` item ends the stream with
//! a status.

use std::pin::Pin;
use std::sync::Arc;

use common::ids::AgentId;
use common::proto::{AgentMessage, CoordinatorMessage, agent_gateway_server};
use common::protocol::{FromAgent, PushAuth, ToAgent};
use common::types::PushCredential;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use super::auth::{caller, peer_address};
use crate::core::{CloseReason, ConnId, OpenRejected};
use crate::driver::{Command, DriverHandle, OUTBOUND_QUEUE, Outbound};

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
/// token minted for the task's repository, in place of the repository the
/// core named. It travels inside the mTLS stream and is never stored (the
/// core's copy of the assignment has none). Without one the agent pushes
/// with its own credentials.
async fn with_credential(
    github: Option<&crate::github::client::Client>,
    mut msg: ToAgent,
) -> ToAgent {
    if let ToAgent::Assign { push, .. } = &mut msg
        && let Some(PushAuth::GithubRepository(repo)) = push.as_ref()
    {
        let credential = match github {
            None => None,
            Some(github) => match github.push_token(repo).await {
                Ok(token) => token,
                Err(e) => {
                    warn!(repo = %repo, error = %e, "no push credential for the assignment; the agent uses its own");
                    None
                }
            },
        };
        *push = credential.map(|token| {
            PushAuth::Credential(PushCredential {
                username: "x-access-token".into(),
                token,
            })
        });
    }
    msg
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl agent_gateway_server::AgentGateway for Gateway {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = caller(&req)?;
        let peer = peer_address(&req);
        let agent = AgentId::new(identity.name.as_str())
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
                    Outbound::Msg(msg) => {
                        Ok(with_credential(github.as_ref(), msg).await.into_proto())
                    }
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
    conn: ConnId,
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
        let cmd = match FromAgent::from_proto(msg) {
            Ok(msg) => Command::Message { conn, msg },
            Err(e) => {
                let why = e.to_string();
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
