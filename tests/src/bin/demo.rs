//! `make demo`: the whole story on this machine, from GitHub issues to pull
//! requests. It makes a demo PKI with `ccc certs`, starts a local fake
//! GitHub (the one the tests use), a bare repository holding a small real
//! project (a Python API and a web page, with a unittest suite), the
//! coordinator and four agents (backend, frontend, testing, devops; two
//! slots each) on loopback. Then it files the issues of
//! `tests/demo/issues.toml` on the fake GitHub, delivers each as a signed
//! webhook, and shows live progress (who took what and why, phases, the
//! CLI's output) until branches are pushed, pull requests are open (one a
//! draft, as its tests fail) and a vague issue got a question. Then it says
//! where to look, and stops everything on Ctrl-C.
//!
//! The agents run the scripted stand-in for the CLI, which edits the
//! project for real (`tests/demo/plays.toml`), unless `--real-cli` asks
//! for a logged-in `claude`. `--once` runs to the end and exits: 0 when
//! every issue ended as expected. Everything lives in `data/demo/` (logs
//! included) and is made anew on each run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tests::github::{FakeGitHub, GitHubConfig, NewIssue, User};
use tests::webhooks::{Delivery, Encoding};
use tests::{Cluster, TestDir, bin, git};

const REPO: &str = "acme/inventory";
/// The fake GitHub's token for the coordinator (it is no real token).
const TOKEN: &str = "ghp_demo000000000000000000000000000000000";
const SECRET: &[u8] = b"the demo's webhook secret";
const LABEL: &str = "claude";
const TEST_COMMAND: &str = "python3 -m unittest discover -s tests -t . -v";
const AGENTS: [(&str, &str); 4] = [
    ("pc-backend", "backend"),
    ("pc-frontend", "frontend"),
    ("pc-testing", "testing"),
    ("pc-devops", "devops"),
];

/// The sample project, as committed to the demo's repository.
const PROJECT: &[(&str, &str)] = &[
    ("README.md", include_str!("../../demo/project/README.md")),
    (
        "inventory/__init__.py",
        include_str!("../../demo/project/inventory/__init__.py"),
    ),
    (
        "inventory/store.py",
        include_str!("../../demo/project/inventory/store.py"),
    ),
    (
        "inventory/api.py",
        include_str!("../../demo/project/inventory/api.py"),
    ),
    (
        "tests/__init__.py",
        include_str!("../../demo/project/tests/__init__.py"),
    ),
    (
        "tests/test_store.py",
        include_str!("../../demo/project/tests/test_store.py"),
    ),
    (
        "tests/test_api.py",
        include_str!("../../demo/project/tests/test_api.py"),
    ),
    (
        "web/index.html",
        include_str!("../../demo/project/web/index.html"),
    ),
    ("web/app.js", include_str!("../../demo/project/web/app.js")),
    (
        "web/style.css",
        include_str!("../../demo/project/web/style.css"),
    ),
];
const ISSUES: &str = include_str!("../../demo/issues.toml");
const PLAYS: &str = include_str!("../../demo/plays.toml");

const USAGE: &str = "\
Usage: demo [--once] [--real-cli]

The whole story on this machine: issues filed on a local fake GitHub become
tasks, agents run the CLI on a sample project, push branches and open pull
requests. Files and logs go to data/demo/.

Options:
  --once      run to the end without waiting for Ctrl-C; exit 0 when every
              issue ended as expected, 1 otherwise
  --real-cli  let the real `claude` CLI (installed and logged in) do the work
              instead of the scripted stand-in
  -h, --help  print this help
";

/// Set by SIGINT or SIGTERM: every wait of the demo ends, and it stops
/// what it started.
static STOP: AtomicBool = AtomicBool::new(false);

struct Options {
    once: bool,
    real_cli: bool,
}

