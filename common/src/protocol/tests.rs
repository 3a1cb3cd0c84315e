//! Examples of validation, and round trips through protobuf by property:
//! a message within the limits comes back unchanged, and whatever a decoder
//! accepts (from arbitrary, often invalid, input) is a fixed point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::from_agent::{output_seq, unhealthy_reason};
use super::*;
use crate::ids::{AgentId, Attempt, TaskId};
use crate::proto;
use crate::time::UnixMillis;
use crate::types::{
    AgentAdvert, CliResult, FinishedReport, Outcome, OutputKind, Phase, PushCredential, Secret,
    Specialty, TaskSpec, TestSummary, Toolchain,
};

fn hello() -> proto::Hello {
    proto::Hello {
        agent_version: "0.0.0".into(),
        specialties: vec![
            proto::Specialty::Frontend as i32,
            proto::Specialty::Backend as i32,
            proto::Specialty::Backend as i32,
        ],
        capacity: 2,
        toolchains: vec![proto::Toolchain {
            name: "node".into(),
            version: "20.1.0".into(),
        }],
        ..Default::default()
    }
}

fn decode_hello(hello: proto::Hello) -> Result<AgentAdvert, Error> {
    let msg = proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Hello(hello)),
    };
    match FromAgent::from_proto(msg)? {
        FromAgent::Hello { advert, .. } => Ok(advert),
        other => panic!("a Hello decodes to a Hello, not {other:?}"),
    }
}

#[test]
fn hello_round_trips_through_the_advert() {
    let advert = decode_hello(hello()).expect("valid hello");
    assert_eq!(
        advert.specialties,
        vec![Specialty::Backend, Specialty::Frontend]
    );
    let sent = FromAgent::Hello {
        advert: advert.clone(),
        running: vec![],
        unhealthy: None,
    };
    assert_eq!(
        FromAgent::from_proto(sent.clone().into_proto("x")),
        Ok(sent)
    );
}

#[test]
fn hostile_hellos_are_rejected_with_the_message_and_field_named() {
    let cases: Vec<(proto::Hello, &str)> = vec![
        (
            proto::Hello {
                capacity: 0,
                ..hello()
            },
            "capacity",
        ),
        (
            proto::Hello {
                capacity: 100_000,
                ..hello()
            },
            "capacity",
        ),
        (
            proto::Hello {
                specialties: vec![42],
                ..hello()
            },
            "specialties",
        ),
        (
            proto::Hello {
                hostname: "x\u{1b}[2J".into(),
                ..hello()
            },
            "hostname",
        ),
        (
            proto::Hello {
                agent_version: "v".repeat(1000),
                ..hello()
            },
            "agent_version",
        ),
        (
            proto::Hello {
                running: vec![proto::RunningTask::default(); MAX_REPORTED_TASKS + 1],
                ..hello()
            },
            "running",
        ),
    ];
    for (h, field) in cases {
        let err = decode_hello(h).expect_err("must be rejected");
        assert_eq!(err.field(), field);
        assert!(
            err.to_string()
                .starts_with(&format!("Hello: field {field}")),
            "{err}"
        );
    }
}

#[test]
fn no_specialty_means_general() {
    let advert = decode_hello(proto::Hello {
        specialties: vec![],
        ..hello()
    })
    .expect("valid");
    assert_eq!(advert.specialties, vec![Specialty::General]);
}

fn output(seq: u64, len: usize) -> proto::AgentMessage {
    proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::TaskOutput(proto::TaskOutput {
            task_id: "t-1".into(),
            attempt: 1,
            seq,
            kind: proto::OutputKind::Stdout as i32,
            data: vec![b'x'; len],
        })),
    }
}

