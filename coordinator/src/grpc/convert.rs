//! Domain values as the Admin API answers them: tasks, agents, admins,
//! output and cluster events. Pure; the shared enums and small values come
//! from `common::protocol`.

use common::ids::{Attempt, TaskId};
use common::proto::{self, AgentInfo};
use common::protocol::{self as protocol, OutputChunk};
use common::types::OutputKind;

use crate::core::{AdminRecord, AgentState, AgentView, Task, TaskSource, TaskState, TaskTriage};
use crate::feed::{self, FeedEvent};

pub fn task_info(task: &Task) -> proto::TaskInfo {
    proto::TaskInfo {
        task_id: task.id.to_string(),
        source: match &task.source {
            TaskSource::Manual { .. } => "manual".into(),
            TaskSource::Github { .. } => "github".into(),
        },
        repo: task.spec.repo_url.clone(),
        base_branch: task.spec.base_branch.clone(),
        title: task.spec.title.clone(),
        body: task.spec.body.clone(),
        issue_number: task.spec.issue_number,
        issue_url: task.spec.issue_url.clone(),
        author: task.spec.author.clone(),
        specialty: protocol::specialty_to_proto(task.spec.specialty) as i32,
        technologies: task.spec.technologies.clone(),
        priority: task.priority,
        state: task_state_to_proto(task.state) as i32,
        state_reason: task.state_reason.clone(),
        attempts: task
            .attempts
            .iter()
            .map(|a| {
                let report = a.report.as_ref();
                proto::TaskAttempt {
                    attempt: a.attempt.0,
                    agent_id: a.agent.to_string(),
                    assigned_at: Some(a.assigned_at.to_timestamp()),
                    accepted_at: a.accepted_at.map(|t| t.to_timestamp()),
                    finished_at: a.finished_at.map(|t| t.to_timestamp()),
                    outcome: a
                        .outcome
                        .map_or(proto::Outcome::Unspecified, protocol::outcome_to_proto)
                        as i32,
                    message: a.message.clone(),
                    placement: a.placement.clone(),
                    outcome_name: a.outcome.map(|o| o.as_str().to_owned()).unwrap_or_default(),
                    phase: a
                        .phase
                        .map_or(proto::Phase::Unspecified, protocol::phase_to_proto)
                        as i32,
                    branch: report.map(|r| r.branch.clone()).unwrap_or_default(),
                    commit: report.map(|r| r.commit.clone()).unwrap_or_default(),
                    tests: report
                        .and_then(|r| r.tests.as_ref())
                        .map(protocol::test_summary_to_proto),
                    cli: report
                        .and_then(|r| r.cli.as_ref())
                        .map(protocol::cli_result_to_proto),
                }
            })
            .collect(),
        max_attempts: task.max_attempts,
        branch: task.spec.branch.clone(),
        created_at: Some(task.created_at.to_timestamp()),
        updated_at: Some(task.updated_at.to_timestamp()),
        not_before: task.not_before.map(|t| t.to_timestamp()),
        cancel_requested: task.cancel_requested.clone().unwrap_or_default(),
        test_command: task.spec.test_command.clone(),
        outcome: task
            .attempts
            .iter()
            .rev()
            .find_map(|a| a.outcome)
            .map(|o| o.to_string())
            .unwrap_or_default(),
        waiting_reason: task.waiting_reason.clone().unwrap_or_default(),
        triage: task.triage.as_ref().map(triage_report),
        github_repo: match &task.source {
            TaskSource::Github { repo, .. } => repo.clone(),
            TaskSource::Manual { .. } => String::new(),
        },
        labels: match &task.source {
            TaskSource::Github { labels, .. } => labels.clone(),
            TaskSource::Manual { .. } => Vec::new(),
        },
        delivery_id: match &task.source {
            TaskSource::Github { delivery, .. } => delivery.clone(),
            TaskSource::Manual { .. } => String::new(),
        },
        pull_request_url: task
            .github
            .as_ref()
            .and_then(|g| g.pull.as_ref())
            .map(|p| p.url.clone())
            .unwrap_or_default(),
        pull_request_draft: task
            .github
            .as_ref()
            .and_then(|g| g.pull.as_ref())
            .is_some_and(|p| p.draft),
        pending_effects: task.pending_effects.clone(),
        github_error: task
            .github
            .as_ref()
            .and_then(|g| g.error.clone())
            .unwrap_or_default(),
    }
}

fn task_state_to_proto(s: TaskState) -> proto::TaskState {
    match s {
        TaskState::NeedsInfo => proto::TaskState::NeedsInfo,
        TaskState::Queued => proto::TaskState::Queued,
        TaskState::Assigned => proto::TaskState::Assigned,
        TaskState::Running => proto::TaskState::Running,
        TaskState::Finishing => proto::TaskState::Finishing,
        TaskState::Succeeded => proto::TaskState::Succeeded,
        TaskState::Failed => proto::TaskState::Failed,
        TaskState::Cancelled => proto::TaskState::Cancelled,
    }
}