fn options() -> Result<Option<Options>, String> {
    let mut options = Options {
        once: false,
        real_cli: false,
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--once" => options.once = true,
            "--real-cli" => options.real_cli = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(Some(options))
}

#[derive(Deserialize)]
struct Issues {
    issue: Vec<DemoIssue>,
}

/// An issue the demo files, and how it should end.
#[derive(Deserialize)]
struct DemoIssue {
    title: String,
    body: String,
    /// `pull request`, `draft pull request` or `question`.
    expect: String,
}

/// Which CLI the agents run.
enum Cli {
    /// The scripted stand-in, acting out `plays.toml`.
    StandIn,
    /// The real CLI, found on `PATH` and logged in.
    Real(PathBuf),
}

/// The real `claude` on `PATH` if it says it is logged in; else why not.
fn logged_in_claude() -> Result<PathBuf, String> {
    let out = Command::new("claude")
        .args(["auth", "status"])
        .output()
        .map_err(|e| format!("no `claude` on PATH ({e})"))?;
    let status: Value = serde_json::from_slice(&out.stdout)
        .map_err(|_| "`claude auth status` did not answer as expected".to_owned())?;
    if status["loggedIn"] == Value::Bool(true) {
        Ok(PathBuf::from("claude"))
    } else {
        Err("`claude` is installed but not logged in (run `claude` and /login)".into())
    }
}

fn choose_cli(real_cli: bool) -> Result<Cli, String> {
    match (logged_in_claude(), real_cli) {
        (Ok(path), true) => {
            say("the real `claude` CLI does the work (--real-cli); it takes minutes per issue");
            Ok(Cli::Real(path))
        }
        (Err(why), true) => Err(format!(
            "--real-cli needs a logged-in `claude`: {why}.\n\
             Install it with `npm install -g @anthropic-ai/claude-code`, log in, and run again"
        )),
        (Ok(_), false) => {
            say(
                "a logged-in `claude` was found; the scripted stand-in does the work \
                 (`make demo DEMO_ARGS=--real-cli` lets the real CLI do it)",
            );
            Ok(Cli::StandIn)
        }
        (Err(why), false) => {
            say(&format!(
                "{why}: the scripted stand-in does the work. It edits the project for real \
                 and prints what the real CLI would (tests/demo/plays.toml)"
            ));
            Ok(Cli::StandIn)
        }
    }
}

fn say(text: &str) {
    println!("== {text}");
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Waits on a background thread for SIGINT or SIGTERM, then sets `STOP`.
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let signal = runtime.block_on(common::signal::terminated());
        println!("\n== {signal}: stopping");
        STOP.store(true, Ordering::SeqCst);
    });
}

/// Sleeps `total`, or less when stopped.
fn nap(total: Duration) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !stopped() {
        std::thread::sleep(step.min(left));
        left = left.saturating_sub(step);
    }
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    watch_signals();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the demo started; dropping it stops them all.
struct Demo {
    cluster: Cluster,
    github: FakeGitHub,
    bare: PathBuf,
    webhook: String,
    followers: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for follower in &mut self.followers {
            let _ = follower.kill();
            let _ = follower.wait();
        }
        for agent in &mut self.cluster.agents {
            agent.terminate(Duration::from_secs(10));
        }
        if let Some(coordinator) = self.cluster.coordinator.as_mut() {
            coordinator.terminate(Duration::from_secs(10));
        }
        say(&format!(
            "stopped everything; files and logs are in {}/",
            self.dir.display()
        ));
    }
}

fn run(options: &Options) -> Result<(), String> {
    let issues: Issues =
        toml::from_str(ISSUES).map_err(|e| format!("tests/demo/issues.toml: {e}"))?;
    // Absolute: the repository's location goes to agents, which run in
    // their own data directories.
    let dir = std::env::current_dir()
        .map_err(|e| format!("the current directory: {e}"))?
        .join("data/demo");
    say(&format!(
        "Claude Code Cluster demo (files and logs in {}/)",
        dir.display()
    ));
    let cli = choose_cli(options.real_cli)?;
    let demo = start(&dir, &cli)?;
    if stopped() {
        return Ok(());
    }
    let mut demo = demo;
    let filed = file_issues(&demo, &issues.issue)?;
    let limit = match cli {
        Cli::StandIn => Duration::from_secs(300),
        Cli::Real(_) => Duration::from_secs(3600),
    };
    let ended = follow_progress(&mut demo, &filed, limit);
    if stopped() {
        return Ok(());
    }
    let summary = summarize(&demo, &filed);
    ended.and(summary)?;
    if options.once {
        return Ok(());
    }
    where_to_look(&demo);
    while !stopped() {
        nap(Duration::from_secs(1));
    }
    Ok(())
}

