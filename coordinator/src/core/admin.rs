//! Admin mutators that let agents back in (undrain, unrevoke), forget an
//! agent record, and revoke admin certificates.
//!
//! Like every admin mutator they answer at once and leave their writes for
//! the driver to commit before the answer goes out. Admin revocations are
//! kept here (loaded at start with [`Core::restore_admins`]) and checked by
//! the gRPC layer on every Admin call from the set the driver publishes
//! after each commit.

use std::collections::BTreeMap;
use std::time::Instant;

use common::ids::AgentId;
use common::time::UnixMillis;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{AdminError, AgentState, AgentView, CloseReason, Core, Write};

/// An admin certificate name with a revocation record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// The admin certificate's CN.
    pub name: String,
    pub revoked: bool,
    /// Why it was revoked (and by whom); kept after an unrevoke.
    pub reason: String,
    /// When it was last revoked.
    pub revoked_at: Option<UnixMillis>,
}

impl Core {
    /// The admin revocations read from the store at start.
    pub fn restore_admins(&mut self, admins: Vec<AdminRecord>) {
        self.admins = admins.into_iter().map(|a| (a.name.clone(), a)).collect();
    }

    /// Every admin name with a revocation record, revoked or not.
    pub fn admins(&self) -> Vec<AdminRecord> {
        self.admins.values().cloned().collect()
    }

    /// The revoked admin names, each with its reason.
    pub fn revoked_admins(&self) -> BTreeMap<String, String> {
        self.admins
            .values()
            .filter(|a| a.revoked)
            .map(|a| (a.name.clone(), a.reason.clone()))
            .collect()
    }

    /// Lifts an admin's drain. A connected agent's stream is closed so that
    /// it reconnects without the drain (an agent told to drain refuses work
    /// for the rest of its stream); its running tasks resume at its Hello.
    pub fn undrain(
        &mut self,
        agent: &AgentId,
        now: Instant,
        wall: UnixMillis,
    ) -> Result<AgentView, AdminError> {
        self.tick(now, wall);
        let entry = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        if entry.record.state == AgentState::Revoked {
            return Err(AdminError::Revoked(agent.clone()));
        }
        // A drain ends with the stream it was sent on.
        if entry.record.drain_reason.is_none() || entry.live.is_none() {
            return Err(AdminError::NotDrained(agent.clone()));
        }
        entry.record.drain_reason = None;
        let live = self
            .timers
            .take_stream(&mut entry.live, self.config.heartbeat_timeout);
        entry.record.state = AgentState::Disconnected;
        entry.record.last_disconnect_reason = Some("undrained: reconnecting to take work".into());
        entry.record.last_seen = entry.record.last_seen.max(wall);
        self.writes.push(entry.record_write());
        self.refile(agent);
        info!(agent_id = %agent, "agent undrained");
        if let Some(conn) = live {
            self.conn_agent.remove(&conn);
            self.close(conn, CloseReason::Undrained);
        }
        Ok(self
            .agent(agent)
            .expect("invariant: undrained agent exists"))
    }

    /// Undoes a revocation: the agent may connect again under its name
    /// (e.g. with a re-issued certificate).
    pub fn unrevoke(&mut self, agent: &AgentId, wall: UnixMillis) -> Result<AgentView, AdminError> {
        let entry = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        if entry.record.state != AgentState::Revoked {
            return Err(AdminError::NotRevoked(agent.clone()));
        }
        entry.record.state = AgentState::Disconnected;
        entry.record.revoked_reason = None;
        entry.record.last_seen = entry.record.last_seen.max(wall);
        // A revoked agent has no stream: it stays out of the free index.
        self.writes.push(entry.record_write());
        warn!(agent_id = %agent, "agent unrevoked");
        Ok(self
            .agent(agent)
            .expect("invariant: unrevoked agent exists"))
    }

    /// Deletes an agent's record. Refused while it is connected (or
    /// connecting), holds live attempts, or is revoked (forgetting would
    /// lift the revocation).
    pub fn forget(&mut self, agent: &AgentId) -> Result<(), AdminError> {
        let entry = self
            .agents
            .get(agent)
            .ok_or_else(|| AdminError::UnknownAgent(agent.clone()))?;
        if entry.record.state == AgentState::Revoked {
            return Err(AdminError::Revoked(agent.clone()));
        }
        if entry.live.is_some() || self.pending.values().any(|p| &p.agent == agent) {
            return Err(AdminError::Connected(agent.clone()));
        }
        if !entry.load.is_empty() {
            return Err(AdminError::HoldsTasks(
                agent.clone(),
                entry.load.iter().copied().collect(),
            ));
        }
        // Without a stream it was never in the free index.
        self.agents.remove(agent);
        self.writes.push(Write::ForgetAgent(agent.clone()));
        info!(agent_id = %agent, "agent forgotten");
        Ok(())
    }

    /// Revokes admin certificate `name`; `by` is the caller's own name,
    /// which cannot be revoked (an admin would lock itself out).
    pub fn revoke_admin(
        &mut self,
        name: &str,
        reason: String,
        by: &str,
        wall: UnixMillis,
    ) -> Result<AdminRecord, AdminError> {
        common::ids::validate_name(name).map_err(|e| AdminError::InvalidName(e.to_string()))?;
        if name == by {
            return Err(AdminError::OwnName(name.to_owned()));
        }
        let record = AdminRecord {
            name: name.to_owned(),
            revoked: true,
            reason,
            revoked_at: Some(wall),
        };
        warn!(admin = %name, reason = %record.reason, "admin certificate revoked");
        self.admins.insert(name.to_owned(), record.clone());
        self.writes.push(Write::Admin(Box::new(record.clone())));
        Ok(record)
    }

    /// Lets admin certificate `name` in again.
    pub fn unrevoke_admin(&mut self, name: &str) -> Result<AdminRecord, AdminError> {
        let record = self
            .admins
            .get_mut(name)
            .filter(|a| a.revoked)
            .ok_or_else(|| AdminError::UnknownAdmin(name.to_owned()))?;
        record.revoked = false;
        let record = record.clone();
        warn!(admin = %name, "admin certificate unrevoked");
        self.writes.push(Write::Admin(Box::new(record.clone())));
        Ok(record)
    }
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
