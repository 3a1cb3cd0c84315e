//! The agent's work on real bare repositories: mirror, clone, branch, the
//! CLI (the `fake-claude` stand-in), tests, commit, push, and every outcome.

use std::time::Duration;

use tests::cluster::READY;
use tests::{Cluster, eventually, git};

const LONG: Duration = Duration::from_secs(60);

fn attempt(task: &serde_json::Value) -> &serde_json::Value {
    task["attempts"]
        .as_array()
        .and_then(|a| a.last())
        .expect("an attempt")
}

/// The agent's attempt directories of task `id` that are still on disk.
fn workspaces_of(cluster: &Cluster, agent: &str, id: &str) -> Vec<String> {
    let work = cluster.dir.join(format!("agent-{agent}")).join("work");
    std::fs::read_dir(work)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("{id}-a")))
                .collect()
        })
        .unwrap_or_default()
}

fn one_try_cluster(name: &str, agent_args: &[&str]) -> Cluster {
    let mut cluster = Cluster::new(name).with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    let mut args = vec!["--specialties", "backend", "--capacity", "4"];
    args.extend_from_slice(agent_args);
    cluster.start_agent("pc-1", &args);
    cluster.wait_agents(&["pc-1"], "connected");
    cluster
}

#[test]
fn the_change_arrives_on_its_branch_and_the_mirror_is_reused() {
    let cluster = one_try_cluster("push", &[]);
    let repo = git::bare_repo(cluster.dir.path(), "app", &[("README.md", "# app\n")]);
    let url = repo.display().to_string();
    let first = cluster.submit_to(
        &url,
        "backend",
        "Add a greeting",
        "FAKE: write=hello.txt",
        &["--issue", "7"],
    );
    let done = cluster.wait_task(&first, "succeeded", LONG);
    let branch = "ccc/issue-7-add-a-greeting";
    assert_eq!(
        git::branch_files(&repo, branch),
        Some(vec!["README.md".to_owned(), "hello.txt".to_owned()]),
        "{done}"
    );
    let message = git::tip_message(&repo, branch);
    assert!(message.starts_with("Add a greeting (#7)"), "{message}");
    assert_eq!(
        workspaces_of(&cluster, "pc-1", &first),
        Vec::<String>::new(),
        "a succeeded attempt's workspace is removed"
    );

    let second = cluster.submit_to(
        &url,
        "backend",
        "Add another",
        "FAKE: write=more.txt",
        &["--issue", "8"],
    );
    cluster.wait_task(&second, "succeeded", LONG);
    let logs = cluster.ccc_ok(&["logs", &second]);
    assert!(logs.contains("(mirror reused)"), "{logs}");
    assert!(
        git::branch_files(&repo, "ccc/issue-8-add-another")
            .is_some_and(|f| f.contains(&"more.txt".to_owned()))
    );

    // A CLI that points the workspace's pushes elsewhere does not move
    // the push (nor the credential that goes with it).
    let elsewhere = git::bare_repo(cluster.dir.path(), "elsewhere", &[("x.txt", "x\n")]);
    let hijack = cluster.submit_to(
        &url,
        "backend",
        "Hijack the push",
        &format!("FAKE: write=h.txt hijack_push={}", elsewhere.display()),
        &["--issue", "10"],
    );
    let done = cluster.wait_task(&hijack, "succeeded", LONG);
    assert!(
        git::branch_files(&repo, "ccc/issue-10-hijack-the-push")
            .is_some_and(|f| f.contains(&"h.txt".to_owned())),
        "{done}"
    );
    assert_eq!(
        git::branch_files(&elsewhere, "ccc/issue-10-hijack-the-push"),
        None
    );

    // An issue body larger than one argument may be (128 KiB on Linux)
    // reaches the CLI whole: the prompt goes on its stdin.
    let body_file = cluster.dir.join("long-body.md");
    let long_body = format!("FAKE: write=long.txt\n{}", "長い説明。".repeat(12_000));
    std::fs::write(&body_file, &long_body).expect("write the body");
    let body_path = body_file.display().to_string();
    let third = cluster.submit_to(
        &url,
        "backend",
        "A long story",
        "",
        &["--issue", "9", "--body-file", &body_path],
    );
    let done = cluster.wait_task(&third, "succeeded", LONG);
    assert!(
        git::branch_files(&repo, "ccc/issue-9-a-long-story")
            .is_some_and(|f| f.contains(&"long.txt".to_owned())),
        "{done}"
    );
}

