//! `ccc top` in a real terminal (tmux) and as plain text, and `ccc submit
//! --follow`: the real binaries against a cluster on loopback.

use std::process::{Command, Output};
use std::time::Duration;

use tests::cluster::READY;
use tests::{Cluster, TestDir, bin, eventually};

const LONG: Duration = Duration::from_secs(60);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A quoted word for `sh`.
fn quoted(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A tmux server of its own (its own socket) with one 200x50 session
/// running a command; the server is killed and its socket removed on drop,
/// so a failing test leaves none behind. The pane stays after the command
/// ends, so its last screen and exit status can be read.
struct Tmux {
    socket: String,
    /// Where the socket is, once the server runs.
    socket_path: Option<String>,
}

impl Tmux {
    const SESSION: &'static str = "top";

    fn start(dir: &TestDir, name: &str, command: &[String]) -> Self {
        let mut tmux = Self {
            socket: format!("ccc-{name}-{}", std::process::id()),
            socket_path: None,
        };
        let config = dir.join("tmux.conf");
        std::fs::write(&config, "set -g remain-on-exit on\n").expect("tmux config");
        let shell_command = command
            .iter()
            .map(|w| quoted(w))
            .collect::<Vec<_>>()
            .join(" ");
        let out = tmux.command(&[
            "-f",
            &config.display().to_string(),
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "-s",
            Self::SESSION,
            &shell_command,
        ]);
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        let path = tmux.command(&["display-message", "-p", "#{socket_path}"]);
        tmux.socket_path =
            Some(String::from_utf8_lossy(&path.stdout).trim().to_owned()).filter(|p| !p.is_empty());
        tmux
    }

    fn command(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    /// The pane's screen as text.
    fn screen(&self) -> String {
        let out = self.command(&["capture-pane", "-p", "-t", Self::SESSION]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", Self::SESSION];
        args.extend_from_slice(keys);
        let out = self.command(&args);
        assert!(out.status.success(), "tmux send-keys: {}", text(&out));
    }

    /// Waits until the screen passes `check` (which says what is missing).
    fn wait_for(&self, check: impl Fn(&str) -> Result<(), String>) -> String {
        eventually(LONG, || {
            let screen = self.screen();
            check(&screen)
                .map(|()| screen.clone())
                .map_err(|missing| format!("{missing}; the screen:\n{screen}"))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}`: "1|0|" once the
    /// command ended well.
    fn pane_status(&self) -> String {
        let out = self.command(&[
            "display-message",
            "-p",
            "-t",
            Self::SESSION,
            "#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]);
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The screen's row that starts with the task id (in the task table).
fn task_row<'a>(screen: &'a str, id: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.trim_start_matches('│').starts_with(&format!("{id} ")))
}

/// `ccc top` against the cluster, as a command line.
fn top_command(cluster: &Cluster) -> Vec<String> {
    vec![
        bin("ccc").display().to_string(),
        "top".into(),
        "--coordinator".into(),
        cluster.url(),
        "--certs-dir".into(),
        cluster.pki.dir.display().to_string(),
    ]
}

fn has(screen: &str, needles: &[&str]) -> Result<(), String> {
    match needles.iter().find(|n| !screen.contains(*n)) {
        Some(missing) => Err(format!("no {missing:?}")),
        None => Ok(()),
    }
}

#[test]
fn top_in_a_terminal_shows_the_cluster_live_follows_a_log_and_cancels_and_retries() {
    let mut cluster = Cluster::new("top-tmux");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.start_agent("pc-2", &["--specialties", "frontend"]);
    cluster.wait_agents(&["pc-1", "pc-2"], "connected");
    // Each writes lines of its own for a few minutes (the test ends first).
    let backend = cluster.submit(
        "backend",
        "backend work",
        "FAKE: write=a.txt lines=3000 interval_ms=100",
    );
    let frontend = cluster.submit(
        "frontend",
        "frontend work",
        "FAKE: write=b.txt lines=4000 interval_ms=100",
    );
    cluster.wait_task(&backend, "running", LONG);
    cluster.wait_task(&frontend, "running", LONG);

    let tmux = Tmux::start(&cluster.dir, "top", &top_command(&cluster));
    tmux.wait_for(|screen| {
        has(
            screen,
            &[
                "2 agents, 2 running",
                "AGENT",
                "HEALTH",
                "USED/FREE",
                "TASK",
            ],
        )?;
        for agent in ["pc-1", "pc-2"] {
            let row = screen
                .lines()
                .find(|l| l.trim_start_matches('│').starts_with(&format!("{agent} ")))
                .ok_or(format!("no row of {agent}"))?;
            has(row, &["connected", "ok", "1/0"])?;
        }
        for (id, lines) in [(&backend, "of 3000"), (&frontend, "of 4000")] {
            let row = task_row(screen, id).ok_or(format!("no row of {id}"))?;
            has(
                row,
                &["running/claude", "at end", "[claude] working, step", lines],
            )?;
        }
        Ok(())
    });

    // The second row, then its log: the frontend task's lines only.
    tmux.keys(&["Down", "Enter"]);
    let log = tmux.wait_for(|screen| {
        has(
            screen,
            &[
                &format!(" {frontend} running/claude "),
                "of 4000",
                "esc/q back",
            ],
        )
    });
    assert!(!log.contains("of 3000"), "another task's output:\n{log}");
    assert!(!log.contains("USED/FREE"), "the tables are hidden:\n{log}");
    // It streams: a later line than the first screen showed comes.
    let step = |screen: &str| -> u32 {
        screen
            .lines()
            .filter_map(|l| l.split("working, step ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let seen = step(&log);
    tmux.wait_for(|screen| {
        if step(screen) > seen {
            Ok(())
        } else {
            Err(format!("no step after {seen}"))
        }
    });

    // Back to the tables; cancel the selected task, asked first.
    tmux.keys(&["Escape"]);
    tmux.wait_for(|screen| has(screen, &["USED/FREE", "c cancel"]));
    tmux.keys(&["c"]);
    tmux.wait_for(|screen| has(screen, &[&format!("cancel {frontend}? y: yes")]));
    tmux.keys(&["y"]);
    cluster.wait_task(&frontend, "cancelled", LONG);
    tmux.wait_for(|screen| {
        let row = task_row(screen, &frontend).ok_or("no row")?;
        has(row, &["cancelled"])
    });
    assert_eq!(
        cluster.task_json(&backend).expect("task")["state"],
        "running",
        "only the selected task is cancelled"
    );

    // Retry it: it runs again (the selection follows it to the top rows).
    tmux.keys(&["r"]);
    tmux.wait_for(|screen| {
        let row = task_row(screen, &frontend).ok_or("no row")?;
        has(row, &["running/claude"])
    });

    tmux.keys(&["q"]);
    // `q` ends it: exit status 0. (tmux reports no status for a process
    // ended by a signal; seen rarely on a loaded machine after the terminal
    // was restored, so it is reported rather than failed.)
    let status = eventually(READY, || {
        let status = tmux.pane_status();
        match status.split('|').collect::<Vec<_>>().as_slice() {
            ["1", "0", _] => Ok(status),
            ["1", "", signal] => Ok(format!("ended by signal {signal}")),
            _ => Err(format!("pane (dead|status|signal): {status}")),
        }
    })
    .unwrap_or_else(|e| panic!("ccc top did not quit: {e}\n{}", tmux.screen()));
    if status.starts_with("ended by signal") {
        eprintln!("note: ccc top {status} after q");
    }
}

#[test]
fn top_without_a_terminal_prints_one_plain_snapshot() {
    let mut cluster = Cluster::new("top-plain");
    cluster.start_coordinator();
    let empty = cluster.ccc_ok(&["top"]);
    assert_eq!(empty, "AGENTS\nno agents yet\n\nTASKS\nno tasks\n");

    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit(
        "backend",
        "plain work",
        "FAKE: write=a.txt lines=3000 interval_ms=100",
    );
    let snapshot = eventually(LONG, || {
        let out = cluster.ccc(&["top"]);
        if !out.status.success() {
            return Err(text(&out));
        }
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = shown
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .ok_or(format!("no row of {id} in\n{shown}"))?;
        has(row, &["running/claude", "pc-1", "[claude] working, step"])
            .map(|()| shown.clone())
            .map_err(|e| format!("{e} in\n{shown}"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(snapshot.starts_with("AGENTS\nAGENT "), "{snapshot}");
    let agent = snapshot
        .lines()
        .find(|l| l.starts_with("pc-1 "))
        .unwrap_or_else(|| panic!("no agent row in\n{snapshot}"));
    for cell in ["connected", "ok", "backend", "1/0"] {
        assert!(agent.contains(cell), "{cell:?} in {agent}");
    }
    assert!(
        !snapshot.contains('\x1b'),
        "no escape codes when not a terminal:\n{snapshot}"
    );
}

/// `ccc submit --follow` with `args`, run to its end.
fn submit_follow(cluster: &Cluster, flag: &str, body: &str, extra: &[&str]) -> Output {
    let repo = cluster.repo();
    let mut args = vec![
        "submit",
        "--repo",
        &repo,
        "--title",
        "followed",
        "--specialty",
        "backend",
        "--body",
        body,
        flag,
    ];
    args.extend_from_slice(extra);
    cluster.ccc(&args)
}

fn first_word(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn submit_follow_prints_the_output_and_exits_as_the_task_ended() {
    let mut cluster = Cluster::new("submit-follow");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend", "--capacity", "2"]);
    cluster.wait_agents(&["pc-1"], "connected");

    let green = submit_follow(&cluster, "--follow", "FAKE: write=a.txt lines=3", &[]);
    assert_eq!(green.status.code(), Some(0), "{}", text(&green));
    let id = first_word(&green);
    let shown = String::from_utf8_lossy(&green.stdout).into_owned();
    assert!(id.starts_with("t-"), "{shown}");
    assert!(shown.contains("[claude] working, step 3 of 3"), "{shown}");
    assert!(
        shown
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("--- {id} succeeded: pushed"))),
        "{shown}"
    );
    // The same lines as `ccc logs` prints afterwards.
    let logs = cluster.ccc_ok(&["logs", &id]);
    assert!(shown.contains(&logs), "{shown}\nvs\n{logs}");

    let red = submit_follow(
        &cluster,
        "--wait",
        "FAKE: write=b.txt",
        &["--test-command", "echo 3 failed; exit 1"],
    );
    assert_eq!(red.status.code(), Some(3), "{}", text(&red));
    assert!(
        text(&red).contains("succeeded (tests_failed): the tests failed"),
        "{}",
        text(&red)
    );

    // A cancel from elsewhere ends the follow with 4.
    let repo = cluster.repo();
    let mut follow = Command::new(bin("ccc"));
    follow
        .arg("--coordinator")
        .arg(cluster.url())
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .args(["submit", "--repo", &repo, "--title", "endless"])
        .args(["--specialty", "backend", "--follow"])
        .args(["--body", "FAKE: write=c.txt lines=1 hang=1"]);
    let mut follower = tests::Process::spawn(
        "submit-follow",
        follow,
        cluster.dir.join("submit-follow.out"),
    );
    let endless = eventually(READY, || {
        let out = follower.log_text();
        let id = out.split_whitespace().next().unwrap_or_default().to_owned();
        if id.starts_with("t-") && out.contains("[claude] working, step 1 of 1") {
            Ok(id)
        } else {
            Err(format!("not following yet: {out}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    cluster.ccc_ok(&["cancel", &endless]);
    let status = follower
        .wait_exit(LONG)
        .expect("the follow ends with the task");
    assert_eq!(status.code(), Some(4), "{}", follower.log_text());

    // Nothing submitted, nothing followed: a refusal is an error (1).
    let refused = submit_follow(&cluster, "--follow", "x", &["--base", "not a branch name"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
}
