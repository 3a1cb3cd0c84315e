//! What the coordinator is doing (starting, serving, stopping), for gRPC
//! health checks (`grpc.health.v1.Health`, every service alike) and HTTP
//! `/readyz`.
//!
//! Starting lasts until the store is restored and the driver answers with
//! the listeners accepting; stopping begins before anything is drained and
//! never ends. A health `Watch` stream tells every change and ends right
//! after telling NOT_SERVING for a stop, so that it does not hold the
//! server's graceful shutdown open.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use common::proto::{admin_server::AdminServer, agent_gateway_server::AgentGatewayServer};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::grpc::{Admin, Gateway};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The store is being restored, or the driver has not answered yet.
    Starting,
    Serving,
    /// Why it stops (one line).
    Stopping(String),
}

impl Phase {
    fn status(&self) -> ServingStatus {
        match self {
            Self::Serving => ServingStatus::Serving,
            Self::Starting | Self::Stopping(_) => ServingStatus::NotServing,
        }
    }
}

/// The coordinator's phase, shared by whoever reports it.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// Starting.
    pub fn new() -> Self {
        Self {
            phase: Arc::new(watch::Sender::new(Phase::Starting)),
        }
    }

    /// Ready for work; ignored once stopping.
    pub fn serving(&self) {
        self.phase.send_if_modified(|phase| {
            let change = *phase == Phase::Starting;
            if change {
                *phase = Phase::Serving;
            }
            change
        });
    }

    /// Stopping, for `reason`; the first reason is kept.
    pub fn stopping(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.phase.send_if_modified(|phase| {
            let change = !matches!(phase, Phase::Stopping(_));
            if change {
                *phase = Phase::Stopping(reason);
            }
            change
        });
    }

    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// The gRPC health service over this lifecycle.
    pub fn grpc_service(&self) -> HealthServer<GrpcHealth> {
        HealthServer::new(GrpcHealth {
            lifecycle: self.clone(),
        })
    }
}

/// `grpc.health.v1.Health`: the overall service `""` and every service the
/// coordinator serves report the lifecycle's phase.
#[derive(Debug)]
pub struct GrpcHealth {
    lifecycle: Lifecycle,
}

/// The services whose health is reported.
fn is_reported(service: &str) -> bool {
    [
        "",
        AgentGatewayServer::<Gateway>::NAME,
        AdminServer::<Admin>::NAME,
    ]
    .contains(&service)
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status.into(),
    }
}

#[tonic::async_trait]
impl Health for GrpcHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !is_reported(&request.get_ref().service) {
            return Err(Status::not_found("service not registered"));
        }
        Ok(Response::new(answer(self.lifecycle.phase().status())))
    }

    type WatchStream = PhaseStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<PhaseStream>, Status> {
        if !is_reported(&request.get_ref().service) {
            return Err(Status::not_found("service not registered"));
        }
        Ok(Response::new(PhaseStream {
            phases: WatchStream::new(self.lifecycle.phase.subscribe()),
            ended: false,
        }))
    }
}

/// The phase now, then every change; ends after a stop is told.
pub struct PhaseStream {
    phases: WatchStream<Phase>,
    ended: bool,
}

impl Stream for PhaseStream {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.phases).poll_next(cx) {
            Poll::Ready(Some(phase)) => {
                self.ended = matches!(phase, Phase::Stopping(_));
                Poll::Ready(Some(Ok(answer(phase.status()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    async fn check(health: &GrpcHealth, service: &str) -> Result<ServingStatus, tonic::Code> {
        health
            .check(Request::new(HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .map(|r| r.into_inner().status())
            .map_err(|s| s.code())
    }

    #[tokio::test]
    async fn every_service_is_not_serving_while_starting_and_stopping() {
        let lifecycle = Lifecycle::new();
        let health = GrpcHealth {
            lifecycle: lifecycle.clone(),
        };
        let services = ["", "ccc.v1.AgentGateway", "ccc.v1.Admin"];
        for service in services {
            assert_eq!(check(&health, service).await, Ok(ServingStatus::NotServing));
        }
        assert_eq!(
            check(&health, "ccc.v1.Nothing").await,
            Err(tonic::Code::NotFound)
        );
        lifecycle.serving();
        for service in services {
            assert_eq!(check(&health, service).await, Ok(ServingStatus::Serving));
        }
        lifecycle.stopping("shutting down");
        lifecycle.serving();
        assert_eq!(
            lifecycle.phase(),
            Phase::Stopping("shutting down".into()),
            "a stop is final"
        );
        for service in services {
            assert_eq!(check(&health, service).await, Ok(ServingStatus::NotServing));
        }
    }

    #[tokio::test]
    async fn a_watch_tells_every_change_and_ends_after_the_stop() {
        let lifecycle = Lifecycle::new();
        let health = GrpcHealth {
            lifecycle: lifecycle.clone(),
        };
        let mut stream = health
            .watch(Request::new(HealthCheckRequest { service: "".into() }))
            .await
            .expect("watch")
            .into_inner();
        let mut next = async || stream.next().await.map(|r| r.expect("status").status());
        assert_eq!(next().await, Some(ServingStatus::NotServing));
        lifecycle.serving();
        assert_eq!(next().await, Some(ServingStatus::Serving));
        lifecycle.stopping("shutting down");
        assert_eq!(next().await, Some(ServingStatus::NotServing));
        assert_eq!(next().await, None, "the stream ends after the stop");
    }
}
