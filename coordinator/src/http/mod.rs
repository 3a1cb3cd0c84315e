//! The coordinator's HTTP server (axum, on the hyper tonic already uses):
//! `/healthz` (the process answers), `/readyz` (it serves: 503 with the
//! reason while starting or stopping), `/metrics` (Prometheus text format)
//! and GitHub's webhook, `POST /webhook/github`.

use std::io;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::driver::{Command, DriverHandle};
use crate::github::GithubConfig;
use crate::health::{Lifecycle, Phase};
use crate::metrics::{self, Metrics};
use crate::triage::Rules;

pub mod webhook;

/// GitHub caps a webhook payload at 25 MB; a larger body is refused with 413
/// before it is read further.
pub const MAX_WEBHOOK_BODY: usize = 25 << 20;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub driver: DriverHandle,
    pub github: Arc<GithubConfig>,
    pub rules: Arc<Rules>,
    /// GitHub's API, when a token is configured (a review's inline comments).
    pub client: Option<crate::github::client::Client>,
    pub metrics: Metrics,
    pub lifecycle: Lifecycle,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/webhook/github",
            post(webhook::github)
                .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
                .layer(axum::middleware::map_response_with_state(
                    state.clone(),
                    webhook::count,
                )),
        )
        .with_state(state)
}

/// Serves HTTP until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// 200 while the coordinator serves: its store restored and open, its
/// driver taking commands, not stopping. Else 503 and why, in one line.
async fn readyz(State(state): State<HttpState>) -> Response {
    let not_ready = match state.lifecycle.phase() {
        Phase::Serving if state.driver.is_running() => None,
        Phase::Serving => Some("stopping: the coordinator's event loop stopped".to_owned()),
        Phase::Starting => Some("starting: restoring state from the store".to_owned()),
        Phase::Stopping(why) => Some(format!("stopping: {why}")),
    };
    match not_ready {
        None => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// Every metric family; the gauges as the driver answers now.
async fn metrics(State(state): State<HttpState>) -> Response {
    match state
        .driver
        .call(|reply| Command::MetricsSnapshot { reply })
        .await
    {
        Ok(snapshot) => (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            state.metrics.encode(&snapshot),
        )
            .into_response(),
        Err(gone) => (StatusCode::SERVICE_UNAVAILABLE, format!("{gone}\n")).into_response(),
    }
}
