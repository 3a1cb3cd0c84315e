//! The real Claude Code CLI (npm `@anthropic-ai/claude-code`, installed into
//! tests/claude-cli by `make test`) run by the agent exactly as in
//! production, against a local fake of the Messages API on loopback.

use std::path::PathBuf;
use std::time::Duration;

use tests::fake_anthropic::{FakeAnthropic, Scenario};
use tests::{Cluster, git};

const LONG: Duration = Duration::from_secs(90);

fn real_claude() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("claude-cli/node_modules/.bin/claude");
    assert!(
        path.exists(),
        "{} is missing: `make test` installs it (npm ci in tests/claude-cli)",
        path.display()
    );
    path
}

fn attempt(task: &serde_json::Value) -> &serde_json::Value {
    task["attempts"]
        .as_array()
        .and_then(|a| a.last())
        .expect("an attempt")
}

/// Starts an agent of `specialty` whose CLI talks to `api`.
fn agent_for(cluster: &mut Cluster, specialty: &str, api: &FakeAnthropic, extra: &[&str]) {
    let home = cluster.dir.join(format!("home-{specialty}"));
    std::fs::create_dir_all(&home).expect("home");
    let claude = real_claude();
    let mut args = vec![
        "--specialties",
        specialty,
        "--claude",
        claude.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let base_url = api.base_url();
    cluster.start_agent_with_env(
        &format!("pc-{specialty}"),
        &args,
        &[
            ("ANTHROPIC_BASE_URL", base_url.as_str()),
            ("ANTHROPIC_API_KEY", "sk-test-not-a-real-key"),
            ("HOME", home.to_str().expect("utf-8")),
            // Fail fast: the real default retries for minutes.
            ("CLAUDE_CODE_MAX_RETRIES", "0"),
        ],
    );
}

#[test]
fn the_real_cli_edits_the_workspace_and_the_agent_pushes_it_and_failures_have_their_outcomes() {
    let edit = FakeAnthropic::start(Scenario::EditFile {
        path: "greeting.txt".into(),
        content: "hello from the real CLI\n".into(),
    });
    let broken = FakeAnthropic::start(Scenario::Fail(500));
    let endless = FakeAnthropic::start(Scenario::EndlessEdits);
    let limited = FakeAnthropic::start(Scenario::Fail(429));

    let mut cluster = Cluster::new("real-cli").with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    agent_for(&mut cluster, "backend", &edit, &[]);
    agent_for(&mut cluster, "frontend", &broken, &[]);
    agent_for(&mut cluster, "testing", &endless, &["--max-turns", "1"]);
    agent_for(&mut cluster, "devops", &limited, &[]);
    cluster.wait_agents(
        &["pc-backend", "pc-frontend", "pc-testing", "pc-devops"],
        "connected",
    );
    let repo = git::bare_repo(cluster.dir.path(), "svc", &[("README.md", "# svc\n")]);
    let url = repo.display().to_string();

    let ok = cluster.submit_to(
        &url,
        "backend",
        "Add a greeting file",
        "Please add greeting.txt.",
        &["--issue", "21"],
    );
    let api_down = cluster.submit_to(&url, "frontend", "Anything", "", &[]);
    let turns = cluster.submit_to(&url, "testing", "Endless work", "", &["--issue", "22"]);
    let rate = cluster.submit_to(&url, "devops", "Rate limited", "", &[]);

    // Success: the real CLI wrote the file, the agent committed and pushed it.
    let done = cluster.wait_task(&ok, "succeeded", LONG);
    assert_eq!(attempt(&done)["outcome"], "succeeded", "{done}");
    let files =
        git::branch_files(&repo, "ccc/issue-21-add-a-greeting-file").expect("the branch is pushed");
    assert!(files.contains(&"greeting.txt".to_owned()), "{files:?}");
    let requests = edit.requests();
    assert!(
        requests.iter().all(|(key, _)| *key),
        "every request carries the API key"
    );
    assert!(requests.iter().any(|(_, body)| body["stream"] == true));

    // The API failing: the outcome names the API error.
    let failed = cluster.wait_task(&api_down, "failed", LONG);
    let last = attempt(&failed);
    assert_eq!(last["outcome"], "cli_failed", "{failed}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("HTTP 500")),
        "{failed}"
    );

    // The turn limit: the partial change is still pushed, and the outcome says so.
    let stopped = cluster.wait_task(&turns, "failed", LONG);
    let last = attempt(&stopped);
    assert_eq!(last["outcome"], "turn_limit", "{stopped}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("partial work is pushed")),
        "{stopped}"
    );
    let files = git::branch_files(&repo, "ccc/issue-22-endless-work").expect("partial work pushed");
    assert!(files.contains(&"step-1.txt".to_owned()), "{files:?}");

    // A 429: rate limited, requeued without spending an attempt, and the
    // agent gets no new work for a while.
    let queued = tests::eventually(LONG, || {
        let task = cluster.task_json(&rate)?;
        if attempt(&task)["outcome"] == "rate_limited" {
            Ok(task)
        } else {
            Err(format!("{task}"))
        }
    })
    .expect("rate limited");
    assert_eq!(queued["state"], "queued", "{queued}");
    let agents = cluster.agents_json().expect("agents");
    let devops = agents
        .iter()
        .find(|a| a["agent_id"] == "pc-devops")
        .expect("pc-devops");
    assert_eq!(devops["free_slots"], 0, "cooling down: {devops}");
}

#[test]
fn a_refused_api_key_and_a_missing_login_are_the_pcs_fault_not_the_tasks() {
    let refusing = FakeAnthropic::start(Scenario::Fail(401));
    let mut cluster = Cluster::new("real-cli-auth").with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    agent_for(&mut cluster, "backend", &refusing, &[]);
    // The real CLI with no credential at all, in an empty HOME.
    let certs = cluster
        .pki
        .agent_certs("pc-nologin", &cluster.dir.join("pc-nologin-certs"));
    let home = cluster.dir.join("home-nologin");
    std::fs::create_dir_all(&home).expect("home");
    let mut cmd = cluster.agent_command_with(&certs, &real_claude());
    cmd.arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-nologin"))
        .args(["--specialties", "frontend"])
        .env("HOME", &home)
        .env("ANTHROPIC_BASE_URL", refusing.base_url())
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env_remove("CLAUDE_CONFIG_DIR");
    let nologin = tests::Process::spawn(
        "agent pc-nologin",
        cmd,
        cluster.dir.join("agent-pc-nologin.log"),
    );
    cluster.wait_agents(&["pc-backend", "pc-nologin"], "connected");
    // `claude auth status` at start: not logged in, so unhealthy from the
    // first Hello on.
    let line = nologin.wait_for_log("this PC cannot work", LONG);
    assert!(line.contains("not logged in"), "{line}");

    // The API refuses the key: the PC's fault, the task keeps its attempt.
    let repo = git::bare_repo(cluster.dir.path(), "svc", &[("README.md", "# svc\n")]);
    let id = cluster.submit_to(&repo.display().to_string(), "backend", "Anything", "", &[]);
    let fault = tests::eventually(LONG, || {
        let task = cluster.task_json(&id)?;
        task["attempts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["outcome"] == "agent_fault").cloned())
            .ok_or_else(|| format!("{task}"))
    })
    .expect("an agent fault");
    let message = fault["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("HTTP 401") && message.contains("Invalid API key"),
        "{message}"
    );
    assert_ne!(
        cluster.task_json(&id).expect("task")["state"],
        "failed",
        "one attempt allowed, none spent"
    );
    let line = cluster.agents[0].wait_for_log("this PC cannot work", LONG);
    assert!(line.contains("Invalid API key"), "{line}");
    cluster.ccc_ok(&["cancel", &id]);
}
