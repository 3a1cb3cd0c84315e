//! Simulated agents: many agent streams from one process, each with its
//! own client certificate, speaking the real protocol over the real gRPC
//! gateway. An agent says Hello, accepts what it is assigned, optionally
//! streams output (a bounded window of unacknowledged chunks, as the real
//! agent keeps), finishes at once, and heartbeats if asked to.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::proto::{
    self, AgentMessage, CoordinatorMessage, agent_gateway_client::AgentGatewayClient,
    agent_message, coordinator_message,
};
use common::tls::TlsMaterial;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::now;

/// What a simulated agent does.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub capacity: u32,
    /// Output chunks per attempt, of `chunk` bytes each.
    pub chunks: u64,
    pub chunk: usize,
    /// Unacknowledged chunks at most.
    pub window: u64,
    /// Heartbeats at this interval (none when `None`).
    pub heartbeat: Option<Duration>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            capacity: 1,
            chunks: 0,
            chunk: 0,
            window: 256,
            heartbeat: None,
        }
    }
}

/// What an agent saw, with when.
#[derive(Clone, Debug)]
pub enum Event {
    Welcomed {
        agent: usize,
    },
    Assigned {
        task: String,
        at: Instant,
    },
    /// Every chunk of the attempt was acknowledged.
    OutputAcked {
        task: String,
        at: Instant,
    },
    FinishedAcked {
        task: String,
        at: Instant,
    },
    Closed {
        agent: usize,
        why: String,
    },
}

fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

fn hello(name: &str, b: &Behaviour) -> AgentMessage {
    use proto::Specialty::*;
    msg(agent_message::Msg::Hello(proto::Hello {
        agent_version: "bench".into(),
        specialties: [Backend, Frontend, Testing, Devops, General]
            .iter()
            .map(|s| *s as i32)
            .collect(),
        capacity: b.capacity,
        hostname: name.into(),
        instance_id: format!("bench-{name}-{}", std::process::id()),
        ..Default::default()
    }))
}

struct Attempt {
    attempt: u32,
    next_seq: u64,
    acked: u64,
}

/// Runs agent `index` until its stream ends; sends what it sees to
/// `events`. Output data is shared by every chunk.
pub async fn run(
    index: usize,
    name: String,
    url: String,
    tls: TlsMaterial,
    b: Behaviour,
    events: mpsc::UnboundedSender<Event>,
) {
    let channel = super::coord::connect(&url, &tls).await;
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    tx.send(hello(&name, &b)).await.expect("hello queued");
    let mut inbound = match AgentGatewayClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let _ = events.send(Event::Closed {
                agent: index,
                why: status.to_string(),
            });
            return;
        }
    };
    let data: std::sync::Arc<[u8]> = vec![b'x'; b.chunk].into();
    let mut held: BTreeMap<String, Attempt> = BTreeMap::new();
    let mut beat = tokio::time::interval(b.heartbeat.unwrap_or(Duration::from_secs(3600)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let why = loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = beat.tick(), if b.heartbeat.is_some() => {
                let running = held
                    .iter()
                    .map(|(t, a)| proto::RunningTask {
                        task_id: t.clone(),
                        attempt: a.attempt,
                        last_output_seq: a.next_seq - 1,
                    })
                    .collect();
                let free = b.capacity.saturating_sub(held.len() as u32);
                let hb = msg(agent_message::Msg::Heartbeat(proto::Heartbeat {
                    running,
                    free_slots: free,
                    unhealthy_reason: String::new(),
                }));
                if tx.send(hb).await.is_err() {
                    break "send failed".to_owned();
                }
                continue;
            }
        };
        let m = match next {
            Ok(Some(CoordinatorMessage { msg: Some(m) })) => m,
            Ok(Some(_)) => continue,
            Ok(None) => break "stream ended".to_owned(),
            Err(status) => break status.to_string(),
        };
        use coordinator_message::Msg as C;
        match m {
            C::Welcome(_) => {
                let _ = events.send(Event::Welcomed { agent: index });
            }
            C::Assign(a) => {
                let at = now();
                let task = a.task.map(|t| t.task_id).unwrap_or_default();
                let _ = events.send(Event::Assigned {
                    task: task.clone(),
                    at,
                });
                let accepted = msg(agent_message::Msg::TaskAccepted(proto::TaskAccepted {
                    task_id: task.clone(),
                    attempt: a.attempt,
                }));
                if tx.send(accepted).await.is_err() {
                    break "send failed".to_owned();
                }
                let mut at = Attempt {
                    attempt: a.attempt,
                    next_seq: 1,
                    acked: 0,
                };
                if b.chunks == 0 {
                    if tx.send(finished(&task, &at)).await.is_err() {
                        break "send failed".to_owned();
                    }
                } else if send_window(&tx, &task, &mut at, &b, &data).await.is_err() {
                    break "send failed".to_owned();
                }
                held.insert(task, at);
            }
            C::OutputAck(ack) => {
                let Some(at) = held.get_mut(&ack.task_id) else {
                    continue;
                };
                if ack.attempt != at.attempt || ack.seq <= at.acked {
                    continue;
                }
                at.acked = ack.seq;
                if at.acked >= b.chunks {
                    let _ = events.send(Event::OutputAcked {
                        task: ack.task_id.clone(),
                        at: now(),
                    });
                    if tx.send(finished(&ack.task_id, at)).await.is_err() {
                        break "send failed".to_owned();
                    }
                } else if send_window(&tx, &ack.task_id, at, &b, &data).await.is_err() {
                    break "send failed".to_owned();
                }
            }
            C::FinishedAck(f) => {
                held.remove(&f.task_id);
                let _ = events.send(Event::FinishedAcked {
                    task: f.task_id,
                    at: now(),
                });
            }
            C::Cancel(_) | C::Drain(_) | C::Heartbeat(_) => {}
        }
    };
    let _ = events.send(Event::Closed { agent: index, why });
}

