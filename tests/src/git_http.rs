//! A smart-HTTP git server on loopback in front of `git http-backend`,
//! that lets in only requests whose Basic credentials carry a token it
//! accepts (as GitHub does with `x-access-token:<token>`), and records the
//! credentials it was offered.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tokio::io::AsyncWriteExt;

/// Which tokens the server accepts.
pub type Accepts = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Shared {
    root: PathBuf,
    accepts: Accepts,
    /// Every (user, token) offered, in order.
    offered: Mutex<Vec<(String, String)>>,
}

pub struct GitHttp {
    url: String,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

impl GitHttp {
    /// Serves the bare repositories under `root` on 127.0.0.1.
    pub fn start(root: &Path, accepts: Accepts) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("git http runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the git http server");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            root: root.to_owned(),
            accepts,
            offered: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            shared,
            _runtime: runtime,
        }
    }

    /// The clone URL of repository `name` (e.g. `app.git`).
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// The credentials clients offered, as (user, token).
    pub fn offered(&self) -> Vec<(String, String)> {
        self.shared
            .offered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let credentials = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(u, t)| (u.to_owned(), t.to_owned()))
        });
    let Some((user, token)) = credentials else {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"git\"")],
            "credentials required",
        )
            .into_response();
    };
    shared
        .offered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((user.clone(), token.clone()));
    if !(shared.accepts)(&token) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"git\"")],
            "bad credentials",
        )
            .into_response();
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut child = match tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", content_type)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let Ok(output) = child.wait_with_output().await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    cgi_response(&output.stdout)
}

/// A CGI answer (headers, a blank line, the body) as an HTTP response.
fn cgi_response(out: &[u8]) -> Response {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|at| (at, 2)));
    let Some((at, gap)) = split else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let head = String::from_utf8_lossy(&out[..at]).into_owned();
    let mut status = StatusCode::OK;
    let mut builder = Response::builder();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        } else {
            builder = builder.header(name.trim(), value);
        }
    }
    builder
        .status(status)
        .body(axum::body::Body::from(out[at + gap..].to_vec()))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}
