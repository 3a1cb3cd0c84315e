//! Placement: which queued task goes to which agent.
//!
//! Tasks are taken by priority (higher first), then fairly between
//! repositories (the repository with the fewest live attempts first), then
//! first in, first out. A task goes to a connected, non-draining agent with
//! a free slot whose specialties include the task's; after the task has
//! waited `general_fallback_after`, agents advertising `general` may take it
//! too (a `general` task goes to anyone at once). Among those agents:
//! exact specialty over fallback, then the one whose toolchains cover more of
//! the task's technologies, then the one that ran the repository before (its
//! mirror is warm), then the least loaded, then the longest idle. Every
//! placement records these reasons.
//!
//! The agents that can take work are indexed as the queue is (`FreeIndex`):
//! an agent is filed under the specialties it advertises while it is
//! connected, not draining, healthy and has a free slot, and is refiled
//! wherever one of those changes (a slot taken or released, a Hello, a
//! disconnect, a drain, a revocation, a change of health). A cooling agent
//! stays filed and is skipped where the index is read: its cool-down is
//! over at the first event past its end, whether or not the cool-down's
//! timer (which clears it) has fired yet. A round therefore looks at the free
//! agents only: which specialties they serve, then, to place the task the
//! queue offers, those that advertise its specialty (and the `general`
//! ones when the fallback applies). Busy, draining, unhealthy and
//! disconnected agents are never looked at.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::ids::{AgentId, TaskId};
use common::time::UnixMillis;
use common::types::{Specialty, Toolchain};

use tracing::warn;

use super::queue::FreeAgents;
use super::task::TaskState;
use super::{AgentEntry, AgentState, Core};

/// The toolchains that serve a technology named by triage or a submitter.
pub fn tools_for(technology: &str) -> &'static [&'static str] {
    match technology.to_ascii_lowercase().as_str() {
        "python" | "django" | "flask" | "fastapi" | "pytest" => &["python3"],
        "javascript" | "typescript" | "node" | "nodejs" | "react" | "vue" | "angular"
        | "svelte" | "nextjs" | "next.js" | "npm" | "jest" | "vite" => &["node", "npm"],
        "rust" | "cargo" => &["cargo"],
        "go" | "golang" => &["go"],
        "java" | "kotlin" | "spring" | "maven" => &["java"],
        "docker" | "dockerfile" | "compose" => &["docker"],
        "kubernetes" | "k8s" | "kubectl" => &["kubectl"],
        "helm" => &["helm"],
        "terraform" | "hcl" => &["terraform"],
        "postgres" | "postgresql" | "sql" => &["psql"],
        "redis" => &["redis-cli"],
        "playwright" | "selenium" | "chromium" | "e2e" => &["chromium"],
        "c" | "c++" | "cpp" => &["gcc"],
        _ => &[],
    }
}

/// How many of `technologies` the toolchains cover.
fn coverage(technologies: &[String], toolchains: &[Toolchain]) -> usize {
    technologies
        .iter()
        .filter(|tech| {
            let tools = tools_for(tech);
            toolchains.iter().any(|t| {
                t.name.eq_ignore_ascii_case(tech) || tools.iter().any(|tool| t.name == *tool)
            })
        })
        .count()
}

/// Ranking key of one agent for one task; greater is better.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank<'a> {
    exact_specialty: bool,
    coverage: usize,
    knows_repo: bool,
    /// Fewer live attempts per slot is better: compare free share.
    free_per_mille: u32,
    /// Longer idle is better.
    idle_since: Reverse<Instant>,
    /// Deterministic last resort: lower id first.
    id: Reverse<&'a AgentId>,
}

/// The agents that may take work now, by the specialties they advertise:
/// connected, not draining, healthy, with fewer live attempts than slots
/// (cooling agents included; see the module docs).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct FreeIndex {
    by_specialty: BTreeMap<Specialty, BTreeSet<AgentId>>,
    /// Every filed agent, with the specialties it is filed under as a set
    /// of bits (an agent advertising none is filed here only).
    filed: BTreeMap<AgentId, u8>,
}

// Every specialty has a bit of the `u8` mask.
const _: () = assert!(Specialty::ALL.len() <= 8);

