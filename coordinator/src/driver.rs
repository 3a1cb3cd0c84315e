//! The coordinator's one event loop. It owns the [`Core`] and the store by
//! value (no `Arc<Mutex<Core>>`), takes [`Command`]s from the gRPC layer,
//! and runs each batch as: apply every ready command, commit the core's
//! writes in one transaction with one flush (group commit), and only then
//! answer callers and perform the core's actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use common::ids::AgentId;
use common::time::UnixMillis;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::core::{
    Action, AdminError, AgentView, CloseReason, ConnId, Core, FromAgent, OpenRejected, ToAgent,
};
use crate::store::{self, Store};

/// How many commands one batch takes before committing; bounds latency.
const MAX_BATCH: usize = 512;
/// Messages queued for one agent stream before it counts as stuck.
pub const OUTBOUND_QUEUE: usize = 256;

/// What the driver sends down an agent's stream.
#[derive(Debug)]
pub enum Outbound {
    Msg(ToAgent),
    /// The last item: the stream ends with this reason.
    Close(CloseReason),
}

pub type Reply<T> = oneshot::Sender<T>;

/// Inputs to the driver, from the gRPC layer.
#[derive(Debug)]
pub enum Command {
    Open {
        agent: AgentId,
        peer: String,
        outbound: mpsc::Sender<Outbound>,
        reply: Reply<Result<ConnId, OpenRejected>>,
    },
    Message {
        conn: ConnId,
        msg: FromAgent,
    },
    Malformed {
        conn: ConnId,
        why: String,
    },
    Closed {
        conn: ConnId,
        reason: String,
    },
    ListAgents {
        reply: Reply<Vec<AgentView>>,
    },
    GetAgent {
        agent: AgentId,
        reply: Reply<Option<AgentView>>,
    },
    Revoke {
        agent: AgentId,
        reason: String,
        reply: Reply<Result<AgentView, AdminError>>,
    },
    Drain {
        agent: AgentId,
        reason: String,
        reply: Reply<Result<AgentView, AdminError>>,
    },
}

/// A cheap handle to send commands to the driver.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug, thiserror::Error)]
#[error("the coordinator is shutting down")]
pub struct DriverGone;

impl DriverHandle {
    pub async fn send(&self, cmd: Command) -> Result<(), DriverGone> {
        self.tx.send(cmd).await.map_err(|_| DriverGone)
    }

    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DriverGone> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| DriverGone)
    }
}

#[must_use = "the driver does nothing unless `run` is awaited"]
pub struct Driver {
    core: Core,
    store: Arc<dyn Store>,
    rx: mpsc::Receiver<Command>,
    next_conn: u64,
    streams: HashMap<ConnId, mpsc::Sender<Outbound>>,
    /// Answers held back until the batch that produced them is committed.
    replies: Vec<Box<dyn FnOnce() + Send>>,
}

impl Driver {
    pub fn new(core: Core, store: Arc<dyn Store>) -> (Self, DriverHandle) {
        let (tx, rx) = mpsc::channel(4096);
        let driver = Self {
            core,
            store,
            rx,
            next_conn: 0,
            streams: HashMap::new(),
            replies: Vec::new(),
        };
        (driver, DriverHandle { tx })
    }

    /// Runs until `shutdown` fires or a commit fails. A failed commit stops
    /// the coordinator: it can no longer promise durability.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), store::Error> {
        // Writes from rebuilding state (e.g. agents marked disconnected).
        self.commit_and_dispatch().await?;
        loop {
            let deadline = self.core.poll_timeout();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => break,
                },
                () = sleep_until(deadline) => {
                    let (now, wall) = clock();
                    self.core.handle_timeout(now, wall);
                }
            }
            for _ in 0..MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(cmd) => self.apply(cmd),
                    Err(_) => break,
                }
            }
            self.commit_and_dispatch().await?;
        }
        for (_, tx) in self.streams.drain() {
            let _ = tx.try_send(Outbound::Close(CloseReason::Protocol(
                "coordinator shutting down".into(),
            )));
        }
        Ok(())
    }

    fn apply(&mut self, cmd: Command) {
        let (now, wall) = clock();
        match cmd {
            Command::Open {
                agent,
                peer,
                outbound,
                reply,
            } => {
                self.next_conn += 1;
                let conn = ConnId(self.next_conn);
                let result = self.core.handle_open(conn, agent, peer, now);
                if result.is_ok() {
                    self.streams.insert(conn, outbound);
                }
                self.reply(reply, result.map(|()| conn));
            }
            Command::Message { conn, msg } => self.core.handle_message(conn, msg, now, wall),
            Command::Malformed { conn, why } => self.core.protocol_error(conn, why, now, wall),
            Command::Closed { conn, reason } => {
                self.streams.remove(&conn);
                self.core.handle_closed(conn, reason, now, wall);
            }
            Command::ListAgents { reply } => {
                let agents = self.core.agents();
                self.reply(reply, agents);
            }
            Command::GetAgent { agent, reply } => {
                let view = self.core.agent(&agent);
                self.reply(reply, view);
            }
            Command::Revoke {
                agent,
                reason,
                reply,
            } => {
                let result = self.core.revoke(&agent, reason, wall);
                self.reply(reply, result);
            }
            Command::Drain {
                agent,
                reason,
                reply,
            } => {
                let result = self.core.drain(&agent, reason, wall);
                self.reply(reply, result);
            }
        }
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.replies.push(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    async fn commit_and_dispatch(&mut self) -> Result<(), store::Error> {
        // Performing an action can feed the core again (a stuck stream is
        // closed), so repeat until a round leaves nothing behind.
        loop {
            let writes = self.core.take_writes();
            if !writes.is_empty() {
                let store = Arc::clone(&self.store);
                let n_writes = writes.len();
                tokio::task::spawn_blocking(move || store.commit(&writes))
                    .await
                    .unwrap_or_else(|join| Err(store::Error::Task(join.to_string())))
                    .inspect_err(|e| error!(error = %e, "commit failed; stopping"))?;
                debug!(n_writes, "committed");
            }
            for reply in self.replies.drain(..) {
                reply();
            }
            let mut performed = false;
            while let Some(action) = self.core.poll_action() {
                performed = true;
                self.perform(action);
            }
            if !performed {
                return Ok(());
            }
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Send { conn, msg } => {
                let Some(tx) = self.streams.get(&conn) else {
                    return;
                };
                if tx.try_send(Outbound::Msg(msg)).is_err() {
                    // A stream that cannot keep up is closed; the agent
                    // reconnects and resynchronises from Hello.
                    warn!(conn = conn.0, "agent stream is not keeping up; closing it");
                    self.streams.remove(&conn);
                    let (now, wall) = clock();
                    self.core
                        .handle_closed(conn, "outbound queue full".into(), now, wall);
                }
            }
            Action::Close { conn, reason } => {
                if let Some(tx) = self.streams.remove(&conn) {
                    let _ = tx.try_send(Outbound::Close(reason));
                }
            }
        }
    }
}

/// The driver's one clock read: monotonic time for timers, wall time for
/// what is persisted and shown.
#[allow(clippy::disallowed_methods)]
fn clock() -> (Instant, UnixMillis) {
    (Instant::now(), UnixMillis::now())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
