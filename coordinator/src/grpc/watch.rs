//! The Admin API's streams: `WatchTask` (a task, its stored output, then
//! its live changes) and `WatchCluster` (a snapshot of the cluster, then
//! its changes through a [`Coalescer`]). Each runs as one task per client.

use std::pin::Pin;
use std::sync::Arc;

use common::ids::Attempt;
use common::proto;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;
use tracing::debug;

use super::convert::{cluster_event, output_event, snapshot_event, state_event};
use crate::core::{TaskError, TaskEvent};
use crate::driver::{Command, DriverGone, DriverHandle, WATCH_QUEUE};
use crate::feed::{self, Coalescer, FeedEvent};
use crate::store::Store;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::TaskEvent, Status>> + Send>>;
pub type ClusterStream = Pin<Box<dyn Stream<Item = Result<proto::ClusterEvent, Status>> + Send>>;

/// How often a cluster feed sends output lines at most.
const FEED_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// `WatchTask`: the task as it is, its stored output from `from`, then (when
/// `follow`) live output and every change until the task ends.
pub async fn watch_task(
    driver: &DriverHandle,
    store: &Arc<dyn Store>,
    req: proto::WatchTaskRequest,
) -> Result<WatchStream, Status> {
    let id = super::admin::task_id(&req.task_id)?;
    let (events_tx, mut events) = mpsc::channel(WATCH_QUEUE);
    let snapshot = driver
        .call(|reply| Command::Watch {
            task: id,
            follow: req.follow,
            events: events_tx,
            reply,
        })
        .await?
        .ok_or(TaskError::Unknown(id))?;
    let (tx, rx) = mpsc::channel::<Result<proto::TaskEvent, Status>>(64);
    let store = Arc::clone(store);
    let from = (Attempt(req.from_attempt), req.from_seq);
    let follow = req.follow;
    tokio::spawn(async move {
        if tx.send(Ok(state_event(&snapshot))).await.is_err() {
            return;
        }
        // History first, page by page, then the live events after it.
        let mut next = from;
        loop {
            let store = Arc::clone(&store);
            let page = tokio::task::spawn_blocking(move || store.read_output(id, next, 256))
                .await
                .map_err(|e| Status::internal(e.to_string()))
                .and_then(|r| r.map_err(|e| Status::internal(e.to_string())));
            let page = match page {
                Ok(page) => page,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let done = page.len() < 256;
            for chunk in page {
                next = (chunk.attempt, chunk.seq + 1);
                let event = output_event(id, chunk.attempt, chunk.seq, chunk.kind, &chunk.data);
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        if snapshot.state.is_terminal() || !follow {
            return;
        }
        while let Some(event) = events.recv().await {
            let (event, last) = match &event {
                TaskEvent::Output(chunk) => {
                    if (chunk.attempt, chunk.seq) < next {
                        continue; // Already sent from the store.
                    }
                    next = (chunk.attempt, chunk.seq + 1);
                    (
                        output_event(id, chunk.attempt, chunk.seq, chunk.kind, &chunk.data),
                        false,
                    )
                }
                TaskEvent::Changed(task) => (state_event(task), task.state.is_terminal()),
            };
            if tx.send(Ok(event)).await.is_err() || last {
                return;
            }
        }
        // The driver dropped us: too slow, or shutting down.
        let _ = tx
            .send(Err(Status::unavailable(
                "watch interrupted; resume from the last position received",
            )))
            .await;
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// `WatchCluster`: a snapshot, then (unless `snapshot_only`) the changes.
pub async fn watch_cluster(
    driver: &DriverHandle,
    req: proto::WatchClusterRequest,
) -> Result<ClusterStream, Status> {
    let recent_ended = match req.recent_ended {
        0 => feed::DEFAULT_RECENT_ENDED,
        n => usize::try_from(n).map_or(feed::MAX_RECENT_ENDED, |n| n.min(feed::MAX_RECENT_ENDED)),
    };
    let (events, snapshot) = register_feed(driver, recent_ended).await?;
    let (tx, rx) = mpsc::channel(16);
    if req.snapshot_only {
        // The watcher's queue goes with `events`; the driver prunes it.
        drop(events);
        let _ = tx.send(Ok(snapshot_event(snapshot))).await;
        return Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
    }
    tokio::spawn(stream_feed(
        driver.clone(),
        recent_ended,
        events,
        snapshot,
        tx,
    ));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Registers a cluster feed with the driver: its changes, and the snapshot
/// they follow.
async fn register_feed(
    driver: &DriverHandle,
    recent_ended: usize,
) -> Result<(mpsc::Receiver<FeedEvent>, feed::Snapshot), DriverGone> {
    let (events, rx) = mpsc::channel(feed::FEED_QUEUE);
    let snapshot = driver
        .call(|reply| Command::WatchCluster {
            recent_ended,
            events,
            reply,
        })
        .await?;
    Ok((rx, snapshot))
}

/// Streams a cluster feed to one client: the snapshot, then the driver's
/// changes through a [`Coalescer`], which keeps taking them while the
/// client is slow. Output lines go out at most every
/// [`FEED_LINE_INTERVAL`]. When the driver drops the feed (it fell behind),
/// it registers again and sends a fresh snapshot.
async fn stream_feed(
    driver: DriverHandle,
    recent_ended: usize,
    mut events: mpsc::Receiver<FeedEvent>,
    snapshot: feed::Snapshot,
    tx: mpsc::Sender<Result<proto::ClusterEvent, Status>>,
) {
    if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
        return;
    }
    let mut pending = Coalescer::default();
    let mut line_ticks = tokio::time::interval(FEED_LINE_INTERVAL);
    line_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lines_due = false;
    loop {
        let ready = pending.has_changes() || (lines_due && pending.has_lines());
        tokio::select! {
            () = tx.closed() => return,
            event = events.recv() => match event {
                Some(event) => pending.push(event),
                None => {
                    let (again, snapshot) = match register_feed(&driver, recent_ended).await {
                        Ok(registered) => registered,
                        Err(gone) => {
                            let _ = tx.send(Err(gone.into())).await;
                            return;
                        }
                    };
                    debug!("a cluster feed fell behind; sending a fresh snapshot");
                    events = again;
                    pending.clear();
                    if tx.send(Ok(snapshot_event(snapshot))).await.is_err() {
                        return;
                    }
                }
            },
            _ = line_ticks.tick(), if !lines_due && pending.has_lines() => lines_due = true,
            permit = tx.reserve(), if ready => {
                let Ok(permit) = permit else { return };
                if let Some(event) = pending.pop(lines_due) {
                    permit.send(Ok(cluster_event(event)));
                }
                lines_due &= pending.has_lines();
            }
        }
    }
}
