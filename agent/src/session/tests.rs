//! The agent session driven through scripted events, time as an argument.
#![allow(clippy::disallowed_methods)] // one real Instant as the origin of simulated time

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use common::ids::{AgentId, Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{AgentAdvert, FinishedReport, Outcome, OutputKind, Specialty, TaskSpec};

use super::*;

fn spec() -> TaskSpec {
    TaskSpec {
        repo_url: "r".into(),
        base_branch: String::new(),
        issue_number: 0,
        title: "t".into(),
        body: String::new(),
        issue_url: String::new(),
        author: String::new(),
        labels: vec![],
        specialty: Specialty::Backend,
        technologies: vec![],
        branch: "ccc/t-1".into(),
        follow_up: false,
        test_command: String::new(),
    }
}

static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Simulated time: `ms` after the origin.
fn at(ms: u64) -> Instant {
    *ORIGIN + Duration::from_millis(ms)
}

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(30);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const SILENCE: Duration = Duration::from_secs(15);

fn advert(capacity: u32) -> AgentAdvert {
    AgentAdvert {
        agent_version: "0".into(),
        specialties: vec![Specialty::General],
        capacity,
        labels: Default::default(),
        toolchains: vec![],
        hostname: "h".into(),
        instance_id: "i".into(),
    }
}

fn session(capacity: u32) -> Session {
    Session::new(SessionConfig {
        advert: advert(capacity),
        welcome_timeout: WELCOME_TIMEOUT,
        health_check_interval: HEALTH_CHECK_INTERVAL,
        stop_grace: STOP_GRACE,
    })
}

/// The coordinator's Welcome at `now`, listing `held`.
fn welcome(s: &mut Session, held: &[(TaskId, Attempt, u64)], now: Instant) {
    s.handle_message(
        ToAgent::Welcome {
            agent_id: AgentId::new("pc-1").expect("a valid name"),
            heartbeat_interval: HEARTBEAT_EVERY,
            heartbeat_timeout: SILENCE,
            lease_timeout: SILENCE,
            held: held.to_vec(),
        },
        now,
    );
}

fn report(outcome: Outcome) -> FinishedReport {
    FinishedReport::new(outcome, "")
}

/// What goes out, in order: messages and resends.
fn outbound(s: &mut Session) -> Vec<Outbound> {
    std::iter::from_fn(|| s.poll_outbound()).collect()
}

/// The messages that go out (resends left out).
fn out(s: &mut Session) -> Vec<FromAgent> {
    outbound(s)
        .into_iter()
        .filter_map(|o| match o {
            Outbound::Message(msg) => Some(msg),
            Outbound::Resend { .. } => None,
        })
        .collect()
}

/// The Hello of a session made by [`session`].
fn hello(capacity: u32, running: Vec<ReportedTask>, unhealthy: Option<&str>) -> FromAgent {
    FromAgent::Hello {
        advert: advert(capacity),
        running,
        unhealthy: unhealthy.map(str::to_owned),
    }
}

fn line(s: &mut Session, text: &str) {
    s.handle_child_output(
        TaskId(1),
        Attempt(1),
        OutputKind::Stdout,
        Arc::from(text.as_bytes()),
    );
}

/// A stream opened and welcomed by a coordinator that holds nothing of ours.
fn welcomed(s: &mut Session) {
    s.handle_connected(at(0));
    welcome(s, &[], at(0));
    out(s);
}

fn commands(s: &mut Session) -> Vec<Command> {
    std::iter::from_fn(|| s.poll_command()).collect()
}

#[test]
fn output_survives_a_reconnect_and_is_resent_from_the_ack() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    assert!(matches!(s.poll_command(), Some(Command::Start { .. })));
    line(&mut s, "a");
    line(&mut s, "b");
    s.handle_output_ack(TaskId(1), Attempt(1), 1);
    s.handle_disconnected();
    line(&mut s, "c");
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded), at(0));
    assert!(out(&mut s).is_empty(), "nothing is sent while disconnected");

    s.handle_connected(at(0));
    assert_eq!(
        out(&mut s),
        vec![hello(
            1,
            vec![ReportedTask {
                task: TaskId(1),
                attempt: Attempt(1),
                last_output_seq: 3
            }],
            None
        )]
    );
    // The coordinator persisted up to 2 before it lost the stream: the rest
    // comes back from the spool, then the result.
    welcome(&mut s, &[(TaskId(1), Attempt(1), 2)], at(0));
    let resent = outbound(&mut s);
    assert_eq!(
        resent[0],
        Outbound::Resend {
            task: TaskId(1),
            attempt: Attempt(1),
            after: 2
        }
    );
    assert!(matches!(
        resent.last(),
        Some(Outbound::Message(FromAgent::Finished { report, .. })) if report.last_output_seq == 3
    ));
    assert_eq!(s.unacked_bytes(), 1);
    commands(&mut s);
    s.handle_finished_ack(TaskId(1), Attempt(1));
    assert!(s.is_idle());
    assert_eq!(
        commands(&mut s),
        vec![Command::Forget {
            task: TaskId(1),
            attempt: Attempt(1)
        }]
    );
}