fn bit(specialty: Specialty) -> u8 {
    1 << specialty as u8
}

impl FreeIndex {
    /// Files `agent` under the specialties of `mask`, or takes it out
    /// (`None`). Costs nothing when its filing does not change.
    fn set(&mut self, agent: &AgentId, mask: Option<u8>) {
        let old = self.filed.get(agent).copied();
        if old == mask {
            return;
        }
        let old = old.unwrap_or(0);
        let new = mask.unwrap_or(0);
        for specialty in Specialty::ALL {
            let b = bit(specialty);
            if old & b != 0 && new & b == 0 {
                if let Some(agents) = self.by_specialty.get_mut(&specialty) {
                    agents.remove(agent);
                    if agents.is_empty() {
                        self.by_specialty.remove(&specialty);
                    }
                }
            } else if old & b == 0 && new & b != 0 {
                self.by_specialty
                    .entry(specialty)
                    .or_default()
                    .insert(agent.clone());
            }
        }
        match mask {
            Some(mask) => {
                self.filed.insert(agent.clone(), mask);
            }
            None => {
                self.filed.remove(agent);
            }
        }
    }

    /// The filed agents that advertise `specialty`.
    fn serving(&self, specialty: Specialty) -> impl Iterator<Item = &AgentId> {
        self.by_specialty.get(&specialty).into_iter().flatten()
    }

    /// The filed agents that may take a task of `wanted`: any for a
    /// `general` task; else those of its specialty, and the `general` ones
    /// too once the task is in the fallback. An agent may come twice (it
    /// ranks the same both times).
    fn candidates(&self, wanted: Specialty, fallback: bool) -> impl Iterator<Item = &AgentId> {
        let anyone = wanted == Specialty::General;
        let all = anyone.then(|| self.filed.keys()).into_iter().flatten();
        let exact = (!anyone)
            .then(|| self.serving(wanted))
            .into_iter()
            .flatten();
        let general = (!anyone && fallback)
            .then(|| self.serving(Specialty::General))
            .into_iter()
            .flatten();
        all.chain(exact).chain(general)
    }
}

/// Whether an agent may take work, cool-downs aside: how it is filed in
/// the `FreeIndex` (`None`: not filed).
fn filing(entry: &AgentEntry) -> Option<u8> {
    let advert = entry.record.advert.as_ref()?;
    let open = entry.live.is_some()
        && entry.record.state == AgentState::Connected
        && entry.record.unhealthy.is_none()
        && usize::try_from(advert.capacity).unwrap_or(usize::MAX) > entry.load.len();
    open.then(|| {
        advert
            .specialties
            .iter()
            .fold(0, |mask, specialty| mask | bit(*specialty))
    })
}

impl Core {
    /// Assigns queued tasks to free agents until nothing more fits. One
    /// round looks only at the free agents (see `FreeIndex`) and at one
    /// queued task per repository lane that a free agent can serve (see
    /// `queue`).
    pub(super) fn schedule(&mut self, now: Instant, wall: UnixMillis) {
        self.queue.advance(now, wall);
        // Nothing ready (the common case at a timer): no agent is looked at.
        if !self.queue.has_ready() {
            return;
        }
        loop {
            let free = self.free_agents();
            if free.specialties.is_empty() {
                return;
            }
            let Some(candidate) = self.queue.next(&free, &self.repo_live) else {
                return;
            };
            let Some((agent, reason)) = self.place(candidate.id) else {
                // The queue offered it because a free agent serves it, so
                // `place` finds one; if not, wait for the next event.
                warn!(task_id = %candidate.id, attempt = self.attempt_of(candidate.id), "no agent found for a task a free agent should serve");
                return;
            };
            self.assign(candidate.id, agent, reason, now, wall);
        }
    }

    /// What the agents with a free slot advertise: one filed agent that is
    /// not cooling down per specialty.
    fn free_agents(&self) -> FreeAgents {
        let mut free = FreeAgents::default();
        for (specialty, agents) in &self.free.by_specialty {
            if agents.iter().any(|agent| {
                self.examined_agent();
                self.takes_work_now(agent)
            }) {
                free.specialties.insert(*specialty);
            }
        }
        free
    }