#[test]
fn output_chunks_are_bounded_by_what_the_agent_sends() {
    assert!(matches!(
        FromAgent::from_proto(output(1, MAX_OUTPUT_CHUNK)),
        Ok(FromAgent::Output(_))
    ));
    let err = FromAgent::from_proto(output(1, MAX_OUTPUT_CHUNK + 1)).expect_err("too big");
    assert!(err.to_string().contains("exceeds 65536"), "{err}");
    let err = FromAgent::from_proto(output(u64::MAX, 1)).expect_err("reserved seq");
    assert!(
        err.to_string().starts_with("TaskOutput: field seq"),
        "{err}"
    );
}

#[test]
fn an_empty_message_is_an_error_from_an_agent_and_ignored_from_the_coordinator() {
    let err = FromAgent::from_proto(proto::AgentMessage { msg: None }).expect_err("empty");
    assert_eq!(err.to_string(), "AgentMessage: field msg is required");
    assert_eq!(
        ToAgent::from_proto(proto::CoordinatorMessage { msg: None }),
        Ok(None)
    );
}

#[test]
fn output_seqs_start_at_one_and_stop_before_the_reserved_maximum() {
    assert_eq!(output_seq(1), Ok(1));
    assert_eq!(output_seq(u64::MAX - 1), Ok(u64::MAX - 1));
    for bad in [0, u64::MAX] {
        let err = output_seq(bad).expect_err("rejected");
        assert!(err.to_string().starts_with("field seq: "), "{err}");
    }
}

#[test]
fn unhealthy_reasons_are_bounded_and_printable() {
    assert_eq!(unhealthy_reason(""), None);
    assert_eq!(unhealthy_reason("  "), None);
    assert_eq!(
        unhealthy_reason("claude: not found\n\x1b[31m").as_deref(),
        Some("claude: not found  [31m")
    );
    let long = "é".repeat(MAX_UNHEALTHY_REASON);
    let cut = unhealthy_reason(&long).expect("a reason");
    assert!(cut.len() <= MAX_UNHEALTHY_REASON && cut.chars().all(|c| c == 'é'));
}

#[test]
fn welcome_timings_are_bounded_for_the_agent() {
    let welcome = |interval_ms, timeout_ms| proto::CoordinatorMessage {
        msg: Some(proto::coordinator_message::Msg::Welcome(proto::Welcome {
            agent_id: "pc-1".into(),
            heartbeat_interval_ms: interval_ms,
            heartbeat_timeout_ms: timeout_ms,
            ..Default::default()
        })),
    };
    let timings = |msg| match ToAgent::from_proto(msg) {
        Ok(Some(ToAgent::Welcome {
            heartbeat_interval,
            heartbeat_timeout,
            ..
        })) => (heartbeat_interval, heartbeat_timeout),
        other => panic!("a Welcome decodes to a Welcome, not {other:?}"),
    };
    assert_eq!(
        timings(welcome(0, 0)),
        (Duration::from_millis(100), Duration::from_millis(200))
    );
    assert_eq!(
        timings(welcome(u64::MAX, u64::MAX)),
        (Duration::from_secs(3600), Duration::from_secs(3600))
    );
}

#[test]
fn a_repository_to_push_as_is_not_sent_and_an_empty_token_is_no_credential() {
    let assign = |push| ToAgent::Assign {
        task: TaskId(1),
        attempt: Attempt(1),
        spec: Box::new(spec()),
        deadline: UnixMillis(5),
        push,
    };
    let sent = assign(Some(PushAuth::GithubRepository("o/r".into()))).into_proto();
    assert_eq!(ToAgent::from_proto(sent), Ok(Some(assign(None))));
    let empty = PushAuth::Credential(PushCredential {
        username: "u".into(),
        token: Secret::new(""),
    });
    let sent = assign(Some(empty)).into_proto();
    assert_eq!(ToAgent::from_proto(sent), Ok(Some(assign(None))));
}

fn spec() -> TaskSpec {
    TaskSpec {
        repo_url: "https://example.com/o/r.git".into(),
        base_branch: String::new(),
        issue_number: 3,
        title: "t".into(),
        body: "b".into(),
        issue_url: String::new(),
        author: "a".into(),
        labels: vec![],
        specialty: Specialty::Backend,
        technologies: vec!["rust".into()],
        branch: "ccc/issue-3".into(),
        follow_up: false,
        test_command: String::new(),
    }
}