#[test]
fn assignments_beyond_capacity_or_while_draining_are_refused() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.handle_assign(TaskId(2), Attempt(1), spec(), UnixMillis(0), None);
    let msgs = out(&mut s);
    assert!(matches!(msgs[0], FromAgent::Accepted { .. }));
    assert!(matches!(&msgs[1], FromAgent::Rejected { reason, .. } if reason.contains("slots")));
    s.handle_message(
        ToAgent::Drain {
            reason: "maintenance".into(),
        },
        at(0),
    );
    s.handle_finished_ack(TaskId(1), Attempt(1));
    s.handle_assign(TaskId(3), Attempt(1), spec(), UnixMillis(0), None);
    assert!(
        matches!(&out(&mut s)[0], FromAgent::Rejected { reason, .. } if reason.contains("draining"))
    );
}

#[test]
fn cancel_stops_the_child_and_reports_cancelled() {
    let mut s = session(2);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.poll_command();
    out(&mut s);
    s.handle_cancel(TaskId(1), Attempt(2), "stale attempt number");
    assert_eq!(s.poll_command(), None);
    s.handle_cancel(TaskId(1), Attempt(1), "admin");
    assert_eq!(
        s.poll_command(),
        Some(Command::Stop {
            task: TaskId(1),
            attempt: Attempt(1)
        })
    );
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::CliFailed), at(0));
    assert!(matches!(
        &out(&mut s)[..],
        [FromAgent::Finished { report, .. }] if report.outcome == Outcome::Cancelled
    ));
}

#[test]
fn tasks_the_coordinator_no_longer_lists_are_dropped_on_cancel() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded), at(0));
    s.handle_disconnected();
    s.handle_connected(at(0));
    welcome(&mut s, &[], at(0));
    assert_eq!(
        out(&mut s).len(),
        1,
        "only Hello: nothing resent for an unlisted task"
    );
    s.handle_cancel(TaskId(1), Attempt(1), "no longer current");
    assert!(s.is_idle());
}

#[test]
fn before_welcome_only_hello_goes_out_so_a_result_never_overtakes_resent_output() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    line(&mut s, "a");
    s.handle_output_ack(TaskId(1), Attempt(1), 1);
    s.handle_disconnected();
    line(&mut s, "b");

    // Reconnected; the child ends and heartbeats tick before Welcome.
    s.handle_connected(at(0));
    line(&mut s, "c");
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded), at(0));
    s.heartbeat();
    let before = out(&mut s);
    assert!(
        matches!(before.as_slice(), [FromAgent::Hello { .. }]),
        "{before:?}"
    );

    welcome(&mut s, &[(TaskId(1), Attempt(1), 1)], at(0));
    let after = outbound(&mut s);
    assert!(
        matches!(
            after.as_slice(),
            [
                Outbound::Resend { after: 1, .. },
                Outbound::Message(FromAgent::Finished { report, .. }),
            ] if report.last_output_seq == 3
        ),
        "the missing output first, then the result: {after:?}"
    );
}