/// The PKI, the fake GitHub, the repository, the coordinator and agents.
fn start(dir: &Path, cli: &Cli) -> Result<Demo, String> {
    let cluster = Cluster::in_dir(TestDir::persistent(dir.to_path_buf()));
    say(&format!(
        "made a demo PKI with `ccc certs` in {}",
        cluster.pki.dir.display()
    ));
    let github = FakeGitHub::start(GitHubConfig::with_token(TOKEN));
    github.create_repo(REPO);
    let bare = git::bare_repo(dir, "inventory", PROJECT);
    // Branches the agents push there exist on the fake GitHub too.
    github.use_git_remote(REPO, &bare);
    say(&format!(
        "a fake GitHub on {} holds {REPO}; its git repository is {} \
         (a Python API and a web page, tested with `{TEST_COMMAND}`)",
        github.url(),
        bare.display()
    ));
    let write = |name: &str, text: &[u8]| -> Result<String, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path.display().to_string())
    };
    let token_file = write("github-token", format!("{TOKEN}\n").as_bytes())?;
    let secret_file = write("webhook-secret", SECRET)?;
    let config = write(
        "coordinator.toml",
        format!(
            "version = 1\n\n[github]\napi_url = {api:?}\ntoken_file = {token_file:?}\n\
             webhook_secret_file = {secret_file:?}\nreconcile_every = \"10m\"\n\n\
             [[repos]]\nname = {REPO:?}\nlabel = {LABEL:?}\nclone_url = {clone:?}\n\
             test_command = {TEST_COMMAND:?}\n",
            api = github.url(),
            clone = bare.display().to_string(),
        )
        .as_bytes(),
    )?;
    let plays = write("plays.toml", PLAYS.as_bytes())?;
    let mut cluster = cluster.with_coordinator_args(&["--config", &config]);
    let addr = cluster.start_coordinator();
    let webhook = format!(
        "http://{}/webhook/github",
        cluster
            .http_addr
            .ok_or("the coordinator has no HTTP address")?
    );
    say(&format!(
        "coordinator: gRPC on {addr} (mutual TLS), webhooks on {webhook}"
    ));
    let claude = match cli {
        Cli::StandIn => bin("fake-claude"),
        Cli::Real(path) => path.clone(),
    };
    let claude = claude.display().to_string();
    for (name, specialty) in AGENTS {
        cluster.start_agent_with_env(
            name,
            &[
                "--specialties",
                specialty,
                "--capacity",
                "2",
                "--claude",
                &claude,
            ],
            &[("FAKE_CLAUDE_PLAYS", plays.as_str())],
        );
    }
    let names: Vec<&str> = AGENTS.iter().map(|(n, _)| *n).collect();
    cluster.wait_agents(&names, "connected");
    say(&format!(
        "{} agents connected, each on its own data directory (`ccc agents`):\n",
        names.len()
    ));
    print!("{}", cluster.ccc_ok(&["agents"]));
    println!();
    Ok(Demo {
        cluster,
        github,
        bare,
        webhook,
        followers: Vec::new(),
        dir: dir.to_path_buf(),
    })
}

/// An issue filed and delivered: its number, the task it became.
struct Filed<'a> {
    issue: &'a DemoIssue,
    number: u64,
    task: String,
}

/// Files each issue on the fake GitHub (labeled by its owner) and delivers
/// it to the coordinator as GitHub would: a signed `issues.labeled`.
fn file_issues<'a>(demo: &Demo, issues: &'a [DemoIssue]) -> Result<Vec<Filed<'a>>, String> {
    say(&format!(
        "filing {} issues on {REPO}, each labeled `{LABEL}`, delivered as signed webhooks:",
        issues.len()
    ));
    let mut filed = Vec::new();
    for issue in issues {
        let number = demo.github.create_issue(
            REPO,
            NewIssue::new(&issue.title)
                .body(issue.body.trim())
                .labels(&[LABEL])
                .user(User::person("mona"))
                .author_association("OWNER"),
        );
        let payload = demo
            .github
            .issues_event(REPO, number, "labeled", Some(LABEL))
            .ok_or("the fake GitHub lost an issue")?;
        let signed = Delivery::new("issues", payload).sign(SECRET, Encoding::Json);
        let answer = tests::webhooks::post(&demo.webhook, &signed)?;
        let reply: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let task = reply["task_id"].as_str().unwrap_or_default().to_owned();
        if task.is_empty() {
            return Err(format!(
                "the coordinator answered issue #{number}'s delivery with {}: {}",
                answer.status,
                answer.text()
            ));
        }
        let triage = demo
            .cluster
            .task_json(&task)
            .map(|t| {
                format!(
                    "{} ({})",
                    t["specialty"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?")
                )
            })
            .unwrap_or_default();
        println!(
            "   #{number} {:<55} → HTTP {} {task}, triaged {triage}",
            issue.title,
            answer.status.as_u16()
        );
        filed.push(Filed {
            issue,
            number,
            task,
        });
    }
    println!();
    Ok(filed)
}

