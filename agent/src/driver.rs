//! The agent's one event loop: it owns the [`Session`], reacts to the link
//! (stream up, messages, down), to the children (output, exit) and to time
//! (heartbeats, a silent coordinator), then performs what the session asks:
//! messages to send, processes to start or stop.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::proto::AgentMessage;
use common::time::UnixMillis;
use common::types::AgentAdvert;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::conn::{self, FromCoordinator, Link, LinkEvent};
use crate::executor::{Executor, Job};
use crate::runner::{ChildEvent, Sink};
use crate::session::{Command, Session, ToCoordinator};
use crate::spool::Spool;
use crate::workspace::Workspaces;

/// Output spooled for the coordinator before the agent stops reading its
/// children's output (they then block on their pipes: nothing is dropped).
const MAX_UNACKED_BYTES: usize = 512 << 20;
/// How much spooled output one step of a resend reads.
const RESEND_STEP_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Link(#[from] conn::Error),
    #[error(transparent)]
    Spool(#[from] crate::spool::Error),
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
}

struct Stream {
    tx: mpsc::Sender<AgentMessage>,
    close: CancellationToken,
    welcomed: bool,
    /// The stream counts as dead after this much silence.
    silence: Duration,
    silent_after: Instant,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
}

pub struct Driver {
    config: Config,
    advert: AgentAdvert,
    session: Session,
    stream: Option<Stream>,
    children: HashMap<TaskId, CancellationToken>,
    child_tx: mpsc::Sender<ChildEvent>,
    executor: Arc<Executor>,
    spool: Spool,
    /// While the PC is unhealthy: when its check runs again.
    next_health_check: Option<Instant>,
    /// A check is running; its result arrives on this channel.
    health_tx: mpsc::Sender<Result<(), String>>,
    checking: bool,
}

impl Driver {
    /// Runs until `shutdown`; `unhealthy` is what the check at start found
    /// wrong with this PC, if anything.
    pub async fn run(
        config: Config,
        advert: AgentAdvert,
        unhealthy: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let link = Link::new(&config)?;
        let (link_tx, mut link_rx) = mpsc::channel(1024);
        let link_stop = CancellationToken::new();
        let link_closing = CancellationToken::new();
        tokio::spawn(link.run(link_tx, link_stop.clone(), link_closing.clone()));
        let (child_tx, mut child_rx) = mpsc::channel(1024);
        let (health_tx, mut health_rx) = mpsc::channel(4);
        let executor = Arc::new(Executor {
            workspaces: Workspaces::new(&config.data_dir, config.ssh.clone()),
            children: crate::runner::Registry::new(&config.data_dir),
            claude: config.claude.clone(),
            tests: config.tests.clone(),
            author: config.author.clone(),
            push_incomplete: config.push_incomplete,
            keep_failed_for: config.keep_failed_for,
            agent: config.name.clone(),
        });
        let (spool, finished) = Spool::open(&config.data_dir)?;
        let mut session = Session::new(config.capacity);
        session.handle_health(unhealthy);
        for done in finished {
            session.restore_finished(done.task, done.attempt, done.report, done.unacked);
        }
        let mut driver = Self {
            spool,
            executor,
            session,
            config,
            advert,
            stream: None,
            children: HashMap::new(),
            child_tx,
            next_health_check: None,
            health_tx,
            checking: false,
        };
        let mut stopping: Option<Instant> = None;
        let result = loop {
            let wake = driver.next_wake();
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {
                    info!("stopping: draining and handing back running tasks");
                    stopping = Some(Instant::now() + driver.config.stop_grace);
                    driver.session.begin_shutdown("agent shutting down");
                    for stop in driver.children.values() {
                        stop.cancel();
                    }
                }
                event = link_rx.recv() => match event {
                    Some(LinkEvent::Refused(why)) => break Err(Error::Refused(why)),
                    Some(event) => driver.on_link(event),
                    None => break Ok(()),
                },
                event = child_rx.recv(), if driver.session.unacked_bytes() < MAX_UNACKED_BYTES => {
                    if let Some(event) = event {
                        driver.on_child(event);
                    }
                }
                Some(result) = health_rx.recv() => {
                    driver.checking = false;
                    driver.session.handle_health(result.err());
                }
                () = tokio::time::sleep_until(wake) => driver.on_time(),
            }
            driver.schedule_health_check();
            driver.perform().await;
            if let Some(deadline) = stopping {
                // Stop once every child has ended and its result is out (or
                // the grace period is over).
                let flushed = driver.children.is_empty()
                    && (driver.session.is_idle() || driver.stream.is_none());
                if flushed || Instant::now() >= deadline {
                    break Ok(());
                }
            }
        };
        for stop in driver.children.values() {
            stop.cancel();
        }
        // Close our side of the stream and give the coordinator a moment to
        // see a clean end (rather than a reset connection); the link then
        // ends without trying again.
        link_closing.cancel();
        if driver.stream.take().is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(event) = link_rx.recv().await {
                    if matches!(event, LinkEvent::Down { .. }) {
                        break;
                    }
                }
            })
            .await;
        }
        link_stop.cancel();
        result
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let stream = match &self.stream {
            Some(s) if s.welcomed => s.silent_after.min(s.next_heartbeat),
            Some(s) => s.silent_after,
            None => far,
        };
        self.next_health_check.map_or(stream, |at| at.min(stream))
    }

    /// While the PC is unhealthy, a check is due every
    /// `health_check_interval`; none once it is healthy again.
    fn schedule_health_check(&mut self) {
        if self.session.unhealthy_reason().is_none() {
            self.next_health_check = None;
        } else if self.next_health_check.is_none() && !self.checking {
            self.next_health_check = Some(Instant::now() + self.config.health_check_interval);
        }
    }

    /// Runs the PC's check in the background if it is due.
    fn start_health_check(&mut self) {
        if self.next_health_check.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.next_health_check = None;
        self.checking = true;
        let (program, env, tx) = (
            std::path::PathBuf::from(&self.config.claude.program),
            self.config.claude.env.clone(),
            self.health_tx.clone(),
        );
        tokio::spawn(async move {
            let result = crate::health::check(&program, &env).await;
            let _ = tx.send(result).await;
        });
    }

    fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Up { tx, close } => {
                self.stream = Some(Stream {
                    tx,
                    close,
                    welcomed: false,
                    silence: self.config.welcome_timeout,
                    silent_after: Instant::now() + self.config.welcome_timeout,
                    heartbeat_every: Duration::from_secs(5),
                    next_heartbeat: Instant::now(),
                });
                self.session.handle_connected();
            }
            LinkEvent::Down { reason } => {
                if self.stream.take().is_some() {
                    info!(%reason, "stream to the coordinator closed");
                }
                self.session.handle_disconnected();
            }
            LinkEvent::Refused(_) => {}
            LinkEvent::Message(msg) => {
                if let Some(stream) = self.stream.as_mut() {
                    // Any message shows the coordinator is alive.
                    stream.silent_after = Instant::now() + stream.silence;
                }
                self.on_message(msg);
            }
        }
    }

    fn on_message(&mut self, msg: FromCoordinator) {
        match msg {
            FromCoordinator::Welcome {
                agent_id,
                heartbeat_interval,
                heartbeat_timeout,
                held,
            } => {
                conn::log_welcome(&agent_id, &self.config.name, heartbeat_interval);
                if let Some(stream) = self.stream.as_mut() {
                    stream.welcomed = true;
                    stream.heartbeat_every = heartbeat_interval;
                    stream.next_heartbeat = Instant::now() + heartbeat_interval;
                    stream.silence = heartbeat_timeout;
                    stream.silent_after = Instant::now() + heartbeat_timeout;
                }
                self.session.handle_welcome(&held);
            }
            FromCoordinator::Heartbeat => {}
            FromCoordinator::Drain { reason } => {
                info!(%reason, "the coordinator asked this agent to drain");
                self.session.handle_drain();
            }
            FromCoordinator::Assign {
                task,
                attempt,
                spec,
                deadline,
                credential,
            } => self
                .session
                .handle_assign(task, attempt, *spec, deadline, credential),
            FromCoordinator::Cancel {
                task,
                attempt,
                reason,
            } => self.session.handle_cancel(task, attempt, &reason),
            FromCoordinator::OutputAck { task, attempt, seq } => {
                self.session.handle_output_ack(task, attempt, seq);
                self.spool.acknowledged(task, attempt, seq);
            }
            FromCoordinator::FinishedAck { task, attempt } => {
                self.session.handle_finished_ack(task, attempt);
            }
        }
    }

    fn on_child(&mut self, event: ChildEvent) {
        match event {
            ChildEvent::Output {
                task,
                attempt,
                kind,
                data,
            } => {
                if let Some(chunk) = self.session.handle_child_output(task, attempt, kind, data)
                    && let Err(e) = self.spool.append(&chunk)
                {
                    // Still sent while connected; lost only if the
                    // stream breaks before it is acknowledged.
                    warn!(task_id = %task, attempt = attempt.0, error = %e, "cannot spool output");
                }
            }
            ChildEvent::Progress {
                task,
                attempt,
                phase,
            } => self.session.handle_progress(task, attempt, phase),
            ChildEvent::Exited {
                task,
                attempt,
                report,
            } => {
                self.children.remove(&task);
                if let Some(report) = self.session.handle_child_exit(task, attempt, *report)
                    && let Err(e) = self.spool.save_result(task, attempt, &report)
                {
                    // Still sent; lost only if the agent dies before the ack.
                    warn!(task_id = %task, attempt = attempt.0, error = %e, "cannot save the result");
                }
            }
        }
    }

    fn on_time(&mut self) {
        self.start_health_check();
        let now = Instant::now();
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if now >= stream.silent_after {
            warn!("the coordinator went silent; reconnecting");
            stream.close.cancel();
            self.stream = None;
            self.session.handle_disconnected();
            return;
        }
        if stream.welcomed && now >= stream.next_heartbeat {
            stream.next_heartbeat = now + stream.heartbeat_every;
            self.session.heartbeat();
        }
    }

    /// Does what the session asked: processes first (so a Stop is not
    /// delayed by a slow stream), then messages.
    async fn perform(&mut self) {
        while let Some(command) = self.session.poll_command() {
            match command {
                Command::Start {
                    task,
                    attempt,
                    spec,
                    deadline,
                    credential,
                } => {
                    let stop = CancellationToken::new();
                    self.children.insert(task, stop.clone());
                    let job = Job {
                        task,
                        attempt,
                        spec: *spec,
                        budget: Duration::from_millis(
                            deadline.0.saturating_sub(UnixMillis::now().0),
                        ),
                        credential,
                    };
                    let sink = Sink {
                        task,
                        attempt,
                        events: self.child_tx.clone(),
                    };
                    let executor = Arc::clone(&self.executor);
                    tokio::spawn(async move {
                        let report = executor.run(job, sink.clone(), stop).await;
                        let _ = sink
                            .events
                            .send(ChildEvent::Exited {
                                task,
                                attempt,
                                report: Box::new(report),
                            })
                            .await;
                    });
                }
                Command::Stop { task, .. } => {
                    if let Some(stop) = self.children.get(&task) {
                        stop.cancel();
                    }
                }
                Command::Forget { task, attempt } => self.spool.remove(task, attempt),
            }
        }
        while let Some(msg) = self.session.poll_outbound() {
            let sent = match msg {
                ToCoordinator::Resend {
                    task,
                    attempt,
                    after,
                } => self.resend(task, attempt, after).await,
                msg => self.send(msg).await,
            };
            if !sent {
                return;
            }
        }
    }

    /// Resends an attempt's spooled output after `after`, a few MiB at a
    /// time. False once the stream is gone.
    async fn resend(&mut self, task: TaskId, attempt: Attempt, mut after: u64) -> bool {
        loop {
            let chunks = match self
                .spool
                .read_after(task, attempt, after, RESEND_STEP_BYTES)
            {
                Ok(chunks) => chunks,
                Err(e) => {
                    warn!(task_id = %task, attempt = attempt.0, error = %e, "cannot read spooled output");
                    return true;
                }
            };
            let Some(last) = chunks.last().map(|c| c.seq) else {
                return true;
            };
            after = last;
            for chunk in chunks {
                if !self.send(ToCoordinator::Output(chunk)).await {
                    return false;
                }
            }
        }
    }

    /// Sends one message. A coordinator that stops reading (the stream full
    /// for a whole silence timeout) counts as gone, so a stuck stream cannot
    /// freeze the agent. False once the stream is gone.
    async fn send(&mut self, msg: ToCoordinator) -> bool {
        let Some(stream) = self.stream.as_ref() else {
            return false;
        };
        let Some(msg) = conn::to_proto(msg, &self.advert, &self.config.name) else {
            return true;
        };
        match tokio::time::timeout(stream.silence, stream.tx.send(msg)).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => {}
            Err(_) => {
                warn!("the coordinator stopped reading; reconnecting");
                stream.close.cancel();
            }
        }
        self.stream = None;
        self.session.handle_disconnected();
        false
    }
}