#[test]
fn a_result_waiting_for_its_ack_does_not_take_a_slot() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    assert_eq!(s.free_slots(), 0);
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded), at(0));
    assert_eq!(s.free_slots(), 1);
    out(&mut s);
    s.handle_assign(TaskId(2), Attempt(1), spec(), UnixMillis(0), None);
    assert!(
        matches!(out(&mut s).as_slice(), [FromAgent::Accepted { .. }]),
        "the next task is accepted"
    );
}

#[test]
fn a_result_of_an_earlier_run_is_listed_in_hello_and_handed_over_after_welcome() {
    let mut s = session(1);
    let mut done = report(Outcome::Succeeded);
    done.last_output_seq = 4;
    s.restore_finished(TaskId(1), Attempt(2), done.clone(), vec![(3, 5), (4, 5)]);
    assert_eq!(s.free_slots(), 1, "a finished attempt takes no slot");
    s.handle_connected(at(0));
    assert_eq!(
        out(&mut s),
        vec![hello(
            1,
            vec![ReportedTask {
                task: TaskId(1),
                attempt: Attempt(2),
                last_output_seq: 4,
            }],
            None
        )]
    );
    welcome(&mut s, &[(TaskId(1), Attempt(2), 3)], at(0));
    assert_eq!(
        outbound(&mut s),
        vec![
            Outbound::Resend {
                task: TaskId(1),
                attempt: Attempt(2),
                after: 3,
            },
            Outbound::Message(FromAgent::Finished {
                task: TaskId(1),
                attempt: Attempt(2),
                report: done,
            }),
        ]
    );
    s.handle_finished_ack(TaskId(1), Attempt(2));
    assert!(s.is_idle());
    assert_eq!(
        commands(&mut s),
        vec![Command::Forget {
            task: TaskId(1),
            attempt: Attempt(2),
        }]
    );
}

#[test]
fn a_cancelled_attempt_owes_no_output_and_a_shutdown_is_said_on_every_stream() {
    let mut s = session(2);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    line(&mut s, "a");
    assert!(s.unacked_bytes() > 0);
    s.handle_cancel(TaskId(1), Attempt(1), "no longer wanted");
    line(&mut s, "b");
    assert_eq!(
        s.unacked_bytes(),
        0,
        "nothing the coordinator will never ack"
    );

    // Stopping between a new stream and its Welcome: said after Welcome.
    s.handle_disconnected();
    s.handle_connected(at(0));
    s.begin_shutdown("agent shutting down", at(0));
    welcome(&mut s, &[], at(0));
    assert!(
        out(&mut s)
            .iter()
            .any(|m| matches!(m, FromAgent::Draining { .. })),
        "the coordinator hears of the shutdown"
    );
}