/// What the progress view last printed of a task.
#[derive(Default, PartialEq)]
struct Seen {
    state: String,
    attempt: usize,
    pull_request: String,
    followed: bool,
}

/// Prints every change of the tasks (placement, phase, tests, pull request)
/// and their CLI output as it streams, until every issue ended as expected,
/// the limit passes, or the demo is stopped.
fn follow_progress(demo: &mut Demo, filed: &[Filed], limit: Duration) -> Result<(), String> {
    say("live progress (Ctrl-C stops the demo):\n");
    let mut seen: Vec<Seen> = filed.iter().map(|_| Seen::default()).collect();
    #[allow(clippy::disallowed_methods)] // the demo is a driver: it reads the clock
    let started = std::time::Instant::now();
    while !stopped() {
        // Checked before the report, so that the last changes are printed.
        let all_ended = filed.iter().all(|f| ended_as_expected(demo, f).is_ok());
        for (f, seen) in filed.iter().zip(seen.iter_mut()) {
            let Ok(task) = demo.cluster.task_json(&f.task) else {
                continue;
            };
            report_changes(demo, f, &task, seen);
        }
        if all_ended {
            // The last output lines of the followers.
            nap(Duration::from_millis(300));
            println!();
            return Ok(());
        }
        if started.elapsed() > limit {
            let late: Vec<String> = filed
                .iter()
                .filter_map(|f| ended_as_expected(demo, f).err())
                .collect();
            return Err(format!(
                "not every issue ended within {} minutes: {}",
                limit.as_secs() / 60,
                late.join("; ")
            ));
        }
        nap(Duration::from_millis(250));
    }
    Ok(())
}

fn report_changes(demo: &mut Demo, f: &Filed, task: &Value, seen: &mut Seen) {
    let id = &f.task;
    let state = task["state"].as_str().unwrap_or_default().to_owned();
    let attempts = task["attempts"].as_array().cloned().unwrap_or_default();
    if attempts.len() > seen.attempt {
        seen.attempt = attempts.len();
        if let Some(last) = attempts.last() {
            println!(
                "   {id} #{} → {} ({})",
                f.number,
                last["agent_id"].as_str().unwrap_or("?"),
                last["placement"].as_str().unwrap_or("")
            );
        }
    }
    if state != seen.state {
        let why = match state.as_str() {
            "needs_info" => " — the issue is unclear; the status comment asks for details",
            "succeeded" | "failed" | "cancelled" => " — the agent's work is over",
            _ => "",
        };
        println!("   {id} #{} is {state}{why}", f.number);
        if let Some(tests) = attempts.last().and_then(|a| a.get("tests"))
            && tests["ran"] == Value::Bool(true)
            && matches!(state.as_str(), "succeeded" | "failed")
        {
            println!(
                "   {id} tests `{}` {} (exit {})",
                tests["command"].as_str().unwrap_or(""),
                if tests["passed"] == Value::Bool(true) {
                    "passed"
                } else {
                    "FAILED"
                },
                tests["exit_code"]
            );
        }
        seen.state = state.clone();
    }
    if !seen.followed && matches!(state.as_str(), "assigned" | "running") {
        seen.followed = true;
        if let Some(child) = follow_output(demo, id) {
            demo.followers.push(child);
        }
    }
    let pull = task["pull_request"].as_str().unwrap_or_default();
    if !pull.is_empty() && pull != seen.pull_request {
        let draft = task["pull_request_draft"] == Value::Bool(true);
        println!(
            "   {id} #{} opened {}pull request {pull}",
            f.number,
            if draft { "a DRAFT " } else { "" }
        );
        seen.pull_request = pull.to_owned();
    }
}

/// `ccc logs -f <id>`, its lines printed with the task's id as they come.
fn follow_output(demo: &Demo, id: &str) -> Option<Child> {
    let mut child = Command::new(bin("ccc"))
        .arg("--coordinator")
        .arg(demo.cluster.url())
        .arg("--certs-dir")
        .arg(&demo.cluster.pki.dir)
        .args(["logs", "-f", id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let id = id.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line: String = line.chars().take(110).collect();
            if !line.trim().is_empty() {
                println!("   {id} │ {line}");
            }
        }
    });
    Some(child)
}

