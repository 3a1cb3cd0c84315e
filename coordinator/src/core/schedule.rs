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

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Instant;

use common::ids::{AgentId, TaskId};
use common::time::UnixMillis;
use common::types::{Specialty, Toolchain};

use super::task::TaskState;
use super::{AgentState, Core};

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
struct Rank {
    exact_specialty: bool,
    coverage: usize,
    knows_repo: bool,
    /// Fewer live attempts per slot is better: compare free share.
    free_per_mille: u32,
    /// Longer idle is better.
    idle_since: Reverse<Instant>,
    /// Deterministic last resort: lower id first.
    id: Reverse<AgentId>,
}

impl Core {
    /// Assigns queued tasks to free agents until nothing more fits.
    pub(super) fn schedule(&mut self, now: Instant, wall: UnixMillis) {
        loop {
            if !self.any_free_agent() {
                return;
            }
            let mut repo_load: BTreeMap<&str, usize> = BTreeMap::new();
            for t in self.tasks.values().filter(|t| t.state.is_live()) {
                *repo_load.entry(t.spec.repo_url.as_str()).or_default() += 1;
            }
            let mut ready: Vec<(Reverse<i32>, usize, TaskId)> = self
                .tasks
                .values()
                .filter(|t| t.state == TaskState::Queued)
                .filter(|t| t.not_before.is_none_or(|nb| nb <= wall))
                .map(|t| {
                    let load = repo_load
                        .get(t.spec.repo_url.as_str())
                        .copied()
                        .unwrap_or(0);
                    (Reverse(t.priority), load, t.id)
                })
                .collect();
            if ready.is_empty() {
                return;
            }
            ready.sort();
            let choice = ready
                .iter()
                .find_map(|&(_, _, id)| self.place(id, now).map(|c| (id, c)));
            let Some((id, (agent, reason))) = choice else {
                return;
            };
            self.assign(id, agent, reason, now, wall);
        }
    }

    fn any_free_agent(&self) -> bool {
        self.agents.values().any(|e| self.free_slots(e) > 0)
    }

    /// Slots an agent can take new work in: zero unless connected, not
    /// draining, not cooling down.
    pub(super) fn free_slots(&self, entry: &super::AgentEntry) -> u32 {
        let Some(live) = entry.live.as_ref() else {
            return 0;
        };
        if entry.record.state != AgentState::Connected
            || live.cooldown_until.is_some_and(|c| c > self.last_now)
        {
            return 0;
        }
        let capacity = entry.record.advert.as_ref().map_or(0, |a| a.capacity);
        capacity.saturating_sub(u32::try_from(entry.load.len()).unwrap_or(u32::MAX))
    }

    /// The best agent for task `id` now, with the reasons.
    fn place(&self, id: TaskId, now: Instant) -> Option<(AgentId, String)> {
        let task = self.tasks.get(&id)?;
        let wanted = task.spec.specialty;
        let waited = self.queued_since.get(&id).is_some_and(|since| {
            now.saturating_duration_since(*since) >= self.config.general_fallback_after
        });
        let mut best: Option<(Rank, &AgentId)> = None;
        for (agent_id, entry) in &self.agents {
            let free = self.free_slots(entry);
            if free == 0 {
                continue;
            }
            let Some(advert) = entry.record.advert.as_ref() else {
                continue;
            };
            let exact = advert.specialties.contains(&wanted);
            let general_ok = wanted == Specialty::General
                || (waited && advert.specialties.contains(&Specialty::General));
            if !exact && !general_ok {
                continue;
            }
            let rank = Rank {
                exact_specialty: exact,
                coverage: coverage(&task.spec.technologies, &advert.toolchains),
                knows_repo: entry.repos.contains(&task.spec.repo_url),
                free_per_mille: free * 1000 / advert.capacity.max(1),
                idle_since: Reverse(entry.idle_since),
                id: Reverse(agent_id.clone()),
            };
            if best.as_ref().is_none_or(|(b, _)| rank > *b) {
                best = Some((rank, agent_id));
            }
        }
        let (rank, agent) = best?;
        let entry = self.agents.get(agent)?;
        let capacity = entry.record.advert.as_ref().map_or(0, |a| a.capacity);
        let mut reasons = vec![if rank.exact_specialty {
            format!("specialty {wanted}")
        } else {
            format!("no {wanted} agent free; general fallback")
        }];
        if !task.spec.technologies.is_empty() {
            reasons.push(format!(
                "toolchains cover {}/{} technologies",
                rank.coverage,
                task.spec.technologies.len()
            ));
        }
        if rank.knows_repo {
            reasons.push("ran this repository before".into());
        }
        reasons.push(format!(
            "{} of {capacity} slots free",
            self.free_slots(entry)
        ));
        Some((agent.clone(), reasons.join("; ")))
    }

    /// When queued tasks become eligible for `general` agents.
    pub(super) fn fallback_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.queued_since.iter().filter_map(|(id, since)| {
            let task = self.tasks.get(id)?;
            let at = *since + self.config.general_fallback_after;
            (task.state == TaskState::Queued
                && task.spec.specialty != Specialty::General
                && at > self.last_now)
                .then_some(at)
        })
    }

    pub(super) fn take_slot(&mut self, agent: &AgentId, task: TaskId, repo: &str) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.load.insert(task);
            entry.repos.insert(repo.to_owned());
        }
    }

    pub(super) fn release_slot(&mut self, agent: &AgentId, task: TaskId, now: Instant) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.load.remove(&task);
            if entry.load.is_empty() {
                entry.idle_since = now;
            }
        }
    }
}
