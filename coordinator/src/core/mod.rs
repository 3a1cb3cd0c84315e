//! The coordinator's pure core: every decision about agent streams, made
//! without I/O, clocks or async.
//!
//! Vocabulary (after quinn-proto): `handle_*` feed inputs (time is always an
//! argument), admin mutators return their result at once, `poll_action` and
//! `take_writes` drain outputs, `poll_timeout` says when to call
//! `handle_timeout` next. The driver commits `take_writes()` to the store
//! *before* it performs any action or answers anyone (effects after commit).
//!
//! Architecture invariant: nothing here touches tokio, tonic, sled or the
//! system clock. An illegal or stale input is dropped with a `warn!`, never an
//! `Err`: the core cannot fail.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use common::ids::AgentId;
use common::time::UnixMillis;
use common::types::AgentAdvert;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[cfg(test)]
mod tests;

/// One accepted gRPC stream. A new stream of the same agent gets a new id, so
/// late messages of a replaced stream are recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Timings the core enforces; all configurable so tests can shrink them.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub heartbeat_interval: Duration,
    /// A stream silent this long is closed.
    pub heartbeat_timeout: Duration,
    /// A stream must send `Hello` within this time.
    pub hello_timeout: Duration,
    /// Announced in `Welcome`; enforced with the task lifecycle.
    pub lease_timeout: Duration,
}

/// The persisted state of an agent, as listed by `ccc agents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Connected,
    Disconnected,
    /// Connected, but takes no new work (asked by an admin or by the agent).
    Draining,
    /// May never connect again.
    Revoked,
}

/// What the coordinator remembers of an agent across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub state: AgentState,
    /// What the agent advertised in its latest `Hello`.
    pub advert: Option<AgentAdvert>,
    pub first_seen: UnixMillis,
    pub last_seen: UnixMillis,
    /// Streams opened over the coordinator's whole history.
    pub connections: u64,
    pub peer_address: String,
    pub last_disconnect_reason: Option<String>,
    pub revoked_reason: Option<String>,
}

/// A running task as an agent reports it (filled in by the task lifecycle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedTask {
    pub task_id: String,
    pub attempt: u32,
    pub last_output_seq: u64,
}

/// A message from an agent, already validated by `common::wire`.
#[derive(Clone, Debug, PartialEq)]
pub enum FromAgent {
    Hello {
        advert: AgentAdvert,
        running: Vec<ReportedTask>,
    },
    Heartbeat {
        free_slots: u32,
        running: Vec<ReportedTask>,
    },
    Draining {
        reason: String,
    },
}

/// A message for an agent; the gRPC layer turns it into protobuf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToAgent {
    Welcome {
        agent_id: AgentId,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
        lease_timeout: Duration,
    },
    Heartbeat {
        now: UnixMillis,
    },
    Drain {
        reason: String,
    },
}

/// Why the coordinator closes a stream; the gRPC layer maps it to a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer stream of the same agent took over.
    Replaced,
    HeartbeatTimeout,
    HelloTimeout,
    Revoked(String),
    Protocol(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send { conn: ConnId, msg: ToAgent },
    Close { conn: ConnId, reason: CloseReason },
}

/// A state change to persist atomically before any action of the same step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Agent(AgentRecord),
}

/// Why a new stream is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenRejected {
    Revoked { agent: AgentId, reason: String },
}

/// Why an admin request on an agent could not be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminError {
    UnknownAgent(AgentId),
    NotConnected(AgentId),
    Revoked(AgentId),
}

/// An agent as the Admin API shows it: the record plus its live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    pub record: AgentRecord,
    pub free_slots: u32,
    pub running: Vec<ReportedTask>,
}

#[derive(Debug)]
struct Live {
    conn: ConnId,
    last_heard: Instant,
    next_heartbeat: Instant,
    free_slots: u32,
    running: Vec<ReportedTask>,
}

#[derive(Debug)]
struct Pending {
    agent: AgentId,
    peer: String,
    hello_deadline: Instant,
}

