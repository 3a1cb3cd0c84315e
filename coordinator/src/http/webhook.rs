//! `POST /webhook/github`: GitHub's deliveries, directly or through a relay
//! such as smee-client.
//!
//! Order: the signature (`X-Hub-Signature-256`, HMAC-SHA256 of the exact
//! raw body, compared in constant time) before anything is parsed; then the
//! content type (`application/json`, or a form with `payload=` as GitHub
//! sends it when so configured), the event, the decision (`github::event`),
//! and, for work, the driver, which de-duplicates by `X-GitHub-Delivery`
//! and persists the task before the `202` names it. Deliveries that start
//! nothing (an unconfigured repository, an untrusted author, an event not
//! handled) are answered `202` with `ignored: <why>`, so GitHub does not mark
//! the hook as failing, and logged.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use tracing::{Instrument, info, info_span, warn};

use super::HttpState;
use crate::core::github::IssueOutcome;
use crate::driver::Command;
use crate::github::event::{self, Decision};
use crate::github::new_task;
use crate::metrics::WebhookResult;

/// The longest delivery id kept (GitHub's are UUIDs).
const MAX_DELIVERY_ID: usize = 100;

pub async fn github(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let delivery = header_str(&headers, "x-github-delivery").to_owned();
    let event = header_str(&headers, "x-github-event").to_owned();
    let span = info_span!("webhook", delivery_id = %delivery, event = %event);
    handle(state, headers, body, delivery, event)
        .instrument(span)
        .await
}

async fn handle(
    state: HttpState,
    headers: HeaderMap,
    body: Bytes,
    delivery: String,
    event: String,
) -> Response {
    let Some(secret) = state.github.webhook_secret.as_ref() else {
        warn!(
            "webhook delivery refused: no webhook secret is configured (github.webhook_secret_file)"
        );
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "refused",
            "webhooks are not configured on this coordinator".into(),
        );
    };
    let signature = header_str(&headers, "x-hub-signature-256");
    if signature.is_empty() {
        warn!("webhook delivery refused: no X-Hub-Signature-256 header");
        return answer(
            StatusCode::UNAUTHORIZED,
            "refused",
            "missing X-Hub-Signature-256".into(),
        );
    }
    if !verify(secret.expose().as_bytes(), &body, signature) {
        // A relay such as smee-client passes GitHub's headers on, so a
        // relayed delivery cannot be told from a direct one: both causes
        // are named.
        warn!(
            user_agent = header_str(&headers, "user-agent"),
            "webhook delivery refused: wrong signature; either the webhook secret differs from GitHub's, or a relay re-encoded the body (the signature covers the exact bytes GitHub sent; smee-client re-serializes JSON, which keeps them only for GitHub's own compact JSON)"
        );
        return answer(
            StatusCode::UNAUTHORIZED,
            "refused",
            "wrong signature".into(),
        );
    }
    if event.is_empty() || delivery.is_empty() || delivery.len() > MAX_DELIVERY_ID {
        warn!("webhook delivery refused: X-GitHub-Event or X-GitHub-Delivery missing or too long");
        return answer(
            StatusCode::BAD_REQUEST,
            "refused",
            "X-GitHub-Event and X-GitHub-Delivery are required".into(),
        );
    }
    let payload = match payload(&headers, &body) {
        Ok(p) => p,
        Err((status, why)) => {
            warn!(%why, "webhook delivery refused");
            return answer(status, "refused", why);
        }
    };
    let parsed = match event::parse(&event, &payload) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "webhook delivery refused");
            return answer(StatusCode::BAD_REQUEST, "refused", e.to_string());
        }
    };
    let decision = event::decide(&parsed, &state.github);
    let work = match decision {
        Decision::Pong => {
            info!("ping");
            return answer(StatusCode::OK, "pong", "pong".into());
        }
        Decision::Ignore(why) => {
            info!(%why, "webhook delivery ignored");
            return answer(StatusCode::ACCEPTED, "ignored", format!("ignored: {why}"));
        }
        Decision::Untrusted(why) => {
            warn!(%why, "webhook delivery ignored: untrusted");
            return answer(StatusCode::ACCEPTED, "ignored", format!("ignored: {why}"));
        }
        Decision::FollowUp(follow) => return follow_up(&state, &delivery, follow).await,
        Decision::Trigger(work) => (work, None),
        Decision::Command(work, command) => (work, Some(command)),
    };
    let (work, command) = work;
    if work.removed.any() {
        info!(
            issue = work.number,
            html_comments = work.removed.html_comments,
            hidden_chars = work.removed.hidden_chars,
            "removed hidden content from the issue text"
        );
    }
    let task = new_task(&work, &delivery, &state.rules);
    let outcome = match command {
        None => {
            state
                .driver
                .call(|reply| Command::IssueTriggered {
                    delivery: delivery.clone(),
                    task,
                    reply,
                })
                .await
        }
        Some(command) => {
            state
                .driver
                .call(|reply| Command::IssueCommand {
                    delivery: delivery.clone(),
                    command,
                    task,
                    reply,
                })
                .await
        }
    };
    outcome_answer(outcome)
}

