//! `ccc top`: a live view of the cluster, redrawn as the coordinator's
//! `WatchCluster` feed pushes changes (and once a second, so elapsed times
//! move on). The state is a pure [`model::Model`] fed by messages (feed
//! events, keys, log lines, action results) and drawn by [`view::draw`];
//! this module is the adapter: terminal, feed, keys, and the effects the
//! model asks for. When standard output is not a terminal, it prints the
//! first snapshot as plain tables and ends.

mod model;
mod view;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::proto::{self, ClusterEvent};
use common::telemetry::error_chain;
use common::time::UnixMillis;
use crossterm::event::{Event, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::Streaming;

use self::model::{Effect, Key, Model, Msg};
use crate::Exit;
use crate::admin::{ConnArgs, Connection};
use crate::tasks::{self, LogSink, say};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// How many ended tasks to show besides the running and queued ones (the
    /// most recently updated; at most 200).
    #[arg(long, default_value_t = 20)]
    ended: u32,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn run(conn: Connection, args: TopArgs) -> anyhow::Result<Exit> {
    let on_terminal = std::io::stdout().is_terminal();
    let request = proto::WatchClusterRequest {
        recent_ended: args.ended.max(1),
        // Without a terminal one snapshot is printed.
        snapshot_only: !on_terminal,
    };
    let keep_ended = usize::try_from(args.ended).unwrap_or(usize::MAX);
    let mut feed = open_feed(&conn, request).await?;
    if !on_terminal {
        let first = feed
            .message()
            .await
            .map_err(|s| conn.diagnosis.explain(s))
            .context("WatchCluster")?
            .and_then(|e| e.event)
            .context("the coordinator ended the feed before its snapshot")?;
        let mut model = Model::new(keep_ended);
        model.update(Msg::Feed(Box::new(first)));
        say(&view::plain(&model, UnixMillis::now()))?;
        return Ok(Exit::Success);
    }
    live(Arc::new(conn), request, feed, Model::new(keep_ended)).await
}

async fn open_feed(
    conn: &Connection,
    request: proto::WatchClusterRequest,
) -> anyhow::Result<Streaming<ClusterEvent>> {
    let mut client = conn.client().await?;
    Ok(client
        .watch_cluster(request)
        .await
        .map_err(|s| conn.diagnosis.explain(s))
        .context("WatchCluster")?
        .into_inner())
}

/// Forwards the feed's events; when the coordinator goes away, says so and
/// opens the feed again with backoff (its first event is a fresh snapshot).
async fn forward_feed(
    conn: Arc<Connection>,
    request: proto::WatchClusterRequest,
    mut feed: Streaming<ClusterEvent>,
    to: UnboundedSender<Msg>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let why = loop {
            match feed.message().await {
                Ok(Some(ClusterEvent { event: Some(event) })) => {
                    backoff = Duration::from_millis(200);
                    if to.send(Msg::Feed(Box::new(event))).is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break "the feed ended".to_owned(),
                Err(status) => break status.message().to_owned(),
            }
        };
        if to.send(Msg::FeedLost(why)).is_err() {
            return;
        }
        feed = loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match open_feed(&conn, request).await {
                Ok(feed) => break feed,
                Err(e) => {
                    if to.send(Msg::FeedLost(error_chain(e.as_ref()))).is_err() {
                        return;
                    }
                }
            }
        };
    }
}

/// The log pane's end of `ccc logs -f`: readable lines, one message each.
struct Pane {
    task: String,
    to: UnboundedSender<Msg>,
}

impl LogSink for Pane {
    fn line(&mut self, data: &[u8]) -> std::io::Result<()> {
        for line in model::readable_lines(proto::OutputKind::Stdout as i32, data) {
            let msg = Msg::Log {
                task: self.task.clone(),
                line,
            };
            self.to
                .send(msg)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }

    fn lost(&mut self, why: &str) {
        let _ = self.line(format!("lost the coordinator ({why}); reconnecting").as_bytes());
    }
}

/// Follows a task's output into the log pane, exactly as `ccc logs -f`.
fn follow(conn: Arc<Connection>, task: String, to: UnboundedSender<Msg>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut pane = Pane { task, to };
        if let Err(e) = tasks::output_into(&conn, &pane.task.clone(), true, false, &mut pane).await
        {
            let _ = pane.line(format!("ccc: {}", error_chain(e.as_ref())).as_bytes());
        }
    })
}