/// Whether issue `f` ended as its `expect` says, with nothing left owed to
/// GitHub; if not, what is missing.
fn ended_as_expected(demo: &Demo, f: &Filed) -> Result<(), String> {
    let task = demo.cluster.task_json(&f.task)?;
    let state = task["state"].as_str().unwrap_or_default();
    let pending = task["pending_effects"]
        .as_array()
        .is_some_and(|p| !p.is_empty());
    let missing = |what: &str| Err(format!("#{} {}: {what} (state {state})", f.number, f.task));
    if pending {
        return missing("GitHub writes still pending");
    }
    let draft = task["pull_request_draft"] == Value::Bool(true);
    let has_pull = task["pull_request"].as_str().is_some_and(|p| !p.is_empty());
    match f.issue.expect.as_str() {
        "question" => {
            if state != "needs_info" {
                return missing("no question asked");
            }
            if status_comment(demo, f.number).is_none() {
                return missing("no status comment yet");
            }
            Ok(())
        }
        "pull request" if has_pull && !draft && state == "succeeded" => Ok(()),
        "draft pull request" if has_pull && draft => Ok(()),
        "pull request" | "draft pull request" => missing(&format!("no {}", f.issue.expect)),
        other => Err(format!("tests/demo/issues.toml: unknown expect {other:?}")),
    }
}

const STATUS_MARKER: &str = "<!-- claude-code-cluster:status -->";

/// The cluster's status comment on an issue.
fn status_comment(demo: &Demo, issue: u64) -> Option<String> {
    demo.github
        .comments(REPO, issue)
        .into_iter()
        .find(|c| c.body.starts_with(STATUS_MARKER))
        .map(|c| c.body)
}

/// Prints the tasks, the pull requests, the status comments and the pushed
/// branches; an error names any issue that did not end as expected.
fn summarize(demo: &Demo, filed: &[Filed]) -> Result<(), String> {
    say("tasks (`ccc tasks`):\n");
    print!("{}", demo.cluster.ccc_ok(&["tasks"]));
    say(&format!("pull requests on {REPO}:\n"));
    for pull in demo.github.pulls(REPO) {
        let head = pull.pull.as_ref().map_or("", |p| p.head_ref.as_str());
        let draft = pull.pull.as_ref().is_some_and(|p| p.draft);
        println!(
            "   #{} {}{} (branch {head})",
            pull.number,
            if draft { "[draft] " } else { "" },
            pull.title
        );
    }
    println!();
    say("status comments the cluster keeps on the issues (first lines):\n");
    for f in filed {
        let comment = status_comment(demo, f.number).unwrap_or_default();
        println!("   #{} {}", f.number, f.issue.title);
        for line in comment
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("<!--"))
            .take(4)
        {
            println!("      {}", line.chars().take(110).collect::<String>());
        }
    }
    println!();
    say(&format!(
        "branches the agents pushed to {}:\n",
        demo.bare.display()
    ));
    if let Ok(out) = Command::new("git")
        .args(["branch", "--list", "ccc/*"])
        .current_dir(&demo.bare)
        .output()
    {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!();
    let wrong: Vec<String> = filed
        .iter()
        .filter_map(|f| ended_as_expected(demo, f).err())
        .collect();
    if wrong.is_empty() {
        say(
            "every issue ended as expected: pull requests open (one a draft, its tests fail), one question asked",
        );
        Ok(())
    } else {
        Err(format!("not as expected: {}", wrong.join("; ")))
    }
}

fn where_to_look(demo: &Demo) {
    let ccc = format!(
        "{} --coordinator {} --certs-dir {}",
        bin("ccc").display(),
        demo.cluster.url(),
        demo.cluster.pki.dir.display()
    );
    let d = demo.cluster.pki.dir.display();
    let api = demo.github.url();
    say("where to look, from another terminal:");
    println!("   {ccc} top          # live view; Enter follows a task's log");
    println!("   {ccc} tasks");
    println!("   {ccc} task t-1");
    println!("   {ccc} logs t-1");
    println!("   {ccc} agents");
    println!("   curl -s {api}/repos/{REPO}/pulls          # the pull requests");
    println!("   curl -s {api}/repos/{REPO}/issues/1/comments   # a status comment");
    println!("   git -C {} log --oneline --all", demo.bare.display());
    println!(
        "   grpcurl -cacert {d}/ca.pem -cert {d}/admin-root.pem -key {d}/admin-root-key.pem {} list",
        demo.cluster
            .grpc_addr
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    say("press Ctrl-C to stop everything");
}
