//! The operator's side through the real binaries: `ccc` and
//! `ccc-coordinator` as an admin meets them (errors, pipes, listings, exit
//! codes, letting agents and admins back in, help, settings).

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tests::cluster::READY;
use tests::{Cluster, Process, TestDir, bin, eventually};

const LONG: Duration = Duration::from_secs(60);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of a `key: value` row of a detail view.
fn row<'a>(detail: &'a str, key: &str) -> &'a str {
    detail
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map_or("", str::trim)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ccc logs -f <id>` against the cluster, its output in a log file.
fn follow(cluster: &Cluster, id: &str, name: &str) -> Process {
    let mut cmd = Command::new(bin("ccc"));
    cmd.arg("--coordinator")
        .arg(cluster.url())
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .args(["logs", "-f", id]);
    Process::spawn(name, cmd, cluster.dir.join(format!("{name}.out")))
}

#[test]
fn errors_are_printed_once_in_words_and_a_bare_address_means_https() {
    let dir = TestDir::new("errors-once");
    let out = Command::new(bin("ccc"))
        .args(["--config"])
        .arg(dir.join("missing.toml"))
        .arg("agents")
        .output()
        .expect("ccc");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        stderr(&out).matches("No such file or directory").count(),
        1,
        "{}",
        stderr(&out)
    );

    let mut cluster = Cluster::new("errors-once-cluster");
    let addr = cluster.start_coordinator();
    // A second coordinator on the same data directory.
    let data = cluster.dir.join("coordinator");
    let out = Command::new(bin("ccc-coordinator"))
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("second coordinator");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "another coordinator is already using {}",
            data.display()
        )),
        "{err}"
    );
    assert!(!err.contains("WouldBlock"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // No scheme means https; http gets the reason instead of a frame error.
    let certs = cluster.pki.dir.display().to_string();
    let bare = addr.to_string();
    let ok = Command::new(bin("ccc"))
        .args(["agents", "--coordinator", &bare, "--certs-dir", &certs])
        .output()
        .expect("ccc");
    assert!(ok.status.success(), "{}", text(&ok));
    let http = Command::new(bin("ccc"))
        .args([
            "--coordinator",
            &format!("http://{bare}"),
            "--certs-dir",
            &certs,
        ])
        .arg("agents")
        .output()
        .expect("ccc");
    assert_eq!(http.status.code(), Some(1));
    assert!(
        stderr(&http).contains(&format!("the coordinator speaks TLS: use https://{bare}")),
        "{}",
        stderr(&http)
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut cluster = Cluster::new("closed-pipe");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit("backend", "talk", "FAKE: write=a.txt lines=50");
    cluster.wait_task(&id, "succeeded", LONG);

    let closed = |cmd: &mut Command| {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // The reader goes away before anything is written, as `| head -1`
        // does after its line.
        drop(child.stdout.take());
        let status = child.wait().expect("wait");
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read stderr");
        (status, err)
    };
    let (status, err) = closed(
        Command::new(bin("ccc"))
            .arg("--coordinator")
            .arg(cluster.url())
            .arg("--certs-dir")
            .arg(&cluster.pki.dir)
            .args(["logs", &id]),
    );
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(err, "", "nothing said about the pipe");
    let (status, err) = closed(Command::new(bin("ccc-coordinator")).arg("--help"));
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(err, "");
}

#[test]
fn tasks_list_newest_first_with_outcomes_and_logs_follow_exits_by_outcome() {
    let mut cluster = Cluster::new("task-listing");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend", "--capacity", "3"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let repo = cluster.repo();
    let red = cluster.submit_to(
        &repo,
        "backend",
        "red tests",
        "FAKE: write=red.txt",
        &["--test-command", "echo 3 failed; exit 1"],
    );
    let green = cluster.submit("backend", "green", "FAKE: write=green.txt");
    let newest = cluster.submit("backend", "newest", "FAKE: write=new.txt");
    for id in [&red, &green, &newest] {
        cluster.wait_task(id, "succeeded", LONG);
    }

    let table = cluster.ccc_ok(&["tasks", "--limit", "2"]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].contains("OUTCOME"), "{table}");
    assert!(
        rows[1].starts_with(&format!("{newest} ")),
        "newest first:\n{table}"
    );
    assert!(rows[2].starts_with(&format!("{green} ")), "{table}");
    assert_eq!(
        rows.last().copied(),
        Some("1 more not shown (2 newest of 3): --limit N or --all"),
        "{table}"
    );
    let all = cluster.ccc_ok(&["tasks"]);
    let red_row = all
        .lines()
        .find(|l| l.starts_with(&format!("{red} ")))
        .expect("red listed");
    assert!(red_row.contains("tests_failed"), "{all}");

    let only: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ccc_ok(&["tasks", "--outcome", "tests_failed", "--json"]))
            .expect("json");
    assert_eq!(only.len(), 1, "{only:?}");
    assert_eq!(only[0]["task_id"], red.as_str());
    let out = cluster.ccc(&["tasks", "--outcome", "green"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown outcome \"green\""),
        "{}",
        text(&out)
    );

    // The task shows its test command and how the tests went.
    let detail = cluster.ccc_ok(&["task", &red]);
    assert!(row(&detail, "tests") == "echo 3 failed; exit 1", "{detail}");
    assert!(
        detail.contains("  tests:    echo 3 failed; exit 1 (exit 1): failed"),
        "{detail}"
    );
    assert!(detail.contains("    | 3 failed"), "{detail}");
    assert!(
        row(&detail, "state")
            .starts_with("succeeded (tests_failed): the tests failed; the work is pushed"),
        "{detail}"
    );
    let green_detail = cluster.ccc_ok(&["task", &green]);
    assert!(
        !green_detail.contains("succeeded: succeeded"),
        "{green_detail}"
    );
    assert!(
        row(&green_detail, "state").starts_with("succeeded: pushed"),
        "{green_detail}"
    );

    // `logs -f` says how the task ended, and its exit code too.
    let mut red_follow = follow(&cluster, &red, "follow-red");
    let status = red_follow.wait_exit(READY).expect("ends");
    assert_eq!(status.code(), Some(3), "{}", red_follow.log_text());
    assert!(
        red_follow.log_text().contains(&format!(
            "--- {red} succeeded (tests_failed): the tests failed"
        )),
        "{}",
        red_follow.log_text()
    );
    let mut green_follow = follow(&cluster, &green, "follow-green");
    let status = green_follow.wait_exit(READY).expect("ends");
    assert_eq!(status.code(), Some(0), "{}", green_follow.log_text());
    let last = green_follow.log_text();
    assert!(
        last.lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("--- {green} succeeded: pushed"))),
        "{last}"
    );
}

#[test]
fn cancel_says_where_the_task_is_and_logs_follow_exits_4() {
    let mut cluster = Cluster::new("cancel-words");
    cluster.start_coordinator();
    let queued = cluster.submit("frontend", "nobody takes it", "FAKE: write=a.txt");
    let out = cluster.ccc_ok(&["cancel", &queued]);
    assert_eq!(out, format!("{queued} is cancelled: by admin root\n"));
    let detail = cluster.ccc_ok(&["task", &queued]);
    assert!(
        row(&detail, "state") == "cancelled: by admin root",
        "{detail}"
    );

    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit("backend", "never ends", "FAKE: write=a.txt lines=1 hang=1");
    cluster.wait_task(&id, "running", READY);
    let mut watcher = follow(&cluster, &id, "follow-cancel");
    let out = cluster.ccc_ok(&["cancel", &id, "--reason", "wrong repo"]);
    assert!(
        out == format!("{id} is running: cancel requested, pc-1 is stopping it\n")
            || out == format!("{id} is cancelled: wrong repo (by admin root)\n"),
        "{out}"
    );
    let status = watcher.wait_exit(LONG).expect("logs -f ends with the task");
    assert_eq!(status.code(), Some(4), "{}", watcher.log_text());
    assert!(
        watcher
            .log_text()
            .contains(&format!("--- {id} cancelled: wrong repo (by admin root)\n")),
        "{}",
        watcher.log_text()
    );
}

#[test]
fn logs_follow_resumes_by_itself_after_a_coordinator_restart() {
    let mut cluster = Cluster::new("follow-restart");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit(
        "backend",
        "long output",
        "FAKE: write=out.txt lines=40 interval_ms=100",
    );
    let mut watcher = follow(&cluster, &id, "follow-restart");
    watcher.wait_for_log("working, step 5 of 40", LONG);
    cluster.coordinator().kill();
    std::thread::sleep(Duration::from_millis(300));
    cluster.start_coordinator();

    let status = watcher.wait_exit(LONG).expect("logs -f ends with the task");
    let text = watcher.log_text();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("reconnecting"), "{text}");
    for n in 1..=40 {
        assert_eq!(
            text.matches(&format!("[claude] working, step {n} of 40\n"))
                .count(),
            1,
            "step {n} once:\n{text}"
        );
    }
    assert!(
        text.contains(&format!("--- {id} succeeded: pushed")),
        "{text}"
    );
}

fn agent_json(cluster: &Cluster, name: &str) -> serde_json::Value {
    serde_json::from_str(&cluster.ccc_ok(&["agent", name, "--json"])).expect("json")
}

#[test]
fn agents_can_be_undrained_unrevoked_and_forgotten() {
    let mut cluster = Cluster::new("let-back-in");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend", "--capacity", "2"]);
    cluster.wait_agents(&["pc-1"], "connected");

    // Slots and tasks agree: one held of two.
    let hang = cluster.submit(
        "backend",
        "holds a slot",
        "FAKE: write=a.txt lines=1 hang=1",
    );
    cluster.wait_task(&hang, "running", READY);
    let detail = eventually(READY, || {
        let detail = cluster.ccc_ok(&["agent", "pc-1"]);
        if row(&detail, "running") == format!("{hang} attempt 1") {
            Ok(detail)
        } else {
            Err(detail)
        }
    })
    .expect("the agent reports the task");
    assert!(
        row(&detail, "slots") == format!("1 free of 2, 1 assigned ({hang})"),
        "{detail}"
    );

    let out = cluster.ccc_ok(&["drain", "pc-1", "--reason", "disk swap"]);
    assert_eq!(out, "pc-1 is draining: disk swap (by admin root)\n");
    let table = cluster.ccc_ok(&["agents"]);
    assert!(table.contains("disk swap (by admin root)"), "{table}");
    let detail = cluster.ccc_ok(&["agent", "pc-1"]);
    assert!(
        row(&detail, "slots")
            == format!("0 free of 2 (draining: disk swap (by admin root)), 1 assigned ({hang})"),
        "{detail}"
    );
    let waiting = cluster.submit("backend", "after the drain", "FAKE: write=b.txt");
    assert_eq!(
        cluster.task_json(&waiting).expect("task")["state"],
        "queued"
    );
    let out = cluster.ccc_ok(&["undrain", "pc-1"]);
    assert_eq!(out, "pc-1 is undrained; it reconnects and takes work\n");
    cluster.wait_task(&waiting, "succeeded", LONG);
    assert_eq!(agent_json(&cluster, "pc-1")["drain_reason"], "");
    let out = cluster.ccc(&["undrain", "pc-1"]);
    assert!(stderr(&out).contains("not drained"), "{}", text(&out));
    cluster.ccc_ok(&["cancel", &hang]);

    // Revoked, then let back in under its name.
    let idx = cluster.start_agent("pc-2", &[]);
    cluster.wait_agents(&["pc-2"], "connected");
    cluster.ccc_ok(&["revoke", "pc-2", "--reason", "re-imaging"]);
    cluster.agents[idx]
        .wait_exit(READY)
        .expect("a revoked agent stops");
    let revoked = agent_json(&cluster, "pc-2");
    assert_eq!(revoked["revoked_reason"], "re-imaging (by admin root)");
    let out = cluster.ccc(&["forget", "pc-2"]);
    assert!(stderr(&out).contains("unrevoke"), "{}", text(&out));
    assert_eq!(
        cluster.ccc_ok(&["unrevoke", "pc-2"]),
        "pc-2 is unrevoked; it may connect again\n"
    );
    cluster.start_agent("pc-2", &[]);
    cluster.wait_agents(&["pc-2"], "connected");

    // Forgotten only once it is gone.
    let out = cluster.ccc(&["forget", "pc-2"]);
    assert!(stderr(&out).contains("pc-2 is connected"), "{}", text(&out));
    let last = cluster.agents.len() - 1;
    cluster.agents[last].terminate(READY);
    cluster.wait_agents(&["pc-2"], "disconnected");
    assert_eq!(cluster.ccc_ok(&["forget", "pc-2"]), "pc-2 is forgotten\n");
    let agents = cluster.agents_json().expect("agents");
    assert!(agents.iter().all(|a| a["agent_id"] != "pc-2"), "{agents:?}");
    let out = cluster.ccc(&["forget", "pc-2"]);
    assert!(stderr(&out).contains("NotFound"), "{}", text(&out));
    // Still forgotten after a restart.
    cluster.coordinator().kill();
    cluster.start_coordinator();
    let agents = cluster.agents_json().expect("agents");
    assert!(agents.iter().all(|a| a["agent_id"] != "pc-2"), "{agents:?}");
}

#[test]
fn a_revoked_admin_certificate_is_refused_on_every_call_until_unrevoked() {
    let mut cluster = Cluster::new("admin-revocation");
    cluster.start_coordinator();
    // Alice's certificate lives apart: root's stays the only one in the PKI dir.
    cluster.pki.certs(&["admin", "alice"]);
    let own = cluster.dir.join("alice");
    std::fs::create_dir_all(&own).expect("dir");
    for file in ["admin-alice.pem", "admin-alice-key.pem"] {
        std::fs::rename(cluster.pki.path(file), own.join(file)).expect("move");
    }
    let alice = own.join("admin-alice.pem").display().to_string();
    let as_alice = |cluster: &Cluster, args: &[&str]| {
        let mut all = vec!["--cert", alice.as_str()];
        all.extend_from_slice(args);
        cluster.ccc(&all)
    };
    assert!(as_alice(&cluster, &["agents"]).status.success());

    let out = cluster.ccc(&["revoke-admin", "root"]);
    assert!(
        stderr(&out).contains("admin root cannot revoke its own certificate"),
        "{}",
        text(&out)
    );
    let out = cluster.ccc_ok(&["revoke-admin", "alice", "--reason", "laptop stolen"]);
    assert_eq!(
        out,
        "admin alice is revoked: laptop stolen (by admin root)\n"
    );
    for args in [&["agents"][..], &["tasks"], &["admins"]] {
        let out = as_alice(&cluster, args);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(
                "PermissionDenied: the certificate of admin alice is revoked: laptop stolen (by admin root)"
            ),
            "{}",
            text(&out)
        );
    }
    let admins = cluster.ccc_ok(&["admins"]);
    assert!(admins.contains("alice  revoked"), "{admins}");

    // Durable.
    cluster.coordinator().kill();
    cluster.start_coordinator();
    assert!(!as_alice(&cluster, &["agents"]).status.success());
    assert_eq!(
        cluster.ccc_ok(&["unrevoke-admin", "alice"]),
        "admin alice is unrevoked\n"
    );
    assert!(as_alice(&cluster, &["agents"]).status.success());
    let out = cluster.ccc(&["unrevoke-admin", "alice"]);
    assert!(
        stderr(&out).contains("admin alice is not revoked"),
        "{}",
        text(&out)
    );
}

/// The options and arguments of a `-h` text: (the name, its description,
/// which clap puts on the same line or, when the page is wide, below).
fn options(help: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.ends_with("Options:") || line == "Arguments:" {
            in_options = true;
            continue;
        }
        if !line.starts_with(' ') {
            in_options = false;
        }
        if !in_options {
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent >= 8 {
            if let Some((_, description)) = found.last_mut() {
                description.push_str(trimmed);
            }
        } else if trimmed.starts_with('-') || trimmed.starts_with('<') {
            let (name, description) = trimmed
                .split_once("  ")
                .map_or((trimmed, ""), |(n, d)| (n, d.trim()));
            found.push((name.to_owned(), description.to_owned()));
        }
    }
    found
}

fn help(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program))
        .args(args)
        .arg("-h")
        .output()
        .expect("help");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_describes_every_option_once_and_each_binary_has_its_own_variables() {
    let top = help("ccc", &[]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.contains(&"unrevoke-admin".to_owned()), "{top}");
    let mut pages = vec![("ccc-coordinator".to_owned(), help("ccc-coordinator", &[]))];
    for command in &commands {
        pages.push((format!("ccc {command}"), help("ccc", &[command])));
    }
    for sub in ["init", "server", "agent", "admin"] {
        pages.push((format!("ccc certs {sub}"), help("ccc", &["certs", sub])));
    }
    for (page, text) in &pages {
        let found = options(text);
        assert!(!found.is_empty(), "{page}: no options found in\n{text}");
        for (name, description) in found {
            assert!(
                !description.is_empty(),
                "{page}: {name} has no description\n{text}"
            );
            assert!(
                description.matches("[default:").count() <= 1,
                "{page}: {name} shows two defaults\n{text}"
            );
            assert!(
                !description.ends_with("[default: ]"),
                "{page}: {name} shows an empty default\n{text}"
            );
        }
    }
    let certs = help("ccc", &["certs"]);
    assert!(!certs.contains("--coordinator"), "{certs}");
    assert!(!help("ccc", &["certs", "init"]).contains("--cert "));

    let coordinator = help("ccc-coordinator", &[]);
    assert!(
        coordinator.contains("[env: CCC_COORDINATOR_CERT="),
        "{coordinator}"
    );
    assert!(!coordinator.contains("[env: CCC_CERT="), "{coordinator}");

    // ccc's variables do not reach the coordinator.
    let dir = TestDir::new("own-variables");
    let pki = tests::Pki::create(dir.join("certs"));
    let mut cmd = Command::new(bin("ccc-coordinator"));
    cmd.arg("--certs-dir")
        .arg(&pki.dir)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("CCC_CERT", dir.join("admin-of-ccc.pem"))
        .env("CCC_COORDINATOR", "https://127.0.0.1:1");
    let coordinator = Process::spawn("coordinator", cmd, dir.join("coordinator.log"));
    coordinator.wait_for_log("coordinator listening", READY);
}

#[test]
fn settings_that_make_no_sense_are_refused_at_start_by_name() {
    let dir = TestDir::new("bad-settings");
    let pki = tests::Pki::create(dir.join("certs"));
    let start = |args: &[&str]| {
        Command::new(bin("ccc-coordinator"))
            .arg("--certs-dir")
            .arg(&pki.dir)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .expect("coordinator")
    };
    for (args, named) in [
        (
            &["--max-attempts", "0"][..],
            "max_attempts (--max-attempts) must be at least 1",
        ),
        (
            &["--accept-timeout", "0s"],
            "accept_timeout (--accept-timeout) must be longer than 0",
        ),
        (
            &["--heartbeat-interval", "5s", "--heartbeat-timeout", "5s"],
            "heartbeat_timeout (--heartbeat-timeout) (5s) must be longer than heartbeat_interval",
        ),
        (
            &["--retry-backoff", "1m", "--retry-backoff-max", "10s"],
            "retry_backoff_max (--retry-backoff-max) (10s) must not be shorter than retry_backoff",
        ),
    ] {
        let out = start(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(stderr(&out).contains(named), "{args:?}: {}", text(&out));
    }
    let file = dir.join("coordinator.toml");
    std::fs::write(&file, "version = 1\nmax_attempts = 0\n").expect("write");
    let out = start(&["--config", &file.display().to_string()]);
    assert!(stderr(&out).contains("max_attempts"), "{}", text(&out));
}

#[test]
fn certs_made_twice_keep_what_exists_and_say_so() {
    let dir = TestDir::new("certs-twice");
    let certs = dir.join("certs");
    let run = |args: &[&str]| {
        Command::new(bin("ccc"))
            .arg("certs")
            .args(args)
            .arg("--certs-dir")
            .arg(&certs)
            .output()
            .expect("ccc certs")
    };
    for _ in 0..2 {
        for args in [
            &["init", "--keep-existing"][..],
            &["server", "--keep-existing"],
            &["admin", "--keep-existing", "root"],
        ] {
            let out = run(args);
            assert!(out.status.success(), "{args:?}: {}", text(&out));
        }
    }
    let ca = std::fs::read(certs.join("ca.pem")).expect("ca");
    let out = run(&["init", "--keep-existing"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("kept {} (it exists)\n", certs.join("ca.pem").display())
    );
    assert_eq!(std::fs::read(certs.join("ca.pem")).expect("ca"), ca);
    let out = run(&["init"]);
    assert!(!out.status.success(), "without the flag it still refuses");
}
