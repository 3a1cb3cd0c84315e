//! The agent session driven through scripted events.

use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{FinishedReport, Outcome, OutputKind, Specialty, TaskSpec};

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

fn report(outcome: Outcome) -> FinishedReport {
    FinishedReport::new(outcome, "")
}

fn out(s: &mut Session) -> Vec<ToCoordinator> {
    std::iter::from_fn(|| s.poll_outbound()).collect()
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
    s.handle_connected();
    s.handle_welcome(&[]);
    out(s);
}

fn commands(s: &mut Session) -> Vec<Command> {
    std::iter::from_fn(|| s.poll_command()).collect()
}

#[test]
fn output_survives_a_reconnect_and_is_resent_from_the_ack() {
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    assert!(matches!(s.poll_command(), Some(Command::Start { .. })));
    line(&mut s, "a");
    line(&mut s, "b");
    s.handle_output_ack(TaskId(1), Attempt(1), 1);
    s.handle_disconnected();
    line(&mut s, "c");
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded));
    assert!(out(&mut s).is_empty(), "nothing is sent while disconnected");

    s.handle_connected();
    assert_eq!(
        out(&mut s),
        vec![ToCoordinator::Hello {
            running: vec![Held {
                task: TaskId(1),
                attempt: Attempt(1),
                last_output_seq: 3
            }],
            unhealthy_reason: String::new(),
        }]
    );
    // The coordinator persisted up to 2 before it lost the stream: the rest
    // comes back from the spool, then the result.
    s.handle_welcome(&[(TaskId(1), Attempt(1), 2)]);
    let resent = out(&mut s);
    assert_eq!(
        resent[0],
        ToCoordinator::Resend {
            task: TaskId(1),
            attempt: Attempt(1),
            after: 2
        }
    );
    assert!(matches!(
        resent.last(),
        Some(ToCoordinator::Finished { report, .. }) if report.last_output_seq == 3
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
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.handle_assign(TaskId(2), Attempt(1), spec(), UnixMillis(0), None);
    let msgs = out(&mut s);
    assert!(matches!(msgs[0], ToCoordinator::Accepted { .. }));
    assert!(matches!(&msgs[1], ToCoordinator::Rejected { reason, .. } if reason.contains("slots")));
    s.handle_drain();
    s.handle_finished_ack(TaskId(1), Attempt(1));
    s.handle_assign(TaskId(3), Attempt(1), spec(), UnixMillis(0), None);
    assert!(
        matches!(&out(&mut s)[0], ToCoordinator::Rejected { reason, .. } if reason.contains("draining"))
    );
}

#[test]
fn cancel_stops_the_child_and_reports_cancelled() {
    let mut s = Session::new(2);
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
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::CliFailed));
    assert!(matches!(
        &out(&mut s)[..],
        [ToCoordinator::Finished { report, .. }] if report.outcome == Outcome::Cancelled
    ));
}

#[test]
fn tasks_the_coordinator_no_longer_lists_are_dropped_on_cancel() {
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded));
    s.handle_disconnected();
    s.handle_connected();
    s.handle_welcome(&[]);
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
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    line(&mut s, "a");
    s.handle_output_ack(TaskId(1), Attempt(1), 1);
    s.handle_disconnected();
    line(&mut s, "b");

    // Reconnected; the child ends and heartbeats tick before Welcome.
    s.handle_connected();
    line(&mut s, "c");
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded));
    s.heartbeat();
    let before = out(&mut s);
    assert!(
        matches!(before.as_slice(), [ToCoordinator::Hello { .. }]),
        "{before:?}"
    );

    s.handle_welcome(&[(TaskId(1), Attempt(1), 1)]);
    let after = out(&mut s);
    assert!(
        matches!(
            after.as_slice(),
            [
                ToCoordinator::Resend { after: 1, .. },
                ToCoordinator::Finished { report, .. },
            ] if report.last_output_seq == 3
        ),
        "the missing output first, then the result: {after:?}"
    );
}

#[test]
fn a_result_waiting_for_its_ack_does_not_take_a_slot() {
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    assert_eq!(s.free_slots(), 0);
    s.handle_child_exit(TaskId(1), Attempt(1), report(Outcome::Succeeded));
    assert_eq!(s.free_slots(), 1);
    out(&mut s);
    s.handle_assign(TaskId(2), Attempt(1), spec(), UnixMillis(0), None);
    assert!(
        matches!(out(&mut s).as_slice(), [ToCoordinator::Accepted { .. }]),
        "the next task is accepted"
    );
}

