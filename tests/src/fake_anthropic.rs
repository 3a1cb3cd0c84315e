//! A faithful local fake of Anthropic's Messages API, for running the real
//! `claude` CLI on loopback (`ANTHROPIC_BASE_URL`): `HEAD /`, then
//! `POST /v1/messages` answered with Server-Sent Events as the real API
//! streams them (message_start, content_block_start/delta/stop,
//! message_delta with the stop reason, message_stop), and errors in the real
//! API's JSON shape.
//!
//! A scenario scripts the conversation: the agent loop's requests (those
//! that offer the `Write` tool) get the scripted turns; any other request
//! (the CLI's own small side requests) gets a short text answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

/// What the fake API does.
#[derive(Clone, Debug)]
pub enum Scenario {
    /// First turn: a `Write` of `path` with `content`; then a closing text.
    EditFile { path: String, content: String },
    /// Every agent-loop turn writes one more file (`step-<n>.txt`): only a
    /// turn limit stops it.
    EndlessEdits,
    /// Every request fails with this HTTP status (500, 529, 429...).
    Fail(u16),
}

#[derive(Debug, Default)]
pub struct Seen {
    /// Requests to `/v1/messages`: (x-api-key present, body).
    pub requests: Vec<(bool, Value)>,
}

struct Shared {
    scenario: Scenario,
    seen: Mutex<Seen>,
}

pub struct FakeAnthropic {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Serves the API until the fake is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl FakeAnthropic {
    pub fn start(scenario: Scenario) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake API runtime");
        let shared = Arc::new(Shared {
            scenario,
            seen: Mutex::new(Seen::default()),
        });
        let app = Router::new()
            .route(
                "/",
                get(|| async { "ok" }).head(|| async { StatusCode::OK }),
            )
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .with_state(Arc::clone(&shared));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind fake API");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            _runtime: runtime,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests reached `/v1/messages`, and whether each carried
    /// an API key.
    pub fn requests(&self) -> Vec<(bool, Value)> {
        self.shared
            .seen
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

async fn count_tokens() -> axum::Json<Value> {
    axum::Json(json!({"input_tokens": 42}))
}

/// Whether a request comes from the agent loop (it offers the file tools).
fn is_agent_turn(body: &Value) -> bool {
    body["tools"]
        .as_array()
        .is_some_and(|tools| tools.iter().any(|t| t["name"] == "Write"))
}

/// How many tool results the conversation already holds: the turn number.
fn tool_results(body: &Value) -> usize {
    body["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m["content"].as_array())
                .flatten()
                .filter(|block| block["type"] == "tool_result")
                .count()
        })
        .unwrap_or(0)
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if let Ok(mut seen) = shared.seen.lock() {
        seen.requests
            .push((headers.contains_key("x-api-key"), body.clone()));
    }
    let model = body["model"].as_str().unwrap_or("claude-test").to_owned();
    match &shared.scenario {
        Scenario::Fail(status) => error(*status),
        _ if !is_agent_turn(&body) => sse(&model, &[Block::Text("ok".into())], "end_turn"),
        Scenario::EditFile { path, content } => {
            if tool_results(&body) == 0 {
                let input = json!({"file_path": path, "content": content});
                sse(
                    &model,
                    &[
                        Block::Text("I will write the file.".into()),
                        Block::ToolUse("Write", input),
                    ],
                    "tool_use",
                )
            } else {
                sse(
                    &model,
                    &[Block::Text(format!("Done: {path} is written."))],
                    "end_turn",
                )
            }
        }
        Scenario::EndlessEdits => {
            let n = tool_results(&body) + 1;
            let input =
                json!({"file_path": format!("step-{n}.txt"), "content": format!("step {n}\n")});
            sse(&model, &[Block::ToolUse("Write", input)], "tool_use")
        }
    }
}

enum Block {
    Text(String),
    ToolUse(&'static str, Value),
}

fn event(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// One streamed message, split into events as the real API does.
fn sse(model: &str, blocks: &[Block], stop_reason: &str) -> Response {
    let id = format!("msg_fake_{}", blocks.len());
    let mut out = event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }}),
    );
    for (index, block) in blocks.iter().enumerate() {
        match block {
            Block::Text(text) => {
                out.push_str(&event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
                out.push_str(&event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})));
            }
            Block::ToolUse(name, input) => {
                out.push_str(&event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": format!("toolu_fake_{index}"), "name": name, "input": {}}})));
                out.push_str(&event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": input.to_string()}})));
            }
        }
        out.push_str(&event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out.push_str(&event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": 30}})));
    out.push_str(&event("message_stop", json!({"type": "message_stop"})));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("request-id", "req_fake")
        .body(Body::from(out))
        .expect("response")
}

/// An error in the API's shape (`{"type":"error","error":{...}}`).
fn error(status: u16) -> Response {
    let (kind, message) = match status {
        429 => (
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        ),
        529 => ("overloaded_error", "Overloaded"),
        401 => ("authentication_error", "invalid x-api-key"),
        _ => ("api_error", "Internal server error"),
    };
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("request-id", "req_fake");
    if status == 429 {
        response = response
            .header("retry-after", "60")
            .header("anthropic-ratelimit-requests-reset", "2030-01-01T00:00:00Z");
    }
    response
        .body(Body::from(
            json!({"type": "error", "error": {"type": kind, "message": message}}).to_string(),
        ))
        .expect("response")
}