#[test]
fn each_way_an_attempt_can_end_has_its_own_outcome() {
    let cluster = one_try_cluster("outcomes", &["--git-network-timeout", "5s"]);
    let repo = git::bare_repo(cluster.dir.path(), "lib", &[("lib.txt", "v1\n")]);
    let url = repo.display().to_string();
    let guarded = git::bare_repo(
        cluster.dir.path(),
        "guarded",
        &[(".ccc/test", "echo base tests ran\n")],
    );
    let frozen = git::bare_repo(cluster.dir.path(), "frozen", &[("x.txt", "x\n")]);
    git::reject_pushes(&frozen);
    // Served over git://, so the remote's pre-receive hook really runs.
    let daemon = git::Daemon::start(cluster.dir.path());
    let stalled = git::SilentServer::start();

    let cases: Vec<(String, &str, &str)> = vec![
        (
            cluster.submit_to(&url, "backend", "nothing to do", "FAKE: lines=1", &[]),
            "failed",
            "no_changes",
        ),
        (
            cluster.submit_to(&url, "backend", "crash", "FAKE: exit=3 result=none", &[]),
            "failed",
            "cli_failed",
        ),
        (
            cluster.submit_to(
                &url,
                "backend",
                "red tests",
                "FAKE: write=a.txt",
                &["--test-command", "echo 3 failed; exit 1"],
            ),
            "succeeded",
            "tests_failed",
        ),
        (
            cluster.submit_to(
                &daemon.url("frozen.git"),
                "backend",
                "frozen remote",
                "FAKE: write=b.txt",
                &[],
            ),
            "failed",
            "push_rejected",
        ),
        (
            cluster.submit_to(
                &url,
                "backend",
                "too many turns",
                "FAKE: write=partial.txt exit=1 result=error_max_turns",
                &[],
            ),
            "failed",
            "turn_limit",
        ),
        (
            // A git server that never answers: the fetch gives up.
            cluster.submit_to(
                &stalled.url("stalled.git"),
                "backend",
                "stalled remote",
                "FAKE: write=c.txt",
                &[],
            ),
            "failed",
            "workspace_error",
        ),
        (
            // The CLI rewrites the repository's test command; the one at
            // the base still runs.
            cluster.submit_to(
                &guarded.display().to_string(),
                "backend",
                "rewrite the tests",
                "FAKE: write=.ccc/test",
                &[],
            ),
            "succeeded",
            "succeeded",
        ),
    ];
    for (id, state, outcome) in &cases {
        let task = cluster.wait_task(id, state, LONG);
        assert_eq!(attempt(&task)["outcome"], *outcome, "{task}");
    }
    // Red tests and a turn limit still push what was done.
    let red = cluster.task_json(&cases[2].0).expect("task");
    assert!(
        attempt(&red)["message"]
            .as_str()
            .is_some_and(|m| m.contains("tests failed")),
        "{red}"
    );
    let turns = cluster.task_json(&cases[4].0).expect("task");
    let branch = turns["branch"].as_str().expect("branch");
    assert!(
        git::branch_files(&repo, branch).is_some_and(|f| f.contains(&"partial.txt".to_owned()))
    );
    assert!(git::tip_message(&repo, branch).contains("INCOMPLETE"));
    assert_eq!(
        workspaces_of(&cluster, "pc-1", &cases[1].0),
        vec![format!("{}-a1", cases[1].0)],
        "a failed attempt's workspace is kept to look at"
    );
    let guarded_logs = cluster.ccc_ok(&["logs", &cases[6].0]);
    assert!(
        guarded_logs.contains("running the tests: echo base tests ran"),
        "{guarded_logs}"
    );
    let rejected = cluster.task_json(&cases[3].0).expect("task");
    assert!(
        attempt(&rejected)["message"]
            .as_str()
            .is_some_and(|m| m.contains("pushes are frozen")),
        "{rejected}"
    );
}

#[test]
fn non_utf8_and_fifty_megabytes_of_output_arrive_intact() {
    let cluster = one_try_cluster("big-output", &[]);
    let repo = git::bare_repo(cluster.dir.path(), "big", &[("a", "a\n")]);
    let id = cluster.submit_to(
        &repo.display().to_string(),
        "backend",
        "loud",
        "FAKE: binary=1 bulk_kb=51200 write=out.txt",
        &[],
    );
    cluster.wait_task(&id, "succeeded", Duration::from_secs(180));
    let out = std::process::Command::new(tests::bin("ccc"))
        .arg("--coordinator")
        .arg(cluster.url())
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .args(["logs", "--raw", &id])
        .output()
        .expect("ccc logs");
    assert!(out.status.success());
    let needle = b"binary:\xff\xfe caf\xe9 \x00\x01 end\n";
    assert!(
        out.stdout.windows(needle.len()).any(|w| w == needle),
        "raw bytes kept"
    );
    let bulk_lines = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| l.len() == 1023 && l.iter().all(|&b| b == b'x'))
        .count();
    assert_eq!(bulk_lines, 51_200, "every line of 50 MiB, once");
}

