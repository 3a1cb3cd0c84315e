//! A scripted stand-in for the `claude` CLI, for tests and the demo: it is
//! invoked exactly like the real CLI (`-p --output-format stream-json
//! --verbose ...` with the prompt on stdin or as an argument, the workspace
//! as working directory) and prints real-format stream-json events.
//!
//! What it does is read from the last `FAKE:` line in the prompt (the task's body,
//! where a follow-up's instructions come last),
//! e.g. `FAKE: lines=20 interval_ms=50 exit=1 result=error hang=1
//! write=notes.txt grandchild=1 stderr=2 binary=1 bulk_kb=1024`; unknown keys
//! are ignored. `binary=1` prints bytes that are not UTF-8; `bulk_kb=N`
//! prints N KiB of plain lines; `hijack_push=<url>` edits the workspace's
//! `.git/config` to send pushes of `origin` to `<url>`, as a hostile issue
//! could make a real CLI do; `hang=2` hangs even when orphaned (only a
//! signal ends it).
//!
//! Like the real CLI it answers `--version` and `auth status` (JSON with
//! `loggedIn`). While the file named by `FAKE_CLAUDE_LOGGED_OUT` exists it
//! is logged out: `auth status` says so (exit 1) and a run ends as the real
//! CLI's does ("Not logged in · Please run /login", exit 1). With
//! `FAKE_CLAUDE_PROMPTS` set to a directory, each run's prompt is kept there.
//!
//! With `FAKE_CLAUDE_PLAYS` naming a TOML file of plays (see
//! `tests/demo/plays.toml`), the first play whose `when` appears in the
//! prompt is acted out instead: its `say` steps are printed as the
//! assistant's text and its `write` steps change files of the workspace for
//! real, `pace_ms` apart; then it succeeds with the play's `result`.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// Writes the prompt into the directory named by `FAKE_CLAUDE_PROMPTS`
/// (one file per run), so a test can read what the CLI was given.
fn keep_prompt(prompt: &str) {
    let Ok(dir) = std::env::var("FAKE_CLAUDE_PROMPTS") else {
        return;
    };
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("prompt-{}-{}.txt", std::process::id(), prompt.len());
    let _ = std::fs::write(std::path::Path::new(&dir).join(name), prompt);
}

/// Appends `<what> <unix nanos>` to the file named by `FAKE_CLAUDE_LOG`, so a
/// test can tell how many runs overlapped.
fn log_run(what: &str) {
    let Ok(path) = std::env::var("FAKE_CLAUDE_LOG") else {
        return;
    };
    #[allow(clippy::disallowed_methods)] // a stand-in process stamping its runs
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{what} {now}");
    }
}

/// A file of plays (`FAKE_CLAUDE_PLAYS`).
#[derive(serde::Deserialize)]
struct Plays {
    #[serde(default)]
    pace_ms: u64,
    #[serde(default)]
    play: Vec<Play>,
}

#[derive(serde::Deserialize)]
struct Play {
    when: String,
    result: String,
    #[serde(default)]
    step: Vec<Step>,
}

/// One step of a play: something said, or a file written.
#[derive(serde::Deserialize)]
struct Step {
    say: Option<String>,
    write: Option<String>,
    #[serde(default)]
    content: String,
}

/// The first play of `FAKE_CLAUDE_PLAYS` whose `when` the prompt contains,
/// and the pace; a file that cannot be read or parsed ends the run, as a
/// broken test setup should.
fn find_play(prompt: &str) -> Option<(Play, Duration)> {
    let path = std::env::var_os("FAKE_CLAUDE_PLAYS")?;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("fake-claude: cannot read {}: {e}", path.display());
        std::process::exit(2);
    });
    let plays: Plays = toml::from_str(&text).unwrap_or_else(|e| {
        eprintln!("fake-claude: {}: {e}", path.display());
        std::process::exit(2);
    });
    let prompt = prompt.to_lowercase();
    let pace = Duration::from_millis(plays.pace_ms);
    plays
        .play
        .into_iter()
        .find(|p| prompt.contains(&p.when.to_lowercase()))
        .map(|p| (p, pace))
}

