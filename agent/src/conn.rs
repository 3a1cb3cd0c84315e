//! The agent's link to the coordinator: one mTLS bidirectional stream,
//! reopened with exponential backoff and jitter after any failure
//! (coordinator down or restarting, network, TLS), until shutdown.
//!
//! Each session: `Hello` first, `Welcome` back within a timeout, then
//! heartbeats at the interval the coordinator asked for; a coordinator
//! silent for its heartbeat timeout counts as lost. A refusal that retrying
//! cannot fix (`PERMISSION_DENIED`: revoked, or not an agent certificate)
//! stops the agent with that message.

use std::time::Duration;

use common::backoff::Backoff;
use common::proto::{
    self, AgentMessage, CoordinatorMessage, agent_gateway_client::AgentGatewayClient,
    agent_message, coordinator_message,
};
use common::telemetry::error_chain;
use common::types::AgentAdvert;
use common::wire;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid coordinator URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
}

/// How one session ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    /// Retrying is pointless.
    Refused(String),
    Lost {
        welcomed: bool,
        why: String,
    },
}

pub struct Link {
    endpoint: Endpoint,
    tls: common::tls::TlsMaterial,
    advert: AgentAdvert,
    name: String,
    backoff: Backoff,
    welcome_timeout: Duration,
}

impl Link {
    pub fn new(config: &Config, advert: AgentAdvert) -> Result<Self, Error> {
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
            advert,
            name: config.name.clone(),
            backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
            welcome_timeout: config.welcome_timeout,
        })
    }

    /// Keeps a session open until `shutdown`; returns an error only when the
    /// coordinator refuses this agent for good.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut rng = rand::rngs::SmallRng::from_os_rng();
        loop {
            match self.session(&shutdown).await {
                Ended::Shutdown => return Ok(()),
                Ended::Refused(why) => return Err(Error::Refused(why)),
                Ended::Lost { welcomed, mut why } => {
                    if welcomed {
                        self.backoff.reset();
                    } else if let Some(cause) = self.tls.diagnose(now_unix_secs()) {
                        // TLS 1.3 reports a refused certificate as a closed
                        // connection: say what is wrong with ours.
                        why = format!("{why}; likely cause: {cause}");
                    }
                    let delay = self.backoff.next_delay(rng.random());
                    warn!(
                        reason = %why,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        failures = self.backoff.failures(),
                        "no connection to the coordinator"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Ended {
        let lost = |why: String| Ended::Lost {
            welcomed: false,
            why,
        };
        let channel: Channel = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            connected = self.endpoint.connect() => match connected {
                Ok(channel) => channel,
                Err(e) => return lost(error_chain(&e)),
            },
        };
        let (tx, rx) = mpsc::channel::<AgentMessage>(64);
        let hello = wire::hello_from_advert(&self.advert, &self.name);
        if tx
            .send(message(agent_message::Msg::Hello(hello)))
            .await
            .is_err()
        {
            return lost("stream closed before Hello".into());
        }
        let mut client = AgentGatewayClient::new(channel);
        let mut inbound: Streaming<CoordinatorMessage> = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            response = client.connect(ReceiverStream::new(rx)) => match response {
                Ok(response) => response.into_inner(),
                Err(status) => return classify(&status, false),
            },
        };
        let welcome = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            first = tokio::time::timeout(self.welcome_timeout, inbound.message()) => match first {
                Err(_) => return lost("no Welcome from the coordinator".into()),
                Ok(Err(status)) => return classify(&status, false),
                Ok(Ok(None)) => return lost("the coordinator closed the stream".into()),
                Ok(Ok(Some(CoordinatorMessage { msg: Some(coordinator_message::Msg::Welcome(w)) }))) => w,
                Ok(Ok(Some(_))) => return lost("the coordinator did not start with Welcome".into()),
            },
        };
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
        let silence = Duration::from_millis(welcome.heartbeat_timeout_ms.max(200));
        info!(
            agent_id = %welcome.agent_id,
            heartbeat_ms = welcome.heartbeat_interval_ms,
            "connected to the coordinator"
        );
        if welcome.agent_id != self.name {
            warn!(
                agent_id = %welcome.agent_id,
                cert_name = %self.name,
                "the coordinator knows this agent under another name"
            );
        }
        self.backoff.reset();
        let lost = |why: String| Ended::Lost {
            welcomed: true,
            why,
        };
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut silent_after = Instant::now() + silence;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let draining = proto::Draining { reason: "agent shutting down".into() };
                    let _ = tx.send(message(agent_message::Msg::Draining(draining))).await;
                    // Give the coordinator a moment to read it before the stream closes.
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_secs(1), inbound.message()).await;
                    return Ended::Shutdown;
                }
                _ = heartbeat.tick() => {
                    let hb = proto::Heartbeat { running: Vec::new(), free_slots: self.advert.capacity };
                    if tx.send(message(agent_message::Msg::Heartbeat(hb))).await.is_err() {
                        return lost("stream closed".into());
                    }
                }
                () = tokio::time::sleep_until(silent_after) => {
                    return lost(format!("the coordinator was silent for {silence:?}"));
                }
                next = inbound.message() => {
                    silent_after = Instant::now() + silence;
                    match next {
                        Ok(Some(msg)) => self.handle(msg, &tx).await,
                        Ok(None) => return lost("the coordinator closed the stream".into()),
                        Err(status) => return classify(&status, true),
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: CoordinatorMessage, tx: &mpsc::Sender<AgentMessage>) {
        use coordinator_message::Msg;
        match msg.msg {
            Some(Msg::Heartbeat(_)) | Some(Msg::Welcome(_)) | None => {}
            Some(Msg::Drain(drain)) => {
                info!(reason = %drain.reason, "the coordinator asked this agent to drain");
            }
            Some(Msg::Assign(assign)) => {
                let task_id = assign.task.map(|t| t.task_id).unwrap_or_default();
                warn!(%task_id, "refusing a task: this agent version does not run tasks");
                let rejected = proto::TaskRejected {
                    task_id,
                    attempt: assign.attempt,
                    reason: "this agent version does not run tasks".into(),
                };
                let _ = tx
                    .send(message(agent_message::Msg::TaskRejected(rejected)))
                    .await;
            }
            Some(Msg::Cancel(_)) | Some(Msg::OutputAck(_)) | Some(Msg::FinishedAck(_)) => {}
        }
    }
}

fn now_unix_secs() -> i64 {
    i64::try_from(common::time::UnixMillis::now().0 / 1000).unwrap_or(i64::MAX)
}

fn message(msg: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(msg) }
}

fn classify(status: &Status, welcomed: bool) -> Ended {
    if status.code() == Code::PermissionDenied {
        return Ended::Refused(status.message().to_owned());
    }
    let mut why = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        why = format!("{why}: {}", error_chain(source));
    }
    Ended::Lost { welcomed, why }
}
