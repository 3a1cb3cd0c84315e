//! The agent's one event loop: it owns the [`Session`] and feeds it the
//! link (stream up, messages, down), the children (output, exit), health
//! check results and time, then performs what the session asks: messages to
//! send, processes to start or stop, a silent stream to close, a check to
//! run. Every timer lives in the session: the loop sleeps until its
//! `poll_timeout` and reads the clock in one place ([`clock`]). Every task
//! it starts is owned by one `TaskTracker`, so a stop waits for them; the
//! spool's disk work runs on its own thread ([`SpoolHandle`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ids::{Attempt, TaskId};
use common::protocol::{FromAgent, ToAgent};
use common::time::UnixMillis;
use common::types::AgentAdvert;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::conn::{self, Link, LinkEvent};
use crate::executor::{Executor, Job};
use crate::runner::{ChildEvent, Sink};
use crate::session::{Command, Outbound, Session, SessionConfig};
use crate::spool::{Spool, SpoolHandle};
use crate::workspace::Workspaces;

/// How much spooled output one step of a resend reads. (Past the configured
/// `max_unacked_output` the agent stops reading its children's output: they
/// then block on their pipes, and nothing is dropped.)
const RESEND_STEP_BYTES: usize = 4 << 20;
/// How long a stopping agent waits for the coordinator to see its stream end.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Link(#[from] conn::Error),
    #[error(transparent)]
    Spool(#[from] crate::spool::Error),
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
}

/// The driver's one clock read: monotonic time for the session's timers,
/// wall time for an attempt's deadline.
#[allow(clippy::disallowed_methods)]
pub fn clock() -> (Instant, UnixMillis) {
    (Instant::now(), UnixMillis::now())
}

struct Stream {
    tx: mpsc::Sender<FromAgent>,
    close: CancellationToken,
}

/// What woke the loop.
enum Input {
    Shutdown,
    Link(Option<LinkEvent>),
    Child(ChildEvent),
    Health(Result<(), String>),
    Timer,
}