/// Cancels or retries a task; the result comes back in words.
fn act(conn: Arc<Connection>, effect: Effect, to: UnboundedSender<Msg>) {
    tokio::spawn(async move {
        let said = async {
            let mut client = conn.client().await?;
            let text = match effect {
                Effect::Cancel(task_id) => {
                    let task = client
                        .cancel_task(proto::CancelTaskRequest {
                            task_id,
                            reason: String::new(),
                        })
                        .await
                        .map_err(|s| conn.diagnosis.explain(s))
                        .context("CancelTask")?
                        .into_inner();
                    tasks::after_cancel(&task)
                }
                Effect::Retry(task_id) => {
                    let task = client
                        .retry_task(proto::RetryTaskRequest { task_id })
                        .await
                        .map_err(|s| conn.diagnosis.explain(s))
                        .context("RetryTask")?
                        .into_inner();
                    format!("{} is {}", task.task_id, tasks::state_name(task.state))
                }
                Effect::Follow(_) | Effect::Unfollow | Effect::Quit => return Ok(String::new()),
            };
            anyhow::Ok(text)
        }
        .await;
        let text = said.unwrap_or_else(|e| error_chain(e.as_ref()));
        let _ = to.send(Msg::Done(text));
    });
}

fn key_of(event: crossterm::event::KeyEvent) -> Option<Key> {
    if event.kind != KeyEventKind::Press {
        return None;
    }
    Some(match event.code {
        KeyCode::Char('c') if event.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Char(c) => Key::Char(c),
        _ => return None,
    })
}

/// Leaves raw mode and the alternate screen however `live` ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = ratatui::try_restore();
    }
}

async fn live(
    conn: Arc<Connection>,
    request: proto::WatchClusterRequest,
    feed: Streaming<ClusterEvent>,
    mut model: Model,
) -> anyhow::Result<Exit> {
    let (to_model, mut messages) = unbounded_channel();
    let feed = tokio::spawn(forward_feed(
        Arc::clone(&conn),
        request,
        feed,
        to_model.clone(),
    ));
    let _guard = TerminalGuard;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut keys = EventStream::new();
    let mut clock = tokio::time::interval(Duration::from_secs(1));
    let mut following: Option<JoinHandle<()>> = None;
    let result = loop {
        let now = UnixMillis::now();
        terminal.draw(|frame| view::draw(frame, &model, now, &conn.url))?;
        let msg = tokio::select! {
            key = keys.next() => match key {
                Some(Ok(Event::Key(key))) => match key_of(key) {
                    Some(key) => Msg::Key(key),
                    None => continue,
                },
                // A resize or another event: draw again.
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Err(anyhow::Error::from(e).context("reading the keyboard")),
                None => break Ok(Exit::Success),
            },
            Some(msg) = messages.recv() => msg,
            _ = clock.tick() => continue,
        };
        // Everything that arrived meanwhile, before drawing again.
        let mut batch = vec![msg];
        while let Ok(msg) = messages.try_recv() {
            batch.push(msg);
        }
        let mut quit = false;
        for msg in batch {
            match model.update(msg) {
                None => {}
                Some(Effect::Quit) => quit = true,
                Some(Effect::Follow(task)) => {
                    if let Some(old) =
                        following.replace(follow(Arc::clone(&conn), task, to_model.clone()))
                    {
                        old.abort();
                    }
                }
                Some(Effect::Unfollow) => {
                    if let Some(old) = following.take() {
                        old.abort();
                    }
                }
                Some(effect @ (Effect::Cancel(_) | Effect::Retry(_))) => {
                    act(Arc::clone(&conn), effect, to_model.clone());
                }
            }
        }
        if quit {
            break Ok(Exit::Success);
        }
    };
    feed.abort();
    if let Some(follow) = following {
        follow.abort();
    }
    result
}