#[derive(Debug)]
struct AgentEntry {
    record: AgentRecord,
    live: Option<Live>,
}

pub struct Core {
    config: CoreConfig,
    agents: BTreeMap<AgentId, AgentEntry>,
    /// Streams accepted but not yet introduced by `Hello`.
    pending: BTreeMap<ConnId, Pending>,
    /// Which agent a live stream belongs to.
    conn_agent: BTreeMap<ConnId, AgentId>,
    actions: VecDeque<Action>,
    writes: Vec<Write>,
}

impl Core {
    /// Rebuilds the core from the store. Nobody is connected to a coordinator
    /// that just started, so agents recorded as connected become
    /// disconnected (and that is written back).
    pub fn new(config: CoreConfig, records: Vec<AgentRecord>) -> Self {
        let mut core = Self {
            config,
            agents: BTreeMap::new(),
            pending: BTreeMap::new(),
            conn_agent: BTreeMap::new(),
            actions: VecDeque::new(),
            writes: Vec::new(),
        };
        for mut record in records {
            if matches!(record.state, AgentState::Connected | AgentState::Draining) {
                record.state = AgentState::Disconnected;
                record.last_disconnect_reason = Some("coordinator restarted".into());
                core.writes.push(Write::Agent(record.clone()));
            }
            core.agents
                .insert(record.id.clone(), AgentEntry { record, live: None });
        }
        core
    }

    // ---- getters ----

    pub fn agents(&self) -> Vec<AgentView> {
        self.agents.values().map(view).collect()
    }

    pub fn agent(&self, id: &AgentId) -> Option<AgentView> {
        self.agents.get(id).map(view)
    }

    /// The agent a live stream belongs to, if the stream is still current.
    pub fn conn_agent(&self, conn: ConnId) -> Option<&AgentId> {
        self.conn_agent
            .get(&conn)
            .or_else(|| self.pending.get(&conn).map(|p| &p.agent))
    }

    // ---- inputs ----

