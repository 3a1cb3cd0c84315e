//! A local stand-in for smee.io (the webhook relay) and the real
//! smee-client in front of it, so that deliveries reach a coordinator the
//! way they do through a relay.
//!
//! `SmeeChannel` is a Server-Sent Events source on 127.0.0.1 that behaves
//! as smee.io does for smee-client: a GET on the channel URL keeps a
//! `text/event-stream` open, sends a `ready` event first, then one
//! `message` event per delivery the test pushes, whose data is a JSON
//! object with the delivery's headers as lowercase fields (`host` too,
//! which the client drops), `body` (the payload, as parsed JSON),
//! `query` (`{}`) and `timestamp` (Unix milliseconds). smee-client
//! (`index.js`) POSTs `JSON.stringify(body)` to its target with every other
//! field as a header, `content-type: application/json` and its own
//! `content-length`; so the target sees the payload re-serialized, whose
//! bytes equal GitHub's when GitHub's were compact JSON as `JSON.stringify`
//! writes them (see `webhooks`), and the signature still verifies.
//! A form-encoded delivery arrives as JSON too, its signature then no longer
//! matching: smee.io itself parses the form into the payload.
//!
//! ```ignore
//! let channel = SmeeChannel::start();
//! let _client = SmeeClient::start(&dir, &channel, &format!("{coordinator}/webhook"));
//! channel.push(&delivery.sign(secret, Encoding::Json));
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::npm::{self, GroupProcess};
use crate::process::eventually;
use crate::webhooks::{Encoding, Signed};

/// The SSE source: one channel, any number of listeners.
pub struct SmeeChannel {
    pub addr: SocketAddr,
    channel: String,
    shared: Arc<Shared>,
    /// Serves the channel until dropped.
    _runtime: tokio::runtime::Runtime,
}

#[derive(Default)]
struct Shared {
    listeners: Mutex<Vec<mpsc::Sender<Bytes>>>,
}

impl SmeeChannel {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("smee runtime");
        let shared = Arc::new(Shared::default());
        let channel = format!("ccc{}", &crate::webhooks::delivery_id()[..8]);
        let app = Router::new()
            .route(&format!("/{channel}"), get(listen))
            .with_state(Arc::clone(&shared));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the SSE source");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            channel,
            shared,
            _runtime: runtime,
        }
    }

    /// The channel URL (what `smee --url` takes).
    pub fn url(&self) -> String {
        format!("http://{}/{}", self.addr, self.channel)
    }

    /// How many listeners hold the stream open now.
    pub fn listeners(&self) -> usize {
        self.shared
            .listeners
            .lock()
            .map(|mut l| {
                l.retain(|tx| !tx.is_closed());
                l.len()
            })
            .unwrap_or(0)
    }

    /// Relays a signed delivery to every listener as smee.io does; returns
    /// how many listeners it went to.
    pub fn push(&self, signed: &Signed) -> usize {
        self.push_data(&event_data(signed))
    }

    /// Sends one `message` event with `data` (one line of JSON) as is.
    pub fn push_data(&self, data: &str) -> usize {
        let frame = Bytes::from(format!("data: {data}\n\n"));
        let Ok(mut listeners) = self.shared.listeners.lock() else {
            return 0;
        };
        listeners.retain(|tx| tx.try_send(frame.clone()).is_ok());
        listeners.len()
    }
}

/// The data of smee.io's event for a delivery: headers (lowercase), then
/// `host`, `body`, `query` and `timestamp`.
pub fn event_data(signed: &Signed) -> String {
    let mut fields = serde_json::Map::new();
    for (name, value) in &signed.headers {
        fields.insert(name.to_ascii_lowercase(), value.clone().into());
    }
    fields.insert("host".to_owned(), "smee.io".into());
    fields.insert(
        "content-length".to_owned(),
        signed.body.len().to_string().into(),
    );
    let mut data = serde_json::to_string(&fields).expect("JSON of strings");
    data.pop(); // the closing brace: the body goes in as its own bytes
    let body = match signed.encoding {
        Encoding::Json => String::from_utf8_lossy(&signed.body).into_owned(),
        Encoding::Form => {
            let form = String::from_utf8_lossy(&signed.body).into_owned();
            form_urlencoded::parse(form.as_bytes())
                .find(|(k, _)| k == "payload")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_else(|| "{}".to_owned())
        }
    };
    #[allow(clippy::disallowed_methods)]
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{data},\"body\":{body},\"query\":{{}},\"timestamp\":{timestamp}}}")
}

async fn listen(State(shared): State<Arc<Shared>>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let _ = tx.try_send(Bytes::from_static(b"event: ready\ndata: {}\n\n"));
    if let Ok(mut listeners) = shared.listeners.lock() {
        listeners.push(tx);
    }
    let stream = ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// The real smee-client (`smee --url <channel> --target <url>`), in its own
/// process group, killed on drop.
pub struct SmeeClient {
    process: GroupProcess,
}

impl SmeeClient {
    /// Starts the client and waits until it listens on the channel and
    /// forwards (it logs "Forwarding ..." once the stream is open). Its log
    /// goes to `dir`.
    pub fn start(dir: &Path, channel: &SmeeChannel, target: &str) -> Self {
        let before = channel.listeners();
        let mut cmd = Command::new(npm::bin("smee"));
        cmd.args(["--url", &channel.url(), "--target", target]);
        let process = GroupProcess::spawn("smee", cmd, dir.join("smee.log"));
        let client = Self { process };
        client
            .process
            .wait_for_log("Forwarding", Duration::from_secs(60));
        eventually(Duration::from_secs(30), || {
            (channel.listeners() > before)
                .then_some(())
                .ok_or_else(|| "smee has not opened the stream".to_owned())
        })
        .unwrap_or_else(|e| panic!("{e}\n--- smee log ---\n{}", client.log_text()));
        client
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