/// Acts a play out: its steps as stream-json events (files written for
/// real), then a successful result.
fn act(play: &Play, pace: Duration, out: &mut impl Write, session: &str, started: Instant) {
    for step in &play.step {
        if let Some(text) = &step.say {
            emit(
                out,
                serde_json::json!({
                    "type": "assistant", "session_id": session,
                    "message": {"content": [{"type": "text", "text": text}]},
                }),
            );
        }
        if let Some(file) = &step.write {
            let tool = if std::path::Path::new(file).exists() {
                "Edit"
            } else {
                "Write"
            };
            emit(
                out,
                serde_json::json!({
                    "type": "assistant", "session_id": session,
                    "message": {"content": [{"type": "tool_use", "name": tool, "input": {"file_path": file}}]},
                }),
            );
            if let Some(dir) = std::path::Path::new(file).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::write(file, &step.content) {
                eprintln!("fake-claude: cannot write {file}: {e}");
                std::process::exit(1);
            }
        }
        std::thread::sleep(pace);
    }
    let turns = play.step.len();
    emit(
        out,
        serde_json::json!({
            "type": "result", "subtype": "success", "is_error": false,
            "num_turns": turns, "duration_ms": started.elapsed().as_millis() as u64,
            "duration_api_ms": 0, "total_cost_usd": 0.0123 * turns as f64, "session_id": session,
            "result": play.result, "permission_denials": [],
            "modelUsage": {"fake-model": {"inputTokens": 10, "outputTokens": 5, "costUSD": 0.0123 * turns as f64}},
        }),
    );
}

