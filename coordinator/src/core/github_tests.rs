//! Issue tasks in the core: one active task per issue, deliveries handled
//! once, `/claude` commands, and the reconciler's "only what is missing".

use common::types::{FinishedReport, Outcome, Specialty};

use super::github::{IssueCommand, IssueOutcome};
use super::task_tests::{H, accepted, finished, spec};
use super::*;

fn issue_task(issue: u64, needs_info: bool) -> NewTask {
    let mut spec = spec("https://github.com/o/r.git", Specialty::Backend);
    spec.issue_number = issue;
    spec.body = "It fails.".into();
    NewTask {
        source: TaskSource::Github {
            repo: "O/R".into(),
            issue,
            url: format!("https://github.com/o/r/issues/{issue}"),
            author: "alice".into(),
            labels: vec!["claude".into()],
            delivery: String::new(),
        },
        spec,
        priority: 0,
        triage: None,
        needs_info,
    }
}

impl H {
    fn trigger(&mut self, delivery: &str, issue: u64) -> IssueOutcome {
        let (now, wall) = self.now();
        self.core
            .issue_triggered(delivery, issue_task(issue, false), now, wall)
    }

    fn command(&mut self, delivery: &str, issue: u64, command: IssueCommand) -> IssueOutcome {
        let (now, wall) = self.now();
        self.core
            .issue_command(delivery, command, issue_task(issue, false), now, wall)
    }
}

#[test]
fn a_delivery_creates_one_task_and_a_replay_creates_nothing() {
    let mut h = H::new();
    let IssueOutcome::Created(t) = h.trigger("d-1", 7) else {
        panic!("no task");
    };
    assert_eq!(h.trigger("d-1", 7), IssueOutcome::Duplicate);
    assert_eq!(
        h.trigger("d-2", 7),
        IssueOutcome::Declined(
            Some(t),
            format!("a task is already active for this issue: {t}")
        )
    );
    // The second trigger is answered on the issue: a note, and the status
    // comment asked for again.
    let task = h.core.task(t).expect("task");
    assert!(
        task.github
            .as_ref()
            .and_then(|g| g.note.as_deref())
            .is_some_and(|n| n.contains("triggered again")),
        "{:?}",
        task.github
    );
    assert!(
        h.core
            .pending_effects(t)
            .iter()
            .any(|e| e.effect == super::outbox::Effect::StatusComment)
    );
    let delivered: Vec<String> = h
        .core
        .take_writes()
        .into_iter()
        .filter_map(|w| match w {
            Write::Delivery { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, ["d-1", "d-2"]);
    // The repository's spelling does not matter.
    assert_eq!(h.core.issue_tasks("o/r", 7), &[t]);
}

#[test]
fn deliveries_older_than_the_window_are_forgotten() {
    let mut h = H::new();
    assert!(matches!(h.trigger("d-1", 1), IssueOutcome::Created(_)));
    h.secs += 3601; // the test config's window is an hour
    assert!(matches!(h.trigger("d-9", 2), IssueOutcome::Created(_)));
    let writes = h.core.take_writes();
    assert!(
        writes.contains(&Write::ForgetDelivery("d-1".into())),
        "{writes:?}"
    );
}

#[test]
fn claude_commands_cancel_retry_and_run_again_with_instructions() {
    let mut h = H::new();
    h.connect("a", Specialty::Backend, 1);
    let IssueOutcome::Created(t) = h.trigger("d-1", 7) else {
        panic!("no task");
    };
    assert_eq!(h.assigned().len(), 1);
    h.msg("a", accepted(t, 1));
    let by = "bob".to_owned();
    assert_eq!(
        h.command("d-2", 7, IssueCommand::Cancel { by: by.clone() }),
        IssueOutcome::Applied(t, "cancel requested".into())
    );
    h.msg(
        "a",
        FromAgent::Finished {
            task: t,
            attempt: Attempt(1),
            report: FinishedReport::new(Outcome::Cancelled, "stopped"),
        },
    );
    assert_eq!(h.state(t), TaskState::Cancelled);
    assert_eq!(
        h.command("d-3", 7, IssueCommand::Retry { by: by.clone() }),
        IssueOutcome::Applied(t, "queued again".into())
    );
    assert_eq!(h.assigned().len(), 1);
    h.msg("a", accepted(t, 2));
    h.msg("a", finished(t, 2, Outcome::Succeeded));
    assert_eq!(
        h.command(
            "d-4",
            7,
            IssueCommand::Run {
                instructions: "Also update the docs.".into(),
                by: by.clone()
            }
        ),
        IssueOutcome::Applied(t, "queued again with the new instructions".into())
    );
    let task = h.core.task(t).expect("task");
    assert!(
        task.spec
            .body
            .ends_with("--- instructions from @bob (a /claude comment) ---\nAlso update the docs."),
        "{}",
        task.spec.body
    );
    let sent = h.sent();
    assert!(
        sent.iter()
            .any(|(_, m)| matches!(m, ToAgent::Assign { task, .. } if *task == t)),
        "{sent:?}"
    );
    // While it runs, another run is declined and a retry is refused.
    assert!(matches!(
        h.command(
            "d-5",
            7,
            IssueCommand::Run {
                instructions: String::new(),
                by: by.clone()
            }
        ),
        IssueOutcome::Declined(Some(_), _)
    ));
    assert!(matches!(
        h.command("d-6", 7, IssueCommand::Retry { by }),
        IssueOutcome::Declined(Some(_), _)
    ));
}

#[test]
fn an_unclear_issue_waits_until_a_claude_comment_runs_it() {
    let mut h = H::new();
    h.connect("a", Specialty::Backend, 1);
    let (now, wall) = h.now();
    let IssueOutcome::Created(t) = h
        .core
        .issue_triggered("d-1", issue_task(9, true), now, wall)
    else {
        panic!("no task");
    };
    assert_eq!(h.state(t), TaskState::NeedsInfo);
    assert!(h.assigned().is_empty());
    assert_eq!(
        h.command(
            "d-2",
            9,
            IssueCommand::Run {
                instructions: "The login page returns 500.".into(),
                by: "bob".into()
            }
        ),
        IssueOutcome::Applied(t, "queued".into())
    );
    assert_eq!(h.assigned().len(), 1);
    // A /claude on an issue without any task starts one.
    let IssueOutcome::Created(new) = h.command(
        "d-3",
        10,
        IssueCommand::Run {
            instructions: String::new(),
            by: "bob".into(),
        },
    ) else {
        panic!("no task");
    };
    assert_ne!(new, t);
}

#[test]
fn the_reconciler_creates_a_task_only_for_an_issue_that_never_had_one() {
    let mut h = H::new();
    let (now, wall) = h.now();
    let IssueOutcome::Created(t) = h.core.issue_found(issue_task(3, false), now, wall) else {
        panic!("no task");
    };
    h.core.cancel(t, "done".into(), now, wall).expect("cancel");
    assert!(matches!(
        h.core.issue_found(issue_task(3, false), now, wall),
        IssueOutcome::Declined(Some(_), _)
    ));
}
