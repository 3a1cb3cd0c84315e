//! The agent's own health and robustness, through the real binaries: the
//! CLI resolved and checked at start, failures that are the PC's fault
//! (which cost no attempt), processes a killed agent left behind, a clean
//! stop that hands tasks back, permanent failures with true messages, SSH
//! remotes through a real sshd, the `ccc-agent` command line itself, and
//! what the coordinator is told (a stand-in that refuses the agent or
//! records its Hello and heartbeats).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proto::{AgentMessage, CoordinatorMessage, agent_gateway_server};
use tests::cluster::READY;
use tests::{Cluster, Process, bin, eventually, git};

const LONG: Duration = Duration::from_secs(60);

fn attempts(task: &serde_json::Value) -> Vec<serde_json::Value> {
    task["attempts"].as_array().cloned().unwrap_or_default()
}

fn outcomes(task: &serde_json::Value) -> Vec<String> {
    attempts(task)
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A copy of `fake-claude` at `path`, with `mode`.
fn cli_copy(path: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::copy(bin("fake-claude"), path).expect("copy fake-claude");
    chmod(path, mode);
    path.to_owned()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Runs `cmd` until it exits (at most `READY`): status and stderr.
fn run_to_exit(cluster: &Cluster, name: &str, cmd: Command) -> (std::process::ExitStatus, String) {
    let mut process = Process::spawn(name, cmd, cluster.dir.join(format!("{name}.log")));
    let status = process
        .wait_exit(READY)
        .unwrap_or_else(|| panic!("{name} did not exit:\n{}", process.log_text()));
    (status, process.log_text())
}

fn agent_certs(cluster: &Cluster, name: &str) -> PathBuf {
    cluster
        .pki
        .agent_certs(name, &cluster.dir.join(format!("agent-{name}-certs")))
}

#[test]
fn the_cli_is_resolved_at_start_checked_and_advertised() {
    let mut cluster = Cluster::new("cli-check");
    cluster.start_coordinator();
    let repo = git::bare_repo(cluster.dir.path(), "r", &[("a", "a\n")]);
    let certs = agent_certs(&cluster, "pc-rel");

    // A relative path with a slash: from where the agent was started, not
    // from the attempt's workspace.
    let start_dir = cluster.dir.join("start");
    cli_copy(&start_dir.join("tools").join("claude"), 0o755);
    let mut cmd = cluster.agent_command_with(&certs, Path::new("tools/claude"));
    cmd.current_dir(&start_dir)
        .arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-rel"))
        .args(["--specialties", "backend"]);
    let agent = Process::spawn("agent pc-rel", cmd, cluster.dir.join("agent-pc-rel.log"));
    let agents = cluster.wait_agents(&["pc-rel"], "connected");
    let tools = agents[0]["toolchains"].as_array().expect("toolchains");
    // The version the CLI itself reports ("2.1.332 (Claude Code)").
    let version = Command::new(start_dir.join("tools").join("claude"))
        .arg("--version")
        .output()
        .expect("claude --version");
    let version = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .next()
        .expect("a version")
        .to_owned();
    assert!(
        tools
            .iter()
            .any(|t| t["name"] == "claude" && t["version"] == version.as_str()),
        "the checked CLI {version} is advertised: {tools:?}"
    );
    let line = agent.wait_for_log("Claude Code CLI found", READY);
    assert!(
        line.contains(&start_dir.join("tools/claude").display().to_string()),
        "{line}"
    );
    let id = cluster.submit_to(
        &repo.display().to_string(),
        "backend",
        "relative CLI",
        "FAKE: write=b.txt",
        &[],
    );
    let done = cluster.wait_task(&id, "succeeded", LONG);
    assert_eq!(outcomes(&done), vec!["succeeded"], "{done}");

    // Missing, not executable, broken, not on PATH: clear errors at start.
    let missing = cluster.dir.join("nowhere").join("claude");
    let not_executable = cli_copy(&cluster.dir.join("noexec").join("claude"), 0o644);
    let broken = cluster.dir.join("broken-claude");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'claude: cannot load its modules' >&2\nexit 1\n",
    )
    .expect("write");
    chmod(&broken, 0o755);
    let cases: [(&Path, &[&str]); 4] = [
        (&missing, &["does not exist"]),
        (&not_executable, &["not an executable file"]),
        (&broken, &["does not run", "cannot load its modules"]),
        (Path::new("no-such-claude-cli"), &["is not on PATH"]),
    ];
    for (idx, (cli, words)) in cases.iter().enumerate() {
        let mut cmd = cluster.agent_command_with(&certs, cli);
        cmd.arg("--data-dir")
            .arg(cluster.dir.join(format!("bad-{idx}")));
        let (status, log) = run_to_exit(&cluster, &format!("bad-cli-{idx}"), cmd);
        assert!(!status.success(), "{log}");
        assert!(
            log.contains(&cli.display().to_string()),
            "the path is named: {log}"
        );
        for word in *words {
            assert!(log.contains(word), "{word:?} in {log}");
        }
    }
}

#[test]
fn a_cli_that_breaks_or_logs_out_costs_no_attempt_and_the_agent_heals() {
    let mut cluster = Cluster::new("cli-heal").with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    let repo = git::bare_repo(cluster.dir.path(), "r", &[("a", "a\n")]);
    let url = repo.display().to_string();
    let cli = cli_copy(&cluster.dir.join("cli").join("claude"), 0o755);
    let logged_out = cluster.dir.join("logged-out");
    std::fs::write(&logged_out, "").expect("flag");
    let flag = logged_out.display().to_string();
    let idx = cluster.start_agent_with_env(
        "pc-heal",
        &[
            "--specialties",
            "backend",
            "--claude",
            cli.to_str().expect("utf-8"),
            "--health-check-interval",
            "1s",
        ],
        &[("FAKE_CLAUDE_LOGGED_OUT", flag.as_str())],
    );
    // Not logged in at start: the agent connects, unhealthy, and says why.
    cluster.wait_agents(&["pc-heal"], "connected");
    let line = cluster.agents[idx].wait_for_log("this PC cannot work", READY);
    assert!(line.contains("not logged in"), "{line}");

    // An attempt that meets the logged-out CLI ends as the PC's fault.
    let first = cluster.submit_to(&url, "backend", "logged out", "FAKE: write=one.txt", &[]);
    // Logging in again: the next check passes and the work gets done, with
    // one attempt allowed, so the faults did not count.
    // A coordinator that knows the agent is unhealthy holds the task back;
    // one that assigns it anyway sees the attempt end as the PC's fault.
    let faulted = eventually(LONG, || {
        let task = cluster.task_json(&first)?;
        let agents = cluster.agents_json()?;
        let held_back = agents
            .iter()
            .any(|a| a["agent_id"] == "pc-heal" && a.to_string().contains("not logged in"));
        if outcomes(&task).iter().any(|o| o == "agent_fault") || held_back {
            Ok(task)
        } else {
            Err(format!("{task}"))
        }
    })
    .expect("the PC's fault is seen");
    std::fs::remove_file(&logged_out).expect("log in");
    cluster.agents[idx].wait_for_log("the health check passed", READY);
    let done = cluster.wait_task(&first, "succeeded", LONG);
    assert_ne!(done["state"], "failed");
    if let Some(fault) = attempts(&faulted)
        .iter()
        .find(|a| a["outcome"] == "agent_fault")
    {
        assert!(
            fault["message"]
                .as_str()
                .is_some_and(|m| m.contains("not logged in")),
            "{fault}"
        );
    }

    // The CLI loses its executable bit: the attempt cannot start it.
    chmod(&cli, 0o644);
    let second = cluster.submit_to(&url, "backend", "broken CLI", "FAKE: write=two.txt", &[]);
    let task = eventually(LONG, || {
        let task = cluster.task_json(&second)?;
        attempts(&task)
            .iter()
            .find(|a| a["outcome"] == "agent_fault")
            .cloned()
            .ok_or_else(|| format!("{task}"))
    })
    .expect("an agent fault");
    assert!(
        task["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot start the CLI") && m.contains("claude")),
        "{task}"
    );
    let line = cluster.agents[idx].wait_for_log("cannot start the CLI", READY);
    assert!(line.contains("this PC cannot work"), "{line}");
    assert_ne!(
        cluster.task_json(&second).expect("task")["state"],
        "failed",
        "no attempt was spent"
    );
    chmod(&cli, 0o755);
    let done = cluster.wait_task(&second, "succeeded", LONG);
    assert!(
        outcomes(&done).contains(&"agent_fault".to_owned()),
        "{done}"
    );
    assert_eq!(
        outcomes(&done).last().map(String::as_str),
        Some("succeeded")
    );
}