    /// Whether a filed agent is not cooling down.
    fn takes_work_now(&self, agent: &AgentId) -> bool {
        self.agents
            .get(agent)
            .and_then(|e| e.live.as_ref())
            .is_some_and(|live| live.cooldown_until.is_none_or(|c| c <= self.last_now))
    }

    /// Slots an agent can take new work in: zero unless connected, not
    /// draining, healthy, not cooling down.
    pub(super) fn free_slots(&self, entry: &AgentEntry) -> u32 {
        let cooling = entry
            .live
            .as_ref()
            .is_some_and(|live| live.cooldown_until.is_some_and(|c| c > self.last_now));
        if filing(entry).is_none() || cooling {
            return 0;
        }
        let capacity = entry.record.advert.as_ref().map_or(0, |a| a.capacity);
        capacity.saturating_sub(u32::try_from(entry.load.len()).unwrap_or(u32::MAX))
    }

    /// Files an agent in the free index as its entry says now. Called
    /// wherever its stream, state, health, advert or load changes.
    pub(super) fn refile(&mut self, agent: &AgentId) {
        let mask = self.agents.get(agent).and_then(filing);
        self.free.set(agent, mask);
    }

    /// The free index as kept, and as rebuilt from every agent's entry:
    /// the two must be equal.
    #[cfg(test)]
    pub(super) fn free_index_rebuilt(&self) -> (&FreeIndex, FreeIndex) {
        let mut rebuilt = FreeIndex::default();
        for (agent, entry) in &self.agents {
            rebuilt.set(agent, filing(entry));
        }
        (&self.free, rebuilt)
    }

    /// The best agent for task `id` now, with the reasons.
    fn place(&self, id: TaskId) -> Option<(AgentId, String)> {
        let task = self.tasks.get(&id)?;
        let wanted = task.spec.specialty;
        let waited = self.queue.in_fallback(id);
        let mut best: Option<(Rank, &AgentId)> = None;
        for agent_id in self.free.candidates(wanted, waited) {
            self.examined_agent();
            let Some(entry) = self.agents.get(agent_id) else {
                continue;
            };
            let free = self.free_slots(entry);
            if free == 0 {
                continue;
            }
            let Some(advert) = entry.record.advert.as_ref() else {
                continue;
            };
            // The candidates serve `wanted`, or general after the wait.
            let exact = advert.specialties.contains(&wanted);
            let rank = Rank {
                exact_specialty: exact,
                coverage: coverage(&task.spec.technologies, &advert.toolchains),
                knows_repo: entry.repos.contains(&task.spec.repo_url),
                free_per_mille: free * 1000 / advert.capacity.max(1),
                idle_since: Reverse(entry.idle_since),
                id: Reverse(agent_id),
            };
            if best.as_ref().is_none_or(|(b, _)| rank > *b) {
                best = Some((rank, agent_id));
            }
        }
        let (rank, agent) = best?;
        let entry = self.agents.get(agent)?;
        let capacity = entry.record.advert.as_ref().map_or(0, |a| a.capacity);
        // The reasons, "; " between them, written into one string (writing
        // to a string cannot fail).
        let mut reasons = if rank.exact_specialty {
            format!("specialty {wanted}")
        } else {
            format!("no {wanted} agent free; general fallback")
        };
        if !task.spec.technologies.is_empty() {
            let _ = write!(
                reasons,
                "; toolchains cover {}/{} technologies",
                rank.coverage,
                task.spec.technologies.len()
            );
        }
        if rank.knows_repo {
            reasons.push_str("; ran this repository before");
        }
        let _ = write!(
            reasons,
            "; {} of {capacity} slots free",
            self.free_slots(entry)
        );
        Some((agent.clone(), reasons))
    }

    /// Queue entries looked at by scheduling so far: what one event costs,
    /// for tests that count work instead of timing it.
    pub fn schedule_work(&self) -> u64 {
        self.queue.examined()
    }

    /// Agents looked at by scheduling so far (to tell what is served and
    /// to place a task), for tests that count work instead of timing it.
    pub fn placement_work(&self) -> u64 {
        self.agents_examined.get()
    }

    fn examined_agent(&self) {
        self.agents_examined.set(self.agents_examined.get() + 1);
    }

