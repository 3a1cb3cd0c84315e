use common::protocol::OutputChunk;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{AgentId, Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{CliResult, FinishedReport, Outcome, OutputKind, Specialty};

use super::snapshot::AgentSlots;
use super::*;
use crate::core::{AttemptRecord, Task, TaskSource, TaskState, Write};

fn task(state: TaskState, attempts: Vec<AttemptRecord>) -> Task {
    Task {
        id: TaskId(1),
        source: TaskSource::Manual {
            submitted_by: "root".into(),
        },
        spec: crate::core::task_tests::spec("r", Specialty::Backend),
        priority: 0,
        state,
        state_reason: String::new(),
        attempts,
        max_attempts: 3,
        created_at: UnixMillis(1_000),
        updated_at: UnixMillis(61_000),
        queued_at: UnixMillis(2_000),
        not_before: None,
        cancel_requested: None,
        output_since: Attempt(0),
        waiting_reason: None,
        pending_effects: Vec::new(),
        triage: None,
        github: None,
    }
}

fn attempt(n: u32, assigned_at: u64, outcome: Option<Outcome>) -> AttemptRecord {
    AttemptRecord {
        attempt: Attempt(n),
        agent: AgentId::new("pc-01").expect("agent id"),
        assigned_at: UnixMillis(assigned_at),
        accepted_at: None,
        finished_at: outcome.map(|_| UnixMillis(assigned_at + 1_000)),
        outcome,
        message: String::new(),
        placement: String::new(),
        phase: None,
        report: outcome.map(|outcome| FinishedReport {
            cli: Some(CliResult {
                cost_usd: 0.25,
                turns: 7,
                duration_ms: 1_000,
                session_id: String::new(),
                is_error: false,
                subtype: String::new(),
                result: String::new(),
                model: String::new(),
            }),
            ..FinishedReport::new(outcome, "")
        }),
    }
}

fn written(task: &Task) -> Vec<Write> {
    vec![Write::Task(Box::new(task.clone()))]
}

#[test]
fn an_attempt_is_counted_when_assigned_and_when_it_ends_however_often_it_is_written() {
    let mut events = TaskEvents::default();
    assert_eq!(
        events.observe(&written(&task(TaskState::Queued, vec![]))),
        []
    );

    let assigned = task(TaskState::Assigned, vec![attempt(1, 5_000, None)]);
    assert_eq!(
        events.observe(&written(&assigned)),
        [Observation::Assigned {
            waited: Duration::from_secs(3)
        }]
    );
    let running = task(TaskState::Running, vec![attempt(1, 5_000, None)]);
    assert_eq!(events.observe(&written(&running)), []);

    let failed_once = task(
        TaskState::Queued,
        vec![attempt(1, 5_000, Some(Outcome::CliFailed))],
    );
    assert_eq!(
        events.observe(&written(&failed_once)),
        [Observation::AttemptEnded {
            outcome: Outcome::CliFailed,
            cost_usd: 0.25,
            turns: 7
        }]
    );

    let done = task(
        TaskState::Succeeded,
        vec![
            attempt(1, 5_000, Some(Outcome::CliFailed)),
            attempt(2, 9_000, Some(Outcome::Succeeded)),
        ],
    );
    // Assigned and ended within one commit: both are seen.
    let observed = events.observe(&[written(&done), written(&done)].concat());
    assert_eq!(
        observed,
        [
            Observation::Assigned {
                waited: Duration::from_secs(7)
            },
            Observation::AttemptEnded {
                outcome: Outcome::Succeeded,
                cost_usd: 0.25,
                turns: 7
            },
            Observation::TaskEnded {
                state: TaskState::Succeeded,
                took: Duration::from_secs(60)
            },
        ]
    );
    assert_eq!(events.observe(&written(&done)), []);
}

#[test]
fn an_admin_retry_ends_the_task_again_and_a_restart_counts_nothing_old() {
    let cancelled = task(
        TaskState::Cancelled,
        vec![attempt(1, 5_000, Some(Outcome::Cancelled))],
    );
    let mut events = TaskEvents::new([&cancelled]);
    assert_eq!(events.observe(&written(&cancelled)), [], "restored as is");

    let mut retried = cancelled.clone();
    retried.state = TaskState::Queued;
    assert_eq!(events.observe(&written(&retried)), []);
    let mut ended_again = cancelled.clone();
    ended_again.state = TaskState::Failed;
    assert_eq!(
        events.observe(&written(&ended_again)),
        [Observation::TaskEnded {
            state: TaskState::Failed,
            took: Duration::from_secs(60)
        }]
    );
}

#[test]
fn stored_output_is_summed_per_commit() {
    let chunk = |bytes: &[u8]| {
        Write::Output(OutputChunk {
            task: TaskId(1),
            attempt: Attempt(1),
            seq: 1,
            kind: OutputKind::Stdout,
            data: Arc::from(bytes),
        })
    };
    let mut events = TaskEvents::default();
    assert_eq!(
        events.observe(&[chunk(b"hello "), chunk(b"world")]),
        [Observation::OutputStored { bytes: 11 }]
    );
}

/// The value of the sample `series` (name and labels, as encoded).
fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

#[test]
fn gauges_show_the_snapshot_and_counters_what_was_recorded() {
    let metrics = Metrics::new();
    metrics.record(&[
        Observation::Assigned {
            waited: Duration::from_millis(250),
        },
        Observation::AttemptEnded {
            outcome: Outcome::Succeeded,
            cost_usd: 0.5,
            turns: 3,
        },
        Observation::TaskEnded {
            state: TaskState::Succeeded,
            took: Duration::from_secs(90),
        },
        Observation::OutputStored { bytes: 1234 },
    ]);
    metrics.webhook_delivery(WebhookResult::TaskCreated);
    metrics.github_call(GithubCallResult::RateLimited);
    metrics.github_retry(crate::core::outbox::Effect::PullRequest);

    let mut snapshot = Snapshot::default();
    snapshot.tasks.insert(("succeeded", "backend"), 2);
    snapshot.tasks.insert(("queued", "backend"), 0);
    snapshot.queue_depth = 4;
    snapshot.agents.insert("connected", 1);
    snapshot.slots.push(AgentSlots {
        agent: AgentId::new("pc-01").expect("agent id"),
        capacity: 3,
        free: 2,
    });
    snapshot.outbox_depth = 5;
    let text = metrics.encode(&snapshot);

    for (series, value) in [
        (r#"ccc_tasks{state="succeeded",specialty="backend"}"#, "2"),
        (r#"ccc_tasks{state="queued",specialty="backend"}"#, "0"),
        ("ccc_queue_depth", "4"),
        (r#"ccc_agents{state="connected"}"#, "1"),
        (r#"ccc_agent_slots{agent="pc-01"}"#, "3"),
        (r#"ccc_agent_slots_free{agent="pc-01"}"#, "2"),
        ("ccc_slots_free", "2"),
        ("ccc_outbox_depth", "5"),
        ("ccc_task_queue_wait_seconds_count", "1"),
        (r#"ccc_task_queue_wait_seconds_bucket{le="0.4"}"#, "1"),
        (r#"ccc_task_duration_seconds_count{state="succeeded"}"#, "1"),
        (r#"ccc_attempts_total{outcome="succeeded"}"#, "1"),
        ("ccc_output_stored_bytes_total", "1234"),
        ("ccc_cli_cost_usd_total", "0.5"),
        ("ccc_cli_turns_total", "3"),
        (
            r#"ccc_webhook_deliveries_total{result="task_created"}"#,
            "1",
        ),
        (r#"ccc_github_api_calls_total{result="rate_limited"}"#, "1"),
        (r#"ccc_github_retries_total{effect="pull_request"}"#, "1"),
    ] {
        assert_eq!(
            sample(&text, series).as_deref(),
            Some(value),
            "{series} in\n{text}"
        );
    }
    assert!(
        text.contains("# HELP ccc_tasks Tasks by state and specialty.\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE ccc_attempts_total counter\n"));

    // A forgotten agent leaves the per-agent families.
    let text = metrics.encode(&Snapshot::default());
    assert_eq!(sample(&text, r#"ccc_agent_slots{agent="pc-01"}"#), None);
    assert_eq!(sample(&text, "ccc_slots_free").as_deref(), Some("0"));
}

#[test]
fn a_snapshot_lists_every_state_and_specialty() {
    let (now, wall) = crate::driver::clock();
    let core = crate::core::Core::new(
        crate::core::tests::config(),
        crate::core::Restored::default(),
        now,
        wall,
    );
    let snapshot = Snapshot::of(&core);
    assert_eq!(snapshot.tasks.len(), 8 * Specialty::ALL.len());
    assert!(snapshot.tasks.values().all(|n| *n == 0));
    assert_eq!(snapshot.agents.len(), 4);
    assert_eq!(snapshot.queue_depth, 0);
}