/// The pid a `fake-claude` run gives in its session id (`fake-<pid>`) and
/// the pid of the grandchild it started, from the task's output.
fn fake_pids(cluster: &Cluster, id: &str) -> (u32, u32) {
    eventually(READY, || {
        let logs = cluster.ccc_ok(&["logs", "--raw", id]);
        let after = |key: &str| {
            logs.split(key)
                .nth(1)
                .and_then(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .find(|s| !s.is_empty())
                })
                .and_then(|pid| pid.parse::<u32>().ok())
        };
        match (after("\"session_id\":\"fake-"), after("\"pid\":")) {
            (Some(leader), Some(grandchild)) => Ok((leader, grandchild)),
            _ => Err(format!("no pids yet in {logs}")),
        }
    })
    .expect("the CLI started its grandchild")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn a_killed_agent_takes_its_cli_along_and_its_restart_ends_the_rest() {
    let mut cluster = Cluster::new("orphans");
    cluster.start_coordinator();
    let idx = cluster.start_agent("pc-orph", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-orph"], "connected");
    let repo = git::bare_repo(cluster.dir.path(), "r", &[("a", "a\n")]);
    // hang=2: the stand-in ignores being orphaned; only a signal ends it.
    let id = cluster.submit_to(
        &repo.display().to_string(),
        "backend",
        "hangs",
        "FAKE: grandchild=1 hang=2",
        &[],
    );
    cluster.wait_task(&id, "running", READY);
    let (leader, grandchild) = fake_pids(&cluster, &id);
    assert!(alive(leader) && alive(grandchild));

    cluster.agents[idx].kill();
    // The parent-death signal ends the CLI...
    eventually(READY, || {
        if alive(leader) {
            Err(format!("the CLI {leader} still runs"))
        } else {
            Ok(())
        }
    })
    .expect("the CLI dies with its agent");
    // ...but not what it started, which the next start of the agent ends.
    assert!(alive(grandchild), "the grandchild outlived the agent");
    let idx = cluster.start_agent("pc-orph", &["--specialties", "backend"]);
    let line = cluster.agents[idx].wait_for_log("earlier run of the agent left running", READY);
    assert!(line.contains(&grandchild.to_string()), "{line}");
    eventually(READY, || {
        if alive(grandchild) {
            Err(format!("{grandchild} still runs"))
        } else {
            Ok(())
        }
    })
    .expect("the restarted agent ends the old group");
    cluster.wait_agents(&["pc-orph"], "connected");
}

#[test]
fn sigterm_hands_running_tasks_back_without_spending_their_attempts() {
    let mut cluster = Cluster::new("clean-stop").with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    let idx = cluster.start_agent("pc-stop", &["--specialties", "backend", "--capacity", "2"]);
    cluster.wait_agents(&["pc-stop"], "connected");
    let repo = git::bare_repo(cluster.dir.path(), "r", &[("a", "a\n")]);
    let url = repo.display().to_string();
    let ids: Vec<String> = (0..2)
        .map(|n| cluster.submit_to(&url, "backend", &format!("long {n}"), "FAKE: hang=1", &[]))
        .collect();
    for id in &ids {
        cluster.wait_task(id, "running", READY);
    }
    let status = cluster.agents[idx]
        .terminate(LONG)
        .expect("the agent stops on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    for id in &ids {
        let task = cluster.wait_task(id, "queued", READY);
        let last = attempts(&task).last().cloned().expect("an attempt");
        // Reported by the agent before its stream closed: not a lease that
        // ran out, nor a task lost with the stream.
        assert_eq!(last["outcome"], "cancelled", "{task}");
        assert!(
            last["message"]
                .as_str()
                .is_some_and(|m| m.contains("handed back")),
            "{task}"
        );
    }
    let log = cluster.agents[idx].log_text();
    let stopped = log.find("agent stopped").expect("logged agent stopped");
    let after = &log[stopped..];
    assert!(
        !after.contains("WARN") && !after.contains("ERROR"),
        "nothing to worry about after the stop: {after}"
    );
    // With one attempt allowed, another agent still gets to do the tasks.
    cluster.start_agent("pc-next", &["--specialties", "backend", "--capacity", "2"]);
    for id in &ids {
        cluster.wait_task(id, "running", LONG);
    }
}

#[test]
fn permanent_failures_say_what_is_wrong() {
    let mut cluster = Cluster::new("permanent");
    cluster.start_coordinator();
    cluster.start_agent("pc-perm", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-perm"], "connected");
    let repo = git::bare_repo(cluster.dir.path(), "r", &[("a", "a\n")]);
    let missing = cluster.dir.join("no-such-repo.git").display().to_string();
    let gone = cluster.submit_to(&missing, "backend", "missing repo", "FAKE: write=a", &[]);
    let no_base = cluster.submit_to(
        &repo.display().to_string(),
        "backend",
        "missing base",
        "FAKE: write=a",
        &["--base", "release-9"],
    );
    let message = |id: &str| {
        eventually(LONG, || {
            let task = cluster.task_json(id)?;
            attempts(&task)
                .first()
                .and_then(|a| {
                    a["message"]
                        .as_str()
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                })
                .ok_or_else(|| format!("{task}"))
        })
        .expect("an attempt ends")
    };
    let text = message(&gone);
    assert!(
        text.contains(&format!("repository {missing} does not exist")),
        "{text}"
    );
    assert!(!text.contains("unsupported URL protocol"), "{text}");
    let text = message(&no_base);
    assert!(
        text.contains(&format!(
            "base branch release-9 does not exist in {}",
            repo.display()
        )),
        "{text}"
    );
    assert!(!text.contains("follow-up"), "{text}");
    // Permanent: failed at once after one attempt, not retried with backoff.
    for id in [&gone, &no_base] {
        let failed = cluster.wait_task(id, "failed", LONG);
        assert_eq!(attempts(&failed).len(), 1, "{failed}");
        assert!(
            failed["state_reason"]
                .as_str()
                .is_some_and(|r| r.contains("permanent: not retried")),
            "{failed}"
        );
    }
}

#[test]
fn a_second_agent_process_with_the_same_certificate_is_refused_and_exits() {
    let mut cluster = Cluster::new("second-process");
    cluster.start_coordinator();
    let first = cluster.start_agent("pc-02", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-02"], "connected");
    let second = cluster.start_agent("pc-02", &["--specialties", "frontend"]);
    let status = cluster.agents[second]
        .wait_exit(READY)
        .expect("the second process exits");
    assert!(!status.success(), "{status:?}");
    let log = cluster.agents[second].log_text();
    assert!(
        log.contains("agent pc-02 is already connected from 127.0.0.1:"),
        "{log}"
    );
    cluster
        .coordinator()
        .wait_for_log("second agent process refused", READY);
    // The first one was never replaced and keeps its specialty.
    let agents = cluster.wait_agents(&["pc-02"], "connected");
    assert_eq!(agents[0]["connections"], 1, "{agents:?}");
    assert_eq!(agents[0]["specialties"], serde_json::json!(["backend"]));
    assert!(cluster.agents[first].is_running());
}

#[test]
fn ssh_remotes_clone_and_push_through_a_real_sshd_and_check_its_host_key() {
    let mut cluster = Cluster::new("ssh").with_coordinator_args(&["--max-attempts", "1"]);
    cluster.start_coordinator();
    let sshd = tests::sshd::Sshd::start(&cluster.dir.join("sshd"));
    let repo = git::bare_repo(cluster.dir.path(), "remote", &[("README.md", "# r\n")]);
    let url = sshd.url(&repo);
    let key = sshd.user_key.display().to_string();
    // A key the server does not know: its host key as a user key.
    let stranger_key = cluster.dir.join("sshd").join("other_host_ed25519");
    let stranger = stranger_key.display().to_string();
    for (name, specialty, known_hosts, key) in [
        ("pc-ssh", "backend", &sshd.known_hosts, &key),
        ("pc-wrong", "devops", &sshd.wrong_known_hosts, &key),
        ("pc-stranger", "frontend", &sshd.known_hosts, &stranger),
    ] {
        let known = known_hosts.display().to_string();
        let mut cmd = cluster.agent_command(&agent_certs(&cluster, name));
        cmd.arg("--data-dir")
            .arg(cluster.dir.join(format!("agent-{name}")))
            .args(["--specialties", specialty, "--git-ssh-key", key])
            .args(["--git-known-hosts", &known])
            // Nothing of the user's own: no ssh-agent, no ~/.ssh.
            .env_remove("SSH_AUTH_SOCK")
            .env("HOME", cluster.dir.join(format!("home-{name}")));
        cluster.agents.push(Process::spawn(
            &format!("agent {name}"),
            cmd,
            cluster.dir.join(format!("agent-{name}.log")),
        ));
    }
    // The key in an ssh-agent instead of a file.
    let ssh_agent = tests::sshd::SshAgent::start(&cluster.dir.join("sshd"), &sshd.user_key);
    let mut cmd = cluster.agent_command(&agent_certs(&cluster, "pc-keyring"));
    cmd.arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-keyring"))
        .args(["--specialties", "testing", "--git-known-hosts"])
        .arg(&sshd.known_hosts)
        .env("SSH_AUTH_SOCK", &ssh_agent.socket)
        .env("HOME", cluster.dir.join("home-pc-keyring"));
    cluster.agents.push(Process::spawn(
        "agent pc-keyring",
        cmd,
        cluster.dir.join("agent-pc-keyring.log"),
    ));
    cluster.wait_agents(
        &["pc-ssh", "pc-wrong", "pc-stranger", "pc-keyring"],
        "connected",
    );
    let id = cluster.submit_to(
        &url,
        "testing",
        "via agent",
        "FAKE: write=k.txt",
        &["--issue", "6"],
    );
    cluster.wait_task(&id, "succeeded", LONG);
    assert!(
        git::branch_files(&repo, "ccc/issue-6-via-agent")
            .is_some_and(|f| f.contains(&"k.txt".to_owned()))
    );

    let id = cluster.submit_to(
        &url,
        "backend",
        "over ssh",
        "FAKE: write=ssh.txt",
        &["--issue", "5"],
    );
    let done = cluster.wait_task(&id, "succeeded", LONG);
    assert_eq!(outcomes(&done), vec!["succeeded"], "{done}");
    let files = git::branch_files(&repo, "ccc/issue-5-over-ssh").expect("pushed over ssh");
    assert!(files.contains(&"ssh.txt".to_owned()), "{files:?}");

    // A server whose key is not the known one: refused, and said so.
    let refused = cluster.submit_to(&url, "devops", "wrong host key", "FAKE: write=x.txt", &[]);
    let task = cluster.wait_task(&refused, "failed", LONG);
    let last = attempts(&task).last().cloned().expect("attempt");
    assert_eq!(last["outcome"], "workspace_error", "{task}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("host key of 127.0.0.1") && message.contains("CHANGED"),
        "{message}"
    );

    // A key the server refuses, a repository that is not there: permanent,
    // and said so.
    let failed_with = |id: &str| {
        let task = cluster.wait_task(id, "failed", LONG);
        let last = attempts(&task).last().cloned().expect("attempt");
        assert_eq!(last["outcome"], "workspace_error", "{task}");
        last["message"].as_str().unwrap_or_default().to_owned()
    };
    let refused = cluster.submit_to(&url, "frontend", "unknown key", "FAKE: write=x.txt", &[]);
    let message = failed_with(&refused);
    assert!(
        message.contains(&format!("{url} refused the credentials")) && message.contains(&stranger),
        "{message}"
    );
    let missing = sshd.url(&cluster.dir.join("missing.git"));
    let absent = cluster.submit_to(&missing, "backend", "no repo", "FAKE: write=x.txt", &[]);
    let message = failed_with(&absent);
    assert!(
        message.contains(&format!("repository {missing} does not exist")),
        "{message}"
    );
}

fn help_text() -> String {
    let out = Command::new(bin("ccc-agent"))
        .arg("--help")
        .output()
        .expect("ccc-agent --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_command_line_explains_itself_and_refuses_settings_that_cannot_work() {
    // Every option: a description, at most one default, CCC_AGENT_ variables.
    let help = help_text();
    // An option's block: its header (indented less than its description),
    // then the lines under it.
    let mut options: Vec<String> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if line.trim_start().starts_with('-') && indent < 8 {
            options.push(format!("{line}\n"));
        } else if let Some(block) = options.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(options.len() > 20, "{help}");
    for option in &options {
        let lines: Vec<&str> = option
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert!(lines.len() >= 2, "no description: {option}");
        assert!(
            option.matches("[default:").count() <= 1,
            "two defaults: {option}"
        );
        if let Some(env) = option.split("[env: ").nth(1) {
            assert!(env.starts_with("CCC_AGENT_"), "{option}");
        }
    }
    for flag in [
        "--health-check-interval",
        "--git-ssh-key",
        "--git-known-hosts",
    ] {
        assert!(help.contains(flag), "{flag}");
    }

    // Output into a closed pipe ends quietly.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(bin("ccc-agent"))
        .arg("--help")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("ccc-agent --help");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Settings that cannot work are refused at start, by name.
    let cluster = Cluster::new("agent-cli");
    let certs = agent_certs(&cluster, "pc-cli");
    for (args, words) in [
        (&["--capacity", "0"][..], "capacity 0"),
        (&["--claude-timeout", "0s"], "claude timeout"),
        (&["--stop-grace", "0s"], "stop_grace"),
        (&["--health-check-interval", "0s"], "health_check_interval"),
        (&["--max-turns", "0"], "max_turns"),
        (&["--max-unacked-output", "1KiB"], "max_unacked_output"),
        (&["--stop-grace", "2s"], "kill_grace"),
        (&["--git-ssh-key", "/nonexistent/id_ed25519"], "ssh_key"),
        (
            &["--git-known-hosts", "/nonexistent/known_hosts"],
            "known_hosts",
        ),
    ] {
        let out = Command::new(bin("ccc-agent"))
            .arg("--certs-dir")
            .arg(&certs)
            .args(args)
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }

    // The same settings in the config file.
    let config = cluster.dir.join("agent.toml");
    for (text, words) in [
        ("health_check_interval = \"0s\"\n", "health_check_interval"),
        ("[git]\nssh_key = \"/nonexistent/key\"\n", "ssh_key"),
    ] {
        std::fs::write(&config, text).expect("config");
        let out = Command::new(bin("ccc-agent"))
            .arg("--certs-dir")
            .arg(&certs)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} accepted");
        assert!(stderr.contains(words), "{text}: {stderr}");
    }

    // An error is said once, in words.
    let file = cluster.dir.join("a-file");
    std::fs::write(&file, "").expect("file");
    let out = Command::new(bin("ccc-agent"))
        .arg("--certs-dir")
        .arg(&certs)
        .arg("--data-dir")
        .arg(file.join("data"))
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot create data dir"), "{stderr}");
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");
    assert!(!stderr.contains("Os {"), "{stderr}");
}

/// A coordinator stand-in on loopback with the cluster's server
/// certificate: it refuses every agent stream with one status, or it
/// welcomes the agent, assigns it `assign` (repository URLs, as tasks t-1,
/// t-2, ...) and records what its Hello, Heartbeats and results say.
#[derive(Clone)]
enum StandIn {
    Refuse {
        code: tonic::Code,
        message: &'static str,
        calls: Arc<AtomicUsize>,
    },
    Record {
        seen: Arc<Mutex<Vec<String>>>,
        assign: Vec<String>,
    },
}

type Outbound = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<CoordinatorMessage, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl agent_gateway_server::AgentGateway for StandIn {
    type ConnectStream = Outbound;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Outbound>, tonic::Status> {
        use common::proto::{agent_message::Msg, coordinator_message};
        let (seen, assign) = match self {
            Self::Refuse {
                code,
                message,
                calls,
            } => {
                calls.fetch_add(1, Ordering::SeqCst);
                return Err(tonic::Status::new(*code, *message));
            }
            Self::Record { seen, assign } => (Arc::clone(seen), assign.clone()),
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let mut answers = Vec::new();
                let said = match msg.msg {
                    Some(Msg::Hello(h)) => {
                        answers.push(coordinator_message::Msg::Welcome(common::proto::Welcome {
                            agent_id: "pc-standin".into(),
                            heartbeat_interval_ms: 200,
                            heartbeat_timeout_ms: 10_000,
                            ..Default::default()
                        }));
                        for (n, repo) in assign.iter().enumerate() {
                            answers.push(coordinator_message::Msg::Assign(common::proto::Assign {
                                task: Some(common::proto::TaskSpec {
                                    task_id: format!("t-{}", n + 1),
                                    repo_url: repo.clone(),
                                    title: "stand-in task".into(),
                                    body: "FAKE: write=x.txt".into(),
                                    branch: format!("ccc/t-{}", n + 1),
                                    ..Default::default()
                                }),
                                attempt: 1,
                                deadline_unix_ms: common::time::UnixMillis::now().0 + 600_000,
                                credential: None,
                            }));
                        }
                        format!("hello:{}", h.unhealthy_reason)
                    }
                    Some(Msg::Heartbeat(h)) => {
                        answers.push(coordinator_message::Msg::Heartbeat(Default::default()));
                        format!("heartbeat:{}", h.unhealthy_reason)
                    }
                    Some(Msg::TaskFinished(f)) => {
                        answers.push(coordinator_message::Msg::FinishedAck(
                            common::proto::FinishedAck {
                                task_id: f.task_id.clone(),
                                attempt: f.attempt,
                            },
                        ));
                        format!(
                            "finished:{}:permanent={}:{}",
                            f.task_id, f.permanent, f.message
                        )
                    }
                    _ => continue,
                };
                if let Ok(mut seen) = seen.lock() {
                    seen.push(said);
                }
                for answer in answers {
                    let reply = CoordinatorMessage { msg: Some(answer) };
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl StandIn {
    /// Serves on loopback with the cluster's server certificate; agents of
    /// `cluster` dial it from now on.
    fn serve(self, cluster: &mut Cluster) -> tokio::runtime::Runtime {
        common::tls::install_crypto_provider();
        let tls = common::tls::TlsPaths::for_server(&cluster.pki.dir, None, None, None)
            .load()
            .expect("server cert");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        cluster.agent_target = Some(listener.local_addr().expect("addr"));
        let server = tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(
                        &tls.cert_pem,
                        &tls.key_pem,
                    ))
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.ca_pem)),
            )
            .expect("tls")
            .add_service(agent_gateway_server::AgentGatewayServer::new(self))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        runtime.spawn(server);
        runtime
    }
}

#[test]
fn hello_and_every_heartbeat_say_why_the_pc_cannot_work_until_it_can() {
    let mut cluster = Cluster::new("health-wire");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _server = StandIn::Record {
        seen: Arc::clone(&seen),
        assign: Vec::new(),
    }
    .serve(&mut cluster);
    let logged_out = cluster.dir.join("logged-out");
    std::fs::write(&logged_out, "").expect("flag");
    let mut cmd = cluster.agent_command(&agent_certs(&cluster, "pc-wire"));
    cmd.arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-wire"))
        .args(["--health-check-interval", "1s"])
        .env("FAKE_CLAUDE_LOGGED_OUT", &logged_out);
    let _agent = Process::spawn("agent pc-wire", cmd, cluster.dir.join("agent-pc-wire.log"));
    let said = || seen.lock().map(|s| s.clone()).unwrap_or_default();
    eventually(READY, || {
        let said = said();
        let beats = said
            .iter()
            .filter(|s| s.starts_with("heartbeat:") && s.contains("not logged in"))
            .count();
        if said
            .first()
            .is_some_and(|h| h.starts_with("hello:") && h.contains("not logged in"))
            && beats >= 2
        {
            Ok(())
        } else {
            Err(format!("{said:?}"))
        }
    })
    .expect("Hello and heartbeats carry the reason");
    std::fs::remove_file(&logged_out).expect("log in");
    eventually(READY, || {
        let said = said();
        match said.last() {
            Some(last) if last == "heartbeat:" => Ok(()),
            _ => Err(format!("{said:?}")),
        }
    })
    .expect("a heartbeat says the PC is healthy again");
}

#[test]
fn a_second_instance_and_a_revoked_certificate_stop_the_agent_for_good() {
    for (code, message) in [
        (
            tonic::Code::AlreadyExists,
            "agent pc-dup is already connected from 127.0.0.1 since 11:02:03",
        ),
        (tonic::Code::PermissionDenied, "agent pc-dup is revoked"),
    ] {
        let mut cluster = Cluster::new("refused");
        let calls = Arc::new(AtomicUsize::new(0));
        let _server = StandIn::Refuse {
            code,
            message,
            calls: Arc::clone(&calls),
        }
        .serve(&mut cluster);
        let mut cmd = cluster.agent_command(&agent_certs(&cluster, "pc-dup"));
        cmd.arg("--data-dir").arg(cluster.dir.join("agent-pc-dup"));
        let (status, log) = run_to_exit(&cluster, "agent-pc-dup", cmd);
        assert!(!status.success(), "{log}");
        let refusal = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("refuses this agent"))
            .unwrap_or_else(|| panic!("no error logged: {log}"));
        assert!(refusal.contains(message), "{refusal}");
        assert!(
            log.lines().last().is_some_and(|l| l.contains(message)),
            "the exit says why: {log}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no reconnect after {code:?}: {log}"
        );
    }
}

#[test]
fn a_permanent_failure_is_reported_permanent_and_a_network_failure_is_not() {
    let mut cluster = Cluster::new("permanent-wire");
    let missing = cluster.dir.join("no-such-repo.git").display().to_string();
    // Nothing listens there: refused connections, worth another attempt.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a port");
    let closed = format!("git://127.0.0.1:{port}/r.git");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _server = StandIn::Record {
        seen: Arc::clone(&seen),
        assign: vec![missing.clone(), closed],
    }
    .serve(&mut cluster);
    let mut cmd = cluster.agent_command(&agent_certs(&cluster, "pc-wire"));
    cmd.arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-wire"))
        .args(["--capacity", "2"]);
    let _agent = Process::spawn("agent pc-wire", cmd, cluster.dir.join("agent-pc-wire.log"));
    let finished = eventually(LONG, || {
        let said = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let finished: Vec<String> = said
            .into_iter()
            .filter(|s| s.starts_with("finished:"))
            .collect();
        if finished.len() >= 2 {
            Ok(finished)
        } else {
            Err(format!("{finished:?}"))
        }
    })
    .expect("both results arrive");
    let of = |task: &str| {
        finished
            .iter()
            .find(|f| f.starts_with(&format!("finished:{task}:")))
            .cloned()
            .unwrap_or_default()
    };
    let gone = of("t-1");
    assert!(
        gone.contains("permanent=true")
            && gone.contains(&format!("repository {missing} does not exist")),
        "{gone}"
    );
    let refused = of("t-2");
    assert!(refused.contains("permanent=false"), "{refused}");
}