pub fn output_event(
    task: TaskId,
    attempt: Attempt,
    seq: u64,
    kind: OutputKind,
    data: &[u8],
) -> proto::TaskEvent {
    proto::TaskEvent {
        event: Some(proto::task_event::Event::Output(proto::TaskOutput {
            task_id: task.to_string(),
            attempt: attempt.0,
            seq,
            kind: protocol::kind_to_proto(kind) as i32,
            data: data.to_vec(),
        })),
    }
}

pub fn state_event(task: &Task) -> proto::TaskEvent {
    proto::TaskEvent {
        event: Some(proto::task_event::Event::Task(task_info(task))),
    }
}

pub fn triage_report(t: &TaskTriage) -> proto::TriageReport {
    let r = &t.result;
    proto::TriageReport {
        specialty: protocol::specialty_to_proto(r.specialty) as i32,
        confidence: r.confidence,
        scores: r.scores.iter().map(|(s, v)| (s.to_string(), *v)).collect(),
        complexity: r.complexity.as_str().to_owned(),
        technologies: r.technologies.clone(),
        keywords: r.keywords.clone(),
        evidence: r
            .evidence
            .iter()
            .map(|e| proto::TriageEvidence {
                signal: e.signal.clone(),
                source: e.source.as_str().to_owned(),
                weight: e.weight,
                specialty: e
                    .specialty
                    .map_or(proto::Specialty::Unspecified, protocol::specialty_to_proto)
                    as i32,
                technology: e.technology.clone().unwrap_or_default(),
            })
            .collect(),
        unclear: r.unclear,
        missing: r.missing.clone(),
        specialty_given: t.specialty_given,
    }
}

pub fn agent_info(view: AgentView) -> AgentInfo {
    let record = view.record;
    let state = match record.state {
        AgentState::Connected => proto::AgentState::Connected,
        AgentState::Disconnected => proto::AgentState::Disconnected,
        AgentState::Draining => proto::AgentState::Draining,
        AgentState::Revoked => proto::AgentState::Revoked,
    };
    let advert = record.advert.unwrap_or_else(|| common::types::AgentAdvert {
        agent_version: String::new(),
        specialties: Vec::new(),
        capacity: 0,
        labels: Default::default(),
        toolchains: Vec::new(),
        hostname: String::new(),
        instance_id: String::new(),
    });
    AgentInfo {
        agent_id: record.id.to_string(),
        state: state as i32,
        specialties: protocol::specialties_to_proto(&advert.specialties),
        capacity: advert.capacity,
        labels: advert.labels.into_iter().collect(),
        toolchains: protocol::toolchains_to_proto(&advert.toolchains),
        agent_version: advert.agent_version,
        hostname: advert.hostname,
        first_seen: Some(record.first_seen.to_timestamp()),
        last_seen: Some(record.last_seen.to_timestamp()),
        connections: record.connections,
        free_slots: view.free_slots,
        running: view
            .running
            .into_iter()
            .map(|t| proto::RunningTask {
                task_id: t.task.to_string(),
                attempt: t.attempt.0,
                last_output_seq: t.last_output_seq,
            })
            .collect(),
        last_disconnect_reason: record.last_disconnect_reason.unwrap_or_default(),
        peer_address: record.peer_address,
        revoked_reason: record.revoked_reason.unwrap_or_default(),
        // A drain ends with its stream; the record keeps the reason until the
        // next Hello.
        drain_reason: if record.state == AgentState::Draining {
            record.drain_reason.unwrap_or_default()
        } else {
            String::new()
        },
        instance_id: advert.instance_id,
        assigned: view.assigned.iter().map(ToString::to_string).collect(),
        unhealthy_reason: record.unhealthy.unwrap_or_default(),
        cooldown_until: view.cooldown_until.map(|t| t.to_timestamp()),
    }
}

/// A task in a cluster feed: without its body and triage, which a live
/// view does not show and which would make a snapshot of many tasks large.
pub fn task_summary(task: &Task) -> proto::TaskInfo {
    proto::TaskInfo {
        body: String::new(),
        triage: None,
        ..task_info(task)
    }
}

pub fn snapshot_event(snapshot: feed::Snapshot) -> proto::ClusterEvent {
    proto::ClusterEvent {
        event: Some(proto::cluster_event::Event::Snapshot(
            proto::ClusterSnapshot {
                agents: snapshot.agents.into_iter().map(agent_info).collect(),
                tasks: snapshot.tasks.iter().map(task_summary).collect(),
                lines: snapshot.lines.iter().map(OutputChunk::to_proto).collect(),
            },
        )),
    }
}

pub fn cluster_event(event: FeedEvent) -> proto::ClusterEvent {
    use proto::cluster_event::Event;
    proto::ClusterEvent {
        event: Some(match event {
            FeedEvent::Agent(view) => Event::Agent(agent_info(*view)),
            FeedEvent::AgentForgotten(id) => Event::AgentForgotten(id.to_string()),
            FeedEvent::Task(task) => Event::Task(task_summary(&task)),
            FeedEvent::Line(line) => Event::Line(line.to_proto()),
        }),
    }
}

pub fn admin_info(record: &AdminRecord) -> proto::AdminInfo {
    proto::AdminInfo {
        name: record.name.clone(),
        revoked: record.revoked,
        revoked_reason: record.reason.clone(),
        revoked_at: record.revoked_at.map(|t| t.to_timestamp()),
    }
}