    /// A stream authenticated as `agent` was opened. A revoked agent is
    /// refused; an older stream of the same agent is closed.
    pub fn handle_open(
        &mut self,
        conn: ConnId,
        agent: AgentId,
        peer: String,
        now: Instant,
    ) -> Result<(), OpenRejected> {
        if let Some(entry) = self.agents.get(&agent)
            && entry.record.state == AgentState::Revoked
        {
            return Err(OpenRejected::Revoked {
                reason: entry.record.revoked_reason.clone().unwrap_or_default(),
                agent,
            });
        }
        let older: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.agent == agent)
            .map(|(c, _)| *c)
            .collect();
        for old in older {
            self.pending.remove(&old);
            self.close(old, CloseReason::Replaced);
        }
        self.pending.insert(
            conn,
            Pending {
                agent,
                peer,
                hello_deadline: now + self.config.hello_timeout,
            },
        );
        Ok(())
    }

    pub fn handle_message(&mut self, conn: ConnId, msg: FromAgent, now: Instant, wall: UnixMillis) {
        if let FromAgent::Hello { advert, running } = msg {
            self.handle_hello(conn, advert, running, now, wall);
            return;
        }
        let Some(agent) = self.conn_agent.get(&conn).cloned() else {
            if self.pending.contains_key(&conn) {
                self.protocol_error(conn, "the first message must be Hello".into(), now, wall);
            }
            // Otherwise a message of a stream already closed: drop it.
            return;
        };
        let Some(entry) = self.agents.get_mut(&agent) else {
            return;
        };
        let Some(live) = entry.live.as_mut() else {
            return;
        };
        live.last_heard = now;
        match msg {
            FromAgent::Hello { .. } => {}
            FromAgent::Heartbeat {
                free_slots,
                running,
            } => {
                live.free_slots = free_slots;
                live.running = running;
                entry.record.last_seen = wall;
                self.writes.push(Write::Agent(entry.record.clone()));
            }
            FromAgent::Draining { reason } => {
                info!(agent_id = %agent, %reason, "agent is draining");
                entry.record.state = AgentState::Draining;
                entry.record.last_seen = wall;
                self.writes.push(Write::Agent(entry.record.clone()));
            }
        }
    }

    fn handle_hello(
        &mut self,
        conn: ConnId,
        advert: AgentAdvert,
        running: Vec<ReportedTask>,
        now: Instant,
        wall: UnixMillis,
    ) {
        let Some(pending) = self.pending.remove(&conn) else {
            if self.conn_agent.contains_key(&conn) {
                self.protocol_error(conn, "Hello sent twice".into(), now, wall);
            }
            return;
        };
        let agent = pending.agent;
        let entry = self
            .agents
            .entry(agent.clone())
            .or_insert_with(|| AgentEntry {
                record: AgentRecord {
                    id: agent.clone(),
                    state: AgentState::Disconnected,
                    advert: None,
                    first_seen: wall,
                    last_seen: wall,
                    connections: 0,
                    peer_address: String::new(),
                    last_disconnect_reason: None,
                    revoked_reason: None,
                },
                live: None,
            });
        if entry.record.state == AgentState::Revoked {
            // Revoked between open and Hello.
            let reason = entry.record.revoked_reason.clone().unwrap_or_default();
            self.close(conn, CloseReason::Revoked(reason));
            return;
        }
        let replaced = entry.live.take().map(|old| old.conn);
        let free_slots = advert.capacity.saturating_sub(len_u32(&running));
        entry.record.state = AgentState::Connected;
        entry.record.advert = Some(advert);
        entry.record.last_seen = wall;
        entry.record.connections += 1;
        entry.record.peer_address = pending.peer;
        entry.live = Some(Live {
            conn,
            last_heard: now,
            next_heartbeat: now + self.config.heartbeat_interval,
            free_slots,
            running,
        });
        let record = entry.record.clone();
        info!(
            agent_id = %agent,
            peer = %record.peer_address,
            connections = record.connections,
            "agent connected"
        );
        self.writes.push(Write::Agent(record));
        if let Some(old) = replaced {
            self.conn_agent.remove(&old);
            self.close(old, CloseReason::Replaced);
        }
        self.conn_agent.insert(conn, agent.clone());
        self.actions.push_back(Action::Send {
            conn,
            msg: ToAgent::Welcome {
                agent_id: agent,
                heartbeat_interval: self.config.heartbeat_interval,
                heartbeat_timeout: self.config.heartbeat_timeout,
                lease_timeout: self.config.lease_timeout,
            },
        });
    }

    /// A message that did not validate; the stream is closed.
    pub fn protocol_error(&mut self, conn: ConnId, why: String, now: Instant, wall: UnixMillis) {
        warn!(conn = conn.0, %why, "protocol error on agent stream");
        self.close(conn, CloseReason::Protocol(why.clone()));
        self.handle_closed(conn, format!("protocol error: {why}"), now, wall);
    }

    /// The stream ended (agent gone, network, or closed by us).
    pub fn handle_closed(&mut self, conn: ConnId, reason: String, _now: Instant, wall: UnixMillis) {
        self.pending.remove(&conn);
        let Some(agent) = self.conn_agent.remove(&conn) else {
            return;
        };
        let Some(entry) = self.agents.get_mut(&agent) else {
            return;
        };
        if entry.live.as_ref().map(|l| l.conn) != Some(conn) {
            return;
        }
        entry.live = None;
        if entry.record.state != AgentState::Revoked {
            entry.record.state = AgentState::Disconnected;
        }
        entry.record.last_seen = wall;
        entry.record.last_disconnect_reason = Some(reason.clone());
        info!(agent_id = %agent, %reason, "agent disconnected");
        self.writes.push(Write::Agent(entry.record.clone()));
    }

    /// Time passed: close silent streams, send due heartbeats.
    pub fn handle_timeout(&mut self, now: Instant, wall: UnixMillis) {
        let late: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.hello_deadline)
            .map(|(c, _)| *c)
            .collect();
        for conn in late {
            self.pending.remove(&conn);
            warn!(conn = conn.0, "stream sent no Hello in time");
            self.close(conn, CloseReason::HelloTimeout);
        }
        let mut silent = Vec::new();
        for entry in self.agents.values_mut() {
            let Some(live) = entry.live.as_mut() else {
                continue;
            };
            if now >= live.last_heard + self.config.heartbeat_timeout {
                silent.push(live.conn);
            } else if now >= live.next_heartbeat {
                live.next_heartbeat = now + self.config.heartbeat_interval;
                self.actions.push_back(Action::Send {
                    conn: live.conn,
                    msg: ToAgent::Heartbeat { now: wall },
                });
            }
        }
        for conn in silent {
            self.close(conn, CloseReason::HeartbeatTimeout);
            self.handle_closed(conn, "heartbeat timeout".into(), now, wall);
        }
    }

    // ---- admin mutators ----

    /// Revokes an agent for good: its stream is closed at once and it cannot
    /// connect again.
    pub fn revoke(
        &mut self,
        agent: &AgentId,
        reason: String,
        wall: UnixMillis,
    ) -> Result<AgentView, AdminError> {
        let entry = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        entry.record.state = AgentState::Revoked;
        entry.record.revoked_reason = Some(reason.clone());
        entry.record.last_seen = entry.record.last_seen.max(wall);
        let live_conn = entry.live.take().map(|l| l.conn);
        if live_conn.is_some() {
            entry.record.last_disconnect_reason = Some(format!("revoked: {reason}"));
        }
        self.writes.push(Write::Agent(entry.record.clone()));
        let result = view(entry);
        warn!(agent_id = %agent, %reason, "agent revoked");
        let pending: Vec<ConnId> = self
            .pending
            .iter()
            .filter(|(_, p)| &p.agent == agent)
            .map(|(c, _)| *c)
            .collect();
        for conn in pending.into_iter().chain(live_conn) {
            self.pending.remove(&conn);
            self.conn_agent.remove(&conn);
            self.close(conn, CloseReason::Revoked(reason.clone()));
        }
        Ok(result)
    }

    /// Asks a connected agent to take no new work for the rest of its session.
    pub fn drain(
        &mut self,
        agent: &AgentId,
        reason: String,
        wall: UnixMillis,
    ) -> Result<AgentView, AdminError> {
        let entry = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        if entry.record.state == AgentState::Revoked {
            return Err(AdminError::Revoked(agent.clone()));
        }
        let Some(live) = entry.live.as_ref() else {
            return Err(AdminError::NotConnected(agent.clone()));
        };
        let conn = live.conn;
        entry.record.state = AgentState::Draining;
        entry.record.last_seen = entry.record.last_seen.max(wall);
        self.writes.push(Write::Agent(entry.record.clone()));
        let result = view(entry);
        info!(agent_id = %agent, %reason, "agent asked to drain");
        self.actions.push_back(Action::Send {
            conn,
            msg: ToAgent::Drain { reason },
        });
        Ok(result)
    }

    // ---- outputs ----

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hellos = self.pending.values().map(|p| p.hello_deadline);
        let lives = self
            .agents
            .values()
            .filter_map(|e| e.live.as_ref())
            .map(|l| {
                l.next_heartbeat
                    .min(l.last_heard + self.config.heartbeat_timeout)
            });
        hellos.chain(lives).min()
    }

    fn close(&mut self, conn: ConnId, reason: CloseReason) {
        self.actions.push_back(Action::Close { conn, reason });
    }
}

fn view(entry: &AgentEntry) -> AgentView {
    AgentView {
        record: entry.record.clone(),
        free_slots: entry.live.as_ref().map_or(0, |l| l.free_slots),
        running: entry
            .live
            .as_ref()
            .map(|l| l.running.clone())
            .unwrap_or_default(),
    }
}

fn len_u32<T>(v: &[T]) -> u32 {
    u32::try_from(v.len()).unwrap_or(u32::MAX)
}