/// The pid of the grandchild `fake-claude` reports, from a task's output.
fn grandchild_pid(cluster: &Cluster, id: &str) -> u32 {
    eventually(READY, || {
        let logs = cluster.ccc_ok(&["logs", "--raw", id]);
        logs.split("\"subtype\":\"grandchild\"")
            .next()
            .and_then(|before| before.rsplit("\"pid\":").next())
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|pid| pid.trim().parse().ok())
            .or_else(|| {
                logs.split("\"pid\":")
                    .nth(1)
                    .and_then(|rest| rest.split([',', '}']).next())
                    .and_then(|pid| pid.trim().parse().ok())
            })
            .ok_or_else(|| "no grandchild yet".to_owned())
    })
    .expect("the CLI started its grandchild")
}

fn gone(pid: u32) -> Result<(), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    match stat {
        Err(_) => Ok(()),
        Ok(s) if s.contains(") Z ") => Ok(()),
        Ok(_) => Err(format!("process {pid} still runs")),
    }
}

#[test]
fn cancel_and_the_deadline_stop_the_whole_process_group() {
    // The cancel runs on pc-1, which has no short deadline (a slow machine
    // must not reach it first); the deadline on pc-2.
    let mut cluster = one_try_cluster("kill-group", &[]);
    cluster.start_agent(
        "pc-2",
        &["--specialties", "devops", "--claude-timeout", "3s"],
    );
    cluster.wait_agents(&["pc-1", "pc-2"], "connected");
    let repo = git::bare_repo(cluster.dir.path(), "g", &[("a", "a\n")]);
    let url = repo.display().to_string();

    let cancelled = cluster.submit_to(&url, "backend", "hangs", "FAKE: grandchild=1 hang=1", &[]);
    cluster.wait_task(&cancelled, "running", READY);
    let pid = grandchild_pid(&cluster, &cancelled);
    assert!(gone(pid).is_err(), "the grandchild runs");
    cluster.ccc_ok(&["cancel", &cancelled]);
    cluster.wait_task(&cancelled, "cancelled", READY);
    eventually(READY, || gone(pid)).expect("cancel stops the grandchild too");

    let late = cluster.submit_to(
        &url,
        "devops",
        "too slow",
        "FAKE: grandchild=1 write=half.txt hang=1",
        &[],
    );
    let task = cluster.wait_task(&late, "failed", LONG);
    assert_eq!(attempt(&task)["outcome"], "timed_out", "{task}");
    let pid = grandchild_pid(&cluster, &late);
    eventually(READY, || gone(pid)).expect("the deadline stops the grandchild too");
    // What it did before the deadline is pushed.
    let branch = task["branch"].as_str().expect("branch");
    assert!(git::branch_files(&repo, branch).is_some_and(|f| f.contains(&"half.txt".to_owned())));
}

#[test]
fn a_follow_up_continues_the_existing_branch() {
    let cluster = one_try_cluster("follow-up", &[]);
    let repo = git::bare_repo(cluster.dir.path(), "f", &[("a", "a\n")]);
    let url = repo.display().to_string();
    let first = cluster.submit_to(
        &url,
        "backend",
        "first pass",
        "FAKE: write=one.txt",
        &["--issue", "3"],
    );
    cluster.wait_task(&first, "succeeded", LONG);
    let branch = "ccc/issue-3-first-pass";
    let next = cluster.submit_to(
        &url,
        "backend",
        "first pass",
        "FAKE: write=two.txt",
        &["--issue", "3", "--follow-up-branch", branch],
    );
    cluster.wait_task(&next, "succeeded", LONG);
    let files = git::branch_files(&repo, branch).expect("branch");
    assert!(
        files.contains(&"one.txt".to_owned()) && files.contains(&"two.txt".to_owned()),
        "{files:?}"
    );
    // A follow-up's workspace (kept here: the CLI fails) also has the base
    // branch, to compare the work against.
    let failing = cluster.submit_to(
        &url,
        "backend",
        "first pass",
        "FAKE: exit=3 result=none",
        &["--issue", "3", "--follow-up-branch", branch],
    );
    cluster.wait_task(&failing, "failed", LONG);
    let workspace = cluster
        .dir
        .join("agent-pc-1")
        .join("work")
        .join(format!("{failing}-a1"));
    assert_eq!(
        git::branch_files(&workspace, "origin/main"),
        Some(vec!["a".to_owned()])
    );
}