#[test]
fn a_result_of_an_earlier_run_is_listed_in_hello_and_handed_over_after_welcome() {
    let mut s = Session::new(1);
    let mut done = report(Outcome::Succeeded);
    done.last_output_seq = 4;
    s.restore_finished(TaskId(1), Attempt(2), done.clone(), vec![(3, 5), (4, 5)]);
    assert_eq!(s.free_slots(), 1, "a finished attempt takes no slot");
    s.handle_connected();
    assert_eq!(
        out(&mut s),
        vec![ToCoordinator::Hello {
            running: vec![Held {
                task: TaskId(1),
                attempt: Attempt(2),
                last_output_seq: 4,
            }],
            unhealthy_reason: String::new(),
        }]
    );
    s.handle_welcome(&[(TaskId(1), Attempt(2), 3)]);
    assert_eq!(
        out(&mut s),
        vec![
            ToCoordinator::Resend {
                task: TaskId(1),
                attempt: Attempt(2),
                after: 3,
            },
            ToCoordinator::Finished {
                task: TaskId(1),
                attempt: Attempt(2),
                report: Box::new(done),
            },
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
    let mut s = Session::new(2);
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
    s.handle_connected();
    s.begin_shutdown("agent shutting down");
    s.handle_welcome(&[]);
    assert!(
        out(&mut s)
            .iter()
            .any(|m| matches!(m, ToCoordinator::Draining { .. })),
        "the coordinator hears of the shutdown"
    );
}

#[test]
fn a_fault_of_the_pc_makes_it_unhealthy_in_every_report_until_a_check_passes() {
    let mut s = Session::new(2);
    // Unhealthy from the start (the check at start failed): Hello says so.
    s.handle_health(Some("the CLI is not logged in".into()));
    s.handle_connected();
    assert_eq!(
        out(&mut s),
        vec![ToCoordinator::Hello {
            running: vec![],
            unhealthy_reason: "the CLI is not logged in".into(),
        }]
    );
    s.handle_welcome(&[]);
    s.handle_health(None);
    let healthy = ToCoordinator::Heartbeat {
        running: vec![],
        free_slots: 2,
        unhealthy_reason: String::new(),
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
    s.handle_child_exit(TaskId(1), Attempt(1), fault);
    let sent = out(&mut s);
    assert!(
        matches!(&sent[..], [ToCoordinator::Finished { report, .. }, ToCoordinator::Heartbeat { unhealthy_reason, .. }]
            if report.outcome == Outcome::AgentFault && unhealthy_reason.contains("permission denied")),
        "{sent:?}"
    );
    assert_eq!(
        s.unhealthy_reason(),
        Some("cannot run the CLI /usr/bin/claude: permission denied")
    );
    s.heartbeat();
    assert!(
        matches!(&out(&mut s)[..], [ToCoordinator::Heartbeat { unhealthy_reason, .. }] if !unhealthy_reason.is_empty())
    );
    // Every new stream says it in Hello.
    s.handle_connected();
    assert!(
        matches!(&out(&mut s)[..], [ToCoordinator::Hello { unhealthy_reason, .. }] if unhealthy_reason.contains("permission denied"))
    );
    s.handle_welcome(&[]);
    out(&mut s);
    // The same reason again changes nothing; a pass clears it.
    s.handle_health(Some(
        "cannot run the CLI /usr/bin/claude: permission denied".into(),
    ));
    assert!(out(&mut s).is_empty());
    s.handle_health(None);
    assert_eq!(s.unhealthy_reason(), None);
    assert!(
        matches!(&out(&mut s)[..], [ToCoordinator::Heartbeat { unhealthy_reason, .. }] if unhealthy_reason.is_empty())
    );

    // What the coordinator accepts: one line, a bounded length.
    let long = format!("the API said:\n{}", "é".repeat(400));
    s.handle_health(Some(long));
    let reason = s.unhealthy_reason().expect("unhealthy").to_owned();
    assert!(
        reason.len() <= common::wire::MAX_SHORT_STRING,
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
    let mut s = Session::new(1);
    welcomed(&mut s);
    s.handle_assign(TaskId(1), Attempt(1), spec(), UnixMillis(0), None);
    out(&mut s);
    s.begin_shutdown("agent shutting down");
    let mut stopped = report(Outcome::Cancelled);
    stopped.message = "stopped on request".into();
    let sent = s
        .handle_child_exit(TaskId(1), Attempt(1), stopped)
        .expect("reported");
    assert_eq!(sent.outcome, Outcome::Cancelled);
    assert_eq!(sent.message, "handed back: agent shutting down");
}