pub struct Driver {
    config: Config,
    session: Session,
    stream: Option<Stream>,
    children: HashMap<TaskId, CancellationToken>,
    child_tx: mpsc::Sender<ChildEvent>,
    /// A health check's result arrives on this channel.
    health_tx: mpsc::Sender<Result<(), String>>,
    executor: Arc<Executor>,
    spool: SpoolHandle,
    /// Owns every task the driver starts.
    tasks: TaskTracker,
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
        let tasks = TaskTracker::new();
        let link = Link::new(&config)?;
        let (link_tx, mut link_rx) = mpsc::channel(1024);
        let link_stop = CancellationToken::new();
        let link_closing = CancellationToken::new();
        tasks.spawn(link.run(link_tx, link_stop.clone(), link_closing.clone()));
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
        let (now, _) = clock();
        let mut session = Session::new(SessionConfig {
            advert,
            welcome_timeout: config.welcome_timeout,
            health_check_interval: config.health_check_interval,
            stop_grace: config.stop_grace,
        });
        session.handle_health(unhealthy, now);
        for done in finished {
            session.restore_finished(done.task, done.attempt, done.report, done.unacked);
        }
        let stop_grace = config.stop_grace;
        let mut driver = Self {
            spool: spool.spawn(&tasks),
            executor,
            session,
            config,
            stream: None,
            children: HashMap::new(),
            child_tx,
            health_tx,
            tasks: tasks.clone(),
        };
        let mut stopping = false;
        let result = loop {
            let wake = driver.session.poll_timeout();
            let input = tokio::select! {
                () = shutdown.cancelled(), if !stopping => Input::Shutdown,
                event = link_rx.recv() => Input::Link(event),
                Some(event) = child_rx.recv(), if driver.session.unacked_bytes() < driver.config.max_unacked_output => {
                    Input::Child(event)
                }
                Some(result) = health_rx.recv() => Input::Health(result),
                () = sleep_until(wake) => Input::Timer,
            };
            let (now, wall) = clock();
            match input {
                Input::Shutdown => {
                    info!("stopping: draining and handing back running tasks");
                    stopping = true;
                    driver.session.begin_shutdown("agent shutting down", now);
                }
                Input::Link(Some(LinkEvent::Refused(why))) => break Err(Error::Refused(why)),
                Input::Link(Some(event)) => driver.on_link(event, now).await,
                Input::Link(None) => break Ok(()),
                Input::Child(event) => driver.on_child(event, now).await,
                Input::Health(result) => driver.session.handle_health(result.err(), now),
                Input::Timer => driver.session.handle_timeout(now),
            }
            driver.perform(now, wall).await;
            if driver.session.is_stopped() {
                break Ok(());
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
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(event) = link_rx.recv().await {
                    if matches!(event, LinkEvent::Down { .. }) {
                        break;
                    }
                }
            })
            .await;
        }
        link_stop.cancel();
        // Nobody listens any more: what the tasks still report is dropped at
        // once, and the spool's thread ends once its queue is done.
        drop((driver, link_rx, child_rx, health_rx));
        tasks.close();
        if tokio::time::timeout(stop_grace, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                grace_ms = u64::try_from(stop_grace.as_millis()).unwrap_or(u64::MAX),
                "work still running after the stop grace; leaving it"
            );
        }
        result
    }

    async fn on_link(&mut self, event: LinkEvent, now: Instant) {
        match event {
            LinkEvent::Up { tx, close } => {
                self.stream = Some(Stream { tx, close });
                self.session.handle_connected(now);
            }
            LinkEvent::Down { reason } => {
                if self.stream.take().is_some() {
                    info!(%reason, "stream to the coordinator closed");
                }
                self.session.handle_disconnected();
            }
            LinkEvent::Refused(_) => {}
            LinkEvent::Message(msg) => {
                match &msg {
                    ToAgent::Welcome {
                        agent_id,
                        heartbeat_interval,
                        ..
                    } => {
                        conn::log_welcome(agent_id.as_str(), &self.config.name, *heartbeat_interval)
                    }
                    ToAgent::OutputAck { task, attempt, seq } => {
                        self.spool.acknowledged(*task, *attempt, *seq).await;
                    }
                    _ => {}
                }
                self.session.handle_message(msg, now);
            }
        }
    }

    async fn on_child(&mut self, event: ChildEvent, now: Instant) {
        match event {
            ChildEvent::Output {
                task,
                attempt,
                kind,
                data,
            } => {
                // Queued for the disk before any later resend reads it.
                if let Some(chunk) = self.session.handle_child_output(task, attempt, kind, data) {
                    self.spool.append(chunk).await;
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
                // Saved before it is sent (by `perform`, after this).
                if let Some(report) = self.session.handle_child_exit(task, attempt, *report, now)
                    && let Err(e) = self.spool.save_result(task, attempt, report).await
                {
                    // Still sent; lost only if the agent dies before the ack.
                    warn!(task_id = %task, attempt = attempt.0, error = %e, "cannot save the result");
                }
            }
        }
    }

    /// Does what the session asked: commands first (so a Stop is not
    /// delayed by a slow stream), then messages.
    async fn perform(&mut self, now: Instant, wall: UnixMillis) {
        while let Some(command) = self.session.poll_command() {
            match command {
                Command::Start {
                    task,
                    attempt,
                    spec,
                    deadline,
                    credential,
                } => {
                    let job = Job {
                        task,
                        attempt,
                        spec: *spec,
                        started: now,
                        budget: Duration::from_millis(deadline.0.saturating_sub(wall.0)),
                        credential,
                    };
                    self.start(job);
                }
                Command::Stop { task, .. } => {
                    if let Some(stop) = self.children.get(&task) {
                        stop.cancel();
                    }
                }
                Command::Forget { task, attempt } => self.spool.remove(task, attempt).await,
                Command::CloseStream => {
                    if let Some(stream) = self.stream.take() {
                        stream.close.cancel();
                    }
                }
                Command::CheckHealth => self.check_health(),
            }
        }
        while let Some(msg) = self.session.poll_outbound() {
            let sent = match msg {
                Outbound::Resend {
                    task,
                    attempt,
                    after,
                } => self.resend(task, attempt, after).await,
                Outbound::Message(msg) => self.send(msg).await,
            };
            if !sent {
                return;
            }
        }
    }

    /// Runs one attempt in the background; its end comes back as
    /// `ChildEvent::Exited`.
    fn start(&mut self, job: Job) {
        let (task, attempt) = (job.task, job.attempt);
        let stop = CancellationToken::new();
        self.children.insert(task, stop.clone());
        let sink = Sink {
            task,
            attempt,
            events: self.child_tx.clone(),
        };
        let executor = Arc::clone(&self.executor);
        self.tasks.spawn(async move {
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

    /// Runs the PC's check in the background.
    fn check_health(&self) {
        let (program, env, tx) = (
            std::path::PathBuf::from(&self.config.claude.program),
            self.config.claude.env.clone(),
            self.health_tx.clone(),
        );
        self.tasks.spawn(async move {
            let result = crate::health::check(&program, &env).await;
            let _ = tx.send(result).await;
        });
    }

    /// Resends an attempt's spooled output after `after`, a few MiB at a
    /// time. False once the stream is gone.
    async fn resend(&mut self, task: TaskId, attempt: Attempt, mut after: u64) -> bool {
        loop {
            let chunks = match self
                .spool
                .read_after(task, attempt, after, RESEND_STEP_BYTES)
                .await
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
                if !self.send(FromAgent::Output(chunk)).await {
                    return false;
                }
            }
        }
    }

    /// Sends one message. A coordinator that stops reading (the stream full
    /// for as long as it may stay silent) counts as gone, so a stuck stream
    /// cannot freeze the agent. False once the stream is gone.
    async fn send(&mut self, msg: FromAgent) -> bool {
        let Some(stream) = self.stream.as_ref() else {
            return false;
        };
        let patience = self
            .session
            .silence_allowed()
            .unwrap_or(self.config.welcome_timeout);
        match tokio::time::timeout(patience, stream.tx.send(msg)).await {
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
