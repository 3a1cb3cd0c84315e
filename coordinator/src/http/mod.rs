//! The coordinator's HTTP server (axum, on the hyper tonic already uses):
//! `/healthz` and GitHub's webhook, `POST /webhook/github`.

use std::io;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::driver::DriverHandle;
use crate::github::GithubConfig;
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
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/webhook/github",
            post(webhook::github).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
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