/// One stream-json event: a JSON object on a line, flushed at once.
fn emit(out: &mut impl Write, value: serde_json::Value) {
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("2.1.332 (Claude Code)");
        return;
    }
    let logged_out = std::env::var_os("FAKE_CLAUDE_LOGGED_OUT")
        .is_some_and(|flag| std::path::Path::new(&flag).exists());
    if args.first().is_some_and(|a| a == "auth") && args.get(1).is_some_and(|a| a == "status") {
        let status = if logged_out {
            serde_json::json!({"loggedIn": false, "authMethod": "none", "apiProvider": "firstParty"})
        } else {
            serde_json::json!({"loggedIn": true, "authMethod": "api_key", "apiProvider": "firstParty"})
        };
        println!("{status:#}");
        std::process::exit(i32::from(logged_out));
    }
    // Only runs are logged: `--version` and `auth status` are checks.
    log_run("start");
    // Like the real CLI: the prompt argument after `-p`, else all of stdin.
    let prompt = match args
        .iter()
        .position(|a| a == "-p" || a == "--print")
        .and_then(|i| args.get(i + 1))
        .filter(|next| !next.starts_with('-'))
    {
        Some(prompt) => prompt.clone(),
        None => {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text);
            text
        }
    };
    keep_prompt(&prompt);
    let stream_json = args
        .windows(2)
        .any(|w| w[0] == "--output-format" && w[1] == "stream-json");
    if stream_json && !args.iter().any(|a| a == "--verbose") {
        eprintln!("Error: When using --print, --output-format=stream-json requires --verbose");
        std::process::exit(1);
    }
    let script: HashMap<String, String> = prompt
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("FAKE:"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let num = |key: &str, default: u64| {
        script
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    #[allow(clippy::disallowed_methods)] // a stand-in process timing itself
    let started = Instant::now();
    let session = format!("fake-{}", std::process::id());
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    emit(
        &mut out,
        serde_json::json!({
            "type": "system", "subtype": "init", "session_id": session, "cwd": cwd,
            "model": "fake-model", "tools": ["Write", "Edit", "Read", "Bash"],
            "permissionMode": args.windows(2).find(|w| w[0] == "--permission-mode").map(|w| w[1].clone()),
            "claude_code_version": "2.1.332",
        }),
    );
    if logged_out {
        let text = "Not logged in · Please run /login";
        emit(
            &mut out,
            serde_json::json!({
                "type": "result", "subtype": "success", "is_error": true, "api_error_status": null,
                "num_turns": 1, "duration_ms": 1, "duration_api_ms": 0, "total_cost_usd": 0,
                "session_id": session, "result": text, "permission_denials": [],
            }),
        );
        log_run("end");
        std::process::exit(1);
    }
    if let Some((play, pace)) = find_play(&prompt) {
        act(&play, pace, &mut out, &session, started);
        log_run("end");
        return;
    }
    if num("grandchild", 0) == 1 {
        // A process of its own group that outlives nothing: killing the
        // group must take it down too. Its pid is printed for the test.
        if let Ok(child) = std::process::Command::new("sleep").arg("1000").spawn() {
            emit(
                &mut out,
                serde_json::json!({"type": "system", "subtype": "grandchild", "pid": child.id()}),
            );
        }
    }
    if let Some(url) = script.get("hijack_push") {
        let config = std::fs::read_to_string(".git/config").unwrap_or_default();
        let origin = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("url = "))
            .unwrap_or_default()
            .to_owned();
        let _ = std::fs::write(
            ".git/config",
            format!(
                "{config}[remote \"origin\"]\n\tpushurl = {url}\n[url \"{url}\"]\n\tpushInsteadOf = {origin}\n\tinsteadOf = {origin}\n"
            ),
        );
    }
    if let Some(file) = script.get("write") {
        let _ = std::fs::write(
            file,
            format!(
                "written by fake-claude for: {}\n",
                prompt.lines().next().unwrap_or("")
            ),
        );
        emit(
            &mut out,
            serde_json::json!({
                "type": "assistant", "session_id": session,
                "message": {"content": [{"type": "tool_use", "name": "Write", "input": {"file_path": file}}]},
            }),
        );
    }
    for _ in 0..num("stderr", 0) {
        eprintln!("fake-claude: a line on stderr");
    }
    if num("binary", 0) == 1 {
        let _ = out.write_all(b"binary:\xff\xfe caf\xe9 \x00\x01 end\n");
        let _ = out.flush();
    }
    let bulk_kb = num("bulk_kb", 0);
    if bulk_kb > 0 {
        // 1 KiB lines: 1023 characters and a newline.
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..bulk_kb {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
    let lines = num("lines", 3);
    for i in 1..=lines {
        emit(
            &mut out,
            serde_json::json!({
                "type": "assistant", "session_id": session,
                "message": {"content": [{"type": "text", "text": format!("working, step {i} of {lines}")}]},
            }),
        );
        std::thread::sleep(Duration::from_millis(num("interval_ms", 0)));
    }
    if num("hang", 0) == 2 {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if num("hang", 0) == 1 {
        // Until stopped, or orphaned (its agent was killed): a test's
        // stand-in never outlives the test.
        let parent = std::os::unix::process::parent_id();
        while std::os::unix::process::parent_id() == parent {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::process::exit(1);
    }
    let exit = i32::try_from(num("exit", 0)).unwrap_or(1);
    let subtype = script.get("result").cloned().unwrap_or_else(|| {
        if exit == 0 {
            "success".into()
        } else {
            "error_during_execution".into()
        }
    });
    if subtype != "none" {
        emit(
            &mut out,
            serde_json::json!({
                "type": "result", "subtype": subtype, "is_error": exit != 0,
                "num_turns": lines, "duration_ms": started.elapsed().as_millis() as u64,
                "duration_api_ms": 0, "total_cost_usd": 0.0123, "session_id": session,
                "result": if exit == 0 { "done".to_owned() } else { format!("failed as scripted ({subtype})") },
                "permission_denials": [],
                "modelUsage": {"fake-model": {"inputTokens": 10, "outputTokens": 5, "costUSD": 0.0123}},
            }),
        );
    }
    log_run("end");
    std::process::exit(exit);
}
