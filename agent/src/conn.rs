//! The agent's link to the coordinator: one mTLS bidirectional stream,
//! reopened with exponential backoff and jitter after any failure
//! (coordinator down or restarting, network, TLS), until shutdown.
//!
//! The link only moves messages: it reports `Up` with a sender for the new
//! stream, every message that arrives, and `Down` when the stream ends; the
//! driver decides what to send (Hello first). A refusal that retrying cannot
//! fix (`PERMISSION_DENIED`: revoked, or not an agent certificate;
//! `ALREADY_EXISTS`: another process is connected with this certificate) is
//! logged with the coordinator's words and reported as `Refused`.
//!
//! The link speaks the session's types (`common::protocol`) with the driver
//! and converts them with `common::protocol` at the stream: this is the only
//! agent module that sees protobuf.

use std::time::Duration;

use common::backoff::Backoff;
use common::proto::agent_gateway_client::AgentGatewayClient;
use common::protocol::{FromAgent, ToAgent};
use common::telemetry::error_chain;
use common::time::UnixMillis;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::config::Config;

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
        tx: mpsc::Sender<FromAgent>,
        close: CancellationToken,
    },
    Message(ToAgent),
    Down {
        reason: String,
    },
    /// The coordinator refuses this agent for good.
    Refused(String),
}

pub struct Link {
    endpoint: Endpoint,
    /// Said in Hello; informational (the certificate names the agent).
    claimed_name: String,
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
            claimed_name: config.name.clone(),
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
        let (tx, rx) = mpsc::channel::<FromAgent>(256);
        let mut client = AgentGatewayClient::new(channel);
        let close = CancellationToken::new();
        let claimed_name = self.claimed_name.clone();
        let outbound = ReceiverStream::new(rx).map(move |msg| msg.into_proto(&claimed_name));
        let call = client.connect(outbound);
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
                Ok(Some(msg)) => match ToAgent::from_proto(msg) {
                    Ok(Some(msg)) => {
                        welcomed |= matches!(msg, ToAgent::Welcome { .. });
                        if events.send(LinkEvent::Message(msg)).await.is_err() {
                            return Ended::Shutdown;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => warn!(why = %e, "ignoring a malformed message from the coordinator"),
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
}