#[test]
fn a_fault_of_the_pc_makes_it_unhealthy_in_every_report_until_a_check_passes() {
    let mut s = session(2);
    // Unhealthy from the start (the check at start failed): Hello says so.
    s.handle_health(Some("the CLI is not logged in".into()), at(0));
    s.handle_connected(at(0));
    assert_eq!(
        out(&mut s),
        vec![hello(2, vec![], Some("the CLI is not logged in"))]
    );
    welcome(&mut s, &[], at(0));
    s.handle_health(None, at(0));
    let healthy = FromAgent::Heartbeat {
        free_slots: 2,
        running: vec![],
        unhealthy: None,
    };
    assert_eq!(
        out(&mut s),
        vec![healthy.clone()],
        "a change is told at once"
    );
    s.heartbeat();
    assert_eq!(out(&mut s), vec![healthy]);

    // An attempt that fails through the PC's fault.
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    out(&mut s);
    let mut fault = report(Outcome::AgentFault);
    fault.message = "cannot run the CLI /usr/bin/claude: permission denied".into();
    s.handle_child_exit(TaskId(1), Attempt(1), fault, at(0));
    let sent = out(&mut s);
    assert!(
        matches!(&sent[..], [FromAgent::Finished { report, .. }, FromAgent::Heartbeat { unhealthy: Some(reason), .. }]
            if report.outcome == Outcome::AgentFault && reason.contains("permission denied")),
        "{sent:?}"
    );
    assert_eq!(
        s.unhealthy_reason(),
        Some("cannot run the CLI /usr/bin/claude: permission denied")
    );
    s.heartbeat();
    assert!(matches!(
        &out(&mut s)[..],
        [FromAgent::Heartbeat {
            unhealthy: Some(_),
            ..
        }]
    ));
    // Every new stream says it in Hello.
    s.handle_connected(at(0));
    assert!(
        matches!(&out(&mut s)[..], [FromAgent::Hello { unhealthy: Some(reason), .. }] if reason.contains("permission denied"))
    );
    welcome(&mut s, &[], at(0));
    out(&mut s);
    // The same reason again changes nothing; a pass clears it.
    s.handle_health(
        Some("cannot run the CLI /usr/bin/claude: permission denied".into()),
        at(0),
    );
    assert!(out(&mut s).is_empty());
    s.handle_health(None, at(0));
    assert_eq!(s.unhealthy_reason(), None);
    assert!(matches!(
        &out(&mut s)[..],
        [FromAgent::Heartbeat {
            unhealthy: None,
            ..
        }]
    ));

    // What the coordinator accepts: one line, a bounded length.
    let long = format!("the API said:\n{}", "é".repeat(400));
    s.handle_health(Some(long), at(0));
    let reason = s.unhealthy_reason().expect("unhealthy").to_owned();
    assert!(
        reason.len() <= common::protocol::MAX_SHORT_STRING,
        "{}",
        reason.len()
    );
    assert!(
        reason.starts_with("the API said: é") && reason.ends_with('…'),
        "{reason}"
    );
    assert!(!reason.chars().any(char::is_control));
}

#[test]
fn a_task_stopped_by_a_shutdown_is_handed_back_as_cancelled() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    out(&mut s);
    s.begin_shutdown("agent shutting down", at(0));
    let mut stopped = report(Outcome::Cancelled);
    stopped.message = "stopped on request".into();
    let sent = s
        .handle_child_exit(TaskId(1), Attempt(1), stopped, at(0))
        .expect("reported");
    assert_eq!(sent.outcome, Outcome::Cancelled);
    assert_eq!(sent.message, "handed back: agent shutting down");
}

