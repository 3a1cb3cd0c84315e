//! `--log-format json`: every line the coordinator and an agent write is a
//! JSON object, and every line about a task carries its task id and
//! attempt (as an event field or a field of an enclosing span).

use std::time::Duration;

use serde_json::{Map, Value};
use tests::Cluster;

const LONG: Duration = Duration::from_secs(60);

/// An event's own fields and those of every span it is in.
fn fields_of(line: &Value) -> Map<String, Value> {
    let mut all = Map::new();
    for span in line["spans"].as_array().into_iter().flatten() {
        if let Some(fields) = span.as_object() {
            all.extend(fields.clone());
        }
    }
    if let Some(fields) = line["fields"].as_object() {
        all.extend(fields.clone());
    }
    all
}

/// `(task_id, attempt, message)` of a line about a task.
type TaskLine = (String, u64, String);

/// Checks one process's log; returns the `(task_id, attempt, message)` of
/// its lines about tasks.
fn check_log(who: &str, text: &str) -> Vec<TaskLine> {
    let task_word = regex_lite_task_id();
    let mut about_tasks = Vec::new();
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        let line: Value = serde_json::from_str(raw)
            .unwrap_or_else(|e| panic!("{who}: a log line that is not JSON ({e}): {raw}"));
        let fields = fields_of(&line);
        let message = fields
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(task) = fields.get("task_id") else {
            // A line that names a task in words must carry it as a field.
            assert!(
                !task_word(&message),
                "{who}: a line names a task without a task_id field: {raw}"
            );
            continue;
        };
        let attempt = fields
            .get("attempt")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{who}: a line about a task without its attempt: {raw}"));
        about_tasks.push((
            task.as_str().unwrap_or_default().to_owned(),
            attempt,
            message,
        ));
    }
    about_tasks
}

/// Whether a text names a task id (`t-<digits>`).
fn regex_lite_task_id() -> impl Fn(&str) -> bool {
    |text: &str| {
        text.match_indices("t-").any(|(at, _)| {
            let before_ok = at == 0 || !text.as_bytes()[at - 1].is_ascii_alphanumeric();
            let digits = text[at + 2..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            before_ok && digits > 0
        })
    }
}

/// Asserts that `log` has a line `message` about `task` naming `attempt`,
/// for each pair of `expected`.
fn expect_lines(log: &[TaskLine], who: &str, task: &str, expected: &[(&str, u64)]) {
    for (message, attempt) in expected {
        assert!(
            log.iter()
                .any(|(t, a, m)| t == task && a == attempt && m == message),
            "{who}: no {message:?} line for {task} attempt {attempt}: {log:?}"
        );
    }
}

#[test]
fn json_logs_carry_the_task_id_and_attempt_on_every_task_line() {
    let mut cluster = Cluster::new("json-logs").with_coordinator_args(&[
        "--log-format",
        "json",
        "--max-attempts",
        "1",
    ]);
    cluster.start_coordinator();
    cluster.start_agent(
        "pc-json",
        &["--log-format", "json", "--specialties", "backend"],
    );
    cluster.wait_agents(&["pc-json"], "connected");

    let done = cluster.submit("backend", "A task that ends", "FAKE: lines=3 write=DONE.md");
    cluster.wait_task(&done, "succeeded", LONG);
    // A second attempt: a failure (one attempt allowed) retried by an admin.
    let failed = cluster.submit("backend", "A task that fails", "FAKE: lines=1 exit=1");
    cluster.wait_task(&failed, "failed", LONG);
    cluster.ccc_ok(&["retry", &failed]);
    cluster.wait_task(&failed, "failed", LONG);

    let coordinator = check_log("coordinator", &cluster.coordinator().log_text());
    let agent = check_log("agent", &cluster.agents[0].log_text());
    expect_lines(
        &coordinator,
        "coordinator",
        &done,
        &[
            ("task submitted", 0),
            ("task assigned", 1),
            ("attempt finished", 1),
        ],
    );
    expect_lines(
        &agent,
        "agent",
        &done,
        &[
            ("task accepted", 1),
            ("mirror updated", 1),
            ("attempt over", 1),
        ],
    );
    // The retried task's later lines name its later attempt.
    assert!(
        coordinator
            .iter()
            .any(|(t, a, m)| t == &failed && *a >= 2 && m == "task assigned"),
        "no assignment of a later attempt of {failed}: {coordinator:?}"
    );
    assert!(
        agent.iter().any(|(t, a, _)| t == &failed && *a >= 2),
        "the agent's lines never name a later attempt of {failed}: {agent:?}"
    );
}