/// A follow-up on a pull request: a review's inline comments are fetched
/// and given with their file and line; the task on the same branch is made
/// by the driver.
async fn follow_up(state: &HttpState, delivery: &str, follow: event::FollowUp) -> Response {
    let mut instructions = follow.instructions;
    if let (Some(review), Some(client)) = (follow.review, state.client.as_ref()) {
        match client
            .review_comments(&follow.repo, follow.number, review)
            .await
        {
            Ok(comments) if !comments.is_empty() => {
                instructions.push_str("\n\nInline comments:");
                for c in comments {
                    let line = c
                        .line
                        .or(c.original_line)
                        .map(|l| format!(" line {l}"))
                        .unwrap_or_default();
                    let (text, _) = crate::github::sanitize::clean(c.body.trim());
                    instructions.push_str(&format!("\n- {}{line}: {text}", c.path));
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the review's inline comments");
                if e.is_retryable() {
                    // GitHub will not redeliver; a 5xx here asks the sender
                    // to try again (the delivery is not recorded yet).
                    return answer(StatusCode::SERVICE_UNAVAILABLE, "refused", e.to_string());
                }
            }
        }
    }
    let outcome = state
        .driver
        .call(|reply| Command::PullFollowUp {
            delivery: delivery.to_owned(),
            repo: follow.repo.clone(),
            number: follow.number,
            by: follow.by.clone(),
            instructions,
            reply,
        })
        .await;
    outcome_answer(outcome)
}

fn outcome_answer(outcome: Result<IssueOutcome, crate::driver::DriverGone>) -> Response {
    match outcome {
        Err(gone) => answer(StatusCode::SERVICE_UNAVAILABLE, "refused", gone.to_string()),
        Ok(IssueOutcome::Created(id)) => {
            // The core logged the task with its repository; this line ties
            // it to the delivery (the span).
            info!(task_id = %id, attempt = 0, "task created from a webhook");
            answer_task(
                StatusCode::ACCEPTED,
                "created",
                &id.to_string(),
                "task created".into(),
            )
        }
        Ok(IssueOutcome::Applied(id, what)) => {
            answer_task(StatusCode::ACCEPTED, "applied", &id.to_string(), what)
        }
        Ok(IssueOutcome::Declined(id, why)) => {
            info!(%why, "issue command or trigger declined");
            let id = id.map(|i| i.to_string()).unwrap_or_default();
            answer_task(
                StatusCode::ACCEPTED,
                "ignored",
                &id,
                format!("ignored: {why}"),
            )
        }
        Ok(IssueOutcome::Duplicate) => {
            info!("delivery seen before: nothing done");
            answer(
                StatusCode::ACCEPTED,
                "duplicate",
                "this delivery was handled before".into(),
            )
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body`.
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The JSON payload of a verified body, by its content type.
fn payload(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, (StatusCode, String)> {
    let content_type = header_str(headers, header::CONTENT_TYPE.as_str());
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(body.to_vec()),
        "application/x-www-form-urlencoded" => form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned().into_bytes())
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    "a form delivery without a payload field".to_owned(),
                )
            }),
        _ => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {content_type:?} is not application/json or application/x-www-form-urlencoded"
            ),
        )),
    }
}

fn answer(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        axum::Extension(result_of(status, kind)),
        axum::Json(json!({ "status": kind, "message": message })),
    )
        .into_response()
}

fn answer_task(status: StatusCode, kind: &str, task: &str, message: String) -> Response {
    (
        status,
        axum::Extension(result_of(status, kind)),
        axum::Json(json!({ "status": kind, "task_id": task, "message": message })),
    )
        .into_response()
}

/// What an answer means, as the metrics count it.
fn result_of(status: StatusCode, kind: &str) -> WebhookResult {
    match (kind, status) {
        ("created", _) => WebhookResult::TaskCreated,
        ("applied", _) => WebhookResult::CommandApplied,
        ("duplicate", _) => WebhookResult::Duplicate,
        ("ignored", _) => WebhookResult::Ignored,
        ("pong", _) => WebhookResult::Ping,
        (_, StatusCode::UNAUTHORIZED) => WebhookResult::BadSignature,
        (_, StatusCode::SERVICE_UNAVAILABLE) => WebhookResult::Unavailable,
        (_, StatusCode::PAYLOAD_TOO_LARGE) => WebhookResult::TooLarge,
        _ => WebhookResult::BadRequest,
    }
}

/// Counts every answer of the webhook route, also those given before the
/// handler runs (a body over the limit).
pub async fn count(State(state): State<HttpState>, response: Response) -> Response {
    let result = response
        .extensions()
        .get::<WebhookResult>()
        .copied()
        .unwrap_or_else(|| result_of(response.status(), "refused"));
    state.metrics.webhook_delivery(result);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_over_the_exact_bytes() {
        let secret = b"It's a Secret to Everybody";
        // GitHub's documented example.
        let body = b"Hello, World!";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(secret, body, good));
        assert!(!verify(secret, b"Hello, World! ", good));
        assert!(!verify(b"another secret", body, good));
        for bad in [
            "",
            "sha1=757107ea",
            "sha256=zz",
            "sha256=",
            "757107ea0eb2509f",
        ] {
            assert!(!verify(secret, body, bad), "{bad}");
        }
    }
}