/// The branch a simulated agent reports having pushed for `task`.
pub fn branch_of(task: &str) -> String {
    format!("ccc/bench-{task}")
}

fn finished(task: &str, at: &Attempt) -> AgentMessage {
    msg(agent_message::Msg::TaskFinished(proto::TaskFinished {
        task_id: task.to_owned(),
        attempt: at.attempt,
        outcome: proto::Outcome::Succeeded as i32,
        message: "done".into(),
        branch: branch_of(task),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        last_output_seq: at.next_seq - 1,
        ..Default::default()
    }))
}

/// Sends chunks while fewer than `window` are unacknowledged.
async fn send_window(
    tx: &mpsc::Sender<AgentMessage>,
    task: &str,
    at: &mut Attempt,
    b: &Behaviour,
    data: &std::sync::Arc<[u8]>,
) -> Result<(), ()> {
    while at.next_seq <= b.chunks && at.next_seq - 1 - at.acked < b.window {
        let out = msg(agent_message::Msg::TaskOutput(proto::TaskOutput {
            task_id: task.to_owned(),
            attempt: at.attempt,
            seq: at.next_seq,
            kind: proto::OutputKind::Stdout as i32,
            data: data.to_vec(),
        }));
        tx.send(out).await.map_err(|_| ())?;
        at.next_seq += 1;
    }
    Ok(())
}

/// A fleet of simulated agents and what they saw.
pub struct Fleet {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Connects `certs.len()` agents, at most `parallel` at a time (the
    /// coordinator refuses more than 16 handshakes in flight from one
    /// address), and waits until each is welcomed.
    pub async fn start(
        url: &str,
        certs: &[(String, TlsMaterial)],
        b: &Behaviour,
        parallel: usize,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut handles = Vec::new();
        let mut welcomed = 0;
        for (i, (name, tls)) in certs.iter().enumerate() {
            handles.push(tokio::spawn(run(
                i,
                name.clone(),
                url.to_owned(),
                tls.clone(),
                b.clone(),
                tx.clone(),
            )));
            // Bounded handshakes in flight: wait for welcomes to keep up.
            while i + 1 - welcomed > parallel {
                match rx.recv().await.expect("agents report") {
                    Event::Welcomed { .. } => welcomed += 1,
                    Event::Closed { agent, why } => panic!("agent {agent} closed: {why}"),
                    _ => {}
                }
            }
        }
        while welcomed < certs.len() {
            match tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .expect("every agent is welcomed within 2 minutes")
                .expect("agents report")
            {
                Event::Welcomed { .. } => welcomed += 1,
                Event::Closed { agent, why } => panic!("agent {agent} closed: {why}"),
                _ => {}
            }
        }
        Self {
            events: rx,
            handles,
        }
    }

    /// Waits for the next event (within a minute).
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(60), self.events.recv())
            .await
            .expect("an agent event within a minute")
            .expect("agents report")
    }

    pub fn stop(self) {
        for h in &self.handles {
            h.abort();
        }
    }
}