#[test]
fn a_coordinator_that_never_welcomes_is_left_after_the_welcome_timeout() {
    let mut s = session(1);
    assert_eq!(s.poll_timeout(), None, "no stream, no timer");
    s.handle_connected(at(1_000));
    out(&mut s);
    assert_eq!(s.poll_timeout(), Some(at(1_000) + WELCOME_TIMEOUT));
    assert_eq!(s.silence_allowed(), Some(WELCOME_TIMEOUT));
    s.handle_timeout(at(10_999));
    assert!(commands(&mut s).is_empty(), "not yet");
    s.handle_timeout(at(11_000));
    assert_eq!(commands(&mut s), vec![Command::CloseStream]);
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.silence_allowed(), None);

    // A Welcome that was on its way when the stream closed changes nothing.
    welcome(&mut s, &[], at(11_001));
    assert!(out(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn heartbeats_go_out_at_the_coordinators_interval_and_silence_closes_the_stream() {
    let mut s = session(2);
    s.handle_connected(at(0));
    welcome(&mut s, &[], at(1_000));
    out(&mut s);
    assert_eq!(s.silence_allowed(), Some(SILENCE));
    assert_eq!(s.poll_timeout(), Some(at(6_000)), "the first heartbeat");
    s.handle_timeout(at(6_000));
    assert_eq!(
        out(&mut s),
        vec![FromAgent::Heartbeat {
            free_slots: 2,
            running: vec![],
            unhealthy: None,
        }]
    );
    assert_eq!(s.poll_timeout(), Some(at(11_000)));

    // Any message shows the coordinator is alive: silence counts from it.
    s.handle_message(ToAgent::Heartbeat { now: UnixMillis(0) }, at(10_000));
    for beat in [11_000, 16_000, 21_000] {
        assert_eq!(s.poll_timeout(), Some(at(beat)));
        s.handle_timeout(at(beat));
        assert!(matches!(&out(&mut s)[..], [FromAgent::Heartbeat { .. }]));
        assert!(commands(&mut s).is_empty());
    }
    assert_eq!(s.poll_timeout(), Some(at(25_000)), "silent since 10s");
    s.handle_timeout(at(25_000));
    assert_eq!(commands(&mut s), vec![Command::CloseStream]);
    assert!(out(&mut s).is_empty());

    // The next stream starts over with the Welcome timeout.
    s.handle_connected(at(26_000));
    assert!(matches!(&out(&mut s)[..], [FromAgent::Hello { .. }]));
    assert_eq!(s.poll_timeout(), Some(at(26_000) + WELCOME_TIMEOUT));
}

#[test]
fn an_unhealthy_pc_is_checked_every_interval_until_a_check_passes() {
    let mut s = session(1);
    s.handle_health(Some("the CLI is not logged in".into()), at(0));
    assert_eq!(s.poll_timeout(), Some(at(60_000)));
    s.handle_timeout(at(60_000));
    assert_eq!(commands(&mut s), vec![Command::CheckHealth]);
    assert_eq!(s.poll_timeout(), None, "nothing is due while a check runs");
    s.handle_timeout(at(200_000));
    assert!(commands(&mut s).is_empty(), "one check at a time");

    s.handle_health(Some("the CLI is not logged in".into()), at(65_000));
    assert_eq!(
        s.poll_timeout(),
        Some(at(125_000)),
        "still failing: again later"
    );
    s.handle_timeout(at(125_000));
    assert_eq!(commands(&mut s), vec![Command::CheckHealth]);
    s.handle_health(None, at(126_000));
    assert_eq!(s.poll_timeout(), None, "healthy: no more checks");

    // An attempt that fails through the PC's fault starts the checks again.
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    commands(&mut s);
    let mut fault = report(Outcome::AgentFault);
    fault.message = "Invalid API key".into();
    s.handle_child_exit(TaskId(1), Attempt(1), fault, at(300_000));
    assert_eq!(s.unhealthy_reason(), Some("Invalid API key"));
    s.handle_disconnected();
    assert_eq!(s.poll_timeout(), Some(at(360_000)));
    s.handle_timeout(at(360_000));
    assert_eq!(commands(&mut s), vec![Command::CheckHealth]);
}

#[test]
fn a_shutdown_stops_running_attempts_and_ends_when_they_are_handed_over_or_the_grace_is_over() {
    let mut s = session(2);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.handle_assign(TaskId(2), Attempt(1), spec(), UnixMillis(0), None);
    commands(&mut s);
    out(&mut s);
    assert!(!s.is_stopped(), "not stopping");

    s.begin_shutdown("agent shutting down", at(1_000));
    assert_eq!(
        commands(&mut s),
        vec![
            Command::Stop {
                task: TaskId(1),
                attempt: Attempt(1),
            },
            Command::Stop {
                task: TaskId(2),
                attempt: Attempt(1),
            },
        ]
    );
    assert!(matches!(&out(&mut s)[..], [FromAgent::Draining { .. }]));
    let mut stopped = report(Outcome::Cancelled);
    stopped.message = "stopped on request".into();
    s.handle_child_exit(TaskId(1), Attempt(1), stopped, at(2_000));
    s.handle_message(
        ToAgent::FinishedAck {
            task: TaskId(1),
            attempt: Attempt(1),
        },
        at(2_100),
    );
    assert!(!s.is_stopped(), "task 2 still runs");

    // Task 2 never ends, and the stream goes: the grace period ends it.
    s.handle_disconnected();
    assert!(!s.is_stopped());
    assert_eq!(s.poll_timeout(), Some(at(31_000)), "the grace ends");
    s.handle_timeout(at(31_000));
    assert!(s.is_stopped());
}

#[test]
fn a_stopping_agent_whose_stream_is_gone_is_done_once_its_attempts_ended() {
    let mut s = session(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.begin_shutdown("agent shutting down", at(1_000));
    s.handle_disconnected();
    assert!(!s.is_stopped(), "the attempt still runs");
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Cancelled), at(2_000));
    assert!(
        s.is_stopped(),
        "its result waits on disk for the next run to hand over"
    );
}