// ---- strategies ----

/// Text of any kind: control characters, long runs, multi-byte characters.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,12}", "[a-z\u{e9}\u{1b}\n\t ]{0,40}", ".{0,300}",]
}

/// Text within the short-string limit, without control characters.
fn short_text() -> impl Strategy<Value = String> {
    "[ -~\u{e9}\u{4e00}]{0,40}"
}

fn task() -> impl Strategy<Value = TaskId> {
    (1..u64::MAX).prop_map(TaskId)
}

fn attempt() -> impl Strategy<Value = Attempt> {
    any::<u32>().prop_map(Attempt)
}

fn specialty() -> impl Strategy<Value = Specialty> {
    prop::sample::select(Specialty::ALL.to_vec())
}

/// The outcomes an agent reports (the coordinator's own have no code).
fn agent_outcome() -> impl Strategy<Value = Outcome> {
    prop::sample::select(vec![
        Outcome::Succeeded,
        Outcome::NoChanges,
        Outcome::CliFailed,
        Outcome::TurnLimit,
        Outcome::BudgetExceeded,
        Outcome::TimedOut,
        Outcome::RateLimited,
        Outcome::TestsFailed,
        Outcome::PushRejected,
        Outcome::Cancelled,
        Outcome::WorkspaceError,
        Outcome::AgentFault,
    ])
}

fn kind() -> impl Strategy<Value = OutputKind> {
    prop::sample::select(vec![
        OutputKind::Stdout,
        OutputKind::Stderr,
        OutputKind::Event,
        OutputKind::System,
    ])
}

fn phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(vec![
        Phase::Preparing,
        Phase::RunningClaude,
        Phase::Testing,
        Phase::Committing,
        Phase::Pushing,
    ])
}

fn reported() -> impl Strategy<Value = Vec<ReportedTask>> {
    prop::collection::vec(
        (task(), attempt(), any::<u64>()).prop_map(|(task, attempt, last_output_seq)| {
            ReportedTask {
                task,
                attempt,
                last_output_seq,
            }
        }),
        0..4,
    )
}

/// An advert as decoding leaves it: specialties sorted, unique and never
/// empty, toolchains sorted with unique names.
fn advert() -> impl Strategy<Value = AgentAdvert> {
    (
        short_text(),
        prop::collection::btree_set(specialty(), 1..4),
        1..=MAX_CAPACITY,
        prop::collection::btree_map(short_text(), short_text(), 0..4),
        prop::collection::btree_map("[a-z]{1,8}", short_text(), 0..4),
        short_text(),
        short_text(),
    )
        .prop_map(
            |(agent_version, specialties, capacity, labels, toolchains, hostname, instance_id)| {
                AgentAdvert {
                    agent_version,
                    specialties: specialties.into_iter().collect(),
                    capacity,
                    labels,
                    toolchains: toolchains
                        .into_iter()
                        .map(|(name, version)| Toolchain { name, version })
                        .collect(),
                    hostname,
                    instance_id,
                }
            },
        )
}

/// An unhealthy reason as decoding leaves it.
fn unhealthy() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[a-z:][a-z: \u{e9}]{0,30}[a-z]")
}

fn report() -> impl Strategy<Value = FinishedReport> {
    let tests = (
        any::<bool>(),
        any::<bool>(),
        short_text(),
        any::<i32>(),
        short_text(),
    )
        .prop_map(|(ran, passed, command, exit_code, tail)| TestSummary {
            ran,
            passed,
            command,
            exit_code,
            tail,
        });
    let cli = (
        -1e9..1e9f64,
        any::<u32>(),
        any::<u64>(),
        short_text(),
        any::<bool>(),
        short_text(),
        short_text(),
        short_text(),
    )
        .prop_map(
            |(cost_usd, turns, duration_ms, session_id, is_error, subtype, result, model)| {
                CliResult {
                    cost_usd,
                    turns,
                    duration_ms,
                    session_id,
                    is_error,
                    subtype,
                    result,
                    model,
                }
            },
        );
    (
        agent_outcome(),
        short_text(),
        "[a-z/-]{0,30}",
        "[0-9a-f]{0,40}",
        prop::option::of(tests),
        prop::option::of(cli),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(outcome, message, branch, commit, tests, cli, reset, last, permanent)| {
                FinishedReport {
                    outcome,
                    message,
                    branch,
                    commit,
                    tests,
                    cli,
                    rate_limit_reset_unix_ms: reset,
                    last_output_seq: last,
                    permanent,
                }
            },
        )
}