    /// Why a queued task is not placed yet, in words (`None` when it is
    /// not queued). Read by people through `ccc submit` and `ccc task`.
    pub fn waiting_reason(&self, id: TaskId, now: Instant, wall: UnixMillis) -> Option<String> {
        let (now, wall) = (now.max(self.last_now), wall.max(self.last_wall));
        let task = self.tasks.get(&id)?;
        if task.state != TaskState::Queued {
            return None;
        }
        if let Some(nb) = task.not_before.filter(|nb| nb.0 > wall.0) {
            let wait = Duration::from_secs((nb.0 - wall.0).div_ceil(1000));
            return Some(format!(
                "waiting {} before its next attempt (until {})",
                humantime::format_duration(wait),
                nb.to_rfc3339()
            ));
        }
        let wanted = task.spec.specialty;
        let connected = || {
            self.agents
                .values()
                .filter(|e| e.live.is_some())
                .filter_map(|e| Some((e, e.record.advert.as_ref()?)))
        };
        let able: Vec<&AgentEntry> = connected()
            .filter(|(_, a)| wanted == Specialty::General || a.specialties.contains(&wanted))
            .map(|(e, _)| e)
            .collect();
        if !able.is_empty() {
            return Some(format!(
                "every {wanted} agent is busy or unavailable: {}",
                self.unavailability(&able, now)
            ));
        }
        if wanted == Specialty::General {
            return Some("no agent is connected".into());
        }
        let mut why = format!("no connected agent has specialty {wanted}");
        let generals: Vec<&AgentEntry> = connected()
            .filter(|(_, a)| a.specialties.contains(&Specialty::General))
            .map(|(e, _)| e)
            .collect();
        match self.queue.fallback_at(id) {
            Some(at) if at > now => {
                let wait = Duration::from_secs(at.duration_since(now).as_secs_f64().ceil() as u64);
                why.push_str(&format!(
                    "; general agents may take it after {}",
                    humantime::format_duration(wait)
                ));
                if generals.is_empty() {
                    why.push_str(" (none is connected now)");
                }
            }
            _ if generals.is_empty() => why.push_str("; no general agent is connected either"),
            _ => why.push_str(&format!(
                "; the general agents are busy or unavailable: {}",
                self.unavailability(&generals, now)
            )),
        }
        Some(why)
    }

    /// Why each of `agents` takes no new work now, e.g. "pc-01 (2 of 2
    /// slots taken), pc-02 (draining)"; a few named, the rest counted.
    fn unavailability(&self, agents: &[&AgentEntry], now: Instant) -> String {
        const NAMED: usize = 5;
        let mut parts: Vec<String> = agents
            .iter()
            .take(NAMED)
            .map(|e| {
                let why = if let Some(reason) = &e.record.unhealthy {
                    format!("unhealthy: {reason}")
                } else if e.record.state == AgentState::Draining {
                    "draining".into()
                } else if e
                    .live
                    .as_ref()
                    .and_then(|l| l.cooldown_until)
                    .is_some_and(|c| c > now)
                {
                    "cooling down after a usage limit".into()
                } else {
                    let capacity = e.record.advert.as_ref().map_or(0, |a| a.capacity);
                    format!("{} of {capacity} slots taken", e.load.len())
                };
                format!("{} ({why})", e.record.id)
            })
            .collect();
        if agents.len() > NAMED {
            parts.push(format!("and {} more", agents.len() - NAMED));
        }
        parts.join(", ")
    }

    pub(super) fn take_slot(&mut self, agent: &AgentId, task: TaskId, repo: &str) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.load.insert(task);
        }
        self.refile(agent);
        // The repository's name is copied only when it is not counted yet.
        match self.repo_live.get_mut(repo) {
            Some(n) => *n += 1,
            None => {
                self.repo_live.insert(repo.to_owned(), 1);
            }
        }
    }

    pub(super) fn release_slot(&mut self, agent: &AgentId, task: TaskId, repo: &str, now: Instant) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.load.remove(&task);
            if entry.load.is_empty() {
                entry.idle_since = now;
            }
        }
        self.refile(agent);
        if let Some(n) = self.repo_live.get_mut(repo) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.repo_live.remove(repo);
            }
        }
    }
}