/// Any message within the limits.
fn from_agent() -> impl Strategy<Value = FromAgent> {
    prop_oneof![
        (advert(), reported(), unhealthy()).prop_map(|(advert, running, unhealthy)| {
            FromAgent::Hello {
                advert,
                running,
                unhealthy,
            }
        }),
        (any::<u32>(), reported(), unhealthy()).prop_map(|(free_slots, running, unhealthy)| {
            FromAgent::Heartbeat {
                free_slots,
                running,
                unhealthy,
            }
        }),
        short_text().prop_map(|reason| FromAgent::Draining { reason }),
        (task(), attempt()).prop_map(|(task, attempt)| FromAgent::Accepted { task, attempt }),
        (task(), attempt(), short_text()).prop_map(|(task, attempt, reason)| {
            FromAgent::Rejected {
                task,
                attempt,
                reason,
            }
        }),
        (
            task(),
            attempt(),
            1..u64::MAX,
            kind(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(
                |(task, attempt, seq, kind, data)| FromAgent::Output(OutputChunk {
                    task,
                    attempt,
                    seq,
                    kind,
                    data: Arc::from(data),
                })
            ),
        (task(), attempt(), phase()).prop_map(|(task, attempt, phase)| FromAgent::Progress {
            task,
            attempt,
            phase,
        }),
        (task(), attempt(), report()).prop_map(|(task, attempt, report)| FromAgent::Finished {
            task,
            attempt,
            report,
        }),
    ]
}

/// Any message of an agent, often outside the limits: texts of any
/// length and kind, task ids that are no task ids, unknown enum values.
fn hostile_from_agent() -> impl Strategy<Value = FromAgent> {
    let id = prop_oneof![task(), Just(TaskId(0))];
    (
        from_agent(),
        any_text(),
        any_text(),
        id,
        0..MAX_CAPACITY * 2,
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            Just(vec![b'x'; MAX_OUTPUT_CHUNK]),
            Just(vec![b'x'; MAX_OUTPUT_CHUNK + 1]),
        ],
    )
        .prop_map(|(msg, text, other, task, capacity, data)| match msg {
            FromAgent::Hello {
                advert, running, ..
            } => FromAgent::Hello {
                advert: AgentAdvert {
                    hostname: text,
                    capacity,
                    labels: BTreeMap::from([(other.clone(), other.clone())]),
                    ..advert
                },
                running,
                unhealthy: Some(format!("{other}\u{1b}{}", "é".repeat(600))),
            },
            FromAgent::Heartbeat {
                free_slots,
                running,
                ..
            } => FromAgent::Heartbeat {
                free_slots,
                running,
                unhealthy: Some(text),
            },
            FromAgent::Draining { .. } => FromAgent::Draining {
                reason: text.repeat(8),
            },
            FromAgent::Rejected { attempt, .. } => FromAgent::Rejected {
                task,
                attempt,
                reason: text.repeat(8),
            },
            FromAgent::Output(chunk) => FromAgent::Output(OutputChunk {
                task,
                data: Arc::from(data),
                ..chunk
            }),
            FromAgent::Finished {
                attempt,
                mut report,
                ..
            } => {
                report.message = text.repeat(30);
                report.commit = other.repeat(3);
                if let Some(cli) = report.cli.as_mut() {
                    cli.cost_usd = f64::NAN;
                    cli.result = text.repeat(100);
                }
                FromAgent::Finished {
                    task,
                    attempt,
                    report,
                }
            }
            other => other,
        })
}

fn agent_id() -> impl Strategy<Value = AgentId> {
    "[a-z0-9][a-z0-9._-]{0,20}".prop_map(|name| AgentId::new(name).expect("a valid name"))
}

fn heartbeat_timing(min_ms: u64) -> impl Strategy<Value = Duration> {
    (min_ms..=3_600_000).prop_map(Duration::from_millis)
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    (
        any_text(),
        any_text(),
        any::<u64>(),
        any_text(),
        specialty(),
        prop::collection::vec(any_text(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(repo_url, title, issue_number, body, specialty, technologies, follow_up)| TaskSpec {
                repo_url,
                base_branch: "main".into(),
                issue_number,
                title,
                body,
                issue_url: String::new(),
                author: "someone".into(),
                labels: technologies.clone(),
                specialty,
                technologies,
                branch: "ccc/t-1".into(),
                follow_up,
                test_command: "cargo test".into(),
            },
        )
}

/// Any message the coordinator sends, with what reaches an agent: durations
/// in whole milliseconds within the bounds, a credential with a token.
fn to_agent() -> impl Strategy<Value = ToAgent> {
    let held = prop::collection::vec((task(), attempt(), any::<u64>()), 0..4);
    let credential = ("[a-z-]{0,12}", "[A-Za-z0-9_]{1,40}").prop_map(|(username, token)| {
        PushAuth::Credential(PushCredential {
            username,
            token: Secret::new(token),
        })
    });
    prop_oneof![
        (
            agent_id(),
            heartbeat_timing(100),
            heartbeat_timing(200),
            any::<u64>().prop_map(Duration::from_millis),
            held
        )
            .prop_map(
                |(agent_id, heartbeat_interval, heartbeat_timeout, lease_timeout, held)| {
                    ToAgent::Welcome {
                        agent_id,
                        heartbeat_interval,
                        heartbeat_timeout,
                        lease_timeout,
                        held,
                    }
                }
            ),
        any::<u64>().prop_map(|ms| ToAgent::Heartbeat {
            now: UnixMillis(ms)
        }),
        any_text().prop_map(|reason| ToAgent::Drain { reason }),
        (
            task(),
            attempt(),
            task_spec(),
            any::<u64>(),
            prop::option::of(credential)
        )
            .prop_map(|(task, attempt, spec, deadline, push)| ToAgent::Assign {
                task,
                attempt,
                spec: Box::new(spec),
                deadline: UnixMillis(deadline),
                push,
            }),
        (task(), attempt(), any_text()).prop_map(|(task, attempt, reason)| ToAgent::Cancel {
            task,
            attempt,
            reason,
        }),
        (task(), attempt(), any::<u64>()).prop_map(|(task, attempt, seq)| ToAgent::OutputAck {
            task,
            attempt,
            seq,
        }),
        (task(), attempt()).prop_map(|(task, attempt)| ToAgent::FinishedAck { task, attempt }),
    ]
}

proptest! {
    #[test]
    fn an_agent_message_within_the_limits_survives_protobuf(msg in from_agent()) {
        prop_assert_eq!(FromAgent::from_proto(msg.clone().into_proto("pc-1")), Ok(msg));
    }

    #[test]
    fn what_the_coordinator_accepts_from_an_agent_is_within_the_limits(
        msg in hostile_from_agent()
    ) {
        if let Ok(accepted) = FromAgent::from_proto(msg.into_proto("pc-1")) {
            prop_assert_eq!(
                FromAgent::from_proto(accepted.clone().into_proto("pc-1")),
                Ok(accepted)
            );
        }
    }

    #[test]
    fn a_coordinator_message_survives_protobuf(msg in to_agent()) {
        prop_assert_eq!(ToAgent::from_proto(msg.clone().into_proto()), Ok(Some(msg)));
    }
}
